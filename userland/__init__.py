"""LLMAgentOS userland: the syscall client and the user API.

    import llmagentos
    c = llmagentos.connect()          # finds the kernel by itself
    pid = c.proc.spawn(["python", "agent.py"])

    agent = llmagentos.Agent(model_name="gemma3-270m")   # an agent is a kernel process
    agent.run(llmagentos.Task("What is 2 + 3?", answer="5"))
"""

from .agent import Agent, EpisodeResult, Observation
from .client import Client, connect
from .errors import ERRORS, KernelError
from .tasks import Task

__all__ = ["Agent", "AsyncClient", "Client", "EpisodeResult", "Observation", "Task",
           "aconnect", "connect", "ERRORS", "KernelError", "Driver", "tool", "KernelEnv", "make"]


def __getattr__(name: str):
    # Driver and tool load on first use, so `python -m llmagentos.driver` does
    # not find its own module already imported (runpy warns about that).
    if name in ("AsyncClient", "aconnect"):  # trio loads with the first async client
        from . import aclient
        return getattr(aclient, name)
    if name in ("Driver", "tool"):
        from . import driver
        return getattr(driver, name)
    if name in ("KernelEnv", "make"):  # on first use: Gymnasium takes a while to import
        from . import envs
        return getattr(envs, name)
    raise AttributeError(f"module 'llmagentos' has no attribute {name!r}")
