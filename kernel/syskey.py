"""Handlers of the `key` group: the HTTP gateway's API keys (kernel/gateway/keys.py)."""

from __future__ import annotations

from llmagentos.syscalls.errno import SyscallError

from .dispatch import Call, handler


def _keys(call: Call):
    if call.sys.keys is None:
        raise SyscallError("ENOSYS", "this kernel keeps no API keys")
    return call.sys.keys


@handler("key.create")
async def create(call: Call, name: str, caps: list | None, nice: int, limits: dict | None,
                 model: str | None) -> dict:
    return _keys(call).create(call.caller, name, caps, nice, limits, model)


@handler("key.list")
async def list_(call: Call) -> list:
    return _keys(call).list()


@handler("key.revoke")
async def revoke(call: Call, name: str | int) -> dict:
    return _keys(call).revoke(name)
