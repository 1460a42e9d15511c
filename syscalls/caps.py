"""Capabilities: strings such as ``llm``, ``fs.write``, ``tool:calc.*``.

A held entry may be a glob (``tool:*``, ``*``). A process holds a set; a
child's set is bounded by its parent's (like Linux's capability bounding set).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable

# What a process gets when its spawner names no set: everything its parent holds
# except the powers over other processes and the kernel itself. agent.adopt
# takes up an agent name (its context, memory, files) that another identity owns;
# llm.admin loads and unloads the kernel's models; svc.admin starts and stops the
# supervised services (processes of init); key.admin makes and revokes the HTTP
# gateway's API keys (each a process of its own).
PRIVILEGED = frozenset({"proc.kill_any", "sys.shutdown", "proc.renice", "sys.audit",
                        "agent.adopt", "llm.admin", "svc.admin", "key.admin"})
# Sharing with other agents is asked for by name, never inherited by default:
# these, and every shared-block capability (ctx.block.read:NAME, ctx.block.write:NAME;
# write implies read; NAME may be a glob).
SHARING = frozenset({"fs.shared", "mem.shared"})
SHARING_PREFIXES = ("ctx.block.",)
BLOCK_READ, BLOCK_WRITE = "ctx.block.read:", "ctx.block.write:"

KNOWN = (
    "llm", "llm.admin", "ctx", "mem", "mem.shared", "fs.read", "fs.write", "fs.shared", "exec",
    "tool:*",
    "proc.spawn", "proc.kill_any", "proc.renice", "drv.register", "env",
    "sys.shutdown", "sys.audit", "ipc", "agent.adopt",
    "ctx.block.read:*", "ctx.block.write:*", "svc.admin", "key.admin",
)


def covers(held: Iterable[str], need: str) -> bool:
    """True when some held entry (glob) covers the needed capability.

    A needed glob (``tool:calc.*``) is covered by an equal or wider held glob.
    ``ctx.block.read:NAME`` is also covered by ``ctx.block.write:NAME``.
    """
    held = held if isinstance(held, (list, set, frozenset, tuple)) else list(held)
    # the exact entry first: it is the common case (every syscall's check), and
    # globbing every entry costs more than the rest of a short call (ipc.send)
    if need in held:
        return True
    if need.startswith(BLOCK_READ):  # the right to write a block is the right to read it too
        if covers(held, BLOCK_WRITE + need[len(BLOCK_READ):]):
            return True
    return any(fnmatchcase(need, h) for h in held)


def bounded(parent: Iterable[str], requested: Iterable[str]) -> list[str]:
    """The requested entries that the parent's set does not cover."""
    parent = list(parent)
    return [r for r in requested if not covers(parent, r)]


def default_child(parent: Iterable[str]) -> list[str]:
    """A child's set when its spawner names none: the parent's, less the
    privileged and the sharing capabilities."""
    parent = list(parent)
    withheld = PRIVILEGED | SHARING

    def kept(c: str) -> bool:
        return c not in withheld and not c.startswith(SHARING_PREFIXES)
    if "*" in parent:
        return [c for c in KNOWN if kept(c)]
    return [c for c in parent if kept(c)]
