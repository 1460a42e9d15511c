"""The run queue and the device loop: who gets the compute device's slots, and when.

One concern a file:

* ``loop.py``: the Scheduler (its API, the device loop and its ticks, applying
  a tick's results, accounting of device time).
* ``placement.py``: admission and preemption (the run queue, the slots, the
  device operations an admission needs).
* ``policy.py``: the policies (queue order, who yields a slot, virtual time).
* ``requests.py``: the records of requests and owners, and the stats window.
* ``remote.py``: RemoteQueue, the run queue of a remote model (an
  OpenAI-compatible server): the same API, with requests in flight in place
  of slots. Imported where a remote model is opened (it loads the HTTP client).

The device is driven only through the contract of drivers/device.py: typed
operations run with ``apply``, then ``step``.
"""

from .loop import COST_EWMA, STATS_WINDOW, Scheduler
from .placement import MIN_COPY, MIN_IDLE_SAVE, MIN_RESTORE, Placement
from .policy import NICE_MAX, NICE_MIN, POLICIES, Policy, nice_weight, policy_named
from .requests import EmbedResult, OwnerUsage, Result

__all__ = [
    "COST_EWMA", "MIN_COPY", "MIN_IDLE_SAVE", "MIN_RESTORE", "NICE_MAX", "NICE_MIN",
    "POLICIES", "STATS_WINDOW", "EmbedResult", "OwnerUsage", "Placement", "Policy",
    "Result", "Scheduler", "nice_weight", "policy_named",
]
