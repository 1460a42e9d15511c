"""Handlers of the shared-block calls (`ctx.block_*`): named, versioned pieces
of context several agents share (kernel/memory/blocks.py).

Rights come from capabilities, not from who made a block: reading NAME needs
``ctx.block.read:NAME``, writing, creating and deleting it
``ctx.block.write:NAME`` (which also reads); a spawner hands them to its
children by name (they are never inherited by default). Attaching needs read
access to the block and the context's ownership, as every ctx call.
"""

from __future__ import annotations

from llmagentos.syscalls import caps as capmod
from llmagentos.syscalls.errno import SyscallError

from . import perms
from .dispatch import Call, handler
from .memory.blocks import check_name
from .names import identity
from .sysctx import current, owner_arg


def _checked(call: Call, name: str, write: bool) -> str:
    check_name(name)  # before it becomes part of a capability string
    perms.check_block(call.caller, name, write)
    return name


@handler("ctx.block_open")
async def block_open(call: Call, name: str, create: bool) -> dict:
    pcb, blocks = call.caller, call.sys.memory.blocks
    _checked(call, name, write=False)
    if create and not perms.holds(pcb, capmod.BLOCK_WRITE + name):
        try:  # one who may only read opens what exists, and creates nothing
            return blocks.open(name, False, identity(pcb))
        except SyscallError as e:
            if e.name != "ENOENT":
                raise
            perms.check_block(pcb, name, write=True)  # EACCES naming the right
    return blocks.open(name, create, identity(pcb))


@handler("ctx.block_read")
async def block_read(call: Call, name: str) -> dict:
    return call.sys.memory.blocks.read(_checked(call, name, write=False))


@handler("ctx.block_write")
async def block_write(call: Call, name: str, text: str, expect_version: int | None) -> dict:
    return call.sys.memory.blocks.write(_checked(call, name, write=True), text, expect_version,
                                        identity(call.caller))


@handler("ctx.block_attach")
async def block_attach(call: Call, name: str, ctx: int | None) -> None:
    call.sys.memory.blocks.attach(current(call, ctx), _checked(call, name, write=False),
                                  owner=owner_arg(call.caller))


@handler("ctx.block_detach")
async def block_detach(call: Call, name: str, ctx: int | None) -> None:
    # Detaching only narrows what the caller's own context shows: no block right needed
    # (a process that lost its read right may still clean up).
    call.sys.memory.blocks.detach(current(call, ctx), check_name(name),
                                  owner=owner_arg(call.caller))


@handler("ctx.block_list")
async def block_list(call: Call, ctx: int | None) -> list:
    pcb = call.caller
    rows = call.sys.memory.blocks.list(current(call, ctx), owner=owner_arg(pcb))
    return [b for b in rows if perms.may_read_block(pcb, b["name"])]


@handler("ctx.block_delete")
async def block_delete(call: Call, name: str) -> None:
    call.sys.memory.blocks.delete(_checked(call, name, write=True))
