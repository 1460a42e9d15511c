"""What llama.cpp needs once per process: the backend, the compute thread, and
how models are loaded.

The compute thread: this llama.cpp is built with OpenMP. libgomp keeps a pool
of helper threads per thread that ever started a parallel region, and once it
manages more threads than there are CPUs it stops spinning at barriers, and
ggml puts an OpenMP barrier after every graph node: on this 2-core machine a
decode run from a second thread (say, a trio worker after the main thread
decoded once) took 35 ms instead of 22. So every ``llama_decode`` of every
Device goes through one thread, ``compute_thread``, whichever thread calls it.
Run other llama.cpp work (e.g. a reference ``Llama``) through its ``call()``
as well. The scheduler runs each whole tick on it (drivers/device.py).

Threads: llama.cpp's own tools default to the machine's physical cores; a
process confined to fewer CPUs (taskset, a cpuset cgroup) gets as many threads
as it has CPUs (``default_threads``), since OpenMP threads that outnumber their
CPUs wait on each other at every barrier. ``$LLMAGENTOS_THREADS`` sets the
default for a process and what it starts (several kernels sharing the cores,
as the test suite's workers do).

Model loading: this build of llama.cpp crashes (SIGSEGV in
ggml_backend_amx_mul_mat) when it repacks weights for the CPU's AMX units on
this machine, so models load with ``use_extra_bufts=False`` (``model_params``)
unless a caller asks for the extra buffers.
"""

from __future__ import annotations

import logging
import os
import threading

import llama_cpp
import psutil

from llmagentos.drivers.device import ComputeThread
from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.paths import ENV_THREADS

_backend_lock = threading.Lock()
_backend_ready = False


compute_thread = ComputeThread("llama-compute")


def init_backend(verbose: bool) -> None:
    """Start llama.cpp's backend (once per process) and set how much it logs."""
    global _backend_ready
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


def default_threads() -> int:
    """Compute threads when none are asked for: ``$LLMAGENTOS_THREADS``, else the
    physical cores of the CPUs this process may run on (see the module doc)."""
    given = os.environ.get(ENV_THREADS)
    if given:
        if not given.isdigit() or not 0 < int(given) <= 512:
            raise SyscallError("EINVAL", f"{ENV_THREADS} is a number of threads (1..512), "
                                         f"not {given!r:.40}")
        return int(given)
    cpus = len(os.sched_getaffinity(0))
    return max(1, min(cpus, psutil.cpu_count(logical=False) or cpus))


def model_params(extra_buffers: bool = False) -> llama_cpp.llama_model_params:
    """llama.cpp's default model parameters, without the AMX weight repack unless
    ``extra_buffers`` (see the module doc)."""
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = extra_buffers
    return params
