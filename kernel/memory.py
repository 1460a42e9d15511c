"""The memory manager: contexts held to a token budget, an archive, long-term memory.

A *context* is an agent's conversation: messages numbered by ``seq`` (1, 2, ...)
with a role, text, token count and a pinned flag. The *live window* is what
the model sees; its tokens never exceed the context's budget. When an append
would overflow it, the oldest unpinned live messages are *paged out* to the
archive (same database, full-text indexed, never deleted), and a single
system note (``seq 0``, kind ``note``) in the window tells the agent that
they exist and how to recall them. The note's tokens count towards the
budget. ``compact`` replaces an archived range by an LLM-written summary.

Ownership: every context has an opaque owner string. Every call that acts on
a context takes ``owner=`` (keyword): when given it must equal the context's
owner, else EACCES; ``None`` means "the kernel itself" and skips the check.
A named context is meant to outlive its process, so the kernel should give it
a stable owner (``"agent:alice"``), not a pid: after a restart, any process
that presents agent name alice opens it with ``open(name, "agent:alice")``.
Anonymous, pid-owned contexts are the kernel's to delete when the process is
reaped (or to hand on with ``chown``).

Threads: one ``ContextStore`` wraps one SQLite connection behind a lock, so it
may be called from the trio thread and from ``trio.to_thread`` workers; calls
are serialised. Cheap calls (append, window, read of a few rows, pin of a
live message, mem_get/put/delete) take well under a millisecond plus one fsync
and may run on the event loop. search takes a few ms, but tens of ms for a
query made only of words common in a 100k-message archive; stats counts the
archive (~10 ms at 100k). Calls that touch a whole context (fork, delete,
compact, set_budget, import_archive, pin of an archived message) or call the
embedding hook (search with ``embed``, embed_pending) belong in
``trio.to_thread.run_sync``. bench/bench_memory.py has the numbers.

Durability: every mutating call commits (fsync, WAL, synchronous=FULL) before
it returns; a call that raises leaves nothing behind.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Self

from llmagentos.kernel import store
from llmagentos.kernel.ltm import LongTermMemory
from llmagentos.kernel.store import (
    MAX_NAME,
    _check_int,
    _check_str,
    _err,
    fts_any,
    fts_terms,
)

ROLES = frozenset({"system", "user", "assistant", "tool"})
NOTE_SEQ = 0  # the paging note's seq: one per context, rewritten in place
NOTE_ROLE = "system"
_RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009)
_COMMON_DF = 1000  # a search term in this many messages only scores, never selects

CountTokens = Callable[[str], int]
Embed = Callable[[list[str]], list[list[float]]]

_MSG_COLS = "seq, role, kind, content, tokens, pinned, state, created"

@dataclass
class _Context:
    id: int
    name: str | None
    owner: str
    budget: int
    created: float
    next_seq: int
    paged: int
    paged_first: int | None
    paged_last: int | None


def _message(row: tuple) -> dict[str, Any]:
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


class ContextStore(LongTermMemory):
    """Contexts, their archive and long-term memory (``mem_*``, kernel/ltm.py),
    in one SQLite file.

    ``count_tokens`` measures message text with the model's tokenizer.
    ``embed``, when given, turns texts into vectors: archived messages get one
    (see ``embed_pending``) and ``search`` blends vector similarity with FTS.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        count_tokens: CountTokens,
        *,
        embed: Embed | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._count_tokens = count_tokens
        self._embed = embed
        self._lock = threading.RLock()
        self._db = store.connect(self.path)
        self._vectors: dict[int, tuple[Any, Any]] = {}  # ctx -> (row ids, unit matrix)

    # -- plumbing -----------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A write transaction: all or nothing, committed (fsynced) on exit."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read_tx(self) -> Iterator[Any]:
        """A read transaction: several SELECTs see one state."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def _count(self, text: str) -> int:
        n = self._count_tokens(text)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TypeError(f"count_tokens returned {n!r}; it must return an int >= 0")
        return n

    def _ctx(self, db: Any, ctx: object, owner: str | None) -> _Context:
        ctx = _check_int(ctx, "context id")
        row = db.execute(
            "SELECT id, name, owner, budget, created, next_seq, paged, paged_first, paged_last"
            " FROM contexts WHERE id = ?",
            (ctx,),
        ).fetchone()
        if row is None:
            raise _err("ENOENT", f"no context {ctx}")
        c = _Context(*row)
        if owner is not None and owner != c.owner:
            raise _err("EACCES", f"context {ctx} belongs to {c.owner!r}, not {owner!r}")
        return c

    # -- contexts -----------------------------------------------------------

    def create(self, owner: str, name: str | None = None, budget: int = 4096) -> int:
        """A new, empty context; returns its id. EEXIST if ``name`` is taken."""
        _check_str(owner, "owner", MAX_NAME)
        if name is not None:
            _check_str(name, "context name", MAX_NAME)
        _check_int(budget, "budget", 1)
        with self._tx() as db:
            if (
                name is not None
                and db.execute("SELECT 1 FROM contexts WHERE name = ?", (name,)).fetchone()
            ):
                raise _err("EEXIST", f"a context named {name!r} exists; open it instead")
            try:
                cur = db.execute(
                    "INSERT INTO contexts(name, owner, budget, created) VALUES (?, ?, ?, ?)",
                    (name, owner, budget, time.time()),
                )
            except sqlite3.IntegrityError:  # another connection took the name meanwhile
                raise _err("EEXIST", f"a context named {name!r} exists") from None
            return cur.lastrowid

    def open(self, name: str, owner: str) -> int:
        """The id of the context named ``name``; EACCES unless ``owner`` owns it."""
        _check_str(name, "context name", MAX_NAME)
        _check_str(owner, "owner", MAX_NAME)
        with self._lock:
            row = self._db.execute(
                "SELECT id, owner FROM contexts WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise _err("ENOENT", f"no context named {name!r}")
        if row[1] != owner:
            raise _err("EACCES", f"context {name!r} belongs to {row[1]!r}, not {owner!r}")
        return row[0]

    def list_contexts(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Every context (or ``owner``'s): id, name, owner, budget, created."""
        sql = "SELECT id, name, owner, budget, created FROM contexts"
        args: tuple = ()
        if owner is not None:
            sql, args = sql + " WHERE owner = ?", (owner,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        keys = ("id", "name", "owner", "budget", "created")
        return [dict(zip(keys, r)) for r in rows]

    def fork(
        self, ctx: int, new_owner: str, *, name: str | None = None, owner: str | None = None
    ) -> int:
        """A copy of ``ctx`` (live window, pins, archive, note, embeddings) owned
        by ``new_owner``, with the same seqs and budget. Returns the new id."""
        _check_str(new_owner, "new owner", MAX_NAME)
        if name is not None:
            _check_str(name, "context name", MAX_NAME)
        with self._tx() as db:
            c = self._ctx(db, ctx, owner)
            if (
                name is not None
                and db.execute("SELECT 1 FROM contexts WHERE name = ?", (name,)).fetchone()
            ):
                raise _err("EEXIST", f"a context named {name!r} exists")
            new = db.execute(
                "INSERT INTO contexts(name, owner, budget, created, next_seq, paged,"
                " paged_first, paged_last) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    new_owner,
                    c.budget,
                    time.time(),
                    c.next_seq,
                    c.paged,
                    c.paged_first,
                    c.paged_last,
                ),
            ).lastrowid
            db.execute(
                "INSERT INTO messages(ctx, seq, pos, role, kind, content, tokens, pinned,"
                " state, summary, created, embedding)"
                " SELECT ?, seq, pos, role, kind, content, tokens, pinned, state, summary,"
                " created, embedding FROM messages WHERE ctx = ? ORDER BY id",
                (new, c.id),
            )
            return new

    def chown(self, ctx: int, new_owner: str, *, owner: str | None = None) -> None:
        """Give ``ctx`` to ``new_owner`` (e.g. a pid's context to its agent name)."""
        _check_str(new_owner, "new owner", MAX_NAME)
        with self._tx() as db:
            c = self._ctx(db, ctx, owner)
            db.execute("UPDATE contexts SET owner = ? WHERE id = ?", (new_owner, c.id))

    def delete(self, ctx: int, *, owner: str | None = None) -> None:
        """Remove ``ctx`` with its window and archive."""
        with self._tx() as db:
            c = self._ctx(db, ctx, owner)
            db.execute("DELETE FROM messages WHERE ctx = ?", (c.id,))
            db.execute("DELETE FROM contexts WHERE id = ?", (c.id,))
            self._vectors.pop(c.id, None)

    def delete_owned(self, owner: str) -> int:
        """Remove every context of ``owner``; returns how many."""
        _check_str(owner, "owner", MAX_NAME)
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM contexts WHERE owner = ?", (owner,))]
            for cid in ids:
                db.execute("DELETE FROM messages WHERE ctx = ?", (cid,))
                db.execute("DELETE FROM contexts WHERE id = ?", (cid,))
                self._vectors.pop(cid, None)
        return len(ids)

    def owners(self) -> list[str]:
        """Every identity that owns a context or a long-term memory namespace."""
        with self._lock:
            rows = self._db.execute("SELECT owner FROM contexts UNION"
                                    " SELECT namespace FROM memories").fetchall()
        return sorted(r[0] for r in rows)

    # -- agent names (the policy is kernel/names.py's) ------------------------

    def name_owner(self, name: str) -> str | None:
        """Who owns agent name ``name``; None if nobody has taken it yet."""
        with self._lock:
            row = self._db.execute("SELECT owner FROM agent_names WHERE name = ?",
                                   (name,)).fetchone()
        return None if row is None else row[0]

    def take_name(self, name: str, owner: str) -> str:
        """Record ``owner`` for ``name`` unless someone owns it already;
        returns the owner on record (first come, first served)."""
        _check_str(name, "agent name", MAX_NAME)
        _check_str(owner, "owner", MAX_NAME)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO agent_names(name, owner, created) VALUES (?, ?, ?)",
                       (name, owner, time.time()))
            return db.execute("SELECT owner FROM agent_names WHERE name = ?",
                              (name,)).fetchone()[0]

    def set_budget(self, ctx: int, budget: int, *, owner: str | None = None) -> int:
        """Change the token budget, paging out as needed; returns how many were
        paged. EDQUOT (nothing changed) if the pinned messages would not fit."""
        _check_int(budget, "budget", 1)
        with self._tx() as db:
            c = self._ctx(db, ctx, owner)
            db.execute("UPDATE contexts SET budget = ? WHERE id = ?", (budget, c.id))
            c.budget = budget
            return self._fit(db, c, protect=None)

    # -- messages -----------------------------------------------------------

    def append(
        self,
        ctx: int,
        role: str,
        content: str,
        pinned: bool = False,
        *,
        owner: str | None = None,
    ) -> dict[str, int]:
        """Add a message at the end of the window; returns {seq, tokens, paged}.

        If the window would exceed the budget, the oldest unpinned live
        messages are paged to the archive (``paged`` of them) and the paging
        note is updated. The new message itself is never paged by its own
        append: EDQUOT (nothing stored) if it does not fit beside the pinned
        messages and the note, in particular if it alone exceeds the budget.
        """
        if role not in ROLES:
            raise _err("EINVAL", f"role must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _err("EINVAL", f"content must be a string, not {type(content).__name__}")
        tokens = self._count(content)
        with self._tx() as db:
            c = self._ctx(db, ctx, owner)
            if tokens > c.budget:
                raise _err(
                    "EDQUOT",
                    f"message of {tokens} tokens exceeds context {c.id}'s budget of {c.budget}",
                )
            seq = c.next_seq
            db.execute(
                "INSERT INTO messages(ctx, seq, pos, role, content, tokens, pinned, state,"
                " created) VALUES (?, ?, ?, ?, ?, ?, ?, 'live', ?)",
                (c.id, seq, seq, role, content, tokens, int(bool(pinned)), time.time()),
            )
            db.execute("UPDATE contexts SET next_seq = ? WHERE id = ?", (seq + 1, c.id))
            paged = self._fit(db, c, protect=seq)
        return {"seq": seq, "tokens": tokens, "paged": paged}

    def _fit(self, db: Any, c: _Context, protect: int | None) -> int:
        """Page the oldest unpinned live messages (never ``protect``, never the
        note) out until window + note fit the budget; rewrite the note.
        Returns how many were paged. Raises EDQUOT when they cannot fit; the
        caller's transaction then rolls everything back."""
        live = db.execute(
            "SELECT id, seq, tokens, pinned, kind, pos FROM messages"
            " WHERE ctx = ? AND state = 'live' ORDER BY pos, seq",
            (c.id,),
        ).fetchall()
        note_tokens = sum(r[2] for r in live if r[4] == "note")
        body = [r for r in live if r[4] != "note"]
        total = sum(r[2] for r in body)
        if total + note_tokens <= c.budget:
            return 0
        candidates = [r for r in body if not r[3] and r[1] != protect]
        out: list[tuple] = []
        while True:
            n = c.paged + len(out)
            seqs = [r[1] for r in out] + [s for s in (c.paged_first, c.paged_last) if s]
            first, last = (min(seqs), max(seqs)) if seqs else (None, None)
            note = self._note_text(n, first, last) if n else None
            if total + (self._count(note) if note else 0) <= c.budget:
                break
            if len(out) == len(candidates):
                pinned = sum(r[2] for r in body if r[3])
                raise _err(
                    "EDQUOT",
                    f"context {c.id} cannot fit its budget of {c.budget} tokens: "
                    f"{pinned} are pinned and the newest message is kept",
                )
            out.append(candidates[len(out)])
            total -= out[-1][2]
        if out:
            db.executemany(
                "UPDATE messages SET state = 'archived' WHERE id = ?", [(r[0],) for r in out]
            )
            c.paged, c.paged_first, c.paged_last = n, first, last
            db.execute(
                "UPDATE contexts SET paged = ?, paged_first = ?, paged_last = ? WHERE id = ?",
                (n, first, last, c.id),
            )
        self._write_note(db, c, note)
        return len(out)

    @staticmethod
    def _note_text(n: int, first: int | None, last: int | None) -> str:
        what = "1 earlier message" if n == 1 else f"{n} earlier messages"
        span = f"seq {first}" if first == last else f"seq {first}\u2013{last}"
        verb = "was" if n == 1 else "were"
        return (
            f"[memory] {what} ({span}) {verb} paged to the archive; use ctx.search to recall them."
        )

    def _write_note(self, db: Any, c: _Context, note: str | None) -> None:
        """Make the note say ``note`` (or remove it), placed after the newest
        archived message."""
        if note is None:
            db.execute("DELETE FROM messages WHERE ctx = ? AND seq = ?", (c.id, NOTE_SEQ))
            return
        tokens = self._count(note)
        top = db.execute(
            "SELECT max(pos) FROM messages WHERE ctx = ? AND state = 'archived'", (c.id,)
        ).fetchone()[0]
        pos = (top or 0) + 0.25
        cur = db.execute(
            "UPDATE messages SET content = ?, tokens = ?, pos = ? WHERE ctx = ? AND seq = ?",
            (note, tokens, pos, c.id, NOTE_SEQ),
        )
        if cur.rowcount == 0:
            db.execute(
                "INSERT INTO messages(ctx, seq, pos, role, kind, content, tokens, pinned,"
                " state, created) VALUES (?, ?, ?, ?, 'note', ?, ?, 0, 'live', ?)",
                (c.id, NOTE_SEQ, pos, NOTE_ROLE, note, tokens, time.time()),
            )

    def _recount_paged(self, db: Any, c: _Context) -> None:
        """Recompute the note's numbers from the archive (after compact, a
        recall by pin, an import): the slow, exact path."""
        n, first, last = db.execute(
            "SELECT count(*), min(seq), max(seq) FROM messages WHERE ctx = ?"
            " AND state = 'archived' AND summary IS NULL AND kind != 'note'",
            (c.id,),
        ).fetchone()
        c.paged, c.paged_first, c.paged_last = n, first, last
        db.execute(
            "UPDATE contexts SET paged = ?, paged_first = ?, paged_last = ? WHERE id = ?",
            (n, first, last, c.id),
        )
        self._write_note(db, c, self._note_text(n, first, last) if n else None)

    def read(
        self,
        ctx: int,
        start: int = 0,
        end: int | None = None,
        include_archived: bool = True,
        *,
        limit: int | None = None,
        owner: str | None = None,
    ) -> list[dict[str, Any]]:
        """Messages with ``start <= pos < end`` in conversation order.

        ``pos`` equals ``seq`` for ordinary messages, so this is the seq range
        [start, end); a summary appears where the range it covers ended, the
        note (seq 0) after the newest archived message. Each message is a dict:
        seq, role, kind ('message' | 'summary' | 'note'), content, tokens,
        pinned, state ('live' | 'archived'), created.
        """
        _check_int(start, "start")
        if end is not None:
            _check_int(end, "end")
        if limit is not None:
            _check_int(limit, "limit", 0)
        sql = f"SELECT {_MSG_COLS} FROM messages WHERE ctx = ? AND pos >= ?"
        args: list = [start]
        if end is not None:
            sql += " AND pos < ?"
            args.append(end)
        if not include_archived:
            sql += " AND state = 'live'"
        sql += " ORDER BY pos, seq"
        if limit is not None:
            sql += f" LIMIT {limit}"
        with self._read_tx() as db:
            c = self._ctx(db, ctx, owner)
            rows = db.execute(sql, [c.id, *args]).fetchall()
        return [_message(r) for r in rows]

    def window(self, ctx: int, reserve: int = 0, *, owner: str | None = None) -> list[dict]:
        """The live messages, in order, that fit ``budget - reserve`` tokens
        (``reserve`` leaves room for the reply). Pinned messages and the note
        are always included, even if they alone exceed that; otherwise the
        oldest are left out first. This is a view: nothing is paged."""
        _check_int(reserve, "reserve", 0)
        with self._read_tx() as db:
            c = self._ctx(db, ctx, owner)
            rows = db.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE ctx = ? AND state = 'live'"
                " ORDER BY pos, seq",
                (c.id,),
            ).fetchall()
        total = sum(r[4] for r in rows)
        room = c.budget - reserve
        keep = [True] * len(rows)
        for i, r in enumerate(rows):
            if total <= room:
                break
            if not r[5] and r[2] != "note":
                keep[i] = False
                total -= r[4]
        return [_message(r) for r, k in zip(rows, keep) if k]

    def stats(self, ctx: int, *, owner: str | None = None) -> dict[str, Any]:
        """Budget and message/token counts: live (including the note), archived,
        pinned, embedded, plus identity."""
        with self._read_tx() as db:
            c = self._ctx(db, ctx, owner)
            live_n, live_t, pin_n, pin_t = db.execute(
                "SELECT count(*), coalesce(sum(tokens), 0), coalesce(sum(pinned), 0),"
                " coalesce(sum(tokens * pinned), 0) FROM messages"
                " WHERE ctx = ? AND state = 'live'",
                (c.id,),
            ).fetchone()
            arch_n, arch_t = db.execute(
                "SELECT count(*), coalesce(sum(tokens), 0) FROM messages"
                " WHERE ctx = ? AND state = 'archived'",
                (c.id,),
            ).fetchone()
            unembedded = db.execute(
                "SELECT count(*) FROM messages INDEXED BY messages_unembedded"
                " WHERE ctx = ? AND state = 'archived' AND embedding IS NULL",
                (c.id,),
            ).fetchone()[0]
        return {
            "ctx": c.id,
            "name": c.name,
            "owner": c.owner,
            "budget": c.budget,
            "created": c.created,
            "next_seq": c.next_seq,
            "live_messages": live_n,
            "live_tokens": live_t,
            "archived_messages": arch_n,
            "archived_tokens": arch_t,
            "pinned_messages": pin_n,
            "pinned_tokens": pin_t,
            "embedded_messages": arch_n - unembedded,
            "paged_uncovered": c.paged,
        }

    def pin(self, ctx: int, seq: int, pinned: bool = True, *, owner: str | None = None) -> dict:
        """Pin (or unpin) message ``seq``; returns it. Pinned messages are never
        paged. Pinning an archived message recalls it into the live window,
        paging others out if needed (EDQUOT if it cannot fit); that recount of
        the archive makes a recall O(archive) rather than cheap."""
        _check_int(seq, "seq")
        if seq == NOTE_SEQ:
            raise _err("EINVAL", "the paging note (seq 0) cannot be pinned")
        with self._tx() as db:
            c = self._ctx(db, ctx, owner)
            row = db.execute(
                "SELECT state FROM messages WHERE ctx = ? AND seq = ?", (c.id, seq)
            ).fetchone()
            if row is None:
                raise _err("ENOENT", f"context {c.id} has no message {seq}")
            recall = pinned and row[0] == "archived"
            db.execute(
                "UPDATE messages SET pinned = ?, state = CASE WHEN ? THEN 'live' ELSE state END,"
                " summary = CASE WHEN ? THEN NULL ELSE summary END WHERE ctx = ? AND seq = ?",
                (int(bool(pinned)), recall, recall, c.id, seq),
            )
            if recall:
                self._recount_paged(db, c)
                self._fit(db, c, protect=seq)
            out = db.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE ctx = ? AND seq = ?", (c.id, seq)
            ).fetchone()
        return _message(out)

    def compact(
        self,
        ctx: int,
        summary_text: str,
        upto_seq: int,
        *,
        role: str = "system",
        pinned: bool = False,
        owner: str | None = None,
    ) -> dict[str, int]:
        """Stand a summary in for everything up to ``upto_seq``.

        ``upto_seq`` past the newest message means "everything so far".
        Unpinned live messages with seq <= upto_seq are paged out first; then
        every archived message up to there not yet covered by a summary is
        marked as covered by the new one (it stays in the archive, searchable)
        and the summary is inserted live where the range ended. The note then
        only counts what no summary covers. Returns {seq, tokens, covered,
        paged}. EINVAL if nothing is left to cover; EDQUOT if the summary
        cannot fit.
        """
        if role not in ROLES:
            raise _err("EINVAL", f"role must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(summary_text, str) or not summary_text:
            raise _err("EINVAL", "summary_text must be a non-empty string")
        _check_int(upto_seq, "upto_seq", 1)
        tokens = self._count(summary_text)
        with self._tx() as db:
            c = self._ctx(db, ctx, owner)
            if tokens > c.budget:
                raise _err("EDQUOT", f"summary of {tokens} tokens exceeds budget {c.budget}")
            # Later messages have pos = seq > upto: the summary must stay before them.
            upto_seq = min(upto_seq, c.next_seq - 1)
            paged = db.execute(
                "UPDATE messages SET state = 'archived' WHERE ctx = ? AND state = 'live'"
                " AND pinned = 0 AND kind != 'note' AND pos <= ?",
                (c.id, upto_seq),
            ).rowcount
            seq = c.next_seq
            covered = db.execute(
                "UPDATE messages SET summary = ? WHERE ctx = ? AND state = 'archived'"
                " AND summary IS NULL AND kind != 'note' AND pos <= ?",
                (seq, c.id, upto_seq),
            ).rowcount
            if covered == 0:
                raise _err("EINVAL", f"nothing up to seq {upto_seq} is left to summarise")
            db.execute(
                "INSERT INTO messages(ctx, seq, pos, role, kind, content, tokens, pinned,"
                " state, created) VALUES (?, ?, ?, ?, 'summary', ?, ?, ?, 'live', ?)",
                (
                    c.id,
                    seq,
                    upto_seq + 0.5,
                    role,
                    summary_text,
                    tokens,
                    int(bool(pinned)),
                    time.time(),
                ),
            )
            db.execute("UPDATE contexts SET next_seq = ? WHERE id = ?", (seq + 1, c.id))
            self._recount_paged(db, c)
            paged += self._fit(db, c, protect=seq)
        return {"seq": seq, "tokens": tokens, "covered": covered, "paged": paged}

    def import_archive(
        self, ctx: int, messages: Iterable[tuple[str, str]], *, owner: str | None = None
    ) -> int:
        """Append ``(role, content)`` pairs straight into the archive, in one
        transaction (restoring a saved history into a fresh context, loading a
        benchmark). They take the next seqs, count no tokens against the
        window, are searchable and are counted by the note. Returns how many
        were stored."""
        rows = []
        for role, content in messages:
            if role not in ROLES or not isinstance(content, str):
                raise _err("EINVAL", f"bad message ({role!r}, {type(content).__name__})")
            rows.append((role, content, self._count(content)))
        with self._tx() as db:
            c = self._ctx(db, ctx, owner)
            now = time.time()
            first = c.next_seq
            db.executemany(
                "INSERT INTO messages(ctx, seq, pos, role, content, tokens, pinned, state,"
                " created) VALUES (?, ?, ?, ?, ?, ?, 0, 'archived', ?)",
                [(c.id, first + i, first + i, r, t, n, now) for i, (r, t, n) in enumerate(rows)],
            )
            db.execute("UPDATE contexts SET next_seq = ? WHERE id = ?", (first + len(rows), c.id))
            self._recount_paged(db, c)
            self._fit(db, c, protect=None)
        return len(rows)

    # -- search -------------------------------------------------------------

    def search(
        self,
        ctx: int,
        query: str,
        k: int = 5,
        *,
        archived_only: bool = False,
        owner: str | None = None,
    ) -> list[dict[str, Any]]:
        """The ``k`` messages of ``ctx`` (live and archived) that best match ``query``.

        Any text is a valid query: it is reduced to words and matched with FTS5
        bm25 (score = -bm25, higher is better). With an ``embed`` hook and
        embedded messages, FTS and cosine-similarity rankings are fused by
        reciprocal rank (score = sum of 1/(60 + rank)). Each result is a
        message dict plus ``score`` and ``archived``.
        """
        if not isinstance(query, str):
            raise _err("EINVAL", f"query must be a string, not {type(query).__name__}")
        _check_int(k, "k", 1)
        terms = fts_terms(query)
        qvec = None
        if self._embed is not None and query.strip():
            qvec = self._embed([query])[0]  # outside the lock: it may be slow
        depth = max(4 * k, 20)
        with self._read_tx() as db:
            c = self._ctx(db, ctx, owner)
            filt = " AND m.state = 'archived'" if archived_only else ""
            fts: list[tuple] = []
            match = self._match(db, c.id, terms) if terms else None
            if match:
                fts = db.execute(
                    "SELECT m.id, bm25(messages_fts, 0.0, 1.0) AS r FROM messages_fts"
                    " JOIN messages m ON m.id = messages_fts.rowid"
                    f" WHERE messages_fts MATCH ? AND m.ctx = ?{filt} ORDER BY r LIMIT ?",
                    (match, c.id, depth),
                ).fetchall()
            if qvec is None:
                scores = {mid: -r for mid, r in fts}
            else:
                scores = {}
                for rank, (mid, _) in enumerate(fts):
                    scores[mid] = 1.0 / (_RRF_K + rank + 1)
                for rank, mid in enumerate(self._nearest(db, c.id, qvec, depth)):
                    scores[mid] = scores.get(mid, 0.0) + 1.0 / (_RRF_K + rank + 1)
            best = sorted(scores, key=scores.__getitem__, reverse=True)[:k]
            out = []
            for mid in best:
                row = db.execute(
                    f"SELECT {_MSG_COLS} FROM messages WHERE id = ?", (mid,)
                ).fetchone()
                if row is None or (archived_only and row[6] != "archived"):
                    continue
                m = _message(row)
                m["score"] = scores[mid]
                m["archived"] = m["state"] == "archived"
                out.append(m)
        return out

    @staticmethod
    def _match(db: Any, ctx: int, terms: list[str]) -> str | None:
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

    def embed_pending(self, limit: int = 64) -> int:
        """Embed up to ``limit`` archived messages that have no vector yet;
        returns how many. The hook runs outside the lock. Call it from a worker
        thread when the device is idle; 0 means the archive is up to date."""
        if self._embed is None:
            return 0
        _check_int(limit, "limit", 1)
        with self._lock:
            rows = self._db.execute(
                "SELECT id, ctx, content FROM messages"
                " WHERE state = 'archived' AND embedding IS NULL LIMIT ?",
                (limit,),
            ).fetchall()
        if not rows:
            return 0
        vectors = self._embed([r[2] for r in rows])
        if len(vectors) != len(rows):
            raise ValueError(f"embed returned {len(vectors)} vectors for {len(rows)} texts")
        with self._tx() as db:
            db.executemany(
                "UPDATE messages SET embedding = ? WHERE id = ?",
                [(array("f", v).tobytes(), r[0]) for r, v in zip(rows, vectors)],
            )
            for ctx in {r[1] for r in rows}:
                self._vectors.pop(ctx, None)
        return len(rows)

    def _nearest(self, db: Any, ctx: int, qvec: list[float], n: int) -> list[int]:
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
