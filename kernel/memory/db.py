"""The memory manager's connection to its SQLite file, and what its parts share.

One ``Database`` (a ``sqlite3.Connection`` with a lock) serves contexts, the
archive, long-term memory and the owner records. It may be used from the trio
thread and from worker threads: every use holds ``lock``, so calls are
serialised. It is in autocommit mode; a write is one ``tx()``, several reads
that must agree are one ``read_tx()``.

Durability: WAL with ``synchronous=FULL`` fsyncs the log on every commit, so
a call that returned after its commit survives a crash of the process or of
the machine; a write that raises rolls back and leaves nothing behind.

Also here, for every part: the argument checks (bad input is EINVAL with a
message), a message row as the dict callers get, and the turning of arbitrary
text into a safe FTS5 query.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llmagentos.kernel.memory.schema import migrate
from llmagentos.syscalls.errno import SyscallError

MAX_NAME = 255  # an owner, a context name, a namespace, a tag
MAX_QUERY_TERMS = 16


class Database(sqlite3.Connection):
    """The shared connection (make one with ``connect``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            super().close()

    @contextmanager
    def tx(self) -> Iterator[Database]:
        """A write transaction: all or nothing, committed (fsynced) on exit."""
        with self.lock:
            self.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self.execute("ROLLBACK")
                raise
            self.execute("COMMIT")

    @contextmanager
    def read_tx(self) -> Iterator[Database]:
        """A read transaction: several SELECTs see one state."""
        with self.lock:
            self.execute("BEGIN")
            try:
                yield self
            finally:
                self.execute("COMMIT")

    def row(self, sql: str, args: tuple = ()) -> tuple | None:
        """The first row of one SELECT, on its own."""
        with self.lock:
            return self.execute(sql, args).fetchone()

    def rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Every row of one SELECT, on its own."""
        with self.lock:
            return self.execute(sql, args).fetchall()


def connect(path: str | os.PathLike[str]) -> Database:
    """Open (creating if needed) the database at ``path``, migrated to the
    current schema (schema.SchemaTooNew if it is newer than this code)."""
    path = os.fspath(path)
    db = sqlite3.connect(path, factory=Database, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal" and path != ":memory:":
            raise RuntimeError(f"cannot put {path!r} in WAL mode (got {mode!r})")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db


# -- argument checks ------------------------------------------------------------


_INT64 = range(-(2**63), 2**63)  # what SQLite stores; the wire carries up to 2**64 - 1


def check_int(value: object, what: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SyscallError("EINVAL", f"{what} must be an integer, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise SyscallError("EINVAL", f"{what} must be >= {minimum}, got {value}")
    if value not in _INT64:
        raise SyscallError("EINVAL", f"{what} must be a 64-bit signed integer, got {value}")
    return value


def check_str(value: object, what: str, max_len: int | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise SyscallError("EINVAL", f"{what} must be a non-empty string")
    if max_len is not None and len(value) > max_len:
        raise SyscallError("EINVAL", f"{what} is longer than {max_len} characters")
    return value


# -- message rows -----------------------------------------------------------------

MSG_COLS = "seq, role, kind, content, tokens, pinned, state, created"


def message(row: tuple) -> dict[str, Any]:
    """A row selected as MSG_COLS, as callers see a message."""
    seq, role, kind, content, tokens, pinned, state, created = row[:8]
    return {
        "seq": seq,
        "role": role,
        "kind": kind,
        "content": content,
        "tokens": tokens,
        "pinned": bool(pinned),
        "state": state,
        "created": created,
    }


# -- full-text queries ------------------------------------------------------------

# Words that match nearly every message: dropping them keeps bm25 work bounded
# by the rare terms that carry the query ("what is the vault code" -> vault, code).
_STOPWORDS = frozenset(
    """a an and are as at be been but by can could did do does for from had has have he her
    him his how i if in into is it its me my no not of on or our she so than that the their
    them then there these they this those to us was we were what when where which who whom
    why will with would you your""".split()  # noqa: SIM905 (a word list reads better so)
)
WORD = re.compile(r"\w+")


def fts_terms(text: str) -> list[str]:
    """The searchable words of arbitrary text: lowercased, deduplicated, stopwords
    dropped (unless that leaves nothing), at most MAX_QUERY_TERMS."""
    words = []
    for w in WORD.findall(text.lower()):
        w = w.strip("_")
        if w and w not in words:
            words.append(w)
    content = [w for w in words if w not in _STOPWORDS]
    return (content or words)[:MAX_QUERY_TERMS]


def fts_any(terms: list[str]) -> str:
    """An FTS5 expression matching any of ``terms``. Each term is a quoted
    string, so operators (AND, NEAR, *, ^, parentheses, column filters) in
    user text are inert; ``\\w+`` words never contain a double quote."""
    return "(" + " OR ".join(f'"{t}"' for t in terms) + ")"
