"""Prometheus metrics: the kernel's own registry, read at scrape time, seen
through `sys.metrics` and `llmos metrics` and parsed with prometheus-client's
own parser."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import boot_kernel
from prometheus_client.parser import text_string_to_metric_families

import llmagentos
from llmagentos.kernel import metrics


@pytest.fixture(scope="module")
def sim_kernel(tmp_path_factory):
    """A kernel on the simulated device: generation without a real model."""
    k = boot_kernel(tmp_path_factory.mktemp("metrics"), model="sim")
    yield k
    k.stop()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def llmos(k, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmagentos.cli", *args], env=k.env(),
                          capture_output=True, text=True, timeout=30)


def test_a_process_token_counters_rise_when_it_generates(sim_kernel):
    with sim_kernel.client() as shell:
        agent = shell.proc.attach("metered", ["llm"])
        with llmagentos.connect(token=agent["token"], run_dir=sim_kernel.run_dir) as c:
            ident = (("name", "metered"), ("pid", str(agent["pid"])))
            before = samples(c.sys.metrics())
            assert before[("llmos_process_tokens_out_total", ident)] == 0
            assert before[("llmos_process_tokens_in_total", ident)] == 0
            res = c.llm.generate("count to three", params={"max_tokens": 7})
            after = samples(c.sys.metrics())
            used = res["usage"]
            out = after[("llmos_process_tokens_out_total", ident)]
            assert out == used["completion_tokens"] == 7
            assert after[("llmos_process_tokens_in_total", ident)] == \
                used["prompt_tokens"] - used["cached_tokens"] > 0
            # the counters are the process table's: what `llmos ps` shows
            row = next(r for r in shell.proc.ps() if r["pid"] == agent["pid"])
            assert row["tokens_out"] == 7 and row["syscalls"] >= 3
            assert after[("llmos_process_syscalls_total", ident)] > \
                before[("llmos_process_syscalls_total", ident)]
            assert after[("llmos_process_device_seconds_total", ident)] > 0
            sim = (("model", "sim"),)
            assert after[("llmos_device_tokens_out_total", sim)] >= 7
            assert after[("llmos_device_tokens_out_total", sim)] > \
                before[("llmos_device_tokens_out_total", sim)]


def test_every_metric_the_issue_names_is_exposed(sim_kernel):
    out = llmos(sim_kernel, "metrics")
    assert out.returncode == 0, out.stderr
    names = {fam.name for fam in text_string_to_metric_families(out.stdout)}
    for name in ("llmos_process_tokens_in", "llmos_process_tokens_out",
                 "llmos_process_syscalls", "llmos_syscalls", "llmos_device_queue_depth",
                 "llmos_device_utilization", "llmos_device_tokens_per_second",
                 "llmos_device_preemptions", "llmos_device_snapshot_bytes", "llmos_processes"):
        assert name in names, name
    got = samples(out.stdout)
    util = got[("llmos_device_utilization", (("model", "sim"),))]
    assert 0 <= util <= 1
    assert got[("llmos_device_snapshot_bytes", (("model", "sim"), ("tier", "ram")))] >= 0
    js = llmos(sim_kernel, "metrics", "--json")
    assert js.returncode == 0 and "llmos_process_tokens_out_total" in js.stdout


def test_a_name_cannot_forge_series(sim_kernel):
    """Label values are escaped: quotes, backslashes and braces in a process
    name stay inside its own label."""
    evil = 'x"} llmos_forged 1\n{a="\\'
    with sim_kernel.client() as shell:
        with pytest.raises(llmagentos.ERRORS["EINVAL"]):  # a newline is refused at birth
            shell.proc.attach(evil)
        name = evil.replace("\n", " ")
        pid = shell.proc.attach(name, ["llm"])["pid"]
        got = samples(shell.sys.metrics())
    assert got[("llmos_process_tokens_out_total", (("name", name), ("pid", str(pid))))] == 0
    assert not any(n.startswith("llmos_forged") for n, _ in got)


def test_each_kernel_has_its_own_registry(tmp_path):
    """render() is what the HTTP face serves at GET /metrics. Two kernels'
    services in one Python process do not share series, and the global
    default registry stays untouched."""
    import prometheus_client

    from llmagentos.kernel.services import Services
    from llmagentos.syscalls.bootopts import KernelConfig

    def services(name: str) -> Services:
        return Services.create(KernelConfig(run_dir=tmp_path / name / "run",
                                            state_dir=tmp_path / name / "state", model="none"))

    a, b = services("a"), services("b")
    a.stats["syscalls"] += 5
    body, ctype = metrics.render(a)
    assert ctype.startswith("text/plain; version=")
    assert samples(body.decode())[("llmos_syscalls_total", ())] == 5
    assert samples(metrics.render(b)[0].decode())[("llmos_syscalls_total", ())] == 0
    assert a.metrics is not b.metrics
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "llmos_" not in default
