"""The audit log: every state-changing syscall and every tool call.

Rows (pid, call, argument digest, errno, time) are appended to SQLite in the
state dir. Appends are buffered in memory and flushed by the kernel's
`flusher` task every `interval` seconds and at shutdown, so auditing never puts
a disk sync on a syscall's path; a kernel crash loses at most that interval.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import trio

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY,
    time    REAL NOT NULL,
    pid     INTEGER NOT NULL,
    call    TEXT NOT NULL,
    digest  TEXT NOT NULL,   -- sha256 of the msgpack'd arguments, first 16 hex digits
    errno   TEXT,            -- NULL when the call succeeded
    detail  TEXT             -- a short human note (tool name, target pid)
);
CREATE INDEX IF NOT EXISTS audit_pid ON audit(pid, time);
CREATE INDEX IF NOT EXISTS audit_call ON audit(call, time);
"""


def digest(args: Any) -> str:
    try:
        data = msgpack.packb(args, use_bin_type=True, default=str)
    except (TypeError, ValueError, OverflowError):
        data = repr(args).encode()
    return hashlib.sha256(data).hexdigest()[:16]


class AuditLog:
    def __init__(self, path: Path, interval: float = 0.2):
        self.path = path
        self.interval = interval
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._pending: list[tuple] = []
        self._lock = threading.Lock()

    def record(self, pid: int, call: str, args: Any, errno: str | None = None,
               detail: str = "") -> None:
        self._pending.append((time.time(), pid, call, digest(args), errno, detail[:200]))

    def flush(self) -> int:
        rows, self._pending = self._pending, []
        if rows:
            with self._lock, self._db:
                self._db.executemany(
                    "INSERT INTO audit(time, pid, call, digest, errno, detail) "
                    "VALUES (?,?,?,?,?,?)", rows)
        return len(rows)

    async def flusher(self) -> None:
        try:
            while True:
                await trio.sleep(self.interval)
                self.flush()
        finally:
            self.flush()

    def query(self, pid: int | None = None, call: str | None = None,
              errno: str | None = None, since: float | None = None,
              limit: int = 100) -> list[dict]:
        self.flush()
        where, params = [], []
        if pid is not None:
            where.append("pid = ?")
            params.append(pid)
        if call:
            where.append("call GLOB ?")
            params.append(call)
        if errno == "ok":
            where.append("errno IS NULL")
        elif errno:
            where.append("errno = ?" if errno != "any" else "errno IS NOT NULL")
            if errno != "any":
                params.append(errno)
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        sql = "SELECT id, time, pid, call, digest, errno, detail FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        cols = ("id", "time", "pid", "call", "digest", "errno", "detail")
        return [dict(zip(cols, r)) for r in reversed(rows)]

    def close(self) -> None:
        self.flush()
        self._db.close()
