"""Saved sequence states (swap space for the compute device).

A snapshot is ``(tokens, data)``: the tokens resident in a slot and the
llama.cpp sequence state (``Device.save``) that holds their KV cache. The
store keeps snapshots in RAM up to a byte budget; beyond it the least
recently used ones go to files in ``spill_dir`` (or, without one, are
dropped). Two kinds, by key:

* ``("req", id)``, *pinned*: a preempted or parked request. Spilled last;
  dropped only when there is no spill dir, and then the request re-prefills
  its tokens on resume (slower, still correct).
* ``("owner", pid)``: the idle conversation of a process whose slot was given
  to someone else, kept so its next call restores instead of re-prefilling.

Synchronous; owned by the scheduler (trio thread). Spilling is a blocking
file write of a few MB, done rarely.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Snapshot:
    key: Hashable
    tokens: list[int]
    nbytes: int
    pinned: bool
    data: bytearray | None = None   # in RAM
    path: Path | None = None        # spilled to this file

    def load(self) -> bytearray:
        """The state bytes, from RAM or the spill file."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return bytearray(self.path.read_bytes())


class SnapshotStore:
    """Snapshots under a RAM budget, LRU, spilling to ``spill_dir``."""

    def __init__(self, ram_bytes: int = 256 << 20, spill_dir: str | Path | None = None) -> None:
        self.ram_budget = ram_bytes
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.spill_dir.glob("kv-*.state"):  # a previous kernel's swap
                stale.unlink(missing_ok=True)
        self._snaps: OrderedDict[Hashable, Snapshot] = OrderedDict()  # LRU first
        self._names = itertools.count()
        self.ram_bytes = 0
        self.disk_bytes = 0
        self.spills = 0
        self.drops = 0

    def __len__(self) -> int:
        return len(self._snaps)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._snaps

    def keys(self) -> Iterator[Hashable]:
        return iter(list(self._snaps))

    def put(
        self, key: Hashable, tokens: list[int], data: bytearray, *, pinned: bool = False
    ) -> None:
        self.discard(key)
        snap = Snapshot(key, list(tokens), len(data), pinned, data=data)
        self._snaps[key] = snap
        self.ram_bytes += snap.nbytes
        self._enforce()

    def peek(self, key: Hashable) -> Snapshot | None:
        """The snapshot without touching its LRU position."""
        return self._snaps.get(key)

    def take(self, key: Hashable) -> Snapshot | None:
        """Remove and return the snapshot; its bytes stay readable via load() until then.

        A spilled file is deleted by ``finish(snapshot)`` once it has been loaded.
        """
        snap = self._snaps.pop(key, None)
        if snap is None:
            return None
        if snap.data is not None:
            self.ram_bytes -= snap.nbytes
        else:
            self.disk_bytes -= snap.nbytes
        return snap

    @staticmethod
    def finish(snap: Snapshot) -> None:
        """Drop what a taken snapshot still holds (its spill file)."""
        if snap.path is not None:
            try:
                snap.path.unlink()
            except FileNotFoundError:
                pass
        snap.data = None

    def discard(self, key: Hashable) -> None:
        snap = self.take(key)
        if snap is not None:
            self.finish(snap)

    def discard_where(self, pred) -> int:
        keys = [k for k in self._snaps if pred(k)]
        for k in keys:
            self.discard(k)
        return len(keys)

    def close(self) -> None:
        for k in list(self._snaps):
            self.discard(k)

    def _enforce(self) -> None:
        # Unpinned (idle caches) go first, then pinned; LRU order within each.
        while self.ram_bytes > self.ram_budget:
            victim = next((s for s in self._snaps.values() if s.data is not None and not s.pinned),
                          None)
            if victim is None:
                victim = next((s for s in self._snaps.values() if s.data is not None), None)
            if victim is None:
                return
            if self.spill_dir is not None:
                path = self.spill_dir / f"kv-{os.getpid()}-{next(self._names)}.state"
                try:
                    path.write_bytes(victim.data)  # type: ignore[arg-type]
                except OSError:
                    path.unlink(missing_ok=True)
                    self._drop(victim)
                    continue
                victim.path = path
                victim.data = None
                self.ram_bytes -= victim.nbytes
                self.disk_bytes += victim.nbytes
                self.spills += 1
            else:
                self._drop(victim)

    def _drop(self, snap: Snapshot) -> None:
        self.take(snap.key)
        self.finish(snap)
        self.drops += 1
