"""Durable mail: messages to a named agent, kept until a process of that name
receives them.

A row is committed (fsynced: the database is synchronous=FULL) before
``ipc.send`` answers, so acknowledged mail survives a crash of the kernel or
the machine; receiving it deletes the row in the commit that hands it out, so
it is delivered once. Bodies stay here until then: the kernel's mailboxes
hold only each row's header (kernel/mailbox.py).

Bounds, per sender identity: ``depth`` messages and ``max_bytes`` waiting for
one agent (so a flood from one sender never fills another's share), and
``MAX_STORED`` messages and ``MAX_STORED_BYTES`` waiting for all agents
together (so mail to made-up names cannot fill the disk). Beyond them ``put``
is EAGAIN.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from llmagentos.kernel.memory.db import Database
from llmagentos.syscalls.errno import SyscallError

MAX_STORED = 4096
MAX_STORED_BYTES = 256 << 20


@dataclass(frozen=True)
class Header:
    """A stored message without its body."""

    id: int
    agent: str
    sender: str  # the sender's identity: agent:NAME or pid:N
    pid: int  # the sender's pid in the boot it was sent in
    boot: str
    type: str | None
    size: int
    created: float


_HEAD = "id, agent, sender, pid, boot, type, length(body), created"


class MailStore:
    """The ``mail`` table of the memory database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def put(self, agent: str, sender: str, pid: int, boot: str, type_: str | None,
            body: bytes, depth: int, max_bytes: int) -> Header:
        """Store one message for ``agent``; EAGAIN past the sender's bounds."""
        with self._db.tx() as db:
            n, size = db.execute(
                "SELECT count(*), coalesce(sum(length(body)), 0) FROM mail"
                " WHERE agent = ? AND sender = ? AND boot = ?", (agent, sender, boot)).fetchone()
            if n >= depth:
                raise SyscallError("EAGAIN", f"agent {agent!r} has {n} unread messages from "
                                             f"you, the most it holds from one sender")
            if size + len(body) > max_bytes:
                raise SyscallError("EAGAIN", f"agent {agent!r} holds {size} unread bytes from "
                                             f"you; this message would pass {max_bytes}")
            total, stored = db.execute(
                "SELECT count(*), coalesce(sum(length(body)), 0) FROM mail"
                " WHERE sender = ? AND boot = ?", (sender, boot)).fetchone()
            if total >= MAX_STORED or stored + len(body) > MAX_STORED_BYTES:
                raise SyscallError("EAGAIN", f"{total} messages ({stored} bytes) you sent to "
                                             f"named agents are still unread; one sender may "
                                             f"have {MAX_STORED} ({MAX_STORED_BYTES} bytes)")
            now = time.time()
            cur = db.execute("INSERT INTO mail(agent, sender, pid, boot, type, body, created)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (agent, sender, pid, boot, type_, body, now))
            return Header(cur.lastrowid, agent, sender, pid, boot, type_, len(body), now)

    def pending(self, agent: str) -> list[Header]:
        """Every message waiting for ``agent``, oldest first (no bodies)."""
        rows = self._db.rows(f"SELECT {_HEAD} FROM mail WHERE agent = ? ORDER BY id", (agent,))
        return [Header(*r) for r in rows]

    def body(self, row: int) -> bytes | None:
        """A waiting message's body (None once received)."""
        r = self._db.row("SELECT body FROM mail WHERE id = ?", (row,))
        return None if r is None else r[0]

    def take(self, row: int) -> bytes | None:
        """Remove a message and return its body, in one commit; None if it
        was already taken."""
        with self._db.tx() as db:
            r = db.execute("DELETE FROM mail WHERE id = ? RETURNING body", (row,)).fetchone()
        return None if r is None else r[0]
