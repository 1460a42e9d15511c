"""The kernel's Prometheus metrics: one registry per kernel, read at scrape time.

Nothing here counts anything. The kernel already keeps every number a scrape
reports: each process's usage in its control block (tokens in and out,
syscalls, tool calls, device seconds), the kernel-wide counters of
`Services.stats`, and each loaded model's run-queue stats (queue depth,
utilization, tokens per second over the stats window, preemptions, saved
snapshot bytes). `KernelCollector` turns them into metric families when the
registry is collected, so the numbers cannot drift from `llmos ps` and
`llmos status`. The registry is the kernel's own (`Services.metrics`), never
prometheus-client's global default one: two kernels in one Python process
(the tests) do not share series.

`render(services)` is what an HTTP face serves at GET /metrics; `sys.metrics`
returns the same text over the syscall interface.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .services import Services

PREFIX = "llmos"

# Per-process usage (PCB.usage field -> metric name, help); counters over its life.
PROCESS_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("tokens_in", "process_tokens_in", "prompt tokens the device processed for the process"),
    ("tokens_out", "process_tokens_out", "tokens the device generated for the process"),
    ("cached_tokens", "process_cached_tokens", "prompt tokens served from its saved state"),
    ("syscalls", "process_syscalls", "syscalls the process made"),
    ("tool_calls", "process_tool_calls", "tool calls the process made"),
    ("device_time", "process_device_seconds", "device seconds spent on the process"),
    ("queue_wait", "process_queue_wait_seconds", "seconds its requests waited in a run queue"),
)

# Kernel-wide counters (Services.stats key -> metric name, help).
KERNEL_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("syscalls", "syscalls", "syscalls received by the kernel"),
    ("errors", "syscall_errors", "syscalls answered with an errno"),
    ("connections", "connections", "connections accepted"),
    ("protocol_errors", "protocol_errors", "connections closed for a wire protocol error"),
)

# Per loaded model, from its run queue's stats() (key -> metric name, help). A queue
# kind without a key (a remote queue keeps no snapshots) reports nothing for it.
DEVICE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("queue_length", "device_queue_depth", "requests waiting in the model's run queue"),
    ("running", "device_running", "requests holding a slot and generating"),
    ("n_slots", "device_slots", "slots (concurrent sequences) of the device"),
    ("utilization", "device_utilization", "share of the stats window the device was busy (0..1)"),
    ("tokens_per_s", "device_tokens_per_second",
     "tokens per second generated over the stats window"),
)
DEVICE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("tokens_in", "device_tokens_in", "prompt tokens the device processed"),
    ("tokens_out", "device_tokens_out", "tokens the device generated"),
    ("device_time", "device_busy_seconds", "seconds the device spent computing"),
    ("preemptions", "device_preemptions", "requests preempted to give their slot to another"),
    ("completed", "device_requests_completed", "requests completed (remote models)"),
)


class KernelCollector(Collector):
    """Reads the kernel's counters each time the registry is collected."""

    def __init__(self, services: "Services") -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        sv = self.services
        yield from self._kernel(sv)
        yield from self._processes(sv)
        yield from self._devices(sv)

    @staticmethod
    def _kernel(sv: "Services") -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_uptime_seconds", "seconds since the kernel booted")
        up.add_metric([], time.time() - sv.boot_time)
        yield up
        for key, name, doc in KERNEL_COUNTERS:
            c = CounterMetricFamily(f"{PREFIX}_{name}", doc)
            c.add_metric([], sv.stats.get(key, 0))
            yield c
        states = GaugeMetricFamily(f"{PREFIX}_processes", "processes by state",
                                   labels=["state"])
        counts: dict[str, int] = {}
        for p in list(sv.procs.procs.values()):
            counts[p.state] = counts.get(p.state, 0) + 1
        for state in ("NEW", "READY", "RUNNING", "WAITING", "STOPPED", "ZOMBIE"):
            states.add_metric([state], counts.get(state, 0))
        yield states

    @staticmethod
    def _processes(sv: "Services") -> Iterator[Metric]:
        labels = ["pid", "name"]
        families = [CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
                    for _, name, doc in PROCESS_COUNTERS]
        nice = GaugeMetricFamily(f"{PREFIX}_process_nice", "the process's nice value",
                                 labels=labels)
        for p in list(sv.procs.procs.values()):
            ident = [str(p.pid), p.name]
            for fam, (field, _, _) in zip(families, PROCESS_COUNTERS):
                fam.add_metric(ident, getattr(p.usage, field))
            nice.add_metric(ident, p.nice)
        yield from families
        yield nice

    @staticmethod
    def _devices(sv: "Services") -> Iterator[Metric]:
        labels = ["model"]
        gauges = [GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
                  for _, name, doc in DEVICE_GAUGES]
        counters = [CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
                    for _, name, doc in DEVICE_COUNTERS]
        snap = GaugeMetricFamily(f"{PREFIX}_device_snapshot_bytes",
                                 "bytes of saved sequence state (KV snapshots) by tier",
                                 labels=["model", "tier"])
        for model, entry in list(sv.table.loaded.items()):
            stats: dict[str, Any] = entry.queue.stats()
            for fam, (key, _, _) in zip(gauges, DEVICE_GAUGES):
                if stats.get(key) is not None:
                    fam.add_metric([model], float(stats[key]))
            for fam, (key, _, _) in zip(counters, DEVICE_COUNTERS):
                if stats.get(key) is not None:
                    fam.add_metric([model], float(stats[key]))
            snaps = stats.get("snapshots")
            if snaps:
                snap.add_metric([model, "ram"], snaps.get("ram_bytes", 0))
                snap.add_metric([model, "disk"], snaps.get("disk_bytes", 0))
        yield from gauges
        yield from counters
        yield snap


def registry(services: "Services") -> CollectorRegistry:
    """A kernel's own registry, its collector registered."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(KernelCollector(services))
    return reg


def render(services: "Services") -> tuple[bytes, str]:
    """The exposition text of the kernel's registry and its content type, as
    GET /metrics answers them."""
    return generate_latest(services.metrics), CONTENT_TYPE_LATEST
