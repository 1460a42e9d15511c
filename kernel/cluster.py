"""The kernel on a Ray cluster: device actors, remote agent processes, node status.

Booted with ``--ray auto|ADDRESS`` the kernel joins (or, with ``auto`` and no
cluster running, starts) a Ray instance, places ``--devices`` DeviceActors
with the resources asked for, and schedules over them with a DeviceSet. The
kernel keeps a small local Device (one slot) for what needs the vocabulary
without a round trip: tokenizing, chat templates, grammar checks, embeddings.

Remote agent processes (``proc.spawn(..., placement="ray"|"node:ID")``) run
in an ``AgentHost`` actor on any node, or pinned to one node (a hard node
affinity): it starts the argv as an OS process there, calling back over the
kernel's TLS listener (``--listen``; its CA travels with the spawn) or, with
no TLS listener, the loopback TCP one, and reports its exit status and output.
The process's token never crosses Ray in clear: Ray's own channels are not
encrypted unless Ray runs with TLS, so the host makes a key pair and the
kernel seals the token to its public key (X25519 + AES-GCM); the host hands
it to the program on a memfd, as a local spawn does. The program dies with its
host (PDEATHSIG), so a lost node leaves no agent behind calling the kernel.

trio stays the event loop: every blocking Ray call goes through a worker thread.
This module imports ray; the kernel imports it only when ``--ray`` is given.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal as _signal
import subprocess
import tempfile
import time
from typing import Any

import ray
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llmagentos.drivers.models import open_device
from llmagentos.drivers.ray_device import RemoteDevice, start_device_actors
from llmagentos.syscalls import paths
from llmagentos.syscalls.errno import SyscallError

from .confine import token_fd
from .devices import DeviceSet
from .proc.remote import KERNEL_ENV
from .scheduler import Scheduler

log = logging.getLogger(__name__)

MAX_REMOTE_OUTPUT = 4 << 20  # bytes of a remote process's output brought back to its log
SPAWN_TIMEOUT = 60.0  # seconds for a host actor to start on its node and run the program


class Cluster:
    """The kernel's handle on the Ray cluster: owns the actors it started."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.started_ray = False
        self.devices: list[RemoteDevice] = []
        self.agents: list[Any] = []
        self.node_ip = ""  # this kernel's node: the host other nodes dial
        self.lost: list[dict[str, Any]] = []  # remote processes whose host or node was lost

    async def start(self, models: Any) -> tuple[Any, DeviceSet | None]:
        """Join the cluster; with a model, place the device actors and build the DeviceSet."""
        cfg = self.cfg
        # On the event loop's own thread, not a worker thread: Ray starts its head
        # processes (GCS, raylet) with PR_SET_PDEATHSIG, which fires when the thread
        # that started them ends, and trio's idle worker threads end after 10 s.
        # Boot blocks here for Ray's start; nothing is served yet.
        self._init_ray()
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
        if not ray.is_initialized():
            address = None if self.cfg.ray == "auto" else self.cfg.ray
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            self.started_ray = True
        self.node_ip = ray.util.get_node_ip_address()

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
        """Nodes alive and dead, the device actors, and what each dead node took with it.
        Blocking (asks the GCS)."""
        nodes = [{"node_id": n["NodeID"], "node": n["NodeManagerAddress"],
                  "alive": bool(n["Alive"]), "cpus": n.get("Resources", {}).get("CPU", 0),
                  "gpus": n.get("Resources", {}).get("GPU", 0)} for n in ray.nodes()]
        lost = []
        for n in nodes:
            if n["alive"]:
                continue
            gone = n["node_id"]
            devices = [d.index for d in self.devices if gone in d.nodes_lost
                       or (d.node_id == gone and not d.alive)]
            procs = [p["pid"] for p in self.lost if p["node_id"] == gone]
            if devices or procs:
                lost.append({"node_id": gone, "node": n["node"], "devices": devices,
                             "processes": procs})
        return {"address": ray.get_runtime_context().gcs_address,
                "node_ip": self.node_ip,
                "nodes": nodes,
                "nodes_alive": sum(1 for n in nodes if n["alive"]),
                "nodes_dead": sum(1 for n in nodes if not n["alive"]),
                "devices": [{"device": d.index, **d.describe()} for d in self.devices],
                "agents": len(self.agents),
                "lost": lost,
                "processes_lost": list(self.lost)}

    # -- remote agent processes -------------------------------------------------------------

    async def resolve_node(self, prefix: str) -> str:
        """The id of the live node that ``prefix`` (a node id or its start) names."""
        nodes = await trio.to_thread.run_sync(ray.nodes)
        match = {n["NodeID"]: bool(n["Alive"]) for n in nodes
                 if n["NodeID"].lower().startswith(prefix)}
        if not match:
            raise SyscallError("ESRCH", f"no node {prefix!r} in the Ray cluster "
                                        "(`llmos status` lists them)")
        if len(match) > 1:
            raise SyscallError("EINVAL", f"node {prefix!r} is ambiguous: it starts "
                                         f"{len(match)} node ids")
        [(node_id, alive)] = match.items()
        if not alive:
            raise SyscallError("ESRCH", f"node {node_id[:12]} is dead")
        return node_id

    async def spawn(self, argv: list[str], env: dict[str, str], token: str, ca_pem: bytes,
                    *, node: str | None = None, pid: int = 0) -> RemoteProcess:
        """Start ``argv`` on a node of the cluster (``node``: that one); returns once it
        runs there. ``token`` reaches the host sealed, ``ca_pem`` (if any) in clear."""
        opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 4}
        if node is not None:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        cls = ray.remote(AgentHost).options(**opts)

        def start() -> tuple[Any, dict]:
            actor = cls.remote()
            try:
                key = ray.get(actor.public_key.remote(), timeout=SPAWN_TIMEOUT)
                return actor, ray.get(actor.start.remote(argv, env, seal(token, key), ca_pem),
                                      timeout=SPAWN_TIMEOUT)
            except BaseException:
                ray.kill(actor, no_restart=True)  # never a host left behind without a program
                raise

        try:
            actor, info = await trio.to_thread.run_sync(start)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, OSError) else None
            if isinstance(cause, FileNotFoundError):
                raise SyscallError("ENOENT", f"no such executable on the node: "
                                             f"{argv[0]!r}") from None
            raise SyscallError("EIO", f"remote spawn failed: {exc}") from None
        except Exception as exc:
            where = f" on node {node[:12]}" if node else ""
            raise SyscallError("EIO", f"remote spawn{where} failed: {exc!r:.300}") from None
        self.agents.append(actor)
        return RemoteProcess(self, actor, info, pid)


class RemoteProcess:
    """The kernel's handle on an agent process running in an AgentHost actor."""

    def __init__(self, cluster: Cluster, actor: Any, info: dict[str, Any], pid: int = 0) -> None:
        self.cluster = cluster
        self.actor = actor
        self.kernel_pid = pid
        self.node = info["node_ip"]
        self.node_id = info["node_id"]
        self.pid = info["pid"]
        self.lost = ""  # why it ended without an exit status: its host or node was lost

    async def wait(self) -> tuple[int, bytes]:
        """(returncode, output); a negative returncode is the signal that ended it.
        A lost node or actor reads as SIGKILL, with ``lost`` saying what was lost."""
        def get() -> tuple[int, bytes]:
            try:
                return ray.get(self.actor.wait.remote())
            except ray.exceptions.RayError as exc:
                self.lost = (f"lost with its host on node {self.node} ({self.node_id[:12]}): "
                             f"{type(exc).__name__}")
                self.cluster.lost.append({"pid": self.kernel_pid, "node_id": self.node_id,
                                          "node": self.node, "reason": self.lost,
                                          "time": time.time()})
                return -int(_signal.SIGKILL), f"\n[llmos: {self.lost}]\n".encode()

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


# -- the token to the host, sealed ------------------------------------------------------------

_SEAL_INFO = b"llmagentos agent token"


def _seal_key(shared: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SEAL_INFO).derive(shared)


def seal(secret: str, public: bytes) -> tuple[bytes, bytes, bytes]:
    """``secret`` for the holder of ``public``'s private key only (an ephemeral X25519
    exchange, then AES-GCM): what a passive reader of Ray's traffic sees is useless."""
    eph = X25519PrivateKey.generate()
    key = _seal_key(eph.exchange(X25519PublicKey.from_public_bytes(public)))
    nonce = os.urandom(12)
    return (eph.public_key().public_bytes_raw(), nonce,
            AESGCM(key).encrypt(nonce, secret.encode(), None))


def unseal(private: X25519PrivateKey, sealed: tuple[bytes, bytes, bytes]) -> str:
    eph, nonce, box = sealed
    key = _seal_key(private.exchange(X25519PublicKey.from_public_bytes(eph)))
    return AESGCM(key).decrypt(nonce, box, None).decode()


# -- on the node ---------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


class AgentHost:
    """Runs in a Ray worker on some node: one agent program as an OS process there."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.out = tempfile.TemporaryFile()
        self._key = X25519PrivateKey.generate()
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork

    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def start(self, argv: list[str], env: dict[str, str], sealed: tuple[bytes, bytes, bytes],
              ca_pem: bytes) -> dict[str, Any]:
        child_env = {k: v for k, v in os.environ.items() if k not in KERNEL_ENV}
        child_env.update(env)
        if child_env[paths.ENV_SOCKET].startswith("tls://"):
            # LLMAGENTOS_ADDRESS would win over LLMAGENTOS_SOCKET: say the same
            child_env[paths.ENV_ADDRESS] = child_env[paths.ENV_SOCKET]
        ca = None
        if ca_pem:  # the kernel's own CA: the program trusts that and nothing else
            # in a file with no name, read as /dev/fd/N: nothing is left on the node
            # whatever ends the host (a killed actor never gets to clean up)
            ca = tempfile.TemporaryFile()
            ca.write(ca_pem)
            ca.flush()
            child_env[paths.ENV_CA] = f"/dev/fd/{ca.fileno()}"
        tfd = token_fd(unseal(self._key, sealed))
        child_env[paths.ENV_TOKEN_FD] = str(tfd)
        inherited = (tfd,) if ca is None else (tfd, ca.fileno())
        try:
            self.proc = subprocess.Popen(argv, env=child_env, stdin=subprocess.DEVNULL,
                                         stdout=self.out, stderr=subprocess.STDOUT,
                                         start_new_session=True, pass_fds=inherited,
                                         preexec_fn=self._prepare_child)
        finally:
            os.close(tfd)
            if ca is not None:
                ca.close()
        return {"node_ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": self.proc.pid}

    def _prepare_child(self) -> None:
        """In the child before exec: SIGKILL when the host's worker dies (a lost node,
        a killed actor), so no agent outlives the kernel's handle on it; and the
        priority of a program rather than of Ray's niced worker, as a local spawn."""
        self._prctl(_PR_SET_PDEATHSIG, int(_signal.SIGKILL), 0, 0, 0)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError:  # not permitted: keep the worker's niceness
            pass

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
