"""llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`)
on the packaged Gemma-3-270M, run as a subprocess on a free loopback port: the
real server the remote backend (drivers/openai_backend.py) is tested and
benchmarked against.

The server's ``Llama`` takes llama.cpp's default model parameters, whose AMX
weight repack crashes this build (SIGILL/SIGSEGV on the first decode; see
drivers/llama/runtime.py), so the child loads models as the kernel's device
does (``model_params``: no repack) and then runs the server module unchanged:

    python bench/openai_server.py --model PATH --port P [any llama_cpp.server flag]
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from _kernel import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenAIServer:
    """One llama_cpp.server process; ``start()`` returns once /v1/models answers."""

    def __init__(self, *, embedding: bool = False, api_key: str | None = None,
                 n_ctx: int = 1024, n_threads: int | None = None, log: str | Path | None = None,
                 extra: list[str] | None = None) -> None:
        from llmagentos.drivers.llama import default_threads
        from llmagentos.drivers.models import packaged_gemma_path

        n_threads = n_threads or default_threads()  # as many as the kernel's device

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        # interrupt_requests off: by default a stream is cut short ([DONE]) as soon as
        # another request waits for the model, which would end every queued stream early.
        self.args = ["--model", str(packaged_gemma_path()), "--host", "127.0.0.1",
                     "--port", str(self.port), "--n_ctx", str(n_ctx),
                     "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads),
                     "--embedding", str(embedding).lower(), "--verbose", "false",
                     "--interrupt_requests", "false", *(extra or [])]
        if api_key is not None:
            self.args += ["--api_key", api_key]
        self.log = Path(log) if log else None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> OpenAIServer:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, __file__, *self.args],
                                     stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if self.log:
            out.close()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode} "
                                   f"(log: {self.log})")
            try:
                if httpx.get(self.base_url + "/v1/models", headers=headers,
                             timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer within {timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-whatever, as a crashed host would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve() -> None:
    import runpy

    import llama_cpp.llama_cpp as low

    from llmagentos.drivers.llama import model_params

    # Llama() reads its defaults from the low-level module (as bench/reference.py).
    low.llama_model_default_params = model_params
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _serve()
