"""The kernel on a Ray cluster: device actors, remote agent processes, node status.

Booted with ``--ray auto|ADDRESS`` the kernel joins (or, with ``auto`` and no
cluster running, starts) a Ray instance, places ``--devices`` DeviceActors
with the resources asked for, and schedules over them with a DeviceSet. The
kernel keeps a small local Device (one slot) for what needs the vocabulary
without a round trip: tokenizing, chat templates, grammar checks, embeddings.

Remote agent processes (``proc.spawn(..., placement="ray")``) run in an
``AgentHost`` actor on any node: it starts the argv as an OS process there,
with ``LLMAGENTOS_SOCKET=tcp://HOST:PORT`` (the kernel's TCP listener) and the
process's token, and reports its exit status and output.

trio stays the event loop: every blocking Ray call goes through a worker thread.
This module imports ray; the kernel imports it only when ``--ray`` is given.
"""

from __future__ import annotations

import logging
import os
import signal as _signal
import subprocess
import tempfile
from typing import Any

import ray
import trio

from llmagentos.drivers.models import open_device
from llmagentos.drivers.ray_device import RemoteDevice, start_device_actors
from llmagentos.syscalls.errno import SyscallError

from .devices import DeviceSet
from .scheduler import Scheduler

log = logging.getLogger(__name__)

MAX_REMOTE_OUTPUT = 4 << 20  # bytes of a remote process's output brought back to its log


class Cluster:
    """The kernel's handle on the Ray cluster: owns the actors it started."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.started_ray = False
        self.devices: list[RemoteDevice] = []
        self.agents: list[Any] = []

    async def start(self, models: Any) -> tuple[Any, DeviceSet | None]:
        """Join the cluster; with a model, place the device actors and build the DeviceSet."""
        cfg = self.cfg
        await trio.to_thread.run_sync(self._init_ray)
        if cfg.model == "none":
            return None, None
        if cfg.devices < 1:
            raise SyscallError("EINVAL", "--devices must be >= 1")
        log.info("loading model %s locally (vocabulary) and in %d device actors",
                 cfg.model, cfg.devices)
        local = await trio.to_thread.run_sync(lambda: open_device(
            cfg.model, registry=models, n_seq_max=1, n_ctx=cfg.n_ctx, n_threads=cfg.threads))
        kwargs = {"n_seq_max": cfg.slots, "n_ctx": cfg.n_ctx, "n_threads": cfg.threads,
                  "n_gpu_layers": cfg.n_gpu_layers, "kv_memory": cfg.kv_memory}
        config = str(cfg.config) if cfg.config else None
        try:
            placed = await trio.to_thread.run_sync(lambda: start_device_actors(
                cfg.devices, cfg.model, kwargs, models_config=config,
                num_cpus=cfg.device_cpus, num_gpus=cfg.device_gpus,
                max_restarts=cfg.device_restarts))
        except Exception as exc:
            local.close()
            raise SyscallError("EIO", f"device actors did not start on the Ray cluster: "
                                      f"{exc}") from None
        self.devices = [RemoteDevice(a, info, validator=local, index=i)
                        for i, (a, info) in enumerate(placed)]
        scheds = [Scheduler(d, cfg.policy, cfg.quantum, cfg.snapshot_ram,
                            str(cfg.state_dir / "kv" / f"device{i}"))
                  for i, d in enumerate(self.devices)]
        for d in self.devices:
            log.info("device actor %d on node %s (pid %d): %d slots x %d tokens",
                     d.index, d.node_ip, d.actor_pid, d.n_seq_max, d.n_ctx)
        return local, DeviceSet(scheds)

    def _init_ray(self) -> None:
        if ray.is_initialized():
            return
        address = None if self.cfg.ray == "auto" else self.cfg.ray
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        self.started_ray = True

    def close(self) -> None:
        for d in self.devices:
            d.close()
        for a in self.agents:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        if self.started_ray and ray.is_initialized():
            ray.shutdown()

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Nodes alive and dead, and the device actors. Blocking (asks the GCS)."""
        nodes = [{"node_id": n["NodeID"], "node": n["NodeManagerAddress"],
                  "alive": bool(n["Alive"]), "cpus": n.get("Resources", {}).get("CPU", 0),
                  "gpus": n.get("Resources", {}).get("GPU", 0)} for n in ray.nodes()]
        return {"address": ray.get_runtime_context().gcs_address,
                "nodes": nodes,
                "nodes_alive": sum(1 for n in nodes if n["alive"]),
                "nodes_dead": sum(1 for n in nodes if not n["alive"]),
                "devices": [{"device": d.index, **d.describe()} for d in self.devices],
                "agents": len(self.agents)}

    # -- remote agent processes -------------------------------------------------------------

    async def spawn(self, argv: list[str], env: dict[str, str], cwd: str | None) -> RemoteProcess:
        """Start ``argv`` on some node of the cluster; returns once it runs there."""
        cls = ray.remote(AgentHost).options(num_cpus=0, max_restarts=0, max_concurrency=4)

        def start() -> tuple[Any, dict]:
            actor = cls.remote()
            return actor, ray.get(actor.start.remote(argv, env, cwd), timeout=60)

        try:
            actor, info = await trio.to_thread.run_sync(start)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, OSError) else None
            if isinstance(cause, FileNotFoundError):
                raise SyscallError("ENOENT", f"no such executable on the node: "
                                             f"{argv[0]!r}") from None
            raise SyscallError("EIO", f"remote spawn failed: {exc}") from None
        except Exception as exc:
            raise SyscallError("EIO", f"remote spawn failed: {exc!r}") from None
        self.agents.append(actor)
        return RemoteProcess(self, actor, info)


class RemoteProcess:
    """The kernel's handle on an agent process running in an AgentHost actor."""

    def __init__(self, cluster: Cluster, actor: Any, info: dict[str, Any]) -> None:
        self.cluster = cluster
        self.actor = actor
        self.node = info["node_ip"]
        self.node_id = info["node_id"]
        self.pid = info["pid"]

    async def wait(self) -> tuple[int, bytes]:
        """(returncode, output); a negative returncode is the signal that ended it.
        A lost node or actor reads as SIGKILL."""
        def get() -> tuple[int, bytes]:
            try:
                return ray.get(self.actor.wait.remote())
            except ray.exceptions.RayError as exc:
                return -int(_signal.SIGKILL), f"\n[llmos: remote host lost: {exc}]\n".encode()

        try:
            return await trio.to_thread.run_sync(get, abandon_on_cancel=True)
        finally:
            self.close()

    def signal(self, sig: int) -> None:
        """Fire and forget: the host signals the process group on its node."""
        try:
            self.actor.signal.remote(sig)
        except Exception:  # the actor is gone: the process is too
            pass

    def close(self) -> None:
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:
            pass
        if self.actor in self.cluster.agents:
            self.cluster.agents.remove(self.actor)


class AgentHost:
    """Runs in a Ray worker on some node: one agent program as an OS process there."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.out = tempfile.TemporaryFile()

    def start(self, argv: list[str], env: dict[str, str], cwd: str | None) -> dict[str, Any]:
        if cwd is not None and not os.path.isdir(cwd):
            cwd = None  # another node's file system: run from the worker's directory
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return {"node_ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": self.proc.pid}

    def wait(self) -> tuple[int, bytes]:
        assert self.proc is not None
        rc = self.proc.wait()
        self.out.seek(0)
        return rc, self.out.read(MAX_REMOTE_OUTPUT)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
