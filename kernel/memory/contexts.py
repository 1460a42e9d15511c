"""Contexts: an agent's conversation held to a token budget, and who may touch it.

A *context* is an agent's conversation: messages numbered by ``seq`` (1, 2, ...)
with a role, text, token count and a pinned flag. The *live window* is what
the model sees; its tokens never exceed the context's budget: what falls out
is paged to the archive (paging.py) and found again by search (archive.py).
``compact`` replaces an archived range by an LLM-written summary.

Ownership: every context has an opaque owner string. Every call that acts on
a context takes ``owner=`` (keyword): when given it must equal the context's
owner, else EACCES; ``None`` means "the kernel itself" and skips the check.
A named context is meant to outlive its process, so the kernel should give it
a stable owner (``"agent:alice"``), not a pid: after a restart, any process
that presents agent name alice opens it with ``open(name, "agent:alice")``.
Anonymous, pid-owned contexts are the kernel's to delete when the process is
reaped.

``ContextStore`` is also the memory manager the kernel holds: it opens the
database and composes the archive, long-term memory and the owner records,
answering for them under the names the syscall layer uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

from llmagentos.kernel.memory.archive import Archive, Embed
from llmagentos.kernel.memory.blocks import BlockStore
from llmagentos.kernel.memory.db import (
    MAX_NAME,
    MSG_COLS,
    Database,
    check_int,
    check_str,
    connect,
    message,
)
from llmagentos.kernel.memory.longterm import LongTermMemory
from llmagentos.kernel.memory.mail import MailStore
from llmagentos.kernel.memory.owners import OwnerRecords
from llmagentos.kernel.memory.paging import NOTE_SEQ, Pager
from llmagentos.syscalls.errno import SyscallError

ROLES = frozenset({"system", "user", "assistant", "tool"})

CountTokens = Callable[[str], int]


def _check_message(role: object, content: object) -> None:
    _check_role(role)
    if not isinstance(content, str):
        raise SyscallError("EINVAL", f"content must be a string, not {type(content).__name__}")


def _check_role(role: object) -> None:
    if not isinstance(role, str) or role not in ROLES:
        raise SyscallError("EINVAL", f"role must be one of {sorted(ROLES)}, got {role!r}")


@dataclass
class Context:
    """A row of the contexts table."""

    id: int
    name: str | None
    owner: str
    budget: int
    created: float
    next_seq: int
    paged: int
    paged_first: int | None
    paged_last: int | None


class ContextStore:
    """Contexts, their archive, long-term memory and owner records, in one
    SQLite file.

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
        self._db = connect(self.path)
        self._pager = Pager(self._count)
        self.archive = Archive(self._db, embed)
        self.longterm = LongTermMemory(self._db)
        self.owner_records = OwnerRecords(self._db)
        self.blocks = BlockStore(self._db, self._ctx)  # shared blocks and their attachments
        self.mail = MailStore(self._db)  # durable mail to named agents (kernel/mailbox.py)
        # The parts' calls under the names the kernel uses (mem.*, names, cleanup).
        lt, rec = self.longterm, self.owner_records
        self.mem_put, self.mem_get, self.mem_delete = lt.put, lt.get, lt.delete
        self.mem_drop, self.mem_list, self.mem_search = lt.drop, lt.keys, lt.search
        self.name_owner, self.take_name, self.owners = (
            rec.name_owner, rec.take_name, rec.identities)
        self.embed_pending = self.archive.embed_pending

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, text: str) -> int:
        n = self._count_tokens(text)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TypeError(f"count_tokens returned {n!r}; it must return an int >= 0")
        return n

    def _ctx(self, db: Database, ctx: object, owner: str | None) -> Context:
        ctx = check_int(ctx, "context id")
        row = db.execute(
            "SELECT id, name, owner, budget, created, next_seq, paged, paged_first, paged_last"
            " FROM contexts WHERE id = ?",
            (ctx,),
        ).fetchone()
        if row is None:
            raise SyscallError("ENOENT", f"no context {ctx}")
        c = Context(*row)
        if owner is not None and owner != c.owner:
            raise SyscallError("EACCES", f"context {ctx} belongs to {c.owner!r}, not {owner!r}")
        return c

    # -- contexts -----------------------------------------------------------

    @staticmethod
    def _insert(
        db: Database, name: str | None, owner: str, budget: int, like: Context | None = None
    ) -> int:
        """A new contexts row; a copy of ``like`` continues its numbering and
        paging. EEXIST if ``name`` is taken."""
        paging = (like.next_seq, like.paged, like.paged_first, like.paged_last) if like else (
            1, 0, None, None)
        if name is not None and db.execute(
            "SELECT 1 FROM contexts WHERE name = ?", (name,)
        ).fetchone():
            raise SyscallError("EEXIST", f"a context named {name!r} exists; open it instead")
        # Inside BEGIN IMMEDIATE no other connection can take the name meanwhile.
        return db.execute(
            "INSERT INTO contexts(name, owner, budget, created, next_seq, paged,"
            " paged_first, paged_last) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, owner, budget, time.time(), *paging),
        ).lastrowid

    def create(self, owner: str, name: str | None = None, budget: int = 4096) -> int:
        """A new, empty context; returns its id. EEXIST if ``name`` is taken."""
        check_str(owner, "owner", MAX_NAME)
        if name is not None:
            check_str(name, "context name", MAX_NAME)
        check_int(budget, "budget", 1)
        with self._db.tx() as db:
            return self._insert(db, name, owner, budget)

    def open(self, name: str, owner: str) -> int:
        """The id of the context named ``name``; EACCES unless ``owner`` owns it."""
        check_str(name, "context name", MAX_NAME)
        check_str(owner, "owner", MAX_NAME)
        row = self._db.row("SELECT id, owner FROM contexts WHERE name = ?", (name,))
        if row is None:
            raise SyscallError("ENOENT", f"no context named {name!r}")
        if row[1] != owner:
            raise SyscallError("EACCES", f"context {name!r} belongs to {row[1]!r}, not {owner!r}")
        return row[0]

    def list_contexts(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Every context (or ``owner``'s): id, name, owner, budget, created."""
        sql = "SELECT id, name, owner, budget, created FROM contexts"
        args: tuple = ()
        if owner is not None:
            sql, args = sql + " WHERE owner = ?", (owner,)
        rows = self._db.rows(sql + " ORDER BY id", args)
        keys = ("id", "name", "owner", "budget", "created")
        return [dict(zip(keys, r)) for r in rows]

    def fork(
        self, ctx: int, new_owner: str, *, name: str | None = None, owner: str | None = None
    ) -> int:
        """A copy of ``ctx`` (live window, pins, archive, note, embeddings) owned
        by ``new_owner``, with the same seqs and budget. Returns the new id."""
        check_str(new_owner, "new owner", MAX_NAME)
        if name is not None:
            check_str(name, "context name", MAX_NAME)
        with self._db.tx() as db:
            c = self._ctx(db, ctx, owner)
            new = self._insert(db, name, new_owner, c.budget, like=c)
            db.execute(
                "INSERT INTO messages(ctx, seq, pos, role, kind, content, tokens, pinned,"
                " state, summary, created, embedding)"
                " SELECT ?, seq, pos, role, kind, content, tokens, pinned, state, summary,"
                " created, embedding FROM messages WHERE ctx = ? ORDER BY id",
                (new, c.id),
            )
            return new

    def delete(self, ctx: int, *, owner: str | None = None) -> None:
        """Remove ``ctx`` with its window and archive."""
        with self._db.tx() as db:
            c = self._ctx(db, ctx, owner)
            db.execute("DELETE FROM messages WHERE ctx = ?", (c.id,))
            db.execute("DELETE FROM contexts WHERE id = ?", (c.id,))
            self.archive.forget(c.id)

    def delete_owned(self, owner: str) -> int:
        """Remove every context of ``owner``; returns how many."""
        check_str(owner, "owner", MAX_NAME)
        with self._db.tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM contexts WHERE owner = ?", (owner,))]
            for cid in ids:
                db.execute("DELETE FROM messages WHERE ctx = ?", (cid,))
                db.execute("DELETE FROM contexts WHERE id = ?", (cid,))
                self.archive.forget(cid)
        return len(ids)

    def set_budget(self, ctx: int, budget: int, *, owner: str | None = None) -> int:
        """Change the token budget, paging out as needed; returns how many were
        paged. EDQUOT (nothing changed) if the pinned messages would not fit."""
        check_int(budget, "budget", 1)
        with self._db.tx() as db:
            c = self._ctx(db, ctx, owner)
            db.execute("UPDATE contexts SET budget = ? WHERE id = ?", (budget, c.id))
            c.budget = budget
            return self._pager.fit(db, c, protect=None)

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
        _check_message(role, content)
        tokens = self._count(content)
        with self._db.tx() as db:
            c = self._ctx(db, ctx, owner)
            if tokens > c.budget:
                raise SyscallError(
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
            paged = self._pager.fit(db, c, protect=seq)
        return {"seq": seq, "tokens": tokens, "paged": paged}

    def read(
        self,
        ctx: int,
        start: int = 0,
        end: int | None = None,
        include_archived: bool = True,
        *,
        owner: str | None = None,
    ) -> list[dict[str, Any]]:
        """Messages with ``start <= pos < end`` in conversation order.

        ``pos`` equals ``seq`` for ordinary messages, so this is the seq range
        [start, end); a summary appears where the range it covers ended, the
        note (seq 0) after the newest archived message. Each message is a dict:
        seq, role, kind ('message' | 'summary' | 'note'), content, tokens,
        pinned, state ('live' | 'archived'), created.
        """
        check_int(start, "start")
        if end is not None:
            check_int(end, "end")
        sql = f"SELECT {MSG_COLS} FROM messages WHERE ctx = ? AND pos >= ?"
        args: list = [start]
        if end is not None:
            sql += " AND pos < ?"
            args.append(end)
        if not include_archived:
            sql += " AND state = 'live'"
        sql += " ORDER BY pos, seq"
        with self._db.read_tx() as db:
            c = self._ctx(db, ctx, owner)
            rows = db.execute(sql, [c.id, *args]).fetchall()
        return [message(r) for r in rows]

    def window(self, ctx: int, reserve: int = 0, *, owner: str | None = None) -> list[dict]:
        """The live messages, in order, that fit ``budget - reserve`` tokens
        (``reserve`` leaves room for the reply). Pinned messages and the note
        are always included, even if they alone exceed that; otherwise the
        oldest are left out first. This is a view: nothing is paged."""
        check_int(reserve, "reserve", 0)
        with self._db.read_tx() as db:
            c = self._ctx(db, ctx, owner)
            rows = db.execute(
                f"SELECT {MSG_COLS} FROM messages WHERE ctx = ? AND state = 'live'"
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
        return [message(r) for r, k in zip(rows, keep) if k]

    def stats(self, ctx: int, *, owner: str | None = None) -> dict[str, Any]:
        """Budget and message/token counts: live (including the note), archived,
        pinned, embedded, plus identity."""
        with self._db.read_tx() as db:
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
        check_int(seq, "seq")
        if seq == NOTE_SEQ:
            raise SyscallError("EINVAL", "the paging note (seq 0) cannot be pinned")
        with self._db.tx() as db:
            c = self._ctx(db, ctx, owner)
            row = db.execute(
                "SELECT state FROM messages WHERE ctx = ? AND seq = ?", (c.id, seq)
            ).fetchone()
            if row is None:
                raise SyscallError("ENOENT", f"context {c.id} has no message {seq}")
            recall = pinned and row[0] == "archived"
            db.execute(
                "UPDATE messages SET pinned = ?, state = CASE WHEN ? THEN 'live' ELSE state END,"
                " summary = CASE WHEN ? THEN NULL ELSE summary END WHERE ctx = ? AND seq = ?",
                (int(bool(pinned)), recall, recall, c.id, seq),
            )
            if recall:
                self._pager.recount(db, c)
                self._pager.fit(db, c, protect=seq)
            out = db.execute(
                f"SELECT {MSG_COLS} FROM messages WHERE ctx = ? AND seq = ?", (c.id, seq)
            ).fetchone()
        return message(out)

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
        _check_role(role)
        if not isinstance(summary_text, str) or not summary_text:
            raise SyscallError("EINVAL", "summary_text must be a non-empty string")
        check_int(upto_seq, "upto_seq", 1)
        tokens = self._count(summary_text)
        with self._db.tx() as db:
            c = self._ctx(db, ctx, owner)
            if tokens > c.budget:
                raise SyscallError(
                    "EDQUOT", f"summary of {tokens} tokens exceeds budget {c.budget}"
                )
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
                raise SyscallError("EINVAL", f"nothing up to seq {upto_seq} is left to summarise")
            db.execute(
                "INSERT INTO messages(ctx, seq, pos, role, kind, content, tokens, pinned,"
                " state, created) VALUES (?, ?, ?, ?, 'summary', ?, ?, ?, 'live', ?)",
                (c.id, seq, upto_seq + 0.5, role, summary_text, tokens, int(bool(pinned)),
                 time.time()),
            )
            db.execute("UPDATE contexts SET next_seq = ? WHERE id = ?", (seq + 1, c.id))
            self._pager.recount(db, c)
            paged += self._pager.fit(db, c, protect=seq)
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
            _check_message(role, content)
            rows.append((role, content, self._count(content)))
        with self._db.tx() as db:
            c = self._ctx(db, ctx, owner)
            now = time.time()
            first = c.next_seq
            db.executemany(
                "INSERT INTO messages(ctx, seq, pos, role, content, tokens, pinned, state,"
                " created) VALUES (?, ?, ?, ?, ?, ?, 0, 'archived', ?)",
                [(c.id, first + i, first + i, r, t, n, now) for i, (r, t, n) in enumerate(rows)],
            )
            db.execute("UPDATE contexts SET next_seq = ? WHERE id = ?", (first + len(rows), c.id))
            self._pager.recount(db, c)
            self._pager.fit(db, c, protect=None)
        return len(rows)

    # -- search -------------------------------------------------------------

    def search(
        self,
        ctx: int,
        query: str,
        k: int = 5,
        *,
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
            raise SyscallError("EINVAL", f"query must be a string, not {type(query).__name__}")
        check_int(k, "k", 1)
        qvec = self.archive.query_vector(query)  # outside the lock: it may be slow
        with self._db.read_tx() as db:
            c = self._ctx(db, ctx, owner)
            return self.archive.search(db, c.id, query, k, qvec)
