"""Paging: holding a context's live window to its token budget.

When the window would overflow, the oldest unpinned live messages are paged
out to the archive (their state becomes ``archived``; nothing is deleted) and
a single system note (``seq 0``, kind ``note``) in the window tells the agent
that they exist and how to recall them. The note's tokens count towards the
budget, and it only counts what no summary covers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from llmagentos.kernel.memory.db import Database
from llmagentos.syscalls.errno import SyscallError

if TYPE_CHECKING:
    from llmagentos.kernel.memory.contexts import Context

NOTE_SEQ = 0  # the paging note's seq: one per context, rewritten in place
NOTE_ROLE = "system"


def note_text(n: int, first: int | None, last: int | None) -> str:
    what = "1 earlier message" if n == 1 else f"{n} earlier messages"
    span = f"seq {first}" if first == last else f"seq {first}\u2013{last}"
    verb = "was" if n == 1 else "were"
    return f"[memory] {what} ({span}) {verb} paged to the archive; use ctx.search to recall them."


class Pager:
    """Pages within a caller's write transaction; ``count`` measures the note."""

    def __init__(self, count: Callable[[str], int]) -> None:
        self._count = count

    def fit(self, db: Database, c: Context, protect: int | None) -> int:
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
            note = note_text(n, first, last) if n else None
            if total + (self._count(note) if note else 0) <= c.budget:
                break
            if len(out) == len(candidates):
                pinned = sum(r[2] for r in body if r[3])
                raise SyscallError(
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

    def recount(self, db: Database, c: Context) -> None:
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
        self._write_note(db, c, note_text(n, first, last) if n else None)

    def _write_note(self, db: Database, c: Context, note: str | None) -> None:
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
