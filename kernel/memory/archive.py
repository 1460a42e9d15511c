"""Archive search: finding a context's messages, live or paged out, by words and by meaning.

Words: the query is reduced to terms and matched against the FTS5 index
(bm25). Meaning: with an ``embed`` hook, archived messages get a vector in
the background (``embed_pending``) and the query's nearest vectors by cosine
similarity are fused with the FTS ranking by reciprocal rank. Each
context's unit vectors are cached in RAM until its archive changes.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

from llmagentos.kernel.memory.db import (
    MSG_COLS,
    Database,
    check_int,
    fts_any,
    fts_terms,
    message,
)

Embed = Callable[[list[str]], list[list[float]]]

_RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009)
_COMMON_DF = 1000  # a search term in this many messages only scores, never selects


class Archive:
    """Search over the messages of ``db``; vectors from ``embed`` when given."""

    def __init__(self, db: Database, embed: Embed | None = None) -> None:
        self._db = db
        self._embed = embed
        self._vectors: dict[int, tuple[Any, Any]] = {}  # ctx -> (row ids, unit matrix)

    def query_vector(self, query: str) -> list[float] | None:
        """The query's vector, None without a hook. It may be slow: call it
        before taking the lock."""
        if self._embed is None or not query.strip():
            return None
        return self._embed([query])[0]

    def search(
        self,
        db: Database,
        ctx: int,
        query: str,
        k: int,
        qvec: list[float] | None,
    ) -> list[dict[str, Any]]:
        """The ``k`` best matches in context ``ctx``, within the caller's read
        transaction ``db`` (which has checked the caller may read ``ctx``).
        Without ``qvec`` the score is -bm25; with it, the fused reciprocal rank."""
        depth = max(4 * k, 20)
        terms = fts_terms(query)
        fts: list[tuple] = []
        match = self._match(db, ctx, terms) if terms else None
        if match:
            fts = db.execute(
                "SELECT m.id, bm25(messages_fts, 0.0, 1.0) AS r FROM messages_fts"
                " JOIN messages m ON m.id = messages_fts.rowid"
                " WHERE messages_fts MATCH ? AND m.ctx = ? ORDER BY r LIMIT ?",
                (match, ctx, depth),
            ).fetchall()
        if qvec is None:
            scores = {mid: -r for mid, r in fts}
        else:
            scores = {}
            for rank, (mid, _) in enumerate(fts):
                scores[mid] = 1.0 / (_RRF_K + rank + 1)
            for rank, mid in enumerate(self._nearest(db, ctx, qvec, depth)):
                scores[mid] = scores.get(mid, 0.0) + 1.0 / (_RRF_K + rank + 1)
        best = sorted(scores, key=scores.__getitem__, reverse=True)[:k]
        out = []
        for mid in best:
            row = db.execute(f"SELECT {MSG_COLS} FROM messages WHERE id = ?", (mid,)).fetchone()
            if row is None:
                continue
            m = message(row)
            m["score"] = scores[mid]
            m["archived"] = m["state"] == "archived"
            out.append(m)
        return out

    @staticmethod
    def _match(db: Database, ctx: int, terms: list[str]) -> str | None:
        """The FTS5 expression for ``terms`` within context ``ctx``, or None if
        no term occurs there.

        bm25 scores every row an expression matches, and a term found in most
        messages matches a whole large archive (80 ms at 100k rows). So a term
        in _COMMON_DF or more of the context's messages only *scores* when the
        query also has rarer terms: those select the rows, and ``(ctx OR
        common)`` seeks into the common doclists for just those rows, ranking
        them exactly as the plain OR would. The price: a message that has only
        common terms of such a query is not returned. Absent terms are dropped.
        """
        probe = (
            "SELECT count(*) FROM (SELECT 1 FROM messages_fts WHERE messages_fts MATCH ? LIMIT ?)"
        )
        df = {
            t: db.execute(probe, (f'ctxkey : "c{ctx}" AND content : "{t}"', _COMMON_DF)).fetchone()[
                0
            ]
            for t in terms
        }
        rare = [t for t in terms if 0 < df[t] < _COMMON_DF]
        common = [t for t in terms if df[t] >= _COMMON_DF]
        if rare and common:
            return (
                f'content : {fts_any(rare)} AND (ctxkey : "c{ctx}" OR content : {fts_any(common)})'
            )
        if rare or common:
            return f'ctxkey : "c{ctx}" AND content : {fts_any(rare or common)}'
        return None

    # -- embeddings ---------------------------------------------------------

    def forget(self, ctx: int) -> None:
        """Drop ``ctx``'s cached vectors (it was deleted: its id may come back)."""
        self._vectors.pop(ctx, None)

    def embed_pending(self, limit: int = 64) -> int:
        """Embed up to ``limit`` archived messages that have no vector yet;
        returns how many. The hook runs outside the lock. Call it from a worker
        thread when the device is idle; 0 means the archive is up to date."""
        if self._embed is None:
            return 0
        check_int(limit, "limit", 1)
        rows = self._db.rows(
            "SELECT id, ctx, content FROM messages"
            " WHERE state = 'archived' AND embedding IS NULL LIMIT ?",
            (limit,),
        )
        if not rows:
            return 0
        vectors = self._embed([r[2] for r in rows])
        if len(vectors) != len(rows):
            raise ValueError(f"embed returned {len(vectors)} vectors for {len(rows)} texts")
        with self._db.tx() as db:
            db.executemany(
                "UPDATE messages SET embedding = ? WHERE id = ?",
                [(array("f", v).tobytes(), r[0]) for r, v in zip(rows, vectors)],
            )
            for ctx in {r[1] for r in rows}:
                self.forget(ctx)
        return len(rows)

    def _nearest(self, db: Database, ctx: int, qvec: list[float], n: int) -> list[int]:
        """Row ids of ``ctx``'s embedded messages, most cosine-similar first."""
        import numpy as np

        cached = self._vectors.get(ctx)
        if cached is None:
            rows = db.execute(
                "SELECT id, embedding FROM messages WHERE ctx = ? AND embedding IS NOT NULL",
                (ctx,),
            ).fetchall()
            dim = len(qvec)
            rows = [r for r in rows if len(r[1]) == 4 * dim]  # another model's vectors: skip
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
            mat = mat.reshape(len(rows), dim)
            norms = np.linalg.norm(mat, axis=1, keepdims=True)
            mat = mat / np.where(norms == 0, 1, norms)
            cached = self._vectors[ctx] = (ids, mat)
        ids, mat = cached
        if len(ids) == 0 or mat.shape[1] != len(qvec):
            return []
        q = np.asarray(qvec, dtype=np.float32)
        q = q / (np.linalg.norm(q) or 1.0)
        sims = mat @ q
        n = min(n, len(ids))
        top = np.argpartition(-sims, n - 1)[:n]
        top = top[np.argsort(-sims[top])]
        return [int(i) for i in ids[top]]
