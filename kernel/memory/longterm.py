"""Long-term memory: key-value records with tags, full-text searchable.

A namespace is the kernel's choice ("pid:12", "agent:alice", "shared:team");
values are strings or anything JSON can encode. The records live in the
memory manager's database beside the contexts; the syscall layer reaches
them as ``kernel.memory.mem_put(...)`` and so on (see ContextStore).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from llmagentos.kernel.memory.db import (
    MAX_NAME,
    WORD,
    Database,
    check_int,
    check_str,
    fts_any,
    fts_terms,
)
from llmagentos.syscalls.errno import SyscallError

MAX_KEY = 1024
MAX_VALUE_BYTES = 1 << 20  # one value, JSON-encoded
MAX_TAGS = 32

_COLS = "m.namespace, m.key, m.value, m.tags, m.created, m.updated"


def _memory(row: tuple) -> dict[str, Any]:
    namespace, key, value, tags, created, updated = row[:6]
    return {
        "namespace": namespace,
        "key": key,
        "value": json.loads(value),
        "tags": json.loads(tags),
        "created": created,
        "updated": updated,
    }


def _tags(tags: Iterable[str] | None) -> list[str]:
    """``tags`` sorted and deduplicated; EINVAL unless a collection of strings."""
    if tags is None:
        return []
    if isinstance(tags, (str, bytes)) or not isinstance(tags, Iterable):
        raise SyscallError("EINVAL", f"tags must be a list of strings, not {type(tags).__name__}")
    return sorted({check_str(t, "tag", MAX_NAME) for t in tags})


def _tag_filter(tags: Iterable[str] | None) -> tuple[str, list]:
    """SQL (and its arguments) keeping the memories ``m`` that have all ``tags``."""
    want = _tags(tags)
    if not want:
        return "", []
    marks = ", ".join("?" * len(want))
    sql = (
        f" AND m.id IN (SELECT mem FROM memory_tags WHERE tag IN ({marks})"
        f" GROUP BY mem HAVING count(*) = {len(want)})"
    )
    return sql, want


class LongTermMemory:
    """The mem.* records of ``db``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def put(
        self, namespace: str, key: str, value: Any, tags: Iterable[str] | None = None
    ) -> bool:
        """Store ``value`` (a string or anything JSON can encode) under
        ``namespace``/``key`` with ``tags``, replacing what was there.
        Returns True if the key is new."""
        check_str(namespace, "namespace", MAX_NAME)
        check_str(key, "key", MAX_KEY)
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise SyscallError("EINVAL", f"value is not JSON-encodable: {e}") from None
        if len(text.encode()) > MAX_VALUE_BYTES:
            raise SyscallError("EDQUOT", f"value is over {MAX_VALUE_BYTES} bytes")
        tag_list = _tags(tags)
        if len(tag_list) > MAX_TAGS:
            raise SyscallError("EINVAL", f"at most {MAX_TAGS} tags")
        now = time.time()
        with self._db.tx() as db:
            old = db.execute(
                "SELECT id FROM memories WHERE namespace = ? AND key = ?", (namespace, key)
            ).fetchone()
            if old is None:
                mid = db.execute(
                    "INSERT INTO memories(namespace, key, value, tags, created, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (namespace, key, text, json.dumps(tag_list), now, now),
                ).lastrowid
            else:
                mid = old[0]
                db.execute(
                    "UPDATE memories SET value = ?, tags = ?, updated = ? WHERE id = ?",
                    (text, json.dumps(tag_list), now, mid),
                )
                db.execute("DELETE FROM memory_tags WHERE mem = ?", (mid,))
            db.executemany(
                "INSERT INTO memory_tags(tag, mem) VALUES (?, ?)", [(t, mid) for t in tag_list]
            )
        return old is None

    def get(self, namespace: str, key: str) -> dict[str, Any]:
        """{namespace, key, value, tags, created, updated}; ENOENT if absent."""
        check_str(namespace, "namespace")
        check_str(key, "key")
        row = self._db.row(
            f"SELECT {_COLS} FROM memories m WHERE namespace = ? AND key = ?", (namespace, key)
        )
        if row is None:
            raise SyscallError("ENOENT", f"no memory {key!r} in {namespace!r}")
        return _memory(row)

    def delete(self, namespace: str, key: str) -> None:
        check_str(namespace, "namespace")
        check_str(key, "key")
        with self._db.tx() as db:
            cur = db.execute(
                "DELETE FROM memories WHERE namespace = ? AND key = ?", (namespace, key)
            )
            if cur.rowcount == 0:
                raise SyscallError("ENOENT", f"no memory {key!r} in {namespace!r}")

    def drop(self, namespace: str) -> int:
        """Remove the whole ``namespace``; returns how many memories it held."""
        check_str(namespace, "namespace", MAX_NAME)
        with self._db.tx() as db:
            return db.execute("DELETE FROM memories WHERE namespace = ?", (namespace,)).rowcount

    def keys(self, namespace: str, tags: Iterable[str] | None = None) -> list[dict]:
        """Keys of ``namespace`` (having all ``tags``), newest first, without values:
        {key, tags, updated}."""
        check_str(namespace, "namespace")
        where, args = _tag_filter(tags)
        rows = self._db.rows(
            "SELECT key, tags, updated FROM memories m WHERE namespace = ?"
            f"{where} ORDER BY updated DESC, id DESC",
            (namespace, *args),
        )
        return [{"key": k, "tags": json.loads(t), "updated": u} for k, t, u in rows]

    def search(
        self, namespace: str, query: str, k: int = 5, tags: Iterable[str] | None = None
    ) -> list[dict[str, Any]]:
        """The ``k`` memories of ``namespace`` (having all ``tags``) that best
        match ``query`` by bm25 over key, value and tags; each a get() dict
        plus ``score``. A query without words lists the newest instead."""
        check_str(namespace, "namespace")
        if not isinstance(query, str):
            raise SyscallError("EINVAL", "query must be a string")
        check_int(k, "k", 1)
        where, args = _tag_filter(tags)
        terms = fts_terms(query)
        if terms:
            # The namespace as one FTS5 string (quotes doubled): tokenized exactly
            # as it was indexed. The join on m.namespace is what makes it exact.
            quoted = namespace.replace('"', '""')
            ns = f'ns : "{quoted}" AND ' if WORD.search(namespace) else ""
            rows = self._db.rows(
                f"SELECT {_COLS}, bm25(memories_fts, 0.0, 2.0, 1.0, 1.0) AS r"
                " FROM memories_fts JOIN memories m ON m.id = memories_fts.rowid"
                f" WHERE memories_fts MATCH ? AND m.namespace = ?{where}"
                " ORDER BY r LIMIT ?",
                (f"{ns}{{key value tags}} : {fts_any(terms)}", namespace, *args, k),
            )
        else:
            rows = self._db.rows(
                f"SELECT {_COLS}, 0.0 FROM memories m WHERE namespace = ?{where}"
                " ORDER BY updated DESC, id DESC LIMIT ?",
                (namespace, *args, k),
            )
        out = []
        for row in rows:
            m = _memory(row)
            m["score"] = -row[6]
            out.append(m)
        return out
