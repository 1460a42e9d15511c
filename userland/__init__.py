"""LLMAgentOS userland: the syscall client and the user API.

    import llmagentos
    c = llmagentos.connect()          # finds the kernel by itself
    pid = c.proc.spawn(["python", "agent.py"])
"""

from .client import AsyncClient, Client, aconnect, connect
from .errors import ERRORS, KernelError

__all__ = ["AsyncClient", "Client", "aconnect", "connect", "ERRORS", "KernelError"]
