"""Built-in tools: valid schemas, and handlers that behave like their descriptions."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import jsonschema
import pytest

from llmagentos.drivers.builtin_tools import (
    MAX_KEYS_PER_OWNER,
    MAX_VALUE_BYTES,
    MappingKV,
    SQLiteKV,
    Tool,
    builtin_tools,
    open_kv,
)
from llmagentos.syscalls.errno import SyscallError


def err(fn, *args) -> str:
    with pytest.raises(SyscallError) as info:
        fn(*args)
    return info.value.name


def test_every_tool_is_well_formed():
    tools = builtin_tools()
    assert set(tools) == {"calc.eval", "clock.now", "kv.get", "kv.set", "kv.delete", "kv.list"}
    for name, tool in tools.items():
        assert isinstance(tool, Tool) and tool.name == name
        group, call = name.split(".")
        assert group and call and tool.description
        jsonschema.Draft202012Validator.check_schema(tool.schema)
        assert tool.schema["type"] == "object"
        assert tool.schema["$schema"].endswith("2020-12/schema")
        assert tool.describe() == {"name": name, "description": tool.description,
                                   "schema": tool.schema}


@pytest.mark.parametrize("name, good, bad", [
    ("calc.eval", {"expression": "1+1"}, {"expression": 5}),
    ("calc.eval", {"expression": "1+1"}, {"expr": "1+1"}),
    ("clock.now", {}, {"tz": "UTC"}),
    ("kv.get", {"key": "a"}, {"key": ""}),
    ("kv.set", {"key": "a", "value": {"any": ["json", 1, None]}}, {"key": "a"}),
    ("kv.delete", {"key": "a"}, {}),
    ("kv.list", {"prefix": "a", "limit": 5}, {"limit": 0}),
])
def test_schemas_accept_good_and_reject_bad_arguments(name, good, bad):
    validator = jsonschema.Draft202012Validator(builtin_tools()[name].schema)
    assert validator.is_valid(good)
    assert not validator.is_valid(bad)


def test_calc_eval():
    calc = builtin_tools()["calc.eval"]
    assert calc.handler("pid1", {"expression": "2 * (3 + 4)"}) == {
        "value": 14, "text": "14", "exact": True}
    big = calc.handler("pid1", {"expression": "2 ** 100"})
    assert big == {"value": float(2 ** 100), "text": str(2 ** 100), "exact": False}
    assert calc.handler("pid1", {"expression": "2 ** 1100"})["value"] is None
    assert err(calc.handler, "pid1", {"expression": "1/0"}) == "EINVAL"


def test_clock_now():
    now = builtin_tools()["clock.now"].handler("pid1", {})
    assert abs(now["unix"] - time.time()) < 5
    parsed = datetime.fromisoformat(now["iso"])
    assert parsed.utcoffset().total_seconds() == 0
    assert abs(parsed.timestamp() - now["unix"]) < 1e-3
    later = builtin_tools()["clock.now"].handler("pid1", {})
    assert later["monotonic"] >= now["monotonic"]


@pytest.fixture(params=["memory", "sqlite"])
def kv(request, tmp_path):
    store = open_kv() if request.param == "memory" else open_kv(tmp_path / "kv.sqlite")
    yield builtin_tools(store)
    if isinstance(store, SQLiteKV):
        store.close()


def call(tools, name, owner, **args):
    return tools[name].handler(owner, args)


def test_kv_roundtrip_and_owner_isolation(kv):
    assert call(kv, "kv.set", "alice", key="k", value=[1, {"x": None}]) == {
        "key": "k", "created": True}
    assert call(kv, "kv.set", "alice", key="k", value="v2")["created"] is False
    assert call(kv, "kv.get", "alice", key="k") == {"key": "k", "value": "v2"}
    assert err(kv["kv.get"].handler, "bob", {"key": "k"}) == "ENOENT"  # bob's own namespace
    call(kv, "kv.set", "bob", key="k", value=1)
    assert call(kv, "kv.get", "alice", key="k")["value"] == "v2"
    for key in ("notes/b", "notes/a", "other"):
        call(kv, "kv.set", "alice", key=key, value=True)
    assert call(kv, "kv.list", "alice") == {"keys": ["k", "notes/a", "notes/b", "other"],
                                            "truncated": False}
    assert call(kv, "kv.list", "alice", prefix="notes/") == {"keys": ["notes/a", "notes/b"],
                                                             "truncated": False}
    assert call(kv, "kv.list", "alice", limit=2) == {"keys": ["k", "notes/a"], "truncated": True}
    assert call(kv, "kv.delete", "alice", key="k") == {"key": "k", "deleted": True}
    assert err(kv["kv.delete"].handler, "alice", {"key": "k"}) == "ENOENT"
    assert call(kv, "kv.get", "bob", key="k")["value"] == 1


def test_kv_values_are_copies(kv):
    value = {"list": [1, 2]}
    call(kv, "kv.set", "a", key="k", value=value)
    value["list"].append(3)
    got = call(kv, "kv.get", "a", key="k")["value"]
    assert got == {"list": [1, 2]}
    got["list"].append(4)
    assert call(kv, "kv.get", "a", key="k")["value"] == {"list": [1, 2]}


def test_kv_bad_input(kv):
    s = kv["kv.set"].handler
    assert err(s, "a", {"key": "", "value": 1}) == "EINVAL"
    assert err(s, "a", {"key": "k\0", "value": 1}) == "EINVAL"
    assert err(s, "a", {"key": "k" * 257, "value": 1}) == "ENAMETOOLONG"
    assert err(s, "a", {"key": "k", "value": object()}) == "EINVAL"
    assert err(s, "a", {"key": "k", "value": float("nan")}) == "EINVAL"
    assert err(s, "a", {"key": "k", "value": "x" * MAX_VALUE_BYTES}) == "E2BIG"
    assert err(kv["kv.list"].handler, "a", {"limit": 0}) == "EINVAL"


def test_kv_key_quota(monkeypatch):
    import llmagentos.drivers.builtin_tools as bt
    monkeypatch.setattr(bt, "MAX_KEYS_PER_OWNER", 3)
    store = MappingKV()
    for i in range(3):
        store.set("a", f"k{i}", i)
    assert err(store.set, "a", "k3", 3) == "EDQUOT"
    store.set("a", "k0", "replace is fine")
    store.set("b", "k3", "another owner has its own count")
    assert MAX_KEYS_PER_OWNER >= 1000


def test_kv_sqlite_is_durable_and_thread_safe(tmp_path):
    path = tmp_path / "kv.sqlite"
    store = SQLiteKV(path)
    threads = [threading.Thread(target=lambda i=i: [store.set(f"p{i}", f"k{j}", j)
                                                    for j in range(50)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    again = SQLiteKV(path)  # a kernel restart
    assert again.keys("p3") == sorted(f"k{j}" for j in range(50))
    assert again.get("p0", "k49") == 49
    again.close()


def test_kv_over_a_caller_supplied_mapping():
    backing: dict[str, str] = {}
    tools = builtin_tools(open_kv(backing))
    call(tools, "kv.set", 7, key="k", value={"v": 1})  # an int pid is an owner too
    assert backing == {"7\0k": '{"v":1}'}
    assert call(tools, "kv.get", "7", key="k")["value"] == {"v": 1}
