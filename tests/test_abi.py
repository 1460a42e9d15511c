"""The ABI from outside: auth, impersonation, errnos, bad input, raw msgpack clients."""

import os
import socket
import stat
import textwrap
import threading
import time

import msgpack
import pytest
from conftest import PY

import llmagentos


def raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def rpc(s: socket.socket, msgid: int, method: str, params: list, **packing):
    """A client written with nothing but socket and msgpack (``packing``: msgpack.packb's
    options, as another client's encoder would choose)."""
    s.sendall(msgpack.packb([0, msgid, method, params], **packing))
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        data = s.recv(65536)
        assert data, "connection closed"
        unpacker.feed(data)
        for msg in unpacker:
            if msg[0] == 1 and msg[1] == msgid:
                return msg


def test_plain_msgpack_client(shared_kernel):
    s = raw(shared_kernel.socket)
    kind, msgid, err, res = rpc(s, 1, "sys.hello", [shared_kernel.token])
    assert (kind, msgid, err) == (1, 1, None) and res["pid"] == 1
    assert rpc(s, 2, "proc.getpid", []) == [1, 2, None, 1]
    s.close()


def test_hello_first(shared_kernel):
    s = raw(shared_kernel.socket)
    _, _, err, _ = rpc(s, 1, "proc.ps", [])
    assert err["name"] == "EPERM" and err["errno"] == 1 and "hello" in err["message"]
    _, _, err, _ = rpc(s, 2, "sys.hello", ["wrong-token"])
    assert err["name"] == "EACCES"
    _, _, err, _ = rpc(s, 3, "proc.ps", [])
    assert err["name"] == "EPERM"


def test_errnos(shared_kernel):
    s = raw(shared_kernel.socket)
    rpc(s, 1, "sys.hello", [shared_kernel.token])
    assert rpc(s, 2, "no.such", [])[2]["name"] == "ENOSYS"
    assert rpc(s, 3, "proc.stat", ["one"])[2]["name"] == "EINVAL"
    assert rpc(s, 4, "proc.kill", [])[2]["name"] == "EINVAL"
    assert rpc(s, 5, "proc.getpid", [1, 2])[2]["name"] == "EINVAL"
    assert rpc(s, 6, "proc.stat", [424242])[2]["name"] == "ESRCH"
    assert rpc(s, 7, 12, [])[2]["name"] == "EINVAL"  # method must be a string
    assert rpc(s, 8, "proc.getpid", []) == [1, 8, None, 1]  # still fine


def test_missing_capability_is_eacces(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn([PY, "-c", textwrap.dedent("""
            import llmagentos
            c = llmagentos.connect()
            try:
                c.sys.shutdown()
            except PermissionError as e:
                print(e.name)
        """)])
        c.proc.wait(pid, 20)
        assert c.proc.logs(pid)["data"] == b"EACCES\n"


def test_token_is_that_pid_and_never_another(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn([PY, "-c", textwrap.dedent("""
            import os, llmagentos
            c = llmagentos.connect()
            print(c.pid, os.environ["LLMAGENTOS_PID"])
            # a second hello with another token on the same connection is refused
            try:
                c.sys.hello("guess")
            except PermissionError as e:
                print(e.name)
            # the shell user's token file is not readable to it by env: it has its own token
            print(c.proc.getpid())
        """)])
        c.proc.wait(pid, 20)
        a, b, err, me = c.proc.logs(pid)["data"].decode().split()
        assert a == b == me == str(pid) and err == "EACCES"


def test_hello_twice_with_other_valid_token_is_eperm(shared_kernel):
    with shared_kernel.client() as c:
        child = c.proc.spawn(["sleep", "30"])
        from conftest import token_of
        token = token_of(c, child)  # the shell user may read it from the child's memfd
        with llmagentos.connect(token=token, run_dir=shared_kernel.run_dir) as cc:
            assert cc.proc.getpid() == child
            with pytest.raises(PermissionError):
                cc.sys.hello(shared_kernel.token)  # cannot become init
            assert cc.proc.getpid() == child
        c.proc.kill(child, "KILL")
        c.proc.wait(child)
        with pytest.raises(PermissionError):  # a dead process's token is dead
            llmagentos.connect(token=token, run_dir=shared_kernel.run_dir)


def test_oversized_frame_closes_with_reason(tmp_path):
    from conftest import boot_kernel
    k = boot_kernel(tmp_path, "--max-frame", "4096")
    try:
        s = raw(k.socket)
        rpc(s, 1, "sys.hello", [k.token])
        s.sendall(msgpack.packb([0, 2, "sys.null", ["x" * 10000]]))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        u = msgpack.Unpacker(raw=False)
        u.feed(data)
        msgs = list(u)
        assert msgs[-1][0] == 2 and msgs[-1][1] == "sys.close" and "limit" in msgs[-1][2][0]
        with k.client() as c:  # the kernel is fine
            assert c.proc.getpid() == 1
    finally:
        k.stop()


def test_random_bytes_do_not_disturb_other_clients(shared_kernel):
    good = shared_kernel.client()
    for seed in range(30):
        s = raw(shared_kernel.socket)
        s.sendall(os.urandom(200 + seed * 37))
        s.close()
    s = raw(shared_kernel.socket)
    s.sendall(b"\xc1" * 10)  # never-used msgpack byte: protocol error
    assert s.recv(4096)  # the close reason
    assert good.proc.getpid() == 1
    assert good.sys.stats()["counters"]["protocol_errors"] >= 1
    good.close()


def test_client_vanishing_mid_call(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["sleep", "30"])
        s = raw(shared_kernel.socket)
        rpc(s, 1, "sys.hello", [shared_kernel.token])
        s.sendall(msgpack.packb([0, 2, "proc.wait", [pid, 20]]))
        time.sleep(0.2)
        s.close()  # gone while proc.wait blocks
        time.sleep(0.2)
        assert c.proc.stat(pid)["state"] == "READY"
        assert c.proc.stat(1)["state"] == "RUNNING"
        c.proc.kill(pid, "KILL")
        assert c.proc.wait(pid, 10)["signal_name"] == "SIGKILL"


def test_concurrent_clients(shared_kernel):
    errors = []

    def worker():
        try:
            with shared_kernel.client() as c:
                for _ in range(200):
                    assert c.proc.getpid() == 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


def test_socket_and_token_are_private(shared_kernel):
    assert stat.S_IMODE(os.stat(shared_kernel.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(shared_kernel.run_dir / "token").st_mode) == 0o600


def test_syscalls_table_over_the_wire(shared_kernel):
    with shared_kernel.client() as c:
        calls = c.sys.calls()
    names = {x["name"] for x in calls}
    assert {"sys.hello", "proc.spawn", "proc.wait", "proc.kill"} <= names
    spawn = next(x for x in calls if x["name"] == "proc.spawn")
    assert spawn["cap"] == "proc.spawn" and spawn["params"][0]["name"] == "argv"


NAN, INF = float("nan"), float("inf")


def _deep(n: int) -> list:
    v: list = []
    for _ in range(n):
        v = [v]
    return v


# What an attacker sends for one parameter: numbers past every range, values
# that pass every comparison the wrong way (NaN), wrong types, huge and deep values.
HOSTILE = [None, True, False, 0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1,
           -(2**63), -(2**63) - 1, NAN, INF, -INF, 1e308, -1e308, -0.0, 1.5, "", "x", "\x00",
           "../..", "a" * 200_000, "\udc80", b"", b"\xff\xfe", bytes(70_000), [], [NAN], [INF, -1],
           _deep(400), ["a"] * 2000, [{"role": "user", "content": "hi"}], [2**64 - 1], {},
           {"a": NAN}, {"": None}, {"role": 1}, {"x": {"y": [INF]}}, {"max_tokens": NAN},
           {"temperature": INF}, {"wall_time": NAN}, {"max_children": -INF},
           {"tool_calls": 2**64 - 1}, {"lang": "python", "code": NAN}, {b"k": 1}]


def _benign(p) -> object:
    """A plain value of a parameter's type: the arguments before the hostile one."""
    if not p.required:
        return p.default
    t = p.type.rstrip("?").split("|")[0]
    return {"int": 1, "float": 0.5, "str": "x", "bool": False, "bytes": b"x", "list": ["x"],
            "dict": {}, "any": 1}[t]


def fuzz(c, calls, benign: dict | None = None, values=HOSTILE, rounds: int = 10,
         seed: int = 0) -> list:
    """Call each syscall with each hostile value in each parameter position (the
    others plain, or as given in benign[name]), then random mixes. Returns
    the answers that were "internal error" (the dispatcher's EIO for a bug)."""
    import random

    rng = random.Random(seed)
    internal = []
    benign = benign or {}

    def attempt(name, args):
        try:
            c.call(name, *args)
        except llmagentos.KernelError as e:
            if e.name == "EIO" and "internal error" in e.message \
                    or "not serializable" in e.message:
                internal.append((name, repr(args)[:200], e.message[:300]))

    for sc in calls:
        plain = benign.get(sc.name) or [_benign(p) for p in sc.params]
        for i in range(len(sc.params)):
            for v in values:
                attempt(sc.name, [*plain[:i], v, *plain[i + 1:]])
        for _ in range(rounds):
            attempt(sc.name, [rng.choice(values)
                              for _ in range(rng.randint(0, len(sc.params) + 1))])
    return internal


def test_every_syscall_with_hostile_arguments_gets_an_errno_not_a_crash(tmp_path):
    """Every call of the table, every parameter, every hostile value: each
    answer is a result or a clear errno (never the dispatcher's EIO 'internal
    error'), and the kernel keeps serving. Init fuzzes everything but
    sys.shutdown; an attached child (no privileged capabilities) fuzzes all."""
    from conftest import boot_kernel

    from llmagentos.syscalls.table import TABLE
    k = boot_kernel(tmp_path)
    try:
        with k.client(timeout=60) as c:
            env = c.env.make("CartPole-v1")["handle"]
            fd = c.fs.open("/f", "w")
            ep = c.traj.begin("task")
            benign = {
                "env.reset": [env, None, None], "env.step": [env, 0], "env.render": [env],
                "env.close": [env + 1000], "fs.read": [fd, 1], "fs.write": [fd, b"x"],
                "fs.seek": [fd, 0, 0], "fs.close": [fd + 1000], "traj.step": [ep, 1, 1, 0.0, None],
                "traj.end": [ep, None, None],
                "tool.call": ["calc.eval", {"expression": "1+1"}, 5.0],
                "proc.wait": [999999, 0.1], "proc.kill": [999999, 0],
                "ipc.recv": [0.1, None], "ipc.sendrecv": [999999, 1, 0.1, None],
            }
            calls = [sc for sc in TABLE if sc.name != "sys.shutdown"]
            # ipc.recv and ipc.sendrecv without a timeout wait for mail: each
            # fuzzer has plenty to take, so they answer at once
            child = c.proc.attach("fuzzer")
            for pid in (1, child["pid"]):
                for i in range(200):
                    c.ipc.send(pid, i)
            internal = fuzz(c, calls, benign)
            assert internal == []
            with llmagentos.connect(token=child["token"], run_dir=k.run_dir, timeout=60) as cc:
                internal = fuzz(cc, list(TABLE), benign, rounds=3, seed=1)
            assert internal == []
            assert c.proc.getpid() == 1
        assert k.proc.poll() is None
    finally:
        k.stop()


@pytest.mark.soak  # about half a minute of real-model calls
def test_llm_calls_with_hostile_arguments_on_the_real_model(llm_kernel):
    """The llm group against the real device: tokenizer, detokenizer, embedder
    and sampler see every hostile value (generations kept to one token)."""
    from llmagentos.syscalls.table import TABLE
    llm = [sc for sc in TABLE if sc.group == "llm"]
    one = {"max_tokens": 1, "temperature": 0.0}
    # nil and {} are the default sampling (256 tokens): real work, not hostile
    hostile = [v for v in HOSTILE if v is not None and v != {}
               and not (isinstance(v, str) and len(v) > 1000)] + [
        {"max_tokens": 1, "temperature": NAN}, {"max_tokens": 1, "top_p": INF},
        {"max_tokens": 1, "seed": 2**64 - 1}, {"max_tokens": 1, "stop": [NAN]},
        {"max_tokens": 1, "json_schema": {"type": "string", "pattern": "^(a+)+$"}},
        {"max_tokens": 1, "grammar": "root ::= ("}, [2**31], [-1], [10**12]]
    with llm_kernel.client(timeout=120) as c:
        benign = {"llm.generate": ["hi", None, one, False, False],
                  "llm.tokenize": ["hi", False], "llm.detokenize": [[1, 2]],
                  "llm.embed": [["hi"]]}
        internal = fuzz(c, llm, benign, values=hostile, rounds=0)
        assert internal == []
        assert c.llm.tokenize("hi")


def test_a_stock_msgpack_rpc_client_that_announces_itself_connects(shared_kernel):
    """pynvim's client sends a notification first (nvim_set_client_info) and
    packs method names as bin: both used to close the connection."""
    from pynvim.msgpack_rpc import socket_session
    s = socket_session(shared_kernel.socket)
    try:
        s.request("nvim_set_client_info", "llmos-test", {}, "remote", {}, {}, async_=True)
        assert s.request("sys.hello", shared_kernel.token)["pid"] == 1
        assert s.request("proc.getpid") == 1
    finally:
        s.close()
    with shared_kernel.client() as c:
        assert c.sys.stats()["counters"]["client_notifications"] >= 1


def test_client_notifications_are_ignored_and_counted(shared_kernel):
    s = raw(shared_kernel.socket)
    s.sendall(msgpack.packb([2, "whatever.event", [1, 2]]))  # before hello, too
    assert rpc(s, 1, "sys.hello", [shared_kernel.token])[2] is None
    s.sendall(msgpack.packb([2, "client.info", [{"name": "x"}]]))
    assert rpc(s, 2, "proc.getpid", [])[3] == 1
