"""Processes: control blocks (pcb.py), the process table (table.py), their OS
side (osproc.py) and processes on cluster nodes (remote.py).

Invariants:
- pid 1 is init: the kernel itself and the shell user. It never exits,
  holds every capability, and adopts orphans.
- A PCB is ZOMBIE from the moment its OS process is gone until its parent
  waits for it; an orphan (adopted by init) is reaped at once.
- A pid is never reused within one boot.
"""


from .osproc import signal_tree
from .pcb import INIT_PID, PCB, Usage, check_payload, parse_signal
from .table import ProcessTable

__all__ = ["INIT_PID", "PCB", "ProcessTable", "Usage", "check_payload", "parse_signal",
           "signal_tree"]
