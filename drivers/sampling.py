"""Per-request sampling, device-independent: parameters, JSON schemas to grammars, text.

``SamplingParams`` is what a request asks for, checked once for every device
(the llama.cpp sampler chain that carries it out is drivers/llama/sampler.py).

``TextStream`` turns token pieces into text: incremental UTF-8 (a piece may
end inside a multi-byte character; the bytes are held until complete) and
stop strings (text that could still become a stop string is held back, so a
streaming client never sees half of one).
"""

from __future__ import annotations

import codecs
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from llmagentos.drivers.gbnf import MAX_EXPANDED as GRAMMAR_MAX_EXPANDED
from llmagentos.drivers.gbnf import check_size
from llmagentos.syscalls.errno import SyscallError


@dataclass
class SamplingParams:
    """What a request may ask of the sampler. Defaults follow llama-cpp-python's."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None
    json_schema: dict | str | bool | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SamplingParams:
        """Build from wire data; unknown keys or wrong types are EINVAL."""
        if data is None:
            return cls()
        if isinstance(data, SamplingParams):
            return data
        if not isinstance(data, dict):
            raise SyscallError(
                "EINVAL", f"sampling params must be a map, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SyscallError(
                "EINVAL", f"unknown sampling parameters {sorted(unknown)}; known: {sorted(known)}"
            )
        params = cls(**data)
        params.validate()
        return params

    def validate(self) -> None:
        def bad(msg: str) -> SyscallError:
            return SyscallError("EINVAL", msg)

        for name in ("max_tokens", "top_k", "repeat_last_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("temperature", "top_p", "min_p", "repeat_penalty",
                     "frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise bad(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise bad("temperature must be >= 0")
        if not 0 <= self.top_p <= 1 or not 0 <= self.min_p <= 1:
            raise bad("top_p and min_p must be within [0, 1]")
        if self.repeat_penalty <= 0:
            raise bad("repeat_penalty must be > 0")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**32):
            raise bad("seed must be an integer in [0, 2**32)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop must be a list of non-empty strings")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise bad("grammar must be a GBNF string")
        if self.grammar is not None and self.json_schema not in (None, False):
            raise bad("give grammar or json_schema, not both")

    def grammar_text(self) -> str | None:
        """The GBNF this request is constrained by, if any (EINVAL for a bad schema)."""
        if self.grammar is not None:
            return self.grammar
        if self.json_schema is None or self.json_schema is False:
            return None
        return json_schema_to_gbnf(self.json_schema)


def json_schema_to_gbnf(schema: dict | str | bool) -> str:
    """A JSON schema (dict or JSON text; True = any JSON value) as GBNF."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf as convert

    if schema is True:
        schema = {}
    if isinstance(schema, str):
        check_size("json_schema", schema)
        text = schema
        try:
            schema = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise SyscallError("EINVAL", f"json_schema is not valid JSON: {exc}") from exc
    elif isinstance(schema, dict):
        try:
            text = json.dumps(schema)
        except (ValueError, TypeError, RecursionError) as exc:
            raise SyscallError("EINVAL", f"json_schema cannot be JSON: {exc}") from exc
        check_size("json_schema", text)
    else:
        raise SyscallError("EINVAL", "json_schema must be a map, JSON text or true")
    _check_schema_repetitions(schema)
    try:
        return convert(text)
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SyscallError("EINVAL", f"unsupported json_schema: {exc}") from exc


_REPEAT_KEYS = ("minItems", "maxItems", "minLength", "maxLength")


def _check_schema_repetitions(schema: Any) -> None:
    """The converter writes an item out once per count (minItems 10**8: 10**8 copies, in
    memory, before any GBNF bound could look): bound their sum first."""
    total, todo = 0, [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _REPEAT_KEYS and isinstance(value, int) and not isinstance(value, bool):
                    total += max(0, value)
                elif isinstance(value, (dict, list)):
                    todo.append(value)
        elif isinstance(node, list):
            todo.extend(v for v in node if isinstance(v, (dict, list)))
    if total > GRAMMAR_MAX_EXPANDED:
        raise SyscallError("E2BIG", f"json_schema repeats items {total} times in all "
                                    f"(minItems, maxLength, ...); the bound is "
                                    f"{GRAMMAR_MAX_EXPANDED} (GRAMMAR_MAX_EXPANDED)")


class TextStream:
    """Token bytes in, printable text out; holds partial UTF-8 and possible stop strings."""

    def __init__(self, stop: list[str] | None = None) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.stop = [s for s in (stop or []) if s]
        self._held = ""  # decoded text not yet released (may start a stop string)
        self.text = ""   # text released so far
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(piece)
        if not self.stop:
            out, self._held = self._held, ""
            self.text += out
            return out
        window = self._held
        cut = min((i for i in (window.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out = window[:cut]
            self._held = ""
            self.text += out
            self.stopped = True
            return out
        keep = 0  # the longest tail of `window` that is a proper prefix of a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(window)), keep, -1):
                if window.endswith(s[:k]):
                    keep = k
                    break
        out = window[: len(window) - keep]
        self._held = window[len(window) - keep:]
        self.text += out
        return out

    def flush(self) -> str:
        """The end: release whatever is held (partial UTF-8 is dropped, as the reference does)."""
        if self.stopped:
            return ""
        out = self._held + self._utf8.decode(b"", final=True)
        self._held = ""
        self.text += out
        return out
