"""/proc/PID/stat, read in one place: a process's state and parent (the
process table) and every process's (the subreaper sweep, kernel/cgroups.py)."""

from __future__ import annotations

import os


def stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat's fields after the command name (state first), or None
    once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()  # the name may hold spaces and ')'


def parent_pid(pid: int) -> int:
    fields = stat_fields(pid)
    try:
        return int(fields[1]) if fields else 0
    except (ValueError, IndexError):
        return 0


def os_state(pid: int) -> str | None:
    """The process's state letter ("T": stopped by a signal), or None if it is gone."""
    fields = stat_fields(pid)
    return fields[0].decode() if fields else None


def proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, start time, state) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or (rest := stat_fields(name)) is None:
            continue
        try:
            table[int(name)] = (int(rest[1]), int(rest[19]), rest[0].decode())
        except (IndexError, ValueError):
            continue
    return table


def children_map(table: dict[int, tuple[int, int, str]]) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    return kids
