"""The call table is the single source of truth and checks arguments once."""

import pytest

from llmagentos.syscalls import caps
from llmagentos.syscalls.errno import ERRNO, SyscallError
from llmagentos.syscalls.table import TABLE


def test_numbers_and_names_unique_and_grouped():
    nums = [sc.number for sc in TABLE]
    assert len(nums) == len(set(nums))
    for sc in TABLE:
        assert "." in sc.name and sc.doc


def test_errno_names_are_posix_and_numbers_unique():
    nums = [n for n, _ in ERRNO.values()]
    assert len(nums) == len(set(nums))
    assert ERRNO["ENOENT"][0] == 2 and ERRNO["EACCES"][0] == 13 and ERRNO["ENOSYS"][0] == 38


def test_bind_fills_defaults_and_checks_types():
    sc = TABLE["proc.wait"]
    assert sc.bind([3]) == {"pid": 3, "timeout": None}
    assert sc.bind([3, 1]) == {"pid": 3, "timeout": 1.0}
    with pytest.raises(SyscallError, match="must be int") as e:
        sc.bind(["3"])
    assert e.value.name == "EINVAL"
    with pytest.raises(SyscallError, match="missing"):
        sc.bind([])
    with pytest.raises(SyscallError, match="at most"):
        sc.bind([1, 2, 3])
    with pytest.raises(SyscallError, match="must be int"):
        sc.bind([True])  # a bool is not a pid


def test_bind_keywords():
    sc = TABLE["proc.kill"]
    assert sc.bind([5], {"signal": "STOP"}) == {"pid": 5, "signal": "STOP"}
    with pytest.raises(SyscallError, match="unknown argument"):
        sc.bind([5], {"sig": 9})
    with pytest.raises(SyscallError, match="given twice"):
        sc.bind([5], {"pid": 6})


def test_unknown_call_is_enosys():
    with pytest.raises(SyscallError) as e:
        TABLE["nope.nope"]
    assert e.value.name == "ENOSYS"


def test_capability_globs_and_bounding():
    assert caps.covers(["tool:*"], "tool:calc.eval")
    assert caps.covers(["*"], "proc.kill_any")
    assert not caps.covers(["fs.read"], "fs.write")
    assert caps.bounded(["fs.read", "tool:calc.*"], ["fs.read", "tool:calc.eval"]) == []
    assert caps.bounded(["fs.read"], ["fs.read", "exec"]) == ["exec"]
    assert caps.bounded(["tool:calc.*"], ["tool:*"]) == ["tool:*"]  # no widening by glob


def test_docs_are_generated_from_the_table():
    from pathlib import Path

    from llmagentos.syscalls.table import markdown
    doc = Path(__file__).parent.parent / "docs" / "syscalls.md"
    assert doc.read_text().strip() == markdown(TABLE).strip(), \
        "docs/syscalls.md is stale: run `llmos syscalls --markdown > docs/syscalls.md`"


def test_every_call_has_a_kernel_handler():
    from llmagentos.kernel import kernel  # noqa: F401  (registers every handler)
    from llmagentos.kernel.dispatch import missing
    assert missing() == []
