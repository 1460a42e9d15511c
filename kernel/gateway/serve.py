"""The gateway's listener: Hypercorn's trio worker in the kernel's own nursery."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from llmagentos.syscalls.bootopts import KernelConfig, http_address

from .app import Gateway, build_app

if TYPE_CHECKING:
    from ..services import Services

log = logging.getLogger("llmagentos.kernel")


async def serve_http(services: "Services", config: KernelConfig,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until shutdown is requested; started() with the base URL once listening."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from ..services import BootError

    host, port = http_address(config.http, config.http_insecure)
    hc = Config()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("llmagentos.kernel.http")
    hc.graceful_timeout = config.grace
    hc.include_server_header = False
    # The MCP face is a client of this kernel like any MCP server process: each request's
    # bearer key says hello on the kernel's socket as the key's process (tool.call, fs.*).
    from llmagentos.mcp_server import streamable_http_app
    mcp = streamable_http_app(run_dir=config.run_dir, host=host)
    app = build_app(Gateway(services), config.max_frame, mcp)
    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(lambda task_status: serve(
                app, hc, shutdown_trigger=services.shutdown_requested.wait,
                task_status=task_status))
        except OSError as e:
            raise BootError(f"cannot listen on --http {config.http}: {e}") from None
        url = binds[0]
        log.info("HTTP gateway (OpenAI API) on %s/v1", url)
        task_status.started(url)
