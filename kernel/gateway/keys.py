"""API keys of the HTTP gateway: each key is a named process.

``key.create`` (capability ``key.admin``) makes a process named after the key,
attached as ``proc.attach`` makes one (it lives in the kernel's own OS
process), with the caps, nice value, limits and model asked for, bounded by
the creator's as a child's are. A request that presents the key runs as that
process: its nice orders it on the device, its limits stop it, its usage
shows in ``llmos ps``, its state-changing calls are audited under its pid.

The key itself is shown once. ``keys.db`` in the state dir holds its SHA-256
(a random 256-bit secret has nothing to guess, so no slow hash is needed),
what the process was made with, and the tokens it has used.

A key lives as long as its process: ``key.revoke`` ends the process, and a
process that ends otherwise (``llmos kill``, its wall_time limit) takes its
key with it; either way the next request is 401. Kernel restarts keep keys:
at boot each stored key gets its process again (a new pid; the named agent's
contexts, memory and files continue, as any named agent's do) with the token
usage recorded so far, so a ``tokens`` limit is a quota over the key's life.
Usage is written back every FLUSH_S seconds and when the process ends, so a
kernel that crashes forgets at most that much of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.table import check_name

from .. import perms
from ..proc import PCB

if TYPE_CHECKING:
    from ..services import Services

log = logging.getLogger("llmagentos.kernel")

KEY_PREFIX = "sk-llmos-"
FLUSH_S = 5.0
SHOWN = 12  # characters of a key that key.list shows (the prefix and a few more)

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    name          TEXT PRIMARY KEY,
    hash          TEXT NOT NULL UNIQUE,  -- sha256 of the key, hex
    shown         TEXT NOT NULL,         -- its first characters, to tell keys apart
    caps          TEXT NOT NULL,         -- JSON list
    nice          INTEGER NOT NULL,
    limits        TEXT NOT NULL,         -- JSON map
    model         TEXT,
    created       REAL NOT NULL,
    tokens_in     INTEGER NOT NULL DEFAULT 0,
    tokens_out    INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0
);
"""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class KeyTable:
    """The stored keys and the live process of each."""

    def __init__(self, services: "Services", path: Path) -> None:
        self.sys = services
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.executescript(SCHEMA)
        self.by_hash: dict[str, PCB] = {}
        self.by_name: dict[str, PCB] = {}
        self.locks: dict[int, trio.Lock] = {}  # per key process: one X-LLMOS-Context turn at once

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()

    # --- boot ---------------------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        """Once the process table takes new processes: every stored key's process."""
        self.sys.procs.on_exit.append(self._exited)
        with self._lock:
            rows = self._db.execute(
                "SELECT name, hash, caps, nice, limits, model, tokens_in, tokens_out, "
                "cached_tokens FROM api_keys ORDER BY created").fetchall()
        for name, h, caps, nice, limits, model, t_in, t_out, cached in rows:
            try:
                pcb = self._attach(name, json.loads(caps), json.loads(limits), nice, model)
            except SyscallError as e:
                log.warning("API key %r: no process for it this boot: %s", name, e.message)
                continue
            pcb.usage.tokens_in, pcb.usage.tokens_out, pcb.usage.cached_tokens = \
                t_in, t_out, cached
            self.by_hash[h] = pcb
            self.by_name[name] = pcb
        nursery.start_soon(self._flusher)

    def _attach(self, name: str, caps: list, limits: dict, nice: int,
                model: str | None) -> PCB:
        procs = self.sys.procs
        pcb = procs.attach(procs.init, name, caps, limits, nice, os.getpid(), model)
        pcb.argv = ["(api key)"]
        return pcb

    # --- the calls ----------------------------------------------------------------------
    def create(self, creator: PCB, name: str, caps: list | None, nice: int,
               limits: dict | None, model: str | None) -> dict:
        check_name(name)
        if name in self.by_name or self._row(name) is not None:
            raise SyscallError("EEXIST", f"an API key named {name!r} exists; revoke it first")
        procs = self.sys.procs
        # Bounded by the creator's rights and its claim on the name, as its child would be;
        # the process itself is init's, as the shell user's agents are: it outlives the
        # creator's connection and is the kernel's to keep.
        live = sum(1 for c in procs.children(creator.pid) if not c.exited)
        caps, limits = perms.child_rights(creator, caps, limits, nice, live)
        procs.names.claim(creator, name)
        model = self.sys.table.check(model) or creator.model
        pcb = self._attach(name, caps, limits, nice, model)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        h = key_hash(key)
        try:
            with self._lock, self._db:
                self._db.execute(
                    "INSERT INTO api_keys(name, hash, shown, caps, nice, limits, model, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, h, key[:SHOWN], json.dumps(caps), nice, json.dumps(limits), model,
                     time.time()))
        except BaseException:
            procs.end_attached(pcb, signal=signal.SIGTERM)
            raise
        self.by_hash[h] = pcb
        self.by_name[name] = pcb
        return {"name": name, "pid": pcb.pid, "key": key}

    def list(self) -> list[dict]:
        self.flush()
        with self._lock:
            rows = self._db.execute(
                "SELECT name, shown, caps, nice, limits, model, created, tokens_in, tokens_out "
                "FROM api_keys ORDER BY created").fetchall()
        out = []
        for name, shown, caps, nice, limits, model, created, t_in, t_out in rows:
            pcb = self.by_name.get(name)
            out.append({"name": name, "pid": pcb.pid if pcb is not None else None,
                        "key": shown + "...", "caps": json.loads(caps), "nice": nice,
                        "limits": json.loads(limits), "model": model, "created": created,
                        "tokens_in": t_in, "tokens_out": t_out})
        return out

    def revoke(self, which: str | int) -> dict:
        if isinstance(which, int):
            name = next((n for n, p in self.by_name.items() if p.pid == which), None)
            if name is None:
                raise SyscallError("ENOENT", f"pid {which} is not an API key's process")
        else:
            name = which
            if name not in self.by_name and self._row(name) is None:
                raise SyscallError("ENOENT", f"no API key named {name!r}")
        pcb = self._forget(name)
        if pcb is not None and not pcb.exited:
            self.sys.procs.end_attached(pcb, signal=signal.SIGTERM)
        return {"name": name, "pid": pcb.pid if pcb is not None else None}

    # --- requests -------------------------------------------------------------------------
    def authenticate(self, key: str) -> PCB | None:
        """The live process a key stands for; None for an unknown or revoked one."""
        pcb = self.by_hash.get(key_hash(key))
        return None if pcb is None or pcb.exited else pcb

    def context_lock(self, pcb: PCB) -> trio.Lock:
        return self.locks.setdefault(pcb.pid, trio.Lock())

    # --- bookkeeping ----------------------------------------------------------------------
    def _row(self, name: str) -> tuple | None:
        with self._lock:
            return self._db.execute("SELECT hash FROM api_keys WHERE name = ?",
                                    (name,)).fetchone()

    def _forget(self, name: str) -> PCB | None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM api_keys WHERE name = ?", (name,))
        pcb = self.by_name.pop(name, None)
        self.by_hash = {h: p for h, p in self.by_hash.items() if p is not pcb}
        if pcb is not None:
            self.locks.pop(pcb.pid, None)
        return pcb

    def _exited(self, pcb: PCB) -> None:
        """A key's process ended: at shutdown its usage is kept; otherwise (killed, out of
        wall time) the key goes with it."""
        if self.by_name.get(pcb.agent or "") is not pcb:
            return
        if self.sys.shutdown_requested.is_set():
            self._save([pcb])
        else:
            self._forget(pcb.agent)

    def flush(self) -> None:
        self._write(_usage_rows(self.by_name.values()))

    def _save(self, pcbs: list[PCB]) -> None:
        self._write(_usage_rows(pcbs))

    def _write(self, rows: list[tuple]) -> None:
        if not rows:
            return
        with self._lock, self._db:
            self._db.executemany("UPDATE api_keys SET tokens_in = ?, tokens_out = ?, "
                                 "cached_tokens = ? WHERE name = ?", rows)

    async def _flusher(self) -> None:
        last: dict[str, tuple] = {}
        while True:
            await trio.sleep(FLUSH_S)
            rows = [r for r in _usage_rows(self.by_name.values()) if last.get(r[3]) != r]
            await trio.to_thread.run_sync(self._write, rows)
            last.update((r[3], r) for r in rows)


def _usage_rows(pcbs: Any) -> list[tuple]:
    return [(p.usage.tokens_in, p.usage.tokens_out, p.usage.cached_tokens, p.agent)
            for p in list(pcbs)]
