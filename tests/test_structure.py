"""The kernel's structure: handlers get the services, never the Kernel.

Only the kernel itself (kernel/kernel.py) and its entry point
(kernel/__main__.py) may know the Kernel object; every other module of
kernel/ works on what it is handed (a handler: `call.sys`, the Services).
Read from the source (the AST), so a TYPE_CHECKING import counts too.
"""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernel"
PACKAGE = "llmagentos.kernel"
KERNEL_MODULE = f"{PACKAGE}.kernel"
MAY_KNOW_THE_KERNEL = {"kernel.py", "__main__.py"}  # paths relative to kernel/


def _package_of(rel: Path) -> str:
    """The package a module's relative imports resolve against."""
    return ".".join([PACKAGE, *rel.parent.parts])


def _resolve(package: str, level: int, module: str | None) -> str:
    base = package.split(".")
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join([*(base if level else []), *([module] if module else [])])


def offences(rel: Path, source: str) -> list[str]:
    """What in one module of kernel/ (``rel``: its path below kernel/) reaches
    for the Kernel: an import of kernel/kernel.py in any spelling (relative or
    absolute, a name from it or the module itself, also as a string handed to
    importlib), or any ``.kernel`` attribute (``call.kernel``, ``self.kernel``)."""
    found = []
    package = _package_of(rel)
    for node in ast.walk(ast.parse(source, str(rel))):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(package, node.level, node.module)
            targets = {mod} | {f"{mod}.{a.name}" for a in node.names}
            if KERNEL_MODULE in targets or any(t.startswith(KERNEL_MODULE + ".")
                                               for t in targets):
                found.append(f"{where}: imports {KERNEL_MODULE}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == KERNEL_MODULE or a.name.startswith(KERNEL_MODULE + "."):
                    found.append(f"{where}: imports {KERNEL_MODULE}")
        elif isinstance(node, ast.Attribute) and node.attr == "kernel":
            found.append(f"{where}: refers to .kernel ({ast.unparse(node)})")
        elif isinstance(node, ast.Constant) and node.value == KERNEL_MODULE:
            found.append(f"{where}: names {KERNEL_MODULE}")
    return found


def kernel_modules() -> list[Path]:
    return sorted(p.relative_to(KERNEL_DIR) for p in KERNEL_DIR.rglob("*.py"))


def test_only_the_kernel_and_its_entry_point_know_the_kernel():
    mods = kernel_modules()
    assert Path("dispatch.py") in mods and Path("proc/table.py") in mods  # the walk sees them
    bad = [o for rel in mods if str(rel) not in MAY_KNOW_THE_KERNEL
           for o in offences(rel, (KERNEL_DIR / rel).read_text())]
    assert bad == [], "handlers get the services (call.sys), never the Kernel:\n" \
        + "\n".join(bad)


def test_the_check_sees_every_spelling():
    """The check above cannot pass by missing what it looks for."""
    handler = Path("sysproc.py")
    sub = Path("proc/table.py")
    for rel, src in [
        (handler, "from .kernel import Kernel"),
        (handler, "from . import kernel"),
        (handler, "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                  "    from .kernel import Kernel"),
        (handler, "import llmagentos.kernel.kernel"),
        (handler, "from llmagentos.kernel.kernel import VERSION"),
        (handler, "from llmagentos.kernel import kernel as k"),
        (handler, "import importlib\nimportlib.import_module('llmagentos.kernel.kernel')"),
        (sub, "from ..kernel import Kernel"),
        (sub, "from .. import kernel"),
        (handler, "async def f(call):\n    return call.kernel.procs"),
        (handler, "def f(conn):\n    k = conn.kernel"),
    ]:
        assert offences(rel, src), src
    for rel, src in [
        (handler, "from .kvstore import SnapshotStore"),
        (handler, "from llmagentos.kernel.kvstore import SnapshotStore"),
        (sub, "from .. import perms"),
        (sub, "from .table import ProcessTable"),  # llmagentos.kernel.proc.table
        (handler, "async def f(call):\n    return call.sys.procs"),
        (handler, "from .cgroups import kernel_name"),
    ]:
        assert not offences(rel, src), src


def test_a_handler_is_handed_the_services_not_the_kernel():
    from llmagentos.kernel.dispatch import Call
    names = {f.name for f in fields(Call)}
    assert "kernel" not in names
    assert "sys" in names
