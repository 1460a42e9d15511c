"""Owners: the durable record of who owns what in the memory database.

Each agent name is recorded with the identity that took it first (the rules
for taking one are kernel/names.py's), and every identity that owns a context
or a long-term namespace can be listed, so that the kernel can clear away
what unnamed processes of earlier boots left behind.
"""

from __future__ import annotations

import time

from llmagentos.kernel.memory.db import MAX_NAME, Database, check_str


class OwnerRecords:
    """Agent names and state owners of ``db``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def name_owner(self, name: str) -> str | None:
        """Who owns agent name ``name``; None if nobody has taken it yet."""
        row = self._db.row("SELECT owner FROM agent_names WHERE name = ?", (name,))
        return None if row is None else row[0]

    def take_name(self, name: str, owner: str) -> str:
        """Record ``owner`` for ``name`` unless someone owns it already;
        returns the owner on record (first come, first served)."""
        check_str(name, "agent name", MAX_NAME)
        check_str(owner, "owner", MAX_NAME)
        with self._db.tx() as db:
            db.execute("INSERT OR IGNORE INTO agent_names(name, owner, created) VALUES (?, ?, ?)",
                       (name, owner, time.time()))
            return db.execute("SELECT owner FROM agent_names WHERE name = ?",
                              (name,)).fetchone()[0]

    def identities(self) -> list[str]:
        """Every identity that owns a context or a long-term memory namespace."""
        rows = self._db.rows("SELECT owner FROM contexts UNION SELECT namespace FROM memories")
        return sorted(r[0] for r in rows)
