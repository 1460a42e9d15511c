"""Userland drivers: the SDK derives JSON Schemas from type hints, and a driver
class run as a real kernel process serves `<ns>.<tool>` calls — arguments
checked by the kernel, errors carried back as errnos, timeouts, crashes and
capabilities enforced."""

from __future__ import annotations

import enum
import json
import pickle
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, TypedDict

import jsonschema
import pytest
import trio
from conftest import wait_for

import llmagentos
from llmagentos import ERRORS, Driver, tool
from llmagentos.driver import (
    cli_run,
    exception_to_error,
    load_driver_class,
    parse_docstring,
    schema_for,
    schema_for_type,
    to_wire,
)
from llmagentos.errors import error_for

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


# --- schemas from type hints ---------------------------------------------------------

class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclass
class Point:
    x: float
    y: float = 0.0


class Span(TypedDict):
    start: int
    end: int


def test_scalar_and_container_types_map_to_json_schema():
    assert schema_for_type(int) == {"type": "integer"}
    assert schema_for_type(float) == {"type": "number"}
    assert schema_for_type(str) == {"type": "string"}
    assert schema_for_type(bool) == {"type": "boolean"}
    assert schema_for_type(list[int]) == {"type": "array", "items": {"type": "integer"}}
    assert schema_for_type(list) == {"type": "array"}
    assert schema_for_type(dict) == {"type": "object"}
    assert schema_for_type(dict[str, float]) == {
        "type": "object", "additionalProperties": {"type": "number"}}
    assert schema_for_type(tuple[int, str]) == {
        "type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
        "minItems": 2, "maxItems": 2}
    assert schema_for_type(list[list[str]]) == {
        "type": "array", "items": {"type": "array", "items": {"type": "string"}}}


def test_literal_and_enum_become_enums():
    assert schema_for_type(Literal["C", "F"]) == {"type": "string", "enum": ["C", "F"]}
    assert schema_for_type(Literal[1, "a"]) == {"enum": [1, "a"]}
    assert schema_for_type(Color) == {"type": "string", "enum": ["red", "green"]}


def test_optional_is_nullable():
    assert schema_for_type(int | None) == {"type": ["integer", "null"]}
    assert schema_for_type(Optional[list[str]]) == {
        "type": ["array", "null"], "items": {"type": "string"}}
    assert schema_for_type(Literal["a", "b"] | None) == {
        "type": ["string", "null"], "enum": ["a", "b", None]}
    assert schema_for_type(int | str) == {"anyOf": [{"type": "integer"}, {"type": "string"}]}


def test_dataclasses_typeddicts_and_annotated():
    assert schema_for_type(Point) == {
        "type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
        "required": ["x"], "additionalProperties": False}
    assert schema_for_type(Span)["required"] == ["end", "start"]
    assert schema_for_type(Annotated[int, "how many", {"minimum": 1}]) == {
        "type": "integer", "description": "how many", "minimum": 1}


def test_a_type_without_a_schema_is_refused():
    with pytest.raises(TypeError, match="no JSON Schema"):
        schema_for_type(complex)
    with pytest.raises(TypeError, match="keys are strings"):
        schema_for_type(dict[int, str])


def test_function_schema_required_defaults_and_descriptions():
    def forecast(self, city: str, days: int = 1, unit: Literal["C", "F"] = "C",
                 note: str | None = None) -> dict:
        """The forecast.

        Args:
            city: the city's name,
                e.g. "Oslo"
            days (int): days ahead
        """

    s = schema_for(forecast, parse_docstring(forecast.__doc__)[1])
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["type"] == "object" and s["additionalProperties"] is False
    assert s["required"] == ["city"]
    assert s["properties"]["city"] == {"type": "string",
                                       "description": 'the city\'s name, e.g. "Oslo"'}
    assert s["properties"]["days"] == {"type": "integer", "description": "days ahead",
                                       "default": 1}
    assert s["properties"]["unit"]["enum"] == ["C", "F"]
    assert s["properties"]["note"] == {"type": ["string", "null"], "default": None}


def test_docstring_first_paragraph_and_args_section():
    summary, params = parse_docstring("""Convert a temperature
        between units.

        More detail that is not part of the description.

        Args:
            value: the temperature
            unit_from: its unit
        Returns:
            the value: in the new unit
        """)
    assert summary == "Convert a temperature between units."
    assert params == {"value": "the temperature", "unit_from": "its unit"}


def test_star_args_are_refused():
    def bad(self, *names: str) -> None: ...

    with pytest.raises(TypeError, match="named parameter"):
        schema_for(bad)


class _Sample(Driver):
    @tool
    def forecast(self, city: str, days: int = 1) -> list:
        """The forecast for a city.

        Args:
            city: the city
        """
        return [city] * days

    @tool(name="mid", description="Midpoint of two points.")
    async def midpoint(self, a: Point, b: Point) -> Point:
        return Point((a.x + b.x) / 2, (a.y + b.y) / 2)

    def helper(self) -> None:  # not a tool
        pass


class WeatherStationDriver(Driver):
    @tool
    def ping(self) -> str:
        return "pong"


def test_driver_class_collects_tools_and_namespace():
    assert _Sample.namespace == "_sample"
    assert WeatherStationDriver.namespace == "weatherstation"
    d = _Sample()
    by_name = {t["name"]: t for t in d.describe()}
    assert set(by_name) == {"forecast", "mid"}
    assert by_name["forecast"]["description"] == "The forecast for a city."
    assert by_name["mid"]["description"] == "Midpoint of two points."
    assert by_name["mid"]["schema"]["properties"]["a"]["required"] == ["x"]
    for t in by_name.values():
        jsonschema.Draft202012Validator.check_schema(t["schema"])


def test_a_tool_method_may_not_shadow_the_driver_api():
    with pytest.raises(TypeError, match="shadow"):
        class Bad(Driver):
            @tool
            def run(self) -> None: ...


async def test_call_tool_converts_arguments_and_runs_sync_and_async():
    d = _Sample()
    assert await d.call_tool("_sample.forecast", {"city": "Oslo", "days": 2}) == ["Oslo", "Oslo"]
    mid = await d.call_tool("mid", {"a": {"x": 0, "y": 0}, "b": {"x": 2}})
    assert mid == Point(1.0, 0.0) and isinstance(mid.x, float)
    with pytest.raises(FileNotFoundError):
        await d.call_tool("nope", {})


def test_exceptions_map_to_errnos():
    assert exception_to_error(ERRORS["EDQUOT"]("no more")) == {"name": "EDQUOT",
                                                               "message": "no more"}
    assert exception_to_error(ValueError("bad"))["name"] == "EINVAL"
    assert exception_to_error(TypeError("bad"))["name"] == "EINVAL"
    assert exception_to_error(FileNotFoundError("gone"))["name"] == "ENOENT"
    assert exception_to_error(PermissionError("no"))["name"] == "EACCES"
    assert exception_to_error(RuntimeError("kaboom")) == {"name": "EIO",
                                                          "message": "RuntimeError: kaboom"}


@pytest.mark.parametrize("builtin", [
    FileNotFoundError, FileExistsError, PermissionError, ProcessLookupError, ChildProcessError,
    TimeoutError, ValueError, NotImplementedError, IsADirectoryError, NotADirectoryError,
    BlockingIOError, InterruptedError, BrokenPipeError, ConnectionResetError, ConnectionError,
    MemoryError])
def test_the_builtin_a_tool_raises_is_the_one_its_caller_catches(builtin):
    # One errno <-> exception table, read both ways: the errno a tool's builtin
    # exception travels as comes back as an exception of that same builtin.
    wire = exception_to_error(builtin("the message"))
    assert wire["message"] == "the message"
    caught = error_for(wire)
    assert isinstance(caught, builtin), (builtin, wire)


def test_the_errno_of_a_subclass_or_an_oserror():
    assert exception_to_error(ConnectionAbortedError("x"))["name"] == "ENOTCONN"
    assert exception_to_error(json.JSONDecodeError("bad", "{", 0))["name"] == "EINVAL"
    assert exception_to_error(OSError(28, "No space left"))["name"] == "ENOSPC"
    assert exception_to_error(OSError(999, "odd"))["name"] == "EIO"
    assert exception_to_error(KeyError("k"))["name"] == "EIO"


def test_a_wire_error_is_read_as_the_kernel_reads_it():
    assert isinstance(error_for({"errno": 2, "message": "gone"}), FileNotFoundError)
    assert error_for({"name": "ENOENT", "errno": 13}).name == "ENOENT"  # the name decides
    assert error_for({"name": "EACCES"}).message == "permission denied"  # the errno's text
    for junk in ({"name": "EBOGUS"}, {"errno": 9999}, "ENOENT", None, [2]):
        assert error_for(junk).name == "EPROTO"
    e = pickle.loads(pickle.dumps(ERRORS["EACCES"]("no")))
    assert (type(e), e.message, e.errno) == (ERRORS["EACCES"], "no", 13)
    assert ERRORS["ENOENT"]().message == "no such file, context or object"


def test_results_become_msgpack_safe_values():
    assert to_wire(Point(1, 2)) == {"x": 1, "y": 2}
    assert to_wire((1, Color.RED, {3: Path("/x")})) == [1, "red", {"3": "/x"}]
    assert to_wire({2, 1}) == [1, 2]
    with pytest.raises(TypeError, match="cannot be sent"):
        to_wire(object())


def test_load_driver_class_finds_the_one_driver(tmp_path):
    one = tmp_path / "one.py"
    one.write_text("from llmagentos import Driver, tool\n"
                   "class EchoDriver(Driver):\n"
                   "    @tool\n"
                   "    def echo(self, text: str) -> str:\n"
                   "        return text\n")
    cls = load_driver_class(one)
    assert cls.__name__ == "EchoDriver" and cls.namespace == "echo"
    two = tmp_path / "two.py"
    two.write_text(one.read_text() + "class OtherDriver(EchoDriver):\n    namespace = 'other'\n")
    with pytest.raises(LookupError, match="several"):
        load_driver_class(two)
    assert load_driver_class(two, "OtherDriver").namespace == "other"
    with pytest.raises(LookupError):
        load_driver_class(two, "Missing")


# --- a driver as a kernel process -------------------------------------------------------

PROBE = '''
import os
import trio
from llmagentos import ERRORS, Driver, tool
from llmagentos.driver import caller_pid


class ProbeDriver(Driver):
    namespace = "probe"

    @tool
    def add(self, a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @tool
    def whoami(self) -> int:
        """The caller's pid."""
        return caller_pid()

    @tool
    async def sleep(self, seconds: float) -> float:
        """Sleep, then answer."""
        await trio.sleep(seconds)
        return seconds

    @tool
    def fail(self, errno: str, message: str) -> None:
        """Fail with an errno."""
        raise ERRORS[errno](message)

    @tool
    def invalid(self, text: str) -> int:
        """A ValueError inside the tool."""
        return int(text)

    @tool
    def boom(self) -> None:
        """An unexpected exception."""
        raise RuntimeError("kaboom")

    @tool
    def text(self, size: int) -> str:
        """A text of size bytes."""
        return "x" * size

    @tool
    def bigint(self) -> int:
        """An integer msgpack cannot carry."""
        return 2 ** 70

    @tool
    def crash(self, status: int = 3) -> None:
        """The driver process dies in the middle of the call."""
        os._exit(status)


class CrashyDriver(ProbeDriver):
    namespace = "crashy"


class TakenDriver(ProbeDriver):
    namespace = "probe"  # already served by ProbeDriver


class MisnamedDriver(ProbeDriver):
    namespace = "Not A Name"  # the kernel refuses it: the process exits at once
'''


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("drivers") / "probe_driver.py"
    path.write_text(PROBE)
    return path


@pytest.fixture(scope="module")
def probe(shared_kernel, probe_file):
    """The probe driver, spawned as a kernel process; the shell client."""
    c = shared_kernel.client()
    pid = cli_run(c, str(probe_file), "ProbeDriver", None)
    yield c, pid
    c.close()


def _child_calls(kernel, calls: list, caps: list[str] | None = None) -> list:
    """Spawn a process that makes the tool calls and prints one JSON line per
    call: its result or its errno."""
    code = textwrap.dedent(f"""
        import json, llmagentos
        c = llmagentos.connect()
        out = [[t["name"] for t in c.tool.list()]]
        for name, args in {calls!r}:
            try:
                out.append({{"ok": c.tool.call(name, args)}})
            except llmagentos.KernelError as e:
                out.append({{"errno": e.name, "message": e.message}})
        print(json.dumps([c.pid, out]))
    """)
    c = kernel.client()
    pid = c.proc.spawn([PY, "-c", code], name="caller", caps=caps)
    status = c.proc.wait(pid, 30)
    log = c.proc.logs(pid)["data"].decode()
    assert status["exit_code"] == 0, log
    child_pid, out = json.loads(log.strip().splitlines()[-1])
    assert child_pid == pid
    c.close()
    return out


def test_a_driver_process_serves_its_tools(probe):
    c, pid = probe
    listed = {t["name"]: t for t in c.tool.list("probe")}
    assert {"probe.add", "probe.sleep", "probe.fail", "probe.crash"} <= set(listed)
    add = listed["probe.add"]
    assert add["driver"] == pid and add["description"] == "Add two integers."
    assert add["schema"]["properties"] == {"a": {"type": "integer"}, "b": {"type": "integer"}}
    assert c.proc.stat(pid)["name"] == "driver:probe"
    assert c.tool.call("probe.add", {"a": 2, "b": 40}) == 42
    assert c.tool.call("probe.whoami") == c.pid == 1


def test_another_process_calls_the_driver(shared_kernel, probe):
    tools, add, who = _child_calls(shared_kernel, [("probe.add", {"a": 1, "b": 2}),
                                                   ("probe.whoami", {})])
    assert "probe.add" in tools
    assert add == {"ok": 3}
    assert who["ok"] > 1  # the child's pid, not the shell's


def test_arguments_are_checked_against_the_schema(probe):
    c, _ = probe
    with pytest.raises(ValueError) as e:
        c.tool.call("probe.add", {"a": "two", "b": 2})
    assert e.value.name == "EINVAL" and "'two' is not of type 'integer'" in e.value.message
    with pytest.raises(ERRORS["EINVAL"], match="'b' is a required property"):
        c.tool.call("probe.add", {"a": 1})
    with pytest.raises(ERRORS["EINVAL"], match="Additional properties"):
        c.tool.call("probe.add", {"a": 1, "b": 2, "c": 3})


def test_a_driver_raises_an_errno(probe):
    c, _ = probe
    with pytest.raises(FileNotFoundError) as e:
        c.tool.call("probe.fail", {"errno": "ENOENT", "message": "no such city"})
    assert e.value.name == "ENOENT" and e.value.message == "no such city"
    with pytest.raises(ERRORS["EDQUOT"], match="over budget"):
        c.tool.call("probe.fail", {"errno": "EDQUOT", "message": "over budget"})
    with pytest.raises(ERRORS["EINVAL"], match="invalid literal"):
        c.tool.call("probe.invalid", {"text": "seven"})
    with pytest.raises(ERRORS["EIO"], match="RuntimeError: kaboom"):
        c.tool.call("probe.boom")
    assert c.tool.call("probe.add", {"a": 1, "b": 1}) == 2  # still serving


def test_results_that_cannot_travel_are_errors_not_hangs(probe):
    c, _ = probe
    assert len(c.tool.call("probe.text", {"size": 1_000_000})) == 1_000_000
    with pytest.raises(ERRORS["EMSGSIZE"], match="the limit is"):
        c.tool.call("probe.text", {"size": 17 * 1024 * 1024})
    with pytest.raises(ERRORS["EIO"], match="does not fit in 64 bits"):
        c.tool.call("probe.bigint")
    assert c.tool.call("probe.add", {"a": 1, "b": 1}) == 2  # the connection survived


def test_a_slow_driver_times_the_caller_out(probe):
    c, _ = probe
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as e:
        c.tool.call("probe.sleep", {"seconds": 5}, 0.3)
    assert e.value.name == "ETIMEDOUT"
    assert time.monotonic() - t0 < 3
    assert c.tool.call("probe.sleep", {"seconds": 0.01}) == 0.01  # the driver goes on


async def test_requests_are_served_concurrently(shared_kernel, probe):
    async with llmagentos.aconnect(run_dir=shared_kernel.run_dir) as ac:
        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for _ in range(8):
                n.start_soon(ac.tool.call, "probe.sleep", {"seconds": 0.5})
        assert trio.current_time() - t0 < 2.5  # 8 x 0.5 s in parallel, not 4 s


def test_a_namespace_is_served_once(shared_kernel, probe, probe_file):
    c, _ = probe
    with pytest.raises(FileExistsError, match="already served"):
        c.drv.register("probe", [{"name": "x", "description": "", "schema": {}}])
    with pytest.raises(FileExistsError, match="already served"):
        cli_run(c, str(probe_file), "TakenDriver", None)


def test_a_driver_that_fails_to_start_is_reported_with_its_log(probe, probe_file):
    c, _ = probe
    with pytest.raises(ERRORS["EIO"]) as e:
        cli_run(c, str(probe_file), "MisnamedDriver", None)
    assert "exited with status 1 before serving 'Not A Name'" in e.value.message
    assert "[EINVAL] namespace 'Not A Name' must match" in e.value.message  # its log tail


def test_bad_registrations_are_einval(probe):
    c, _ = probe
    with pytest.raises(ERRORS["EINVAL"], match="invalid JSON schema"):
        c.drv.register("broken", [{"name": "x", "schema": {"type": "nonsense"}}])
    with pytest.raises(ERRORS["EINVAL"]):
        c.drv.register("Bad Name", [{"name": "x", "schema": {}}])
    assert c.tool.list("broken") == []


def test_a_driver_crash_mid_call_fails_the_caller_with_eio(shared_kernel, probe_file):
    c = shared_kernel.client()
    pid = cli_run(c, str(probe_file), "CrashyDriver", None)
    assert c.tool.call("crashy.add", {"a": 1, "b": 1}) == 2
    with pytest.raises(ERRORS["EIO"], match="crashy"):
        c.tool.call("crashy.crash", {"status": 3}, 10)
    assert c.tool.list("crashy") == []
    with pytest.raises(FileNotFoundError):
        c.tool.call("crashy.add", {"a": 1, "b": 1})
    assert c.proc.wait(pid, 10)["exit_code"] == 3
    c.close()


def test_a_process_without_the_capability_is_refused(shared_kernel, probe):
    refused = _child_calls(shared_kernel, [("probe.add", {"a": 1, "b": 2})],
                           caps=["tool:calc.*"])
    tools, add = refused
    assert not any(t.startswith("probe.") for t in tools)
    assert add["errno"] == "EACCES" and "tool:probe.add" in add["message"]
    tools, add, boom = _child_calls(shared_kernel, [("probe.add", {"a": 1, "b": 2}),
                                                    ("probe.boom", {})],
                                    caps=["tool:probe.add"])
    assert tools == ["probe.add"]
    assert add == {"ok": 3} and boom["errno"] == "EACCES"


def test_the_weather_example(shared_kernel):
    c = shared_kernel.client()
    pid = cli_run(c, str(ROOT / "examples" / "weather_driver.py"), None, ["tool:calc.*"])
    assert set(c.proc.stat(pid)["caps"]) == {"tool:calc.*", "drv.register"}
    days = c.tool.call("weather.forecast", {"city": "Oslo", "days": 3, "unit": "F"})
    assert [d["day"] for d in days] == [1, 2, 3] and all(d["unit"] == "F" for d in days)
    assert days == c.tool.call("weather.forecast", {"city": "oslo", "days": 3, "unit": "F"})
    assert c.tool.call("weather.convert", {"value": 100, "unit_from": "C", "unit_to": "F"}) \
        == 212
    with pytest.raises(ERRORS["EINVAL"], match="maximum of 7"):
        c.tool.call("weather.forecast", {"city": "Oslo", "days": 9})
    with pytest.raises(ERRORS["EINVAL"], match="absolute zero"):
        c.tool.call("weather.convert", {"value": -500, "unit_from": "C", "unit_to": "K"})
    assert "Oslo" in c.tool.call("weather.list", {})
    c.proc.kill(pid, "SIGTERM")
    wait_for(lambda: c.tool.list("weather") == [])
    c.close()


# --- loading errors and servers started from the shell ---------------------------------

def test_a_method_named_like_a_builtin_is_explained(tmp_path):
    f = tmp_path / "notes.py"
    f.write_text(textwrap.dedent("""
        from llmagentos import Driver, tool

        class Notes(Driver):
            @tool
            def list(self) -> list[str]:
                return []

            @tool
            def add(self, items: list[str]) -> int:
                return len(items)
    """))
    with pytest.raises(ImportError) as e:
        load_driver_class(f)
    assert f"{f}:10" in str(e.value) and '@tool(name="list")' in str(e.value)


def test_llmos_driver_run_of_a_missing_file_is_a_usage_error(shared_kernel, tmp_path):
    import subprocess
    r = subprocess.run([PY, "-m", "llmagentos.cli", "driver", "run", str(tmp_path / "no.py")],
                       env=shared_kernel.env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no driver file" in r.stderr


@pytest.mark.parametrize("how", ["driver", "mcp"])
def test_a_server_started_from_the_shell_is_its_own_killable_process(shared_kernel, how):
    """Started by hand (not by the kernel), a driver or MCP bridge would speak
    as init: invisible in ps and unkillable. It attaches a process of its own."""
    import subprocess
    ns = f"shell{how}"
    if how == "driver":
        cmd = [PY, "-c", textwrap.dedent(f"""
            from llmagentos import Driver, tool
            class Echo(Driver):
                namespace = {ns!r}
                @tool
                def echo(self, text: str) -> str:
                    return text
            Echo().run()
        """)]
    else:
        cmd = [PY, "-m", "llmagentos.mcp_bridge", "--namespace", ns, "--",
               PY, str(ROOT / "examples" / "mcp_server.py")]
    prog = subprocess.Popen(cmd, env=shared_kernel.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        with shared_kernel.client() as c:
            wait_for(lambda: c.tool.list(ns), timeout=30)
            driver_pid = c.tool.list(ns)[0]["driver"]
            assert driver_pid != 1
            row = next(r for r in c.proc.ps() if r["pid"] == driver_pid)
            assert row["name"] == ("driver:" if how == "driver" else "mcp:") + ns
            c.proc.kill(driver_pid, "SIGKILL")
            assert c.tool.list(ns) == []
        assert prog.wait(timeout=20) is not None  # it stopped serving and exited
    finally:
        prog.kill()
