"""Where a kernel lives on disk: part of the ABI, since clients find the
kernel's socket and the shell user's token from these names alone."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ENV_SOCKET = "LLMAGENTOS_SOCKET"  # a Unix socket path, or tcp://HOST:PORT
ENV_ADDRESS = "LLMAGENTOS_ADDRESS"  # set by hand: as ENV_SOCKET, or tls://HOST:PORT; wins
ENV_CA = "LLMAGENTOS_CA"  # the CA file a tls:// client trusts (the kernel's tls/ca.pem)
ENV_TOKEN = "LLMAGENTOS_TOKEN"  # a token given by hand (remote processes, tests)
ENV_TOKEN_FD = "LLMAGENTOS_TOKEN_FD"  # a spawned process's token: an inherited memfd
ENV_PID = "LLMAGENTOS_PID"
ENV_RUN_DIR = "LLMAGENTOS_RUN_DIR"
ENV_STATE_DIR = "LLMAGENTOS_STATE_DIR"
ENV_CONFIG = "LLMAGENTOS_CONFIG"  # the config file (model registry) a private kernel boots with
ENV_THREADS = "LLMAGENTOS_THREADS"  # llama.cpp threads of a device not given --threads

SOCKET_NAME = "kernel.sock"
TOKEN_NAME = "token"  # the shell user's token, mode 0600
PIDFILE_NAME = "kernel.pid"
LOCK_NAME = "kernel.lock"
TCP_NAME = "tcp"  # the TCP listener's address, when one is open
TLS_NAME = "tls"  # the TLS listener's address (tls://HOST:PORT), when one is open
HTTP_NAME = "http"  # the HTTP gateway's base URL, when one is open
LOG_NAME = "kernel.log"


def default_run_dir() -> Path:
    if os.environ.get(ENV_RUN_DIR):
        return Path(os.environ[ENV_RUN_DIR])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "llmagentos"
    return Path(tempfile.gettempdir()) / f"llmagentos-{os.getuid()}"


def default_state_dir() -> Path:
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR])
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "llmagentos"
