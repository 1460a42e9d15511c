"""Long-term memory: key-value records with tags, full-text searchable.

A namespace is the kernel's choice ("pid:12", "agent:alice", "shared:team");
values are strings or anything JSON can encode. It shares the context
store's SQLite database and lock: `ContextStore` mixes this class in, and
the kernel reaches it as `kernel.memory.mem_put(...)` and so on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from llmagentos.kernel.store import (
    _WORD,
    MAX_KEY,
    MAX_NAME,
    MAX_TAGS,
    MAX_VALUE_BYTES,
    _check_int,
    _check_str,
    _err,
    fts_any,
    fts_terms,
)


class LongTermMemory:
    """Needs the host's ``_db``, ``_lock`` and ``_tx()`` (see ContextStore)."""

    def mem_put(
        self, namespace: str, key: str, value: Any, tags: Iterable[str] | None = None
    ) -> bool:
        """Store ``value`` (a string or anything JSON can encode) under
        ``namespace``/``key`` with ``tags``, replacing what was there.
        Returns True if the key is new."""
        _check_str(namespace, "namespace", MAX_NAME)
        _check_str(key, "key", MAX_KEY)
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise _err("EINVAL", f"value is not JSON-encodable: {e}") from None
        if len(text.encode()) > MAX_VALUE_BYTES:
            raise _err("EDQUOT", f"value is over {MAX_VALUE_BYTES} bytes")
        if isinstance(tags, str):
            raise _err("EINVAL", "tags must be a list of strings, not a string")
        tag_list = sorted({_check_str(t, "tag", MAX_NAME) for t in tags or ()})
        if len(tag_list) > MAX_TAGS:
            raise _err("EINVAL", f"at most {MAX_TAGS} tags")
        now = time.time()
        with self._tx() as db:
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

    @staticmethod
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

    def mem_get(self, namespace: str, key: str) -> dict[str, Any]:
        """{namespace, key, value, tags, created, updated}; ENOENT if absent."""
        _check_str(namespace, "namespace")
        _check_str(key, "key")
        with self._lock:
            row = self._db.execute(
                "SELECT namespace, key, value, tags, created, updated FROM memories"
                " WHERE namespace = ? AND key = ?",
                (namespace, key),
            ).fetchone()
        if row is None:
            raise _err("ENOENT", f"no memory {key!r} in {namespace!r}")
        return self._memory(row)

    def mem_delete(self, namespace: str, key: str) -> None:
        _check_str(namespace, "namespace")
        _check_str(key, "key")
        with self._tx() as db:
            if (
                db.execute(
                    "DELETE FROM memories WHERE namespace = ? AND key = ?", (namespace, key)
                ).rowcount
                == 0
            ):
                raise _err("ENOENT", f"no memory {key!r} in {namespace!r}")

    def mem_drop(self, namespace: str) -> int:
        """Remove the whole ``namespace``; returns how many memories it held."""
        _check_str(namespace, "namespace", MAX_NAME)
        with self._tx() as db:
            return db.execute("DELETE FROM memories WHERE namespace = ?", (namespace,)).rowcount

    def mem_list(self, namespace: str, tags: Iterable[str] | None = None) -> list[dict]:
        """Keys of ``namespace`` (having all ``tags``), newest first, without values:
        {key, tags, updated}."""
        _check_str(namespace, "namespace")
        where, args = self._tag_filter(tags)
        with self._lock:
            rows = self._db.execute(
                "SELECT key, tags, updated FROM memories m WHERE namespace = ?"
                f"{where} ORDER BY updated DESC, id DESC",
                (namespace, *args),
            ).fetchall()
        return [{"key": k, "tags": json.loads(t), "updated": u} for k, t, u in rows]

    @staticmethod
    def _tag_filter(tags: Iterable[str] | None) -> tuple[str, list]:
        if tags is None:
            return "", []
        if isinstance(tags, str):
            raise _err("EINVAL", "tags must be a list of strings, not a string")
        want = sorted({_check_str(t, "tag", MAX_NAME) for t in tags})
        if not want:
            return "", []
        marks = ", ".join("?" * len(want))
        sql = (
            f" AND m.id IN (SELECT mem FROM memory_tags WHERE tag IN ({marks})"
            f" GROUP BY mem HAVING count(*) = {len(want)})"
        )
        return sql, want

    def mem_search(
        self, namespace: str, query: str, k: int = 5, tags: Iterable[str] | None = None
    ) -> list[dict[str, Any]]:
        """The ``k`` memories of ``namespace`` (having all ``tags``) that best
        match ``query`` by bm25 over key, value and tags; each a mem_get dict
        plus ``score``. A query without words lists the newest instead."""
        _check_str(namespace, "namespace")
        if not isinstance(query, str):
            raise _err("EINVAL", "query must be a string")
        _check_int(k, "k", 1)
        where, args = self._tag_filter(tags)
        cols = "m.namespace, m.key, m.value, m.tags, m.created, m.updated"
        terms = fts_terms(query)
        with self._lock:
            if terms:
                # The namespace as one FTS5 string (quotes doubled): tokenized exactly
                # as it was indexed. The join on m.namespace is what makes it exact.
                quoted = namespace.replace('"', '""')
                ns = f'ns : "{quoted}" AND ' if _WORD.search(namespace) else ""
                rows = self._db.execute(
                    f"SELECT {cols}, bm25(memories_fts, 0.0, 2.0, 1.0, 1.0) AS r"
                    " FROM memories_fts JOIN memories m ON m.id = memories_fts.rowid"
                    f" WHERE memories_fts MATCH ? AND m.namespace = ?{where}"
                    " ORDER BY r LIMIT ?",
                    (f"{ns}{{key value tags}} : {fts_any(terms)}", namespace, *args, k),
                ).fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT {cols}, 0.0 FROM memories m WHERE namespace = ?{where}"
                    " ORDER BY updated DESC, id DESC LIMIT ?",
                    (namespace, *args, k),
                ).fetchall()
        out = []
        for row in rows:
            m = self._memory(row)
            m["score"] = -row[6]
            out.append(m)
        return out
