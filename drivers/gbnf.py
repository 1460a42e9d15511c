"""Bounds on a GBNF grammar, checked before llama.cpp compiles it.

llama.cpp keeps one parse *stack* per way the grammar can go on from where the
output is, and works with all of them: compiling starts every stack the root
can begin with; each sampled token is checked against each stack; and when the
single best token is refused, a pass over many candidates costs candidates x
stacks (Gemma 3 has 262,144 tokens). A rule with N alternatives starts N
stacks, and references multiply: three nested rules of 40 alternatives each
start 64,000 stacks from 1 KB of text, which took 21 s to compile here. So
besides its size a grammar's *fan-out* is bounded: the most stacks any point of
it can open at once, estimated from its rules (a terminal opens one; a
reference opens what its rule does; a sequence opens what its first element
does, plus what follows while the elements it passes may be empty).

Two more inputs took the whole process down: ``x{5,3}`` (llama.cpp writes out
max - min optional copies, unsigned: four billion) and 30,000 nested
parentheses (its parser recurses on them). Repetitions are checked and their
expansion counted (MAX_EXPANDED); nesting is bounded (MAX_DEPTH).

The scanner here only estimates. It is lenient: a text it cannot read goes on
to llama.cpp's parser, which refuses bad grammars (EINVAL) itself.
"""

from __future__ import annotations

import re

from llmagentos.syscalls.errno import SyscallError

MAX_BYTES = 64 << 10      # GBNF text (a json_schema: its JSON text, then its GBNF)
MAX_RULES = 1024
MAX_ALTERNATIVES = 4096   # '|' over all rules
MAX_FANOUT = 1024         # parse stacks one point of the grammar may open
MAX_DEPTH = 64            # nested parentheses (llama.cpp's parser recurses on them)
MAX_EXPANDED = 1 << 16    # elements once llama.cpp has written out every x{m,n}
_CAP = 10 ** 12           # fan-outs past this are all "too many"

_TOKENS = re.compile(r"""
    (?P<ws>\s+|\#[^\r\n]*)
  | (?P<lit>"(?:[^"\\]|\\.)*")
  | (?P<cls>\[(?:[^\]\\]|\\.)*\])
  | (?P<tok>!?<[^<>]*>)
  | (?P<def>::=)
  | (?P<name>[A-Za-z0-9_-]+)
  | (?P<rep>\{[^{}]*\}|[*+?])
  | (?P<op>[|().])
""", re.X | re.S)


class _Unreadable(Exception):
    pass


def check_size(what: str, text: str) -> None:
    n = len(text) if len(text) > MAX_BYTES else len(text.encode("utf-8"))
    if n > MAX_BYTES:
        raise SyscallError("E2BIG", f"{what} of {n} bytes is over the bound of {MAX_BYTES} "
                                    "bytes (GRAMMAR_MAX_BYTES)")


def check_grammar(text: str) -> None:
    """E2BIG, naming the bound, for a grammar too big or too branchy to compile."""
    check_size("grammar", text)
    try:
        rules = _parse(text)
    except _Unreadable:
        return
    try:
        n = fanout(rules)
    except RecursionError:
        raise SyscallError("E2BIG", "grammar rules refer to one another too deeply (a chain "
                                    "of some hundreds of references)") from None
    if len(rules) > MAX_RULES:
        raise SyscallError("E2BIG", f"grammar has {len(rules)} rules; the bound is "
                                    f"{MAX_RULES} (GRAMMAR_MAX_RULES)")
    alternatives = sum(_count_alternatives(alts) for alts in rules.values())
    if alternatives > MAX_ALTERNATIVES:
        raise SyscallError("E2BIG", f"grammar has {alternatives} alternatives; the bound is "
                                    f"{MAX_ALTERNATIVES} (GRAMMAR_MAX_ALTERNATIVES)")
    size = sum(_expanded(alts) for alts in rules.values())
    if size > MAX_EXPANDED:
        raise SyscallError("E2BIG", f"grammar expands to {min(size, _CAP)} elements once its "
                                    f"repetitions are written out; the bound is {MAX_EXPANDED} "
                                    "(GRAMMAR_MAX_EXPANDED)")
    if n > MAX_FANOUT:
        shown = f"{n}" if n < _CAP else f"more than {_CAP}"
        raise SyscallError("E2BIG", f"grammar can branch {shown} ways at one point; the bound "
                                    f"is {MAX_FANOUT} (GRAMMAR_MAX_FANOUT): use fewer "
                                    "alternatives, or nest them less")


# A rule is a list of alternatives; an alternative a list of elements; an element
# [kind, payload, optional, copies] with kind "t" (terminal; payload: may it match
# nothing), "r" (reference; payload: rule name) or "g" (group; payload: its
# alternatives), and copies: how many times llama.cpp writes it out (x{m,n}: n).

def _parse(text: str) -> dict[str, list]:
    toks: list[tuple[str, str]] = []
    pos, depth = 0, 0
    for m in _TOKENS.finditer(text):
        if m.start() != pos:
            raise _Unreadable
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        value = m.group()
        if value == "(":
            depth += 1
            if depth > MAX_DEPTH:
                raise SyscallError("E2BIG", f"grammar nests parentheses deeper than "
                                            f"{MAX_DEPTH} (GRAMMAR_MAX_DEPTH)")
        elif value == ")":
            depth -= 1
        toks.append((kind, value))
    if pos != len(text):
        raise _Unreadable
    rules: dict[str, list] = {}
    i = 0
    while i < len(toks):
        if toks[i][0] != "name" or i + 1 >= len(toks) or toks[i + 1][0] != "def":
            raise _Unreadable
        name = toks[i][1]
        end = i + 2
        while end < len(toks) and not (toks[end][0] == "name" and end + 1 < len(toks)
                                       and toks[end + 1][0] == "def"):
            end += 1
        alts, j = _alternatives(toks, i + 2, end)
        if j != end:
            raise _Unreadable
        rules.setdefault(name, []).extend(alts)
        i = end
    return rules


def _alternatives(toks: list[tuple[str, str]], i: int, end: int) -> tuple[list, int]:
    alts: list[list] = [[]]
    while i < end:
        kind, value = toks[i]
        if value == "|":
            alts.append([])
        elif value == ")":
            break
        elif value == "(":
            group, i = _alternatives(toks, i + 1, end)
            if i >= end or toks[i][1] != ")":
                raise _Unreadable
            alts[-1].append(["g", group, False, 1])
        elif kind == "rep":
            if not alts[-1]:
                raise _Unreadable
            elem = alts[-1][-1]
            least, copies = _repetition(value)
            elem[2] = elem[2] or least == 0
            elem[3] = min(_CAP, elem[3] * copies)
        elif kind == "name":
            alts[-1].append(["r", value, False, 1])
        elif kind in ("lit", "cls", "tok") or value == ".":
            alts[-1].append(["t", value == '""', False, 1])
        else:
            raise _Unreadable
        i += 1
    return alts, i


def _repetition(op: str) -> tuple[int, int]:
    """(least times, copies written out) of a repetition operator."""
    if op in ("*", "?"):
        return 0, 1
    if op == "+":
        return 1, 1
    m = re.fullmatch(r"\{\s*(\d+)\s*(?:(,)\s*(\d*)\s*)?\}", op)
    if m is None:
        raise _Unreadable
    least = _count(m.group(1))
    most = least if m.group(2) is None else (_count(m.group(3)) if m.group(3) else None)
    if most is not None and most < least:
        raise SyscallError("EINVAL", f"grammar repetition {op}: the most is less than the least")
    return least, max(1, most if most is not None else least + 1)


def _count(digits: str) -> int:
    return int(digits) if len(digits) <= 12 else _CAP  # (int() refuses 4,300+ digits)


def _expanded(alts: list) -> int:
    total = 0
    for seq in alts:
        for e in seq:
            total = min(_CAP, total + e[3] * (_expanded(e[1]) if e[0] == "g" else 1))
    return total


def _count_alternatives(alts: list) -> int:
    n = len(alts) - 1
    for seq in alts:
        n += sum(_count_alternatives(e[1]) for e in seq if e[0] == "g")
    return n


def fanout(rules: dict[str, list]) -> int:
    """The most parse stacks one point of the grammar can open (an estimate, capped)."""
    first: dict[str, int] = {}
    empty: dict[str, bool] = {}
    busy_first: set[str] = set()
    busy_empty: set[str] = set()

    def rule_first(name: str) -> int:
        if name not in first:
            if name in busy_first or name not in rules:
                return 1  # recursion (llama.cpp refuses the left kind) or unknown
            busy_first.add(name)
            first[name] = min(_CAP, sum(seq_first(s) for s in rules[name]))
            busy_first.discard(name)
        return first[name]

    def rule_empty(name: str) -> bool:
        if name not in empty:
            if name in busy_empty or name not in rules:
                return False
            busy_empty.add(name)
            empty[name] = any(all(elem_empty(e) for e in s) for s in rules[name])
            busy_empty.discard(name)
        return empty[name]

    def elem_first(e: list) -> int:
        if e[0] == "t":
            return 1
        if e[0] == "r":
            return rule_first(e[1])
        return min(_CAP, sum(seq_first(s) for s in e[1]))

    def elem_empty(e: list) -> bool:
        if e[2] or (e[0] == "t" and e[1]):
            return True
        if e[0] == "r":
            return rule_empty(e[1])
        return e[0] == "g" and any(all(elem_empty(x) for x in s) for s in e[1])

    def seq_first(seq: list) -> int:
        total = 0
        for e in seq:
            total += elem_first(e)
            if total >= _CAP or not elem_empty(e):
                break
        return min(_CAP, total)

    best = max(rule_first(name) for name in rules) if rules else 1  # where each is referenced
    todo = [alts for alts in rules.values()]
    while todo:
        alts = todo.pop()
        for seq in alts:
            after = 0  # stacks open at the point after element j (right to left)
            for e in reversed(seq):
                after = min(_CAP, elem_first(e) + (after if elem_empty(e) else 0))
                best = max(best, after)
                if e[0] == "g":
                    todo.append(e[1])
    return best
