"""The kernel's boot options, declared once: the interface between `llmos boot`
(userland) and the kernel program, so it lives with the ABI.

Every option is a field of `KernelConfig` with its help text. From this one
declaration come the kernel program's flags (`python -m llmagentos.kernel`),
`llmos boot`'s flags (passed on to the kernel program as given), and the
keys of a kernel config file (`--config FILE`, TOML)::

    policy = "priority"            # any option, by its field name or flag name
    slots = 16
    n-ctx = 1024
    isolation = "namespace"

    default = "qwen-0.5b"          # the model registry lives in the same file
    [models.qwen-0.5b]             # (drivers/models.py documents [models])
    path = "qwen2.5-0.5b-instruct-q4_k_m.gguf"

    [services.weather]             # started at boot and kept running
    argv = ["python", "-m", "llmagentos.driver", "weather.py"]  # (kernel/supervisor.py)

Precedence: flags over the file over the defaults. An unknown key, or a value
of the wrong type, is a boot error naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmagentos.syscalls import paths


class ConfigError(ValueError):
    """A bad option value or config file; the message names it."""


def opt(help: str, *, choices: tuple | None = None, flag: str | None = None,
        metavar: str | None = None, default: Any = dataclasses.MISSING,
        factory: Any = dataclasses.MISSING, parse: Any = None, many: bool = False) -> Any:
    """A KernelConfig field with what its flag needs; ``parse`` reads a value
    its type alone cannot (from a flag's text or a config file's value);
    ``many``: the flag may be repeated (see `given`)."""
    meta = {"help": help, "choices": choices, "flag": flag, "metavar": metavar, "parse": parse,
            "many": many}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


POLICIES = ("fifo", "rr", "priority", "fair")
ALL_LAYERS = -1  # --gpu-layers all


def gpu_layers(value: Any) -> int:
    """``all`` or a count of layers (``all`` is -1, as llama-cpp-python's
    ``n_gpu_layers=-1``)."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return ALL_LAYERS
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"gpu layers must be a count or 'all', not {value!r}") from None
    if isinstance(value, bool) or n < ALL_LAYERS:
        raise ValueError(f"gpu layers must be a count or 'all', not {value!r}")
    return n
REGISTRY_KEYS = ("models", "default", "aliases")  # the model registry's part of a config file
SERVICES_KEY = "services"  # [services.NAME]: supervised services (kernel/supervisor.py)


@dataclass
class KernelConfig:
    # where it lives
    run_dir: Path = opt("socket, token and pidfile live here", factory=paths.default_run_dir)
    state_dir: Path = opt("durable state: logs, contexts, files, audit",
                          factory=paths.default_state_dir)
    config: Path | None = opt("TOML config file: any of these options, and the model "
                              "registry ([models])", default=None)
    # connections
    tcp: str | None = opt("also listen on loopback TCP", metavar="HOST:PORT", default=None)
    listen: str | None = opt("also serve the ABI over TLS on HOST:PORT, for other machines "
                             "(0.0.0.0: every IPv4 address); a CA and a server certificate are "
                             "made in the state dir at first boot", metavar="HOST:PORT",
                             default=None)
    tls_cert: Path | None = opt("--listen: bring your own server certificate (PEM, with its "
                                "chain) instead of the one made in the state dir", metavar="FILE",
                                default=None)
    tls_key: Path | None = opt("--listen: the private key of --tls-cert (PEM)", metavar="FILE",
                               default=None)
    max_frame: int = opt("largest accepted message, bytes", default=16 * 1024 * 1024)
    max_connections: int = opt("open connections at once; more are refused", default=1024)
    max_unauthenticated: int = opt("connections that have not said sys.hello yet, at once",
                                   default=64)
    grace: float = opt("seconds between TERM and KILL at shutdown", default=3.0)
    http: str | None = opt("serve the OpenAI-compatible HTTP gateway here (API keys: llmos key "
                           "create); port 0 picks a free one, written to the run dir's 'http'",
                           metavar="HOST:PORT", default=None)
    http_insecure: bool = opt("let --http listen on an address other than loopback, in plain "
                              "HTTP: API keys then cross the network readable", default=False)
    mailbox_depth: int = opt("messages one sender may have waiting in one mailbox (ipc.send "
                             "beyond it is EAGAIN)", default=256)
    # the compute device
    model: str = opt("model name from the registry, a GGUF path, or 'none' (no device); "
                     "given again, each further one is loaded too (as --load)",
                     default="gemma3-270m", many=True)
    load: list[str] = opt("further models loaded at boot beside --model, each its own device "
                          "and run queue (a config file's load = [...])", factory=list,
                          metavar="MODEL")
    model_memory: int = opt("bytes the loaded local models may take together (GGUF file + KV "
                            "cache); a load past it is ENOMEM. 0: half the machine's RAM",
                            default=0)
    slots: int | None = opt("most sequences on the device at once (default: llama.cpp's "
                            "most, as many as the KV pool holds)", default=None)
    kv_memory: int | None = opt("bytes of the KV cache pool that running sequences share "
                                "(default: a share of the free RAM, or of the GPU's memory "
                                "with --gpu-layers)", metavar="BYTES", default=None)
    n_ctx: int = opt("tokens per slot", default=2048)
    threads: int | None = opt("llama.cpp threads (default: $LLMAGENTOS_THREADS, else the physical "
                                "cores of the CPUs the kernel may run on)", default=None)
    n_gpu_layers: int | None = opt("layers to offload to the GPU, or 'all' (needs llama-cpp-python "
                                   "built for the GPU: README)", flag="--gpu-layers",
                                   metavar="N|all", parse=gpu_layers, default=None)
    policy: str = opt("run-queue policy of the compute device", choices=POLICIES,
                      default="fair")
    quantum: int = opt("tokens a running request keeps its slot (rr, priority, fair)",
                       default=16)
    snapshot_ram: int = opt("bytes of preempted KV state kept in RAM before spilling to disk",
                            default=256 << 20)
    embed_memory: bool = opt("embed archived context messages; ctx.search then finds by "
                             "meaning too", default=False)
    # a Ray cluster (optional; kernel/cluster.py): devices as actors, agents as tasks
    ray: str | None = opt("place the compute devices on a Ray cluster ('auto': join the local "
                          "one or start it); needs pip install 'llmagentos[ray]'",
                          metavar="auto|ADDRESS", default=None)
    devices: int = opt("--ray: device actors to place", default=1)
    device_cpus: float = opt("--ray: CPUs each device actor reserves", default=1.0)
    device_gpus: float = opt("--ray: GPUs each device actor reserves", default=0.0)
    device_restarts: int = opt("--ray: times Ray restarts a dead device actor", default=3)
    # processes below the syscall layer (docs/sandbox.md)
    isolation: str = opt("how spawned processes are kept from the kernel and each other",
                         choices=("auto", "namespace", "landlock", "none"), default="auto")
    containment: str = opt("how process trees are kept together and killed",
                           choices=("auto", "cgroup2", "cgroup1", "subreaper"), default="auto")
    exec_memory: int = opt("bytes all exec runs of one process may hold together",
                           default=1 << 30)
    exec_pids: int = opt("processes all exec runs of one process may have at once",
                         default=256)
    log_level: str = opt("kernel log level: DEBUG, INFO, WARNING or ERROR", default="INFO")

    @property
    def socket_path(self) -> Path:
        return self.run_dir / paths.SOCKET_NAME

    def check(self) -> None:
        """Ranges no flag type can say."""
        positive = ("max_frame", "max_connections", "max_unauthenticated", "slots", "n_ctx",
                    "quantum", "devices", "exec_memory", "exec_pids", "kv_memory", "mailbox_depth")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("grace", "snapshot_ram", "device_cpus", "device_gpus", "device_restarts",
                     "model_memory"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, not "
                              f"{self.log_level!r}")
        if self.max_unauthenticated > self.max_connections:
            raise ConfigError("max_unauthenticated must not exceed max_connections")
        for name in ("tcp", "listen"):
            if getattr(self, name) is not None:
                try:
                    host_port(getattr(self, name))
                except ValueError as e:
                    raise ConfigError(f"{name}: {e}") from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")
        if self.tls_cert is not None and self.listen is None:
            raise ConfigError("tls_cert and tls_key are for the TLS listener: give --listen too")
        if self.http is not None:
            http_address(self.http, self.http_insecure)
        # in clear, so loopback only: the token must not cross a network so
        if self.tcp is not None and (host := host_port(self.tcp)[0]) not in LOOPBACK:
            raise ConfigError(f"--tcp must be a loopback address, got {host!r} "
                              "(--listen serves other machines, over TLS)")


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port); ValueError says why not."""
    host, sep, port = str(text).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (sep and host and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"want HOST:PORT with a port in 0..65535, not {text!r}")
    return host, int(port)


LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the hosts a clear-text listener may bind


def http_address(text: str, insecure: bool = False) -> tuple[str, int]:
    """--http HOST:PORT as (host, port): loopback unless --http-insecure."""
    try:
        host, port = host_port(text)
    except ValueError as e:
        raise ConfigError(f"--http: {e}") from None
    if host not in LOOPBACK and not insecure:
        raise ConfigError(f"--http {text}: {host} is not a loopback address; API keys would "
                          "cross the network in plain HTTP (add --http-insecure to accept that)")
    return host, port


def _fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(KernelConfig))


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(KernelConfig)  # (resolving them takes a millisecond)


def _base_type(f: dataclasses.Field) -> type:
    hint = _hints()[f.name]
    if isinstance(hint, types.UnionType):  # X | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint  # list[str] -> list


# Options naming files: made absolute as given (the kernel program may run elsewhere).
PATH_OPTIONS = tuple(f.name for f in _fields() if _base_type(f) is Path)


def flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(ap: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Every option as a flag. Defaults are left out of the namespace
    (SUPPRESS), so what was given can be told from what was not."""
    for f in _fields():
        if f.name in skip:
            continue
        t = _base_type(f)
        kw: dict[str, Any] = {"help": f.metadata["help"], "default": argparse.SUPPRESS,
                              "dest": f.name}
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif t is list or f.metadata.get("many"):
            kw["action"], kw["type"] = "append", str
            if f.metadata.get("metavar"):
                kw["metavar"] = f.metadata["metavar"]
        else:
            kw["type"] = _flag_type(f.metadata["parse"]) if f.metadata.get("parse") else t
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            if f.metadata.get("metavar"):
                kw["metavar"] = f.metadata["metavar"]
        ap.add_argument(flag(f), **kw)


def _flag_type(parse: Any) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def given(ns: argparse.Namespace) -> dict[str, Any]:
    """The options a parsed command line gave, by field name. A repeated
    ``--model A --model B`` is ``model`` A and B loaded too (``load``)."""
    out = {f.name: getattr(ns, f.name) for f in _fields() if hasattr(ns, f.name)}
    if isinstance(out.get("model"), list):
        first, *more = out["model"]
        out["model"] = first
        if more:
            out["load"] = more + list(out.get("load", []))
    return out


def as_flags(options: dict[str, Any]) -> list[str]:
    """Options back into flags (what `llmos boot` passes to the kernel program)."""
    out: list[str] = []
    by_name = {f.name: f for f in _fields()}
    for name, value in options.items():
        f = by_name[name]
        if _base_type(f) is bool:
            out.append(flag(f) if value else "--no-" + flag(f)[2:])
        elif isinstance(value, (list, tuple)):
            for v in value:
                out += [flag(f), str(v)]
        else:
            out += [flag(f), str(value)]
    return out


def read_file(path: Path) -> dict[str, Any]:
    """A config file's options by field name (the registry keys left to
    drivers/models.py, which reads the same file)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    by_key = {}
    for f in _fields():
        by_key[f.name] = f
        by_key[flag(f)[2:]] = f
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in REGISTRY_KEYS or key == SERVICES_KEY:
            continue
        f = by_key.get(key)
        if f is None or f.name == "config":
            known = ", ".join(sorted(fl.name for fl in _fields() if fl.name != "config"))
            raise ConfigError(f"{path}: unknown option {key!r}; options: {known}, and the "
                              "model registry's [models] and default, and [services]")
        out[f.name] = _coerce(path, key, f, value)
    return out


def _coerce(path: Path, key: str, f: dataclasses.Field, value: Any) -> Any:
    if f.metadata.get("parse"):
        try:
            return f.metadata["parse"](value)
        except ValueError as e:
            raise ConfigError(f"{path}: {key}: {e}") from None
    t = _base_type(f)
    if t is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: {key} must be a list of strings")
        return list(value)
    ok = (isinstance(value, bool) if t is bool
          else isinstance(value, (int, float)) and not isinstance(value, bool) if t is float
          else isinstance(value, int) and not isinstance(value, bool) if t is int
          else isinstance(value, str))
    if not ok:
        raise ConfigError(f"{path}: {key} must be {t.__name__}, not {type(value).__name__}")
    if t is Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (Path(path).parent / p).resolve()
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{path}: {key} must be one of {', '.join(choices)}, not {value!r}")
    return float(value) if t is float else value


def load(options: dict[str, Any]) -> KernelConfig:
    """Defaults, then the config file (if options name one), then options."""
    merged: dict[str, Any] = {}
    if options.get("config") is not None:
        merged.update(read_file(options["config"]))
    merged.update(options)
    cfg = KernelConfig(**merged)
    for name in PATH_OPTIONS:
        value = getattr(cfg, name)
        if value is not None:
            setattr(cfg, name, Path(value).resolve())
    cfg.check()
    return cfg
