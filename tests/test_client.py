"""The Python client as a user meets it: failures leave nothing behind, and
defaults that belong to the caller come from the caller."""

from __future__ import annotations

import asyncio
import os

import pytest
import trio

import llmagentos


async def test_aconnect_with_a_bad_token_leaves_trio_usable(shared_kernel):
    for _ in range(2):
        with pytest.raises(PermissionError):
            async with llmagentos.aconnect(token="not-a-token", run_dir=shared_kernel.run_dir):
                pass
    await trio.sleep(0.01)  # trio used to die here: "Nursery stack corrupted"
    async with llmagentos.aconnect(run_dir=shared_kernel.run_dir) as c:
        assert await c.proc.getpid() == 1


def test_aconnect_under_asyncio_says_it_needs_trio(shared_kernel):
    async def main():
        async with llmagentos.aconnect(run_dir=shared_kernel.run_dir):
            pass
    with pytest.raises(RuntimeError, match="trio"):
        asyncio.run(main())


def test_spawn_runs_in_the_callers_working_directory(shared_kernel, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["pwd"])
        c.proc.wait(pid, 10)
        assert c.proc.logs(pid)["data"].decode().strip() == str(tmp_path)
        pid = c.proc.spawn(["pwd"], None, None, "/")  # an explicit cwd still wins
        c.proc.wait(pid, 10)
        assert c.proc.logs(pid)["data"].decode().strip() == "/"


def test_sync_connect_with_a_bad_token_closes_its_socket(shared_kernel):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(PermissionError):
            llmagentos.connect(token="nope", run_dir=shared_kernel.run_dir)
    assert len(os.listdir("/proc/self/fd")) <= before + 2


def test_readme_sequence_wait_then_stat(shared_kernel):
    """`llmos wait PID` then `llmos stat PID`, each its own connection."""
    import subprocess
    import sys

    def llmos(*args):
        return subprocess.run([sys.executable, "-m", "llmagentos.cli", *args],
                              env=shared_kernel.env(), capture_output=True, text=True, timeout=30)
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["sh", "-c", "exit 3"])
    assert llmos("wait", str(pid)).returncode == 3
    st = llmos("stat", str(pid), "--json")
    assert st.returncode == 0, st.stderr
    assert '"exit_code": 3' in st.stdout



def _imported_after(code: str) -> str:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", f"import sys; {code}"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_program_starts_without_the_heavy_imports():
    """Every agent program and `llmos` command imports llmagentos: the sync client
    and the CLI must not bring trio (the async client, aclient.py, does on first
    use) nor rich (tables on a terminal only), and the kernel loads jsonschema
    only when a tool schema is checked."""
    heavy = "print(sorted(m for m in ('trio', 'jsonschema', 'rich') if m in sys.modules))"
    assert _imported_after(f"import llmagentos, llmagentos.cli; {heavy}") == "[]"
    assert _imported_after("import llmagentos; llmagentos.aconnect; "
                           "print('trio' in sys.modules)") == "True"
    assert _imported_after("import llmagentos.kernel.kernel; "
                           "print('jsonschema' in sys.modules)") == "False"
