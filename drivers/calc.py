"""The calc driver: evaluate an arithmetic expression safely.

The expression is parsed with ``ast`` and walked by a tiny evaluator that
knows only numeric literals, ``+ - * / // % **``, unary ``+ -``, parentheses
and a whitelist of math functions and constants. Nothing is ever passed to
``eval``/``exec``, and there are no names, attributes, subscripts or keyword
arguments to reach Python objects through.

Denial of service is bounded: the expression's length, the nesting depth,
integers at ``MAX_INT_BITS`` bits (checked *before* ``**`` and ``*`` compute),
``round``'s digits. Every error is EINVAL with a message saying what was
wrong.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from llmagentos.syscalls.errno import SyscallError

MAX_EXPR_CHARS = 4096
MAX_INT_BITS = 4096  # about 1233 decimal digits
MAX_DEPTH = 100
MAX_ARGS = 64

Number = int | float

CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int):
        raise SyscallError("EINVAL", "round(): ndigits must be an integer")
    if abs(ndigits) > 400:
        raise SyscallError("EINVAL", "round(): ndigits must be within -400..400")
    return round(x, ndigits)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    # name: (function, fewest args, most args)
    "sqrt": (math.sqrt, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1),
    "acos": (math.acos, 1, 1),
    "atan": (math.atan, 1, 1),
    "atan2": (math.atan2, 2, 2),
    "log": (_log, 1, 2),
    "log2": (math.log2, 1, 1),
    "log10": (math.log10, 1, 1),
    "exp": (math.exp, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "hypot": (math.hypot, 1, MAX_ARGS),
    "degrees": (math.degrees, 1, 1),
    "radians": (math.radians, 1, 1),
    "min": (min, 1, MAX_ARGS),
    "max": (max, 1, MAX_ARGS),
}


def _too_large(what: str) -> SyscallError:
    return SyscallError("EINVAL", f"{what}: result too large (over {MAX_INT_BITS} bits)")


def _pow(a: Number, b: Number) -> Number:
    # bits of a**b is about b * log2|a|: refuse before computing it.
    if (isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1
            and b * math.log2(abs(a)) > MAX_INT_BITS):
        raise _too_large("**")
    return a ** b


def _mul(a: Number, b: Number) -> Number:
    if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > \
            MAX_INT_BITS + 1:
        raise _too_large("*")
    return a * b


BINARY: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _pow,
}
UNARY: dict[type, Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _check(value: object) -> Number:
    """Keep results real, finite and bounded."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SyscallError("EINVAL", f"result is not a real number ({type(value).__name__})")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _too_large("integer")
    if isinstance(value, float) and not math.isfinite(value):
        raise SyscallError("EINVAL", "result is too large (not finite)")
    return value


def _eval(node: ast.AST, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise SyscallError("EINVAL", f"expression nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Expression):
        return _eval(node.body, depth + 1)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise SyscallError("EINVAL", f"only numbers are allowed, not {node.value!r}")
        return _check(node.value)
    if isinstance(node, ast.BinOp):
        # 1 + 2 + ... + n is a left-deep tree: walk it as a loop, so a long
        # sum is not mistaken for deep nesting.
        chain = []
        while isinstance(node, ast.BinOp):
            if type(node.op) not in BINARY:
                raise SyscallError("EINVAL", f"operator {type(node.op).__name__} is not allowed")
            chain.append(node)
            node = node.left
        value = _eval(node, depth + 1)
        for op in reversed(chain):
            value = _check(BINARY[type(op.op)](value, _eval(op.right, depth + 1)))
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return _check(UNARY[type(node.op)](_eval(node.operand, depth + 1)))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if node.id in FUNCTIONS:
            raise SyscallError("EINVAL", f"{node.id} is a function: call it, as {node.id}(x)")
        raise SyscallError("EINVAL", f"unknown name {node.id!r}; known constants: "
                                     f"{', '.join(sorted(CONSTANTS))}")
    if isinstance(node, ast.Call):
        return _call(node, depth)
    if isinstance(node, ast.UnaryOp):
        raise SyscallError("EINVAL", f"operator {type(node.op).__name__} is not allowed")
    raise SyscallError("EINVAL", f"{type(node).__name__} is not allowed in an expression")


def _call(node: ast.Call, depth: int) -> Number:
    if not isinstance(node.func, ast.Name):
        raise SyscallError("EINVAL", "only the listed functions may be called")
    name = node.func.id
    if name not in FUNCTIONS:
        raise SyscallError("EINVAL", f"unknown function {name!r}; known: "
                                     f"{', '.join(sorted(FUNCTIONS))}")
    if node.keywords:
        raise SyscallError("EINVAL", f"{name}() takes no keyword arguments")
    if any(isinstance(a, ast.Starred) for a in node.args):
        raise SyscallError("EINVAL", f"{name}(): *args is not allowed")
    fn, least, most = FUNCTIONS[name]
    if not least <= len(node.args) <= most:
        want = str(least) if least == most else f"{least} to {most}"
        raise SyscallError("EINVAL", f"{name}() takes {want} arguments, got {len(node.args)}")
    args = [_eval(a, depth + 1) for a in node.args]
    return _check(fn(*args))


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression: an int or a float.

    >>> evaluate("2 * (3 + 4) ** 2")
    98
    """
    if not isinstance(expression, str):
        raise SyscallError("EINVAL", "the expression must be a string")
    if len(expression) > MAX_EXPR_CHARS:
        raise SyscallError("EINVAL", f"expression longer than {MAX_EXPR_CHARS} characters")
    if not expression.strip():
        raise SyscallError("EINVAL", "empty expression")
    # A model may wrap a long expression over lines; it is still one expression.
    text = " ".join(expression.split())
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise SyscallError("EINVAL", f"syntax error: {e.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise SyscallError("EINVAL", "expression too complex to parse") from None
    try:
        return _eval(tree, 0)
    except SyscallError:
        raise
    except ZeroDivisionError:
        raise SyscallError("EINVAL", "division by zero") from None
    except OverflowError:
        raise SyscallError("EINVAL", "result too large") from None
    except RecursionError:
        raise SyscallError("EINVAL", "expression too complex") from None
    except (ValueError, TypeError) as e:
        raise SyscallError("EINVAL", f"math error: {e}") from None
