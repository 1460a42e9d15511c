"""Identities and agent names: whose state a process acts on, and who may take a name.

Identity. A process spawned or attached with a name is the *named agent* of
that name and acts as ``agent:NAME``: its context, long-term memory, files
and kv keys are stored under that identity, outlive the process and kernel
restarts, and a later process with the name continues them. Any other
process acts as ``pid:N``, and that state lasts one boot at most: it is
deleted when the process exits (`forget`), and whatever a crash left behind
is deleted at the next boot before the first pid is handed out
(`forget_unnamed`); pids restart at 2 every boot, so that sweep is what keeps
a new pid N from reading an old one's data. Init's ``pid:1`` state lasts one
boot too. Trajectory episodes are records and stay, but an earlier boot's
unfinished unnamed ones are ended.

Names are owned, because taking up a name is taking up everything stored
under it:

- A new name is owned by its spawner: ``init`` when the shell user spawns,
  ``agent:NAME`` when a named agent does, and when an unnamed process does,
  an identity of that process's life only (``pid:N@BOOT``). No later process
  matches it, so once that spawner is gone its names fall to init and to
  holders of ``agent.adopt``.
- Spawning or attaching with a name that is taken needs the owner, init, or
  the privileged capability ``agent.adopt`` (never inherited by default);
  anyone else gets EACCES.
- Never while a live process holds the name, whoever asks: EBUSY naming it.

Ownership is durable (``agent_names`` in the memory database). A failed spawn
may leave a new name owned by its spawner, who may use it again. A name is
1..128 characters, none of them control or other non-printing characters
(Unicode category C).

Storage names. Distinct identities never share storage: file names come from
`path_name`, an injective encoding, so ``agent:team lead`` and
``agent:team_lead`` get different directories. Sandbox dirs written under the
older, lossy encoding (``agent_team_lead``) are not migrated: they stay,
unused, until removed by hand.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmagentos.drivers.sandbox import discard, empty_trash
from llmagentos.syscalls import caps as capmod
from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.table import check_name  # noqa: F401  (the ABI's rule)

from .proc import INIT_PID, PCB
from .proc.pcb import UNNAMED

if TYPE_CHECKING:
    from .services import Services

ADOPT = "agent.adopt"


def identity(pcb: PCB) -> str:
    """Who a process acts as: ``agent:NAME`` or ``pid:N`` (made with its PCB)."""
    return pcb.identity




_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_-")
_MAX_PATH_NAME = 200  # well under NAME_MAX (255 bytes)
_CUT = 120


def path_name(text: str) -> str:
    """A file name for ``text``, one to one: each UTF-8 byte outside
    [a-z0-9_-] becomes ``%XX`` ('%', '.', '/' included, so the result is never
    '.', '..' or a path; capitals too, so names that differ only in case stay
    apart on a case-insensitive file system). Past 200 characters the result
    is cut and ends in '~' plus the text's SHA-256; a whole encoding never
    holds a '~'."""
    data = text.encode()
    out = "".join(chr(b) if b in _PLAIN else f"%{b:02X}" for b in data)
    if len(out) > _MAX_PATH_NAME:
        out = out[:_CUT] + "~" + hashlib.sha256(data).hexdigest()
    return out


class NameTable:
    """Who may spawn or attach a process with a given agent name."""

    def __init__(self, procs: Any, memory: Any) -> None:
        self.procs = procs  # the ProcessTable: who holds a name now
        self.memory = memory  # the ContextStore: who owns it, durably
        self.boot = secrets.token_hex(8)  # makes an unnamed spawner's ownership one boot's

    def owner_of(self, pcb: PCB) -> str:
        if pcb.pid == INIT_PID:
            return "init"
        if pcb.agent:
            return identity(pcb)
        return f"{UNNAMED}{pcb.pid}@{self.boot}"

    def holder(self, name: str) -> PCB | None:
        return next((p for p in self.procs.procs.values()
                     if p.agent == name and not p.exited), None)

    def claim(self, parent: PCB, name: str | None) -> None:
        """Check that ``parent`` may now start a process named ``name`` (None:
        unnamed, always fine); a new name becomes the parent's."""
        if name is None:
            return
        check_name(name)
        me = self.owner_of(parent)
        owner = self.memory.name_owner(name)
        if owner is None:
            owner = self.memory.take_name(name, me)
        if owner != me and parent.pid != INIT_PID and not capmod.covers(parent.caps, ADOPT):
            raise SyscallError("EACCES", f"agent name {name!r} belongs to {owner}; taking it "
                                         f"up needs its owner or capability {ADOPT}")
        holder = self.holder(name)
        if holder is not None:
            raise SyscallError("EBUSY", f"agent name {name!r} is held by pid {holder.pid}")


def forget(services: "Services", pcb: PCB) -> None:
    """An unnamed process has exited: its contexts, memories and kv keys go
    with it (its files: sysfs.release)."""
    if pcb.agent or pcb.pid == INIT_PID:
        return
    me = identity(pcb)
    services.memory.delete_owned(me)
    services.memory.mem_drop(me)
    services.tools.kv.drop(me)


def forget_unnamed(services: "Services") -> None:
    """At boot, before the first pid: delete what unnamed processes of earlier
    boots left (a crash or a kill skips `forget`)."""
    mem, kv = services.memory, services.tools.kv
    for owner in mem.owners():
        if owner.startswith(UNNAMED):
            mem.delete_owned(owner)
            mem.mem_drop(owner)
    for owner in kv.owners():
        if owner.startswith(UNNAMED):
            kv.drop(owner)
    services.trajectories.end_unfinished(UNNAMED)
    fs = services.config.state_dir / "fs"
    stale = (path_name(UNNAMED), "pid_")  # and the older encoding's
    try:
        entries = list(os.scandir(fs))
    except FileNotFoundError:
        return
    trash = services.config.state_dir / "trash"
    for e in entries:
        if e.name.startswith(stale):
            if e.is_dir(follow_symlinks=False):
                discard(Path(e.path), trash)  # recursion-free: any depth a crash left
            else:
                os.unlink(e.path)
    empty_trash(trash)  # and whatever an earlier boot's releases left there
