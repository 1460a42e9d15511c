"""Shared blocks: named pieces of context that several agents read, write and attach.

A block is a name, a text and a version. Each write replaces the whole text
and takes the next version, in one transaction, so a read (one SELECT of one
row) sees exactly one version, never a mix of two writes. A write may be made
conditional on the version the writer last read (compare-and-set): if another
write came first it fails with EAGAIN and changes nothing, and the writer
re-reads and retries.

A context may have blocks attached: generation from that context shows each
block's current version before the conversation (kernel/sysctx.py). An
attachment goes with its context or its block.

Who may read and write a block is decided by capabilities, outside this
store (kernel/perms.py); it only checks names, sizes and versions.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from llmagentos.kernel.memory.db import Database
from llmagentos.syscalls.errno import SyscallError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_TEXT_BYTES = 64 * 1024  # one block; it is shown whole in every generation
MAX_BLOCKS = 4096
MAX_ATTACHED = 16  # blocks attached to one context

_COLS = "name, version, text, created, updated, writer"


def check_name(name: object) -> str:
    """Block names are also capability suffixes (ctx.block.read:NAME): no glob
    characters, no ':' and no spaces."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SyscallError("EINVAL", f"block name {name!r:.80} must be 1..128 of letters, digits, "
                                     "'_', '.', '-', starting with a letter or digit")
    return name


def _row(r: tuple, text: bool = True) -> dict[str, Any]:
    out = {"name": r[0], "version": r[1], "size": len(r[2].encode()), "created": r[3],
           "updated": r[4], "writer": r[5]}
    if text:
        out["text"] = r[2]
    return out


class BlockStore:
    """The blocks and attachments of the memory database ``db``. ``ctx_of(db,
    ctx, owner)`` is the context store's lookup (ENOENT, EACCES by owner)."""

    def __init__(self, db: Database, ctx_of: Callable[[Database, Any, str | None], Any]) -> None:
        self._db = db
        self._ctx_of = ctx_of

    def _get(self, db: Database, name: str) -> tuple:
        r = db.execute(f"SELECT {_COLS} FROM blocks WHERE name = ?", (name,)).fetchone()
        if r is None:
            raise SyscallError("ENOENT", f"no block named {name!r}")
        return r

    def open(self, name: str, create: bool, writer: str) -> dict[str, Any]:
        """The block's stat; with ``create``, made empty (version 0) if missing."""
        check_name(name)
        with self._db.tx() as db:
            r = db.execute(f"SELECT {_COLS} FROM blocks WHERE name = ?", (name,)).fetchone()
            if r is None:
                if not create:
                    raise SyscallError("ENOENT", f"no block named {name!r}")
                if db.execute("SELECT count(*) FROM blocks").fetchone()[0] >= MAX_BLOCKS:
                    raise SyscallError("ENOSPC", f"there are {MAX_BLOCKS} blocks already; "
                                                 "delete some first")
                now = time.time()
                db.execute("INSERT INTO blocks(name, version, text, created, updated, writer)"
                           " VALUES (?, 0, '', ?, ?, ?)", (name, now, now, writer))
                r = (name, 0, "", now, now, writer)
        return _row(r, text=False)

    def read(self, name: str) -> dict[str, Any]:
        """One whole version: name, version, text, size, created, updated, writer."""
        check_name(name)
        with self._db.lock:
            return _row(self._get(self._db, name))

    def write(self, name: str, text: str, expect_version: int | None,
              writer: str) -> dict[str, Any]:
        """Replace the text; the new version's stat. EAGAIN (nothing written) if
        ``expect_version`` is given and is no longer the current version."""
        check_name(name)
        if not isinstance(text, str):
            raise SyscallError("EINVAL", "a block's text must be a string")
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_TEXT_BYTES:
            raise SyscallError("E2BIG", f"a block holds at most {MAX_TEXT_BYTES} bytes, "
                                        f"not {size}")
        with self._db.tx() as db:
            version = self._get(db, name)[1]
            if expect_version is not None and expect_version != version:
                raise SyscallError("EAGAIN", f"block {name!r} is at version {version}, not "
                                             f"{expect_version}: read it again and retry")
            now = time.time()
            db.execute("UPDATE blocks SET version = ?, text = ?, updated = ?, writer = ?"
                       " WHERE name = ?", (version + 1, text, now, writer, name))
            return _row(self._get(db, name), text=False)

    def delete(self, name: str) -> None:
        check_name(name)
        with self._db.tx() as db:
            self._get(db, name)
            db.execute("DELETE FROM blocks WHERE name = ?", (name,))  # attachments cascade

    def list(self, ctx: int | None = None, *, owner: str | None = None) -> list[dict[str, Any]]:
        """Every block's stat, by name, and whether it is attached to ``ctx``."""
        with self._db.read_tx() as db:
            on: set[str] = set()
            if ctx is not None:
                c = self._ctx_of(db, ctx, owner)
                on = {r[0] for r in db.execute(
                    "SELECT block FROM block_attachments WHERE ctx = ?", (c.id,))}
            rows = db.execute(f"SELECT {_COLS} FROM blocks ORDER BY name").fetchall()
        return [{**_row(r, text=False), "attached": r[0] in on} for r in rows]

    # -- attachments -------------------------------------------------------------------
    def attach(self, ctx: int, name: str, *, owner: str | None) -> None:
        check_name(name)
        with self._db.tx() as db:
            c = self._ctx_of(db, ctx, owner)
            self._get(db, name)
            n = db.execute("SELECT count(*) FROM block_attachments WHERE ctx = ? AND block != ?",
                           (c.id, name)).fetchone()[0]
            if n >= MAX_ATTACHED:
                raise SyscallError("EMFILE", f"context {c.id} has {MAX_ATTACHED} blocks "
                                             "attached already")
            db.execute("INSERT OR IGNORE INTO block_attachments(ctx, block, attached)"
                       " VALUES (?, ?, ?)", (c.id, name, time.time()))

    def detach(self, ctx: int, name: str, *, owner: str | None) -> None:
        check_name(name)
        with self._db.tx() as db:
            c = self._ctx_of(db, ctx, owner)
            if not db.execute("DELETE FROM block_attachments WHERE ctx = ? AND block = ?",
                              (c.id, name)).rowcount:
                raise SyscallError("ENOENT", f"block {name!r} is not attached to context {c.id}")

    def attached(self, ctx: int, *, owner: str | None) -> list[dict[str, Any]]:
        """The blocks attached to ``ctx``, whole, in the order they were attached:
        one snapshot, so two blocks written together are seen together."""
        with self._db.read_tx() as db:
            c = self._ctx_of(db, ctx, owner)
            rows = db.execute(
                f"SELECT {', '.join('b.' + k.strip() for k in _COLS.split(','))}"
                " FROM block_attachments a JOIN blocks b ON b.name = a.block"
                " WHERE a.ctx = ? ORDER BY a.attached, a.block", (c.id,)).fetchall()
        return [_row(r) for r in rows]
