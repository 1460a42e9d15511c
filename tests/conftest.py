"""Shared fixtures: a real kernel booted as its own program on a temp run dir."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import llmagentos
from llmagentos.syscalls.paths import ENV_THREADS

PY = sys.executable
# The baseline the tests compare against lives with the benchmarks (bench/ is no package).
sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))


@dataclass
class BootedKernel:
    run_dir: Path
    state_dir: Path
    proc: subprocess.Popen
    log: Path

    @property
    def socket(self) -> str:
        return str(self.run_dir / "kernel.sock")

    @property
    def token(self) -> str:
        return (self.run_dir / "token").read_text().strip()

    def client(self, **kw) -> llmagentos.Client:
        return llmagentos.connect(run_dir=self.run_dir, **kw)

    def env(self) -> dict:
        """Environment for a shell command (llmos CLI) aimed at this kernel."""
        e = dict(os.environ)
        for k in ("LLMAGENTOS_SOCKET", "LLMAGENTOS_TOKEN"):
            e.pop(k, None)
        e["LLMAGENTOS_RUN_DIR"] = str(self.run_dir)
        return e

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


MODEL_FIXTURES = {"llm_kernel", "device", "reference"}


def pytest_configure(config):
    """Under xdist every model the workers start (kernels, devices, the reference)
    runs one llama.cpp thread: two workers' models with two threads each on two
    cores would wait on each other at every OpenMP barrier."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ[ENV_THREADS] = "1"


def pytest_itemcollected(item):
    """Markers from what a test uses: `model` (it loads the real model), `ray`
    (a Ray cluster); `-m "not model"` runs the fast foundation tests alone.
    A module's tests are one xdist group, so its shared fixtures (a kernel with
    the model) start once; Ray's are one group, so one cluster runs at a time. A
    long test that uses none of its module's shared fixtures may name a group of
    its own (`@pytest.mark.xdist_group`) and run beside the rest of its module.
    (Set as each test is collected: xdist reads the groups in its own
    modifyitems hook.)"""
    import inspect

    fixtures = set(getattr(item, "fixturenames", ()))
    try:
        boots_model = 'model="gemma3-270m"' in inspect.getsource(item.function)
    except (OSError, TypeError):
        boots_model = False
    if fixtures & MODEL_FIXTURES or boots_model or item.module.__name__ == "test_ray":
        item.add_marker(pytest.mark.model)
    if item.module.__name__ == "test_ray":
        item.add_marker(pytest.mark.ray)
    if item.get_closest_marker("xdist_group") is None:  # a test may name a group of its own
        item.add_marker(pytest.mark.xdist_group(
            "ray" if item.get_closest_marker("ray") else item.module.__name__))


def probe_name(what: str = "probe") -> str:
    """A containment group name of this test process's own: xdist workers probe
    at the same time, and a shared name let one remove what another was listing."""
    return f"llmagentos-test{what}-{os.getpid()}"


@functools.lru_cache(maxsize=1)
def containment_levels() -> tuple[str, tuple[str, ...]]:
    """(the level auto picks here, the weaker levels this machine can be forced to)."""
    from llmagentos.kernel.cgroups import LEVELS, Containment

    auto = Containment.probe(probe_name())
    auto.close()
    forced = []
    for lv in LEVELS:
        if lv == auto.level:
            continue
        if lv == "subreaper":  # always there (probing it would make us a subreaper)
            forced.append(lv)
            continue
        try:
            Containment.probe(probe_name(), lv).close()
            forced.append(lv)
        except ValueError:
            pass
    return auto.level, tuple(forced)


def boot_kernel(tmp: Path, *extra: str, wait: float = 60, model: str = "none") -> BootedKernel:
    """Boot a kernel program. Tests of the foundation boot without the compute
    device (`--model none`); device tests pass model="gemma3-270m"."""
    run_dir, state_dir = tmp / "run", tmp / "state"
    log = tmp / "kernel.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [PY, "-m", "llmagentos.kernel", "--run-dir", str(run_dir),
             "--state-dir", str(state_dir), "--grace", "1", "--model", model, *extra],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    k = BootedKernel(run_dir, state_dir, proc, log)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kernel exited {proc.returncode}:\n{log.read_text()}")
        try:
            k.client().close()
            return k
        except llmagentos.KernelError:
            time.sleep(0.05)
    k.stop()
    raise RuntimeError(f"kernel did not come up:\n{log.read_text()}")


@pytest.fixture
def kernel(tmp_path):
    k = boot_kernel(tmp_path)
    yield k
    k.stop()


@pytest.fixture(scope="module")
def llm_kernel(tmp_path_factory):
    """A kernel with the real compute device (Gemma-3-270M), shared by a module."""
    k = boot_kernel(tmp_path_factory.mktemp("llm"), "--slots", "4", "--n-ctx", "1024",
                    model="gemma3-270m")
    yield k
    k.stop()


@pytest.fixture(scope="module")
def shared_kernel(tmp_path_factory):
    """One kernel for a module's read-mostly tests (cheaper than one per test)."""
    k = boot_kernel(tmp_path_factory.mktemp("kernel"))
    yield k
    k.stop()


def token_of(c, pid: int) -> str:
    """A spawned process's token, read as the shell user may: from the memfd
    it inherited (LLMAGENTOS_TOKEN_FD)."""
    import psutil
    os_pid = c.proc.stat(pid)["os_pid"]
    fd = psutil.Process(os_pid).environ()["LLMAGENTOS_TOKEN_FD"]
    with open(f"/proc/{os_pid}/fd/{fd}") as f:
        return f.read()


def in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    """Start fn(*args, **kw) in a thread (a call that blocks while the test acts):
    its result lands in box["result"], a KernelError in box["error"]."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kw)
        except llmagentos.KernelError as e:
            box["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, box


def wait_for(pred, timeout: float = 10, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def device():
    """A real compute device (4 slots), one per test module."""
    from llmagentos.drivers.llama import Device
    dev = Device(n_seq_max=4, n_ctx=1024, n_batch=512)
    yield dev
    dev.close()


@pytest.fixture(scope="module")
def reference():
    """llama-cpp-python's own Llama on the same GGUF, one per test module."""
    llm = reference_llama()
    yield llm
    llm.close()


def reference_llama(n_ctx: int = 512):
    """llama-cpp-python's own greedy baseline (bench/reference.py)."""
    from reference import reference_llama as load
    return load(n_ctx)
