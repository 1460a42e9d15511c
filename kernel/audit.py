"""The audit log: every state-changing syscall and every tool call.

Rows (pid, call, argument digest, errno, time) are appended to SQLite in the
state dir. A state-changing call is answered only after its row is committed
(dispatch.invoke awaits `committed`), so an acknowledged call is never
missing from the log, even if the kernel is SIGKILLed right after answering.

Group commit: rows join the open batch; the `writer` task commits a batch in
a worker thread (one transaction, one WAL commit for all its rows) while the
next batch fills, so concurrent calls share a commit and the event loop never
waits on the disk. WAL with synchronous=NORMAL: a commit is in the WAL file
before the answer, which a crash of the kernel process cannot undo; a power
cut may lose the last batches (the memory database, synchronous=FULL, is
the one that fsyncs every commit).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import trio

from llmagentos.syscalls.errno import SyscallError

log = logging.getLogger("llmagentos.kernel")

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


class Batch:
    """Rows that commit together; `done` is set once they are in the log (or
    `error` says why not)."""

    __slots__ = ("rows", "done", "error")

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.done = trio.Event()
        self.error: BaseException | None = None


class AuditLog:
    def __init__(self, path: Path):
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._batch = Batch()
        self._wake = trio.Event()

    def record(self, pid: int, call: str, args: Any, errno: str | None = None,
               detail: str = "") -> Batch:
        """Queue a row; returns the batch it commits with."""
        batch = self._batch
        batch.rows.append((time.time(), pid, call, digest(args), errno, detail[:200]))
        self._wake.set()
        return batch

    async def committed(self, batch: Batch) -> None:
        """Wait until ``batch`` is in the log; EIO if it could not be written."""
        await batch.done.wait()
        if batch.error is not None:
            raise SyscallError("EIO", f"the audit log could not be written: {batch.error}")

    async def writer(self) -> None:
        """The kernel's audit writer task: commit batch after batch."""
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                batch, self._batch = self._batch, Batch()
                try:
                    # not abandoned on cancel: a batch is written whole or not at all
                    await trio.to_thread.run_sync(self._write, batch.rows)
                except Exception as e:
                    log.error("audit log write failed: %s", e)
                    batch.error = e
                finally:
                    batch.done.set()
        finally:
            self._flush()

    def _write(self, rows: list[tuple]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO audit(time, pid, call, digest, errno, detail) "
                    "VALUES (?,?,?,?,?,?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _flush(self) -> None:
        """Write the open batch now (shutdown: its callers are being cancelled)."""
        batch, self._batch = self._batch, Batch()
        try:
            if batch.rows:
                self._write(batch.rows)
        except sqlite3.Error as e:
            log.error("audit log write failed: %s", e)
            batch.error = e
        batch.done.set()

    def query(self, pid: int | None = None, call: str | None = None,
              errno: str | None = None, since: float | None = None,
              limit: int = 100) -> list[dict]:
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
        self._flush()
        self._db.close()
