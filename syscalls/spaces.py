"""The wire form of Gymnasium spaces, observations and actions: the ABI of
the `env` group. Plain msgpack-able data that any client can read and a
Python client rebuilds exactly; nothing is ever unpickled, and nothing a
client sends is imported or called. The kernel's env driver
(drivers/gymenv.py) and the userland proxy (userland/envs.py) share it.

numpy and gymnasium are imported here, unlike the rest of syscalls/: they
are the types this part of the ABI describes.
Wire forms:

    Discrete       {"type": "Discrete", "n": 4, "start": 0}
    Box            {"type": "Box", "low": L, "high": H, "shape": [4], "dtype": "float32"}
                   L, H: one number when uniform, else nested lists; the
                   non-finite bounds are the strings "inf", "-inf", "nan"
    MultiDiscrete  {"type": "MultiDiscrete", "nvec": [..], "start": [..], "dtype": "int64"}
    MultiBinary    {"type": "MultiBinary", "n": 3 | [2, 3]}
    Tuple          {"type": "Tuple", "spaces": [S, ...]}
    Dict           {"type": "Dict", "spaces": [[key, S], ...]}   (pairs keep the order)
    Text           {"type": "Text", "min_length": 1, "max_length": 8, "charset": "abc"}
    Sequence       {"type": "Sequence", "space": S, "stack": false}
    OneOf          {"type": "OneOf", "spaces": [S, ...]}
    anything else  {"type": "unsupported", "repr": "Graph(...)"}

    an array       {"ndarray": DATA, "dtype": "float32", "shape": [4]}
                   DATA: nested lists, or raw little-endian bytes when large
    a numpy scalar its Python number; a tuple: a list; a dict: a map

Actions may also come as plain numbers or nested lists (what a client in
another language, or a language model, naturally writes); they are cast to
the action space's dtype only where that loses nothing, then checked with
`action_space.contains`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from gymnasium import spaces

from llmagentos.syscalls.errno import SyscallError

INLINE_ITEMS = 64  # arrays above this many items travel as raw bytes
MAX_ITEMS = 1 << 26  # an array a client sends may not claim more items than this
ARRAY_KINDS = "biuf"  # bool, int, uint, float: the dtypes an array may have on the wire
_ARRAY_KEYS = frozenset({"ndarray", "dtype", "shape"})


def _einval(msg: str) -> SyscallError:
    return SyscallError("EINVAL", msg)


# --- spaces -------------------------------------------------------------------------
def _bound_to_wire(a: np.ndarray) -> Any:
    def num(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
        return x

    flat = a.ravel()
    if flat.size and (flat == flat[0]).all():
        return num(flat[0].item())
    return _map_nested(a.tolist(), num)


def _bound_from_wire(v: Any) -> Any:
    return _map_nested(v, lambda x: float(x) if isinstance(x, str) else x)


def _map_nested(v: Any, fn: Any) -> Any:
    if isinstance(v, list):
        return [_map_nested(x, fn) for x in v]
    return fn(v)


def space_to_wire(space: spaces.Space) -> dict:
    """A space as plain data; spaces this codec does not know come back as
    {"type": "unsupported", "repr": ...} (their values still travel, untyped)."""
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.Box):
        return {"type": "Box", "low": _bound_to_wire(space.low),
                "high": _bound_to_wire(space.high), "shape": list(space.shape),
                "dtype": space.dtype.name}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist(),
                "start": space.start.tolist(), "dtype": space.dtype.name}
    if isinstance(space, spaces.MultiBinary):
        n = space.n
        return {"type": "MultiBinary", "n": int(n) if np.isscalar(n) else [int(x) for x in n]}
    if isinstance(space, spaces.Tuple):
        return {"type": "Tuple", "spaces": [space_to_wire(s) for s in space.spaces]}
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": [[k, space_to_wire(s)] for k, s in space.spaces.items()]}
    if isinstance(space, spaces.Text):
        return {"type": "Text", "min_length": int(space.min_length),
                "max_length": int(space.max_length), "charset": space.characters}
    if isinstance(space, spaces.Sequence):
        return {"type": "Sequence", "space": space_to_wire(space.feature_space),
                "stack": bool(space.stack)}
    if isinstance(space, spaces.OneOf):
        return {"type": "OneOf", "spaces": [space_to_wire(s) for s in space.spaces]}
    return {"type": "unsupported", "repr": repr(space)}


def space_from_wire(d: Any) -> spaces.Space:
    """Rebuild a space; EINVAL for a malformed or unsupported description."""
    if not isinstance(d, dict) or not isinstance(d.get("type"), str):
        raise _einval(f"not a space description: {d!r:.200}")
    kind = d["type"]
    try:
        if kind == "Discrete":
            return spaces.Discrete(int(d["n"]), start=int(d.get("start", 0)))
        if kind == "Box":
            dtype = _array_dtype(d["dtype"])
            shape = tuple(int(x) for x in d["shape"])
            low = np.broadcast_to(np.asarray(_bound_from_wire(d["low"]), dtype=dtype), shape)
            high = np.broadcast_to(np.asarray(_bound_from_wire(d["high"]), dtype=dtype), shape)
            return spaces.Box(low=low.copy(), high=high.copy(), shape=shape, dtype=dtype)
        if kind == "MultiDiscrete":
            dtype = _array_dtype(d.get("dtype", "int64"))
            return spaces.MultiDiscrete(np.asarray(d["nvec"], dtype=dtype), dtype=dtype,
                                        start=np.asarray(d.get("start", 0), dtype=dtype))
        if kind == "MultiBinary":
            n = d["n"]
            return spaces.MultiBinary(int(n) if not isinstance(n, list) else [int(x) for x in n])
        if kind == "Tuple":
            return spaces.Tuple([space_from_wire(s) for s in d["spaces"]])
        if kind == "Dict":
            return spaces.Dict({str(k): space_from_wire(s) for k, s in d["spaces"]})
        if kind == "Text":
            return spaces.Text(int(d["max_length"]), min_length=int(d.get("min_length", 1)),
                               charset=str(d["charset"]))
        if kind == "Sequence":
            return spaces.Sequence(space_from_wire(d["space"]), stack=bool(d.get("stack")))
        if kind == "OneOf":
            return spaces.OneOf([space_from_wire(s) for s in d["spaces"]])
    except SyscallError:
        raise
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise _einval(f"malformed {kind} space description: {type(e).__name__}: {e}") from None
    if kind == "unsupported":
        raise _einval(f"the kernel cannot describe this space: {d.get('repr', '?')}")
    raise _einval(f"unknown space type {kind!r}")


# --- values -------------------------------------------------------------------------
def _array_dtype(name: Any) -> np.dtype:
    try:
        dt = np.dtype(str(name))
    except TypeError:
        raise _einval(f"unknown dtype {name!r}") from None
    if dt.kind not in ARRAY_KINDS:
        raise _einval(f"dtype {name!r} cannot travel: only bool, integer and float arrays")
    return dt


def array_to_wire(a: np.ndarray) -> Any:
    if a.dtype.kind not in ARRAY_KINDS:  # strings, objects: as nested lists of values
        return value_to_wire(a.tolist())
    if a.size > INLINE_ITEMS:
        data: Any = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
    else:
        data = a.tolist()
    return {"ndarray": data, "dtype": a.dtype.name, "shape": list(a.shape)}


def array_from_wire(w: dict) -> np.ndarray:
    dtype = _array_dtype(w.get("dtype"))
    try:
        shape = tuple(int(x) for x in w.get("shape", ()))
    except (TypeError, ValueError):
        raise _einval(f"bad array shape {w.get('shape')!r:.100}") from None
    if any(n < 0 for n in shape) or math.prod(shape) > MAX_ITEMS:
        raise _einval(f"bad array shape {shape}")
    data = w["ndarray"]
    try:
        if isinstance(data, bytes):
            a = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype)
        else:
            a = np.asarray(data, dtype=dtype)
        return a.reshape(shape)
    except (TypeError, ValueError) as e:
        raise _einval(f"array data does not match dtype {dtype.name} shape {shape}: {e}") \
            from None


def value_to_wire(x: Any) -> Any:
    """An observation, action, reward or info value as plain data."""
    if x is None or isinstance(x, (bool, int, float, str, bytes)):
        return x
    if isinstance(x, np.ndarray):
        return array_to_wire(x)
    if isinstance(x, np.generic):
        v = x.item()
        return v if isinstance(v, (bool, int, float, str, bytes)) else repr(v)
    if isinstance(x, (list, tuple)):
        return [value_to_wire(v) for v in x]
    if isinstance(x, dict):
        return {k if isinstance(k, (str, int)) else str(k): value_to_wire(v) for k, v in x.items()}
    return repr(x)  # an info value of some other type: readable, never executable


def value_from_wire(w: Any, space: spaces.Space | None = None) -> Any:
    """Rebuild a value of `space` (or, with no space, arrays wherever the
    array form appears). EINVAL when the wire value cannot be one."""
    if isinstance(space, spaces.Discrete):
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)):
            raise _einval(f"expected an integer for {space}, got {type(w).__name__}")
        return int(w)
    if isinstance(space, (spaces.Box, spaces.MultiDiscrete, spaces.MultiBinary)):
        return _array_for(w, space)
    if isinstance(space, spaces.Tuple):
        if not isinstance(w, (list, tuple)) or len(w) != len(space.spaces):
            raise _einval(f"expected a list of {len(space.spaces)} values for {space}")
        return tuple(value_from_wire(v, s) for v, s in zip(w, space.spaces))
    if isinstance(space, spaces.Dict):
        if not isinstance(w, dict) or set(w) != set(space.spaces):
            raise _einval(f"expected a map with keys {sorted(space.spaces)} for {space}")
        return {k: value_from_wire(w[k], s) for k, s in space.spaces.items()}
    if isinstance(space, spaces.Text):
        if not isinstance(w, str):
            raise _einval(f"expected a string for {space}")
        return w
    if isinstance(space, spaces.Sequence):
        if space.stack:
            return value_from_wire(w, None)
        if not isinstance(w, (list, tuple)):
            raise _einval(f"expected a list for {space}")
        return tuple(value_from_wire(v, space.feature_space) for v in w)
    if isinstance(space, spaces.OneOf):
        if not isinstance(w, (list, tuple)) or len(w) != 2 or isinstance(w[0], bool) \
                or not isinstance(w[0], int) or not 0 <= w[0] < len(space.spaces):
            raise _einval(f"expected [index, value] for {space}")
        return (np.int64(w[0]), value_from_wire(w[1], space.spaces[w[0]]))
    # no space, or one this codec does not know: structure only
    if isinstance(w, dict):
        if set(w) == _ARRAY_KEYS:
            return array_from_wire(w)
        return {k: value_from_wire(v) for k, v in w.items()}
    if isinstance(w, list):
        return [value_from_wire(v) for v in w]
    return w


def _array_for(w: Any, space: spaces.Space) -> np.ndarray:
    if isinstance(w, dict) and set(w) == _ARRAY_KEYS:
        return array_from_wire(w)  # exact: the sender named its dtype
    try:
        a = np.asarray(w)
    except (TypeError, ValueError) as e:
        raise _einval(f"not an array for {space}: {e}") from None
    if a.dtype.kind not in ARRAY_KINDS:
        raise _einval(f"expected numbers for {space}, got {a.dtype} data")
    if a.size > MAX_ITEMS:
        raise _einval(f"array of {a.size} items is too large")
    cast = a.astype(space.dtype)
    # A plain list of numbers takes the space's dtype, unless that changes a value
    # (0.5 into an integer space is an error, not a silent 0).
    if a.dtype != space.dtype and not np.array_equal(cast, a, equal_nan=a.dtype.kind == "f"):
        raise _einval(f"values do not fit {space.dtype.name} of {space}")
    return cast
