"""The call table: the one place a syscall's name, number, parameters,
capability and doc live.

The kernel dispatches from it (handlers receive checked, typed keyword
arguments and never parse wire data), the client builds its stubs from it,
`llmos syscalls` prints it. Numbers are never reused; the ABI changes only by
addition.
"""

from __future__ import annotations

import math
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errno import SyscallError

REQUIRED = object()  # sentinel: the parameter has no default

# Every integer that crosses the ABI fits in int64 unless its parameter says
# otherwise: ids, offsets and counts reach SQLite and the OS, which take no more.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
LIMIT_MAX = INT64_MAX  # a process limit (proc.spawn, proc.setlimit, proc.attach)

# wire type name -> accepted Python types (after msgpack decoding)
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "bytes": (bytes,),
    "list": (list, tuple),
    "dict": (dict,),
    "any": (object,),
}


def check_number(what: str, value: int | float, lo: float | None = None,
                 hi: float | None = None) -> None:
    """The one check every number of the ABI goes through: finite (NaN and
    +-inf are EINVAL: they pass every comparison the wrong way) and in lo..hi."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SyscallError("EINVAL", f"{what} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in {lo}..{hi}"
        raise SyscallError("EINVAL", f"{what} must be {bounds}, got {value!r:.40}")


# A process's limits: name -> what it bounds. Absent means unlimited.
LIMITS: dict[str, str] = {
    "wall_time": "seconds the process may live; then SIGKILL",
    "max_children": "live children at once; proc.spawn beyond it is EAGAIN",
    "tokens": "LLM tokens in+out over the process's life; beyond it is EDQUOT",
    "ctx_tokens": "token budget of the process's context",
    "tool_calls": "tool calls over the process's life; beyond it is EDQUOT",
    "fs_bytes": "bytes in the process's private file root; beyond it is EDQUOT",
    "fs_files": "files and directories in the private file root; beyond it is EDQUOT",
    "exec_memory": "bytes all the process's exec runs may hold together; beyond it the "
                   "memory cap kills (ENOMEM in the run's result)",
}


MAX_AGENT_NAME = 128


def check_name(name: object) -> str:
    """The one rule for agent names; EINVAL says what is wrong."""
    if not isinstance(name, str) or not name:
        raise SyscallError("EINVAL", "an agent name must be a non-empty string")
    if len(name) > MAX_AGENT_NAME:
        raise SyscallError("EINVAL", f"an agent name has at most {MAX_AGENT_NAME} characters, "
                                     f"not {len(name)}")
    for ch in name:
        if unicodedata.category(ch)[0] == "C":
            raise SyscallError("EINVAL", f"agent name {name!r} contains the control or "
                                         f"non-printing character U+{ord(ch):04X}")
    return name


def check_limit_name(name: str) -> str:
    if name not in LIMITS:
        raise SyscallError("EINVAL", f"unknown limit {name!r}; known: {sorted(LIMITS)}")
    return name


def check_limit(name: str, value: Any) -> int | float:
    """A process limit, wherever it comes from (proc.spawn, proc.attach,
    proc.setlimit): a known name, a finite number >= 0."""
    check_limit_name(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SyscallError("EINVAL", f"limit {name!r} must be a non-negative number, "
                                     f"got {type(value).__name__}")
    check_number(f"limit {name!r}", value, 0, LIMIT_MAX)
    return value


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # "int", "str|int", "list?" (? = may be nil)
    default: Any = REQUIRED
    doc: str = ""
    lo: int | float | None = None  # numbers: the least value (ints default to int64)
    hi: int | float | None = None
    choices: tuple | None = None  # the only values accepted

    def __post_init__(self) -> None:
        # The type spec parsed once: every argument of every call is checked here.
        spec = self.type.removesuffix("?")
        names = spec.split("|")
        object.__setattr__(self, "_nullable", spec != self.type or self.default is None)
        object.__setattr__(self, "_alts", tuple((t, _TYPES[t]) for t in names))
        # What passes as it is, decided by its exact type alone (most arguments)
        plain = () if self.choices is not None else tuple(
            _TYPES[t][0] for t in names if t in ("str", "bytes", "bool"))
        object.__setattr__(self, "_any", "any" in names and self.choices is None)
        object.__setattr__(self, "_plain", frozenset(plain))
        object.__setattr__(self, "_ints", None if "int" not in names or self.choices is not None
                           else (INT64_MIN if self.lo is None else self.lo,
                                 INT64_MAX if self.hi is None else self.hi))
        # A float in these bounds passes the binder's glance (NaN fails the comparison,
        # and +-inf is past the largest finite float: both go on to check() and EINVAL).
        big = sys.float_info.max
        object.__setattr__(self, "_floats", None if "float" not in names or self.choices
                           is not None else (-big if self.lo is None else self.lo,
                                             big if self.hi is None else self.hi))

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def at_a_glance(self, x: str) -> str:
        """A Python test of the variable ``x``, true only where check(x) would
        return x as it is: the positional binder (below) skips check() for it."""
        if self._any:
            return "True" if self._nullable else f"{x} is not None"
        tests = [f"{x} is None"] if self._nullable else []
        tests += [f"type({x}) is {t.__name__}" for t in sorted(self._plain, key=str)]
        if self._ints is not None:
            tests.append(f"(type({x}) is int and {self._ints[0]!r} <= {x} <= {self._ints[1]!r})")
        if self._floats is not None:
            tests.append(f"(type({x}) is float and {self._in_floats(x)})")
        if self.choices is None and any(t == "dict" for t, _ in self._alts):
            tests.append(f"(type({x}) is dict and all(map(str.__instancecheck__, {x})))")
        return " or ".join(tests) or "False"

    def int_as_float(self, x: str) -> str | None:
        """For a float parameter that takes no int as such: a test of ``x`` true
        where check(x) returns float(x) (an int in range, as clients send 60 for
        60.0), for the binder to convert without check(); None for others."""
        if self._floats is None or self._ints is not None:
            return None
        return f"(type({x}) is int and {self._in_floats(x)})"

    def _in_floats(self, x: str) -> str:
        return f"{self._floats[0]!r} <= {x} <= {self._floats[1]!r}"

    def check(self, value: Any) -> Any:
        if value is None:
            if self._nullable:
                return None
            raise SyscallError("EINVAL", f"parameter {self.name!r} must not be nil")
        if self._any:
            return value
        kind = type(value)
        if kind in self._plain:
            return value
        if kind is int and self._ints is not None and self._ints[0] <= value <= self._ints[1]:
            return value
        return self._check(value)

    def _check(self, value: Any) -> Any:
        is_bool = isinstance(value, bool)
        for t, accepted in self._alts:
            # bool is an int subclass in Python; never let True pass as a pid.
            if is_bool and t != "bool" and t != "any":
                continue
            if isinstance(value, accepted):
                if t == "float":
                    try:
                        value = float(value)
                    except OverflowError:  # an int past float's range
                        raise SyscallError("EINVAL", f"parameter {self.name!r} is out of "
                                                     "range") from None
                    check_number(f"parameter {self.name!r}", value, self.lo, self.hi)
                    return value
                if t == "int":
                    check_number(f"parameter {self.name!r}", value,
                                 INT64_MIN if self.lo is None else self.lo,
                                 INT64_MAX if self.hi is None else self.hi)
                if self.choices is not None and value not in self.choices:
                    raise SyscallError("EINVAL", f"parameter {self.name!r} must be one of "
                                                 f"{list(self.choices)}, got {value!r:.60}")
                if t == "list":
                    return list(value)
                if t == "dict" and not all(isinstance(k, str) for k in value):
                    raise SyscallError("EINVAL", f"parameter {self.name!r} must be a map with "
                                                 "string keys")
                return value
        raise SyscallError(
            "EINVAL",
            f"parameter {self.name!r} must be {self.type}, got {type(value).__name__}",
        )


def _binder_for(params: tuple[Param, ...]) -> Callable[[Sequence[Any]], dict | None]:
    """The positional binding of one call's parameters as one function written
    for them, as dataclasses writes an __init__: a value that passes at a glance
    (its type and range) is taken as it is, any other goes through Param.check,
    so the checks are still the table's; defaults are filled unchecked, as
    Syscall.bind fills them. None where Syscall.bind must say what is wrong
    (too many arguments, a required one missing). Every call is bound here, so
    it is worth not calling a check per argument (bench/bench_mailbox.py)."""
    n = len(params)
    least = n  # the fewest arguments taken: every parameter after them has a default
    while least and not params[least - 1].required:
        least -= 1
    src = ["def bind(args):", "    n = len(args)"]
    for k in range(n, least - 1, -1):
        src.append(f"    if n == {k}:")
        if k:
            src.append(f"        {', '.join(f'a{i}' for i in range(k))}, = args")
        for i in range(k):
            test = params[i].at_a_glance(f"a{i}")
            if test != "True":
                widen = params[i].int_as_float(f"a{i}")
                fix = f"float(a{i}) if {widen} else " if widen else ""
                src += [f"        if not ({test}):", f"            a{i} = {fix}P[{i}].check(a{i})"]
        items = (f"{p.name!r}: " + (f"a{i}" if i < k else f"P[{i}].default")
                 for i, p in enumerate(params))
        src.append(f"        return {{{', '.join(items)}}}")
    src.append("    return None")
    scope: dict[str, Any] = {"P": params}
    exec("\n".join(src), scope)  # noqa: S102 (the source is made here from the table alone)
    return scope["bind"]


@dataclass(frozen=True)
class Syscall:
    number: int
    name: str  # "group.call"
    params: tuple[Param, ...] = ()
    cap: str | None = None  # capability needed; None = any authenticated process
    doc: str = ""
    stream: bool = False  # may send notifications before its response
    mutates: bool = False  # changes kernel state: written to the audit log

    def __post_init__(self) -> None:
        object.__setattr__(self, "_positional", _binder_for(self.params))

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def call(self) -> str:
        return self.name.split(".", 1)[1]

    def bind(self, args: list | tuple, kwargs: dict | None = None) -> dict[str, Any]:
        """Check positional (and, from Python clients, keyword) arguments
        against the parameter list; return them by name with defaults filled."""
        if not kwargs:  # what the wire sends: positional only
            out = self._positional(args)
            if out is not None:
                return out
        return self.bind_checked(args, kwargs)

    def bind_checked(self, args: list | tuple, kwargs: dict | None = None) -> dict[str, Any]:
        """Syscall.bind argument by argument, every value through Param.check:
        what the positional binder must agree with, and what says why not."""
        if len(args) > len(self.params):
            raise SyscallError(
                "EINVAL",
                f"{self.name} takes at most {len(self.params)} arguments, got {len(args)}",
            )
        out: dict[str, Any] = {}
        kwargs = dict(kwargs) if kwargs else {}
        for i, p in enumerate(self.params):
            if i < len(args):
                if p.name in kwargs:
                    raise SyscallError("EINVAL", f"{self.name}: {p.name!r} given twice")
                out[p.name] = p.check(args[i])
            elif p.name in kwargs:
                out[p.name] = p.check(kwargs.pop(p.name))
            elif p.required:
                raise SyscallError("EINVAL", f"{self.name}: missing argument {p.name!r}")
            else:
                out[p.name] = p.default
        if kwargs:
            raise SyscallError("EINVAL", f"{self.name}: unknown argument(s) {sorted(kwargs)}")
        return out

    def signature(self) -> str:
        parts = []
        for p in self.params:
            parts.append(p.name if p.required else f"{p.name}={p.default!r}")
        return f"{self.name}({', '.join(parts)})"

    def describe(self) -> dict:
        return {
            "number": self.number,
            "name": self.name,
            "params": [
                {"name": p.name, "type": p.type, "required": p.required,
                 **({} if p.required else {"default": p.default}),
                 **({} if p.lo is None else {"min": p.lo}),
                 **({} if p.hi is None else {"max": p.hi}),
                 **({} if p.choices is None else {"choices": list(p.choices)})}
                for p in self.params
            ],
            "cap": self.cap,
            "doc": self.doc,
            "stream": self.stream,
            "mutates": self.mutates,
        }


@dataclass
class CallTable:
    calls: dict[str, Syscall] = field(default_factory=dict)

    def add(self, sc: Syscall) -> None:
        if sc.name in self.calls:
            raise ValueError(f"duplicate syscall name {sc.name}")
        if any(c.number == sc.number for c in self.calls.values()):
            raise ValueError(f"duplicate syscall number {sc.number}")
        self.calls[sc.name] = sc

    def __getitem__(self, name: str) -> Syscall:
        try:
            return self.calls[name]
        except KeyError:
            raise SyscallError("ENOSYS", f"no such system call {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.calls

    def __iter__(self):
        return iter(sorted(self.calls.values(), key=lambda c: c.number))

    def groups(self) -> dict[str, list[Syscall]]:
        out: dict[str, list[Syscall]] = {}
        for sc in self:
            out.setdefault(sc.group, []).append(sc)
        return out


def markdown(table: "CallTable") -> str:
    """The call table as a Markdown reference (docs/syscalls.md is this output)."""
    lines = ["# System calls", "",
             "Generated from the call table (`llmos syscalls --markdown`); do not edit.", ""]
    for group, calls in table.groups().items():
        lines += [f"## {group}", "", "| nr | call | capability | description |",
                  "|---:|---|---|---|"]
        for sc in calls:
            params = ", ".join(
                f"{p.name}: {p.type}" + ("" if p.required else f" = {p.default!r}")
                + _bounds(p) for p in sc.params)
            lines.append(f"| {sc.number} | `{sc.name}({params})` | {sc.cap or '-'} | "
                         f"{sc.doc}{' (streams)' if sc.stream else ''} |")
        lines.append("")
    return "\n".join(lines)


def _bounds(p: Param) -> str:
    if p.choices is not None:
        return " (" + "\\|".join(repr(c) for c in p.choices) + ")"
    if p.lo is None and p.hi is None:
        return ""
    return f" ({'' if p.lo is None else p.lo}..{'' if p.hi is None else p.hi})"


def P(name: str, type: str, default: Any = REQUIRED, doc: str = "", *,
      lo: int | float | None = None, hi: int | float | None = None,
      choices: tuple | None = None) -> Param:
    return Param(name, type, default, doc, lo, hi, choices)


TABLE = CallTable()


def _def(number: int, name: str, params: list[Param], cap: str | None, doc: str,
         stream: bool = False, mutates: bool = False) -> None:
    TABLE.add(Syscall(number, name, tuple(params), cap, doc, stream, mutates))


# --- sys: 0-19 ---------------------------------------------------------------
_def(0, "sys.hello", [P("token", "str")], None,
     "authenticate this connection; returns the caller's pid")
_def(1, "sys.uname", [], None, "kernel name, version, boot time, policy, devices")
_def(2, "sys.stats", [], None, "kernel-wide counters: processes, syscalls, device, memory")
_def(3, "sys.shutdown", [P("grace", "float", 3.0, lo=0, hi=3600)], "sys.shutdown",
     "shut the kernel down: TERM every process, wait grace seconds, KILL", mutates=True)
_def(4, "sys.null", [], None, "do nothing and return nil (for measuring syscall overhead)")
_def(5, "sys.calls", [], None, "the call table, as data")
_def(6, "sys.audit", [P("pid", "int?", None), P("syscall", "str?", None), P("errno", "str?", None),
                      P("since", "float?", None), P("limit", "int", 100, lo=1, hi=10_000)],
     "sys.audit",
     "read the audit log (syscall is a glob; errno a name, 'any' or 'ok')")
_def(7, "sys.metrics", [], None,
     "the kernel's metrics in Prometheus text format: per-process tokens, syscalls and "
     "device time, run-queue depth, device utilization, tok/s, preemptions, snapshot bytes")

# --- proc: 20-49 -------------------------------------------------------------
_def(20, "proc.spawn", [
    P("argv", "list"), P("name", "str?", None), P("env", "dict?", None),
    P("cwd", "str?", None), P("caps", "list?", None), P("limits", "dict?", None),
    P("nice", "int", 0, lo=-20, hi=19), P("placement", "str", "local"),
    P("model", "str?", None), P("stdin", "int?", None), P("stdout", "int?", None),
], "proc.spawn", "start a real OS process as a child of the caller; returns its pid "
   "(placement \"local\", \"ray\": any node of the kernel's Ray cluster, or \"node:ID\": that "
   "node; a remote process calls back over the kernel's TLS listener, else its loopback TCP; "
   "model: its default model, else the caller's, inherited by its children; "
   "stdin/stdout: a pipe end of the caller that becomes the child's OS stdin/stdout "
   "and its fd 0/1)",
     mutates=True)
_def(21, "proc.getpid", [], None, "the caller's pid")
_def(22, "proc.ps", [], None, "the process table, one row per process")
_def(23, "proc.stat", [P("pid", "int?", None)], None,
     "control block, CPU/RSS and usage of one process (default: the caller)")
_def(24, "proc.wait", [P("pid", "int", lo=-1), P("timeout", "float?", None, lo=0)], None,
     "wait for a child to exit and reap it; returns its exit status")
_def(25, "proc.kill", [P("pid", "int"), P("signal", "int|str", "SIGTERM"),
                      P("payload", "any?", None)], None,
     "send a signal (SIGSTOP, SIGCONT, SIGTERM, SIGKILL, ...) to a process; SIGINT, SIGUSR1 "
     "and SIGUSR2 reach a process with a connection as a [signal, payload, sender pid] "
     "proc.signal notification (SIGINT also ends its llm.generate calls with EINTR)",
     mutates=True)
_def(26, "proc.nice", [P("pid", "int"), P("value", "int", lo=-20, hi=19)], None,
     "set a process's nice value (-20..19); lowering it needs proc.renice", mutates=True)
_def(27, "proc.setlimit", [P("pid", "int"), P("name", "str"),
                           P("value", "int|float?", lo=0, hi=LIMIT_MAX)], None,
     "set one limit of a process (only lower it, unless proc.kill_any is held)",
     mutates=True)
_def(30, "proc.attach", [P("name", "str?", None), P("caps", "list?", None),
                        P("limits", "dict?", None), P("nice", "int", 0, lo=-20, hi=19),
                        P("model", "str?", None)],
     "proc.spawn",
     "make a child process that lives in the caller's OS process (an Agent object); "
     "returns {pid, token}: a connection that says hello with the token is that process "
     "(model: its default model, as for proc.spawn)",
     mutates=True)
_def(29, "proc.logs", [P("pid", "int"), P("offset", "int", 0, lo=0),
                       P("limit", "int", 65536, lo=1, hi=4 << 20)], None,
     "read a process's captured stdout/stderr from offset (works after it was reaped)")
_def(28, "proc.exit", [P("status", "int", 0, lo=0, hi=255)], None,
     "record the caller's exit status; the client then exits with it", mutates=True)

# --- llm: 50-59 ----------------------------------------------------------------
_def(50, "llm.generate", [
    P("prompt", "str?", None), P("messages", "list?", None), P("params", "dict?", None),
    P("stream", "bool", False), P("context", "bool", False),
], "llm", "generate text from a prompt, chat messages, or (context=true) the caller's "
   "context; stream=true sends [msgid, piece] llm.token notifications first; "
   "params.model picks a loaded model (default: the caller's)", stream=True)
_def(51, "llm.embed", [P("texts", "list|str"), P("model", "str?", None)], "llm",
     "embedding vectors, one per text (model: a loaded one; default: the caller's)")
_def(52, "llm.tokenize", [P("text", "str"), P("special", "bool", False)], "llm",
     "text to token ids with the loaded model's vocabulary")
_def(53, "llm.models", [], None,
     "the models the kernel knows: kind, loaded, n_ctx, aliases, default, device stats")
_def(54, "llm.detokenize", [P("tokens", "list")], "llm", "token ids back to text")
_def(55, "llm.load", [P("name", "str")], "llm.admin",
     "load a registered model as a further device with its own run queue; ENOMEM past "
     "the model memory budget", mutates=True)
_def(56, "llm.unload", [P("name", "str")], "llm.admin",
     "unload a model: its requests fail with ECANCELED, its device is freed", mutates=True)

# --- ctx: 60-79 (the memory manager; ctx=nil means the caller's current context) ----
_def(60, "ctx.append", [P("role", "str"), P("content", "str"), P("pinned", "bool", False),
                        P("ctx", "int?", None)], "ctx",
     "append a message; past the budget the oldest unpinned ones are paged to the archive",
     mutates=True)
_def(61, "ctx.read", [P("start", "int", 0), P("end", "int?", None), P("archived", "bool", True),
                      P("ctx", "int?", None)], "ctx",
     "messages by position, archived ones included unless archived=false")
_def(62, "ctx.window", [P("reserve", "int", 0, lo=0), P("ctx", "int?", None)], "ctx",
     "the messages that fit the budget for the next generation (minus reserve tokens)")
_def(63, "ctx.stats", [P("ctx", "int?", None)], "ctx",
     "budget, live/archived/pinned message and token counts")
_def(64, "ctx.pin", [P("seq", "int"), P("pinned", "bool", True), P("ctx", "int?", None)], "ctx",
     "pin (never paged) or unpin a message", mutates=True)
_def(65, "ctx.fork", [P("pid", "int?", None), P("name", "str?", None), P("ctx", "int?", None)],
     "ctx", "copy a context: for a child pid (it becomes the child's), or for the caller",
     mutates=True)
_def(66, "ctx.search", [P("query", "str"), P("k", "int", 5, lo=1, hi=100),
                        P("ctx", "int?", None)], "ctx",
     "full-text search of the live window and the archive; best first")
_def(67, "ctx.compact", [P("strategy", "str", "summarize", choices=("summarize",)),
                         P("upto", "int?", None),
                         P("ctx", "int?", None)], "ctx",
     "replace old messages by a summary the device writes (accounted to the caller)",
     mutates=True)
_def(68, "ctx.delete", [P("ctx", "int?", None)], "ctx",
     "delete a context with its archive", mutates=True)
_def(69, "ctx.open", [P("name", "str"), P("create", "bool", True)], "ctx",
     "open (or create) a named context of the caller's agent and make it current",
     mutates=True)
_def(70, "ctx.list", [], "ctx", "the contexts the caller owns")

# --- mem: 80-89 (long-term memory; namespace nil = private to the process/agent) ----
_def(80, "mem.put", [P("key", "str"), P("value", "any"), P("tags", "list?", None),
                     P("namespace", "str?", None)], "mem",
     "store a value under a key; shared:* namespaces need mem.shared", mutates=True)
_def(81, "mem.get", [P("key", "str"), P("namespace", "str?", None)], "mem",
     "the value, tags and times stored under a key")
_def(82, "mem.search", [P("query", "str"), P("k", "int", 5, lo=1, hi=100), P("tags", "list?", None),
                        P("namespace", "str?", None)], "mem",
     "full-text search of a namespace, optionally requiring tags")
_def(83, "mem.delete", [P("key", "str"), P("namespace", "str?", None)], "mem",
     "delete a key", mutates=True)
_def(84, "mem.list", [P("namespace", "str?", None), P("tags", "list?", None)], "mem",
     "the keys of a namespace")

# --- fs: 90-109 (paths are inside the caller's sandbox: its private root + /shared) -----
_def(90, "fs.open", [P("path", "str"), P("mode", "str", "r")], "fs.read",
     "open a file ('r', 'r+', 'w', 'a', 'x'; writing needs fs.write); returns an fd",
     mutates=True)
_def(91, "fs.read", [P("fd", "int"), P("n", "int", -1, lo=-1)], "fs.read",
     "read up to n bytes (-1: to the end) from an fd; a pipe returns what it holds (at "
     "most n), waits while it is empty, and b\"\" at EOF")
_def(92, "fs.write", [P("fd", "int"), P("data", "bytes|str")], "fs.write",
     "write to an fd; returns the bytes written", mutates=True)
_def(93, "fs.close", [P("fd", "int")], "fs.read", "close an fd")
_def(94, "fs.stat", [P("path", "str")], "fs.read", "type, size, mtime, mode of a path")
_def(95, "fs.listdir", [P("path", "str", "/")], "fs.read", "the entries of a directory")
_def(96, "fs.mkdir", [P("path", "str"), P("parents", "bool", False)], "fs.write",
     "make a directory", mutates=True)
_def(97, "fs.unlink", [P("path", "str")], "fs.write", "remove a file", mutates=True)
_def(98, "fs.rmdir", [P("path", "str")], "fs.write", "remove an empty directory",
     mutates=True)
_def(99, "fs.rename", [P("src", "str"), P("dst", "str")], "fs.write",
     "rename within one mount", mutates=True)
_def(100, "fs.seek", [P("fd", "int"), P("offset", "int"), P("whence", "int", 0, lo=0, hi=2)],
     "fs.read",
     "move an fd's position; returns the new one")
_def(101, "fs.read_file", [P("path", "str")], "fs.read", "a whole file's bytes")
_def(102, "fs.write_file", [P("path", "str"), P("data", "bytes|str"), P("append", "bool", False)],
     "fs.write", "create/replace (or append to) a whole file", mutates=True)
_def(103, "fs.usage", [], "fs.read", "bytes and files used in the private root, and quotas")

# --- tool and drv: 110-129 -------------------------------------------------------
_def(110, "tool.list", [P("namespace", "str?", None)], None,
     "the tools the caller may call, with JSON schemas of their arguments")
_def(111, "tool.describe", [P("name", "str")], None, "one tool: description and JSON schema")
_def(112, "tool.call", [P("name", "str"), P("args", "dict?", None),
                        P("timeout", "float", 30.0, lo=0, hi=600)],
     None, "call a tool (needs capability tool:<name>); arguments checked against its schema",
     mutates=True)
_def(120, "drv.register", [P("namespace", "str"), P("tools", "list")], "drv.register",
     "serve tools under a namespace from this process: calls arrive as "
     "[req_id, tool, args, caller_pid] drv.request notifications", mutates=True)
_def(121, "drv.reply", [P("req_id", "int"), P("result", "any", None), P("error", "dict?", None)],
     "drv.register", "answer a drv.request: a result, or an error {name, message}")
_def(122, "drv.unregister", [P("namespace", "str")], "drv.register",
     "stop serving a namespace; pending calls fail with EIO", mutates=True)

# --- env: 130-139 (Gymnasium environments served by the kernel) ----------------------
_def(130, "env.make", [P("env_id", "str"), P("kwargs", "dict?", None)], "env",
     "create a Gymnasium environment by id; returns {handle, observation_space, "
     "action_space, spec}", mutates=True)
_def(131, "env.reset", [P("handle", "int"), P("seed", "int?", None, lo=0),
                        P("options", "dict?", None)],
     "env", "reset; returns {observation, info, text}")
_def(132, "env.step", [P("handle", "int"), P("action", "any")], "env",
     "one step; returns {observation, reward, terminated, truncated, info, text}")
_def(133, "env.close", [P("handle", "int")], "env", "close an environment", mutates=True)
_def(134, "env.list", [P("prefix", "str?", None)], None,
     "registered environment ids (all, or those starting with prefix)")
_def(135, "env.render", [P("handle", "int")], "env", "the environment's text rendering")

# --- traj: 140-149 (trajectories: the experience that learning reads) -------------
_def(140, "traj.begin", [P("task", "str"), P("family", "str?", None), P("kind", "str", "episode"),
                         P("meta", "dict?", None)], None,
     "start recording an episode (kind 'episode' or 'demo'); returns its id", mutates=True)
_def(141, "traj.step", [P("episode", "int"), P("observation", "any?"), P("action", "any?"),
                        P("reward", "float", 0.0), P("info", "dict?", None)], None,
     "record one step (observation, action, reward, tool calls and tokens in info)",
     mutates=True)
_def(142, "traj.end", [P("episode", "int"), P("success", "bool?", None),
                       P("meta", "dict?", None)], None,
     "finish an episode; returns its summary", mutates=True)
_def(143, "traj.list", [P("family", "str?", None), P("kind", "str?", None),
                        P("agent", "str?", None), P("limit", "int", 100, lo=1, hi=10_000)], None,
     "episodes, newest last, with steps, total reward and success")
_def(144, "traj.get", [P("episode", "int")], None, "one episode with all its steps")
_def(145, "traj.search", [P("query", "str"), P("family", "str?", None), P("kind", "str", "demo"),
                          P("k", "int", 3, lo=1, hi=50), P("success", "bool?", True)], None,
     "episodes whose task text best matches the query (demonstrations for few-shot)")
_def(146, "traj.stats", [P("family", "str")], None,
     "per-family statistics: episodes, success rate, mean reward, per-choice outcomes")

# --- ipc pipes: 150-155 -----------------------------------------------------------
_def(150, "ipc.pipe", [], "ipc",
     "make a pipe (a 64 KiB buffer); returns {read, write}: two fds of the caller for "
     "fs.read/fs.write/fs.close (a full pipe blocks the writer; EPIPE without readers; "
     "EOF once every write end is closed)", mutates=True)


# --- ipc mailboxes: 156-169 (cap ipc; docs in kernel/mailbox.py) -------------------
# A message is any MessagePack value; the kernel stamps who sent it. Sending and
# receiving are data, like fs.read/fs.write: not written to the audit log.
_def(156, "ipc.send", [P("dest", "int|str"), P("message", "any?"),
                       P("timeout", "float", 0.0, lo=0, hi=3600)], "ipc",
     "send a message to a pid's mailbox, or durably to agent:NAME (its running process, "
     "else its next one); a full mailbox is EAGAIN after waiting up to timeout seconds; "
     "returns {id, durable}")
_def(157, "ipc.recv", [P("timeout", "float?", None, lo=0, hi=86400), P("match", "dict?", None)],
     "ipc",
     "take the next message (senders served in turn), waiting up to timeout seconds (nil: "
     "for ever; then ETIMEDOUT); match: {from: pid or 'agent:NAME', type, topic}")
_def(158, "ipc.peek", [P("match", "dict?", None), P("limit", "int", 1, lo=1, hi=64)], "ipc",
     "the next messages ipc.recv would take, without taking them or waiting")
_def(159, "ipc.subscribe", [P("topic", "str")], "ipc",
     "receive every message published to a topic", mutates=True)
_def(160, "ipc.unsubscribe", [P("topic", "str")], "ipc",
     "stop receiving a topic's messages", mutates=True)
_def(161, "ipc.publish", [P("topic", "str"), P("message", "any?")], "ipc",
     "send a message to every subscriber of a topic; returns how many received it "
     "(a subscriber whose mailbox is full of yours misses it)")
_def(162, "ipc.mailbox", [], "ipc",
     "the caller's mailbox: messages waiting by sender, its bounds, its topics")
_def(163, "ipc.sendrecv", [P("dest", "int|str"), P("message", "any?"),
                           P("timeout", "float?", None, lo=0, hi=86400),
                           P("match", "dict?", None)], "ipc",
     "ipc.send, then ipc.recv, in one call (a request and its answer; a reply and the next "
     "request); timeout bounds both (nil: for ever); ETIMEDOUT means the message went and "
     "nothing came back")

# --- ctx blocks: 71-79 (shared context blocks; access by capability, see caps.py) ----
_def(71, "ctx.block_open", [P("name", "str"), P("create", "bool", True)], "ctx",
     "open a named shared block, creating it empty (version 0) if asked; needs "
     "ctx.block.read:NAME (to create: ctx.block.write:NAME); returns its stat",
     mutates=True)
_def(72, "ctx.block_read", [P("name", "str")], "ctx",
     "one whole version of a block: {name, version, text, updated, writer}")
_def(73, "ctx.block_write", [P("name", "str"), P("text", "str"),
                             P("expect_version", "int?", None, lo=0)], "ctx",
     "replace a block's text (needs ctx.block.write:NAME); with expect_version, only if "
     "that is still the current version, else EAGAIN (compare-and-set); returns its stat",
     mutates=True)
_def(74, "ctx.block_attach", [P("name", "str"), P("ctx", "int?", None)], "ctx",
     "attach a block to a context (default: the caller's): llm.generate(context=true) "
     "then shows its current version before the conversation", mutates=True)
_def(75, "ctx.block_detach", [P("name", "str"), P("ctx", "int?", None)], "ctx",
     "detach a block from a context", mutates=True)
_def(76, "ctx.block_list", [P("ctx", "int?", None)], "ctx",
     "the blocks the caller may read, each with whether it is attached to the context")
_def(77, "ctx.block_delete", [P("name", "str")], "ctx",
     "delete a block (needs ctx.block.write:NAME); it is detached everywhere", mutates=True)

# --- svc: 180-189 (supervised services: processes the kernel restarts) -------------
_def(180, "svc.add", [
    P("name", "str"), P("argv", "list"),
    P("restart", "str", "always", choices=("always", "on-failure")),
    P("caps", "list?", None), P("env", "dict?", None), P("cwd", "str?", None),
    P("backoff", "float", 0.1, lo=0.01, hi=3600),
    P("backoff_max", "float", 30.0, lo=0.01, hi=86400),
    P("stable", "float", 10.0, lo=0, hi=86400),
], "svc.admin", "start a command as a supervised service: a process the kernel restarts when "
   "it dies (restart 'on-failure': not after exit 0), after backoff seconds doubling to "
   "backoff_max, back to backoff once a run lasted stable seconds; returns its row",
     mutates=True)
_def(181, "svc.list", [], None,
     "the services: name, pid, state, restarts, last exit, backoff, argv")
_def(182, "svc.stop", [P("name", "str"), P("grace", "float", 3.0, lo=0, hi=3600)],
     "svc.admin", "stop a service: TERM its process, KILL after grace seconds; it is not "
                  "restarted until svc.restart", mutates=True)
_def(183, "svc.restart", [P("name", "str"), P("grace", "float", 3.0, lo=0, hi=3600)],
     "svc.admin", "start a service's process afresh (TERM, KILL after grace, start at once); "
                  "starts a stopped one", mutates=True)
_def(184, "svc.remove", [P("name", "str"), P("grace", "float", 3.0, lo=0, hi=3600)],
     "svc.admin", "stop a service and forget it", mutates=True)

# --- key: 170-179 (the HTTP gateway's API keys; each key is a named process) -------------
_def(170, "key.create", [P("name", "str"), P("caps", "list?", None), P("nice", "int", 0, lo=-20,
                                                                            hi=19),
                         P("limits", "dict?", None), P("model", "str?", None)], "key.admin",
     "make an API key for the HTTP gateway: a named process (as proc.attach makes) that its "
     "requests run as; returns {name, pid, key} (the key is shown this once; the kernel "
     "keeps only its hash, durably)", mutates=True)
_def(171, "key.list", [], "key.admin",
     "the API keys: name, pid, key prefix, caps, nice, limits, model, created, usage")
_def(172, "key.revoke", [P("name", "str|int")], "key.admin",
     "revoke an API key by name or pid: it stops working at once and its process exits",
     mutates=True)
