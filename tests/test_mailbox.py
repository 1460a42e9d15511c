"""Mailboxes: every process has one; mail to a named agent is durable and
delivered once; the sender is stamped by the kernel; bad input is an errno;
a flood from one sender does not starve another's mail."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import msgpack
import pytest
from conftest import PY, boot_kernel, in_thread, wait_for

import llmagentos

DEPTH = 16
MAX_FRAME = 1 << 20


@pytest.fixture(scope="module")
def mk(tmp_path_factory):
    """A kernel with small bounds: 1 MiB frames, 16 messages per sender and mailbox."""
    k = boot_kernel(tmp_path_factory.mktemp("mail"), "--max-frame", str(MAX_FRAME),
                    "--mailbox-depth", str(DEPTH))
    yield k
    k.stop()


def process(k, c, name: str | None = None, caps: list | None = None) -> llmagentos.Client:
    """A kernel process living in this test (proc.attach), as its own client."""
    info = c.proc.attach(name, caps)
    return llmagentos.Client(k.socket, info["token"])


def errno_of(fn, *args, **kw) -> str:
    try:
        fn(*args, **kw)
    except llmagentos.KernelError as e:
        return e.name
    return "ok"


def test_order_is_kept_per_sender(mk):
    with mk.client() as c, process(mk, c) as r, process(mk, c) as a, process(mk, c) as b:
        for i in range(DEPTH):
            a.ipc.send(r.pid, ["a", i])
            b.ipc.send(r.pid, {"type": "b", "n": i})
        got = [r.ipc.recv(5) for _ in range(2 * DEPTH)]
        assert [e["message"][1] for e in got if e["from"] == a.pid] == list(range(DEPTH))
        assert [e["message"]["n"] for e in got if e["from"] == b.pid] == list(range(DEPTH))
        assert {e["sender"] for e in got} == {f"pid:{a.pid}", f"pid:{b.pid}"}
        assert all(e["to"] == r.pid and not e["durable"] for e in got)


def test_recv_times_out_and_wakes_on_arrival(mk):
    with mk.client() as c, process(mk, c) as r, process(mk, c) as s:
        t = time.monotonic()
        assert errno_of(r.ipc.recv, 0.3) == "ETIMEDOUT"
        assert 0.25 <= time.monotonic() - t < 10
        assert errno_of(r.ipc.recv, 0) == "ETIMEDOUT"  # a poll

        got = {}

        def waiter():
            got["env"] = r.ipc.recv(60)
            got["at"] = time.monotonic()
        th = threading.Thread(target=waiter)
        th.start()
        # asleep in the kernel: the process shows WAITING until mail comes
        wait_for(lambda: c.proc.stat(r.pid)["state"] == "WAITING")
        sent = time.monotonic()
        s.ipc.send(r.pid, "wake up")
        th.join(30)
        assert got["env"]["message"] == "wake up" and got["at"] - sent < 5


def test_agent_recv_gives_none_on_timeout(mk):
    with mk.client() as c:
        a = llmagentos.Agent(client=c, name="mail-agent-a")
        b = llmagentos.Agent(client=c)
        try:
            assert a.recv(0.1) is None
            assert b.send("agent:mail-agent-a", {"type": "hello", "n": 1})["durable"]
            assert b.send(a, "direct")["durable"] is False
            assert a.subscribe("mail-news") == ["mail-news"]
            assert b.publish("mail-news", "extra") == 1
            got = [a.recv(5) for _ in range(3)]
            assert sorted(json.dumps(e["message"]) for e in got) == sorted(
                [json.dumps({"type": "hello", "n": 1}), '"direct"', '"extra"'])
            assert {e["from"] for e in got} == {b.pid}
            assert a.recv(0.1) is None
        finally:
            a.close()
            b.close()


def test_a_process_without_ipc_gets_eacces(mk):
    with mk.client() as c, process(mk, c) as r, process(mk, c, caps=["llm", "ctx"]) as mute:
        for call, args in ((mute.ipc.send, (r.pid, "x")), (mute.ipc.recv, (0,)),
                           (mute.ipc.peek, ()), (mute.ipc.subscribe, ("t",)),
                           (mute.ipc.publish, ("t", 1)), (mute.ipc.mailbox, ())):
            assert errno_of(call, *args) == "EACCES"
        assert errno_of(r.ipc.recv, 0) == "ETIMEDOUT"  # nothing got through


def test_the_sender_cannot_forge_its_pid(mk):
    with mk.client() as c, process(mk, c) as r, process(mk, c) as s:
        s.ipc.send(r.pid, {"from": 1, "sender": "agent:root", "type": "order"})
        env = r.ipc.recv(5)
        assert env["from"] == s.pid and env["sender"] == f"pid:{s.pid}"
        assert env["message"]["from"] == 1  # the message is the sender's; the envelope is not
        # no argument names a sender
        assert errno_of(s.call, "ipc.send", r.pid, "x", 0, 1) == "EINVAL"
        assert errno_of(s.call, "ipc.send", r.pid, "x", **{"from": 1}) == "EINVAL"
        assert errno_of(r.ipc.recv, 0) == "ETIMEDOUT"
        # match on the stamped sender: a message claiming pid 1 is not from pid 1
        s.ipc.send(r.pid, {"from": 1})
        assert errno_of(r.ipc.recv, 0, {"from": 1}) == "ETIMEDOUT"
        assert r.ipc.recv(0, {"from": s.pid})["message"] == {"from": 1}


def test_an_oversized_message_is_e2big_and_the_connection_is_kept(mk):
    with mk.client() as c, process(mk, c) as r, process(mk, c) as s:
        limit = r.ipc.mailbox()["max_message"]
        assert MAX_FRAME // 2 < limit < MAX_FRAME
        fits = b"x" * (limit - 5)  # bin 32: 5 bytes of header
        assert len(msgpack.packb(fits)) == limit
        s.ipc.send(r.pid, fits)
        assert r.ipc.recv(5)["message"] == fits
        for big in (fits + b"x", "y" * (limit + 100)):
            assert errno_of(s.ipc.send, r.pid, big) == "E2BIG"
            assert errno_of(s.ipc.send, "agent:mail-big", big) == "E2BIG"
            assert errno_of(s.ipc.publish, "mail-big", big) == "E2BIG"
        assert s.proc.getpid() == s.pid  # same connection, still served
        assert errno_of(r.ipc.recv, 0) == "ETIMEDOUT"


def test_a_message_that_grows_when_encoded_again_is_still_e2big(mk):
    """A message small on the wire is handed over without being encoded to
    measure it; one that is not is measured in the kernel's own encoding, which
    can be larger (float32 comes back as float64): E2BIG, though a receiver waits."""
    from test_abi import raw, rpc

    with mk.client() as c, process(mk, c) as r:
        limit = r.ipc.mailbox()["max_message"]
        floats = [0.5] * 60_000  # 5 bytes each as float32, 9 as float64
        pad = bytes(limit - 60_000 * 7)  # on the wire under the limit; again, over it
        wire_size = len(msgpack.packb([pad, floats], use_single_float=True))
        assert limit // 2 < wire_size < limit < len(msgpack.packb([pad, floats]))
        info = c.proc.attach(None)
        s = raw(mk.socket)
        got = {}
        th = threading.Thread(target=lambda: got.setdefault("r", errno_of(r.ipc.recv, 2)))
        th.start()
        wait_for(lambda: c.proc.stat(r.pid)["state"] != "READY", timeout=10)
        assert rpc(s, 1, "sys.hello", [info["token"]])[2] is None
        err = rpc(s, 2, "ipc.send", [r.pid, [pad, floats], 5.0], use_single_float=True)[2]
        assert err["name"] == "E2BIG"
        th.join(30)
        assert got["r"] == "ETIMEDOUT"  # nothing too big reached the receiver
        s.close()


def test_bad_destinations(mk):
    with mk.client() as c, process(mk, c) as s:
        assert errno_of(s.ipc.send, 424242, "x") == "ESRCH"
        assert errno_of(s.ipc.send, -1, "x") == "ESRCH"
        pid = c.proc.spawn(["true"])
        c.proc.wait(pid, 30)
        assert errno_of(s.ipc.send, pid, "x") == "ESRCH"  # exited
        for bad in ("bob", "agent:", "agent:a\nb", "pid:1", "agent:" + "n" * 129):
            assert errno_of(s.ipc.send, bad, "x") == "EINVAL", bad
        assert errno_of(s.call, "ipc.send", True, "x") == "EINVAL"  # a bool is not a pid
        for match in ({"sender": 1}, {"from": 1.5}, {"type": 3}, {"from": True}):
            assert errno_of(s.ipc.recv, 0, match) == "EINVAL", match
        for topic in ("", "a\x00b", "t" * 256):
            assert errno_of(s.ipc.subscribe, topic) == "EINVAL"
            assert errno_of(s.ipc.publish, topic, 1) == "EINVAL"
        assert errno_of(s.ipc.unsubscribe, "never") == "ENOENT"
        assert errno_of(s.ipc.recv, -1) == "EINVAL"
        assert errno_of(s.ipc.send, s.pid, "x", float("nan")) == "EINVAL"


def test_a_flood_does_not_starve_another_sender(mk):
    with mk.client() as c, process(mk, c) as r, process(mk, c) as flood, \
            process(mk, c) as other:
        for i in range(DEPTH):
            flood.ipc.send(r.pid, i)
        # the flooder's share is full; it alone waits
        assert errno_of(flood.ipc.send, r.pid, "more") == "EAGAIN"
        t = time.monotonic()
        assert errno_of(flood.ipc.send, r.pid, "more", 0.2) == "EAGAIN"
        assert time.monotonic() - t >= 0.15
        other.ipc.send(r.pid, "me too")
        first = [r.ipc.recv(5)["message"] for _ in range(2)]
        assert "me too" in first  # served in turn, not behind the flood
        # a blocked sender goes on once the receiver has taken one
        flood.ipc.send(r.pid, DEPTH)  # full again
        done = {}
        th = threading.Thread(target=lambda: done.setdefault(
            "r", flood.ipc.send(r.pid, "late", 30)))
        th.start()
        wait_for(lambda: c.proc.stat(flood.pid)["state"] != "READY", timeout=10)
        time.sleep(0.2)
        assert "r" not in done
        r.ipc.recv(5)
        th.join(30)
        assert done["r"]["durable"] is False
        rest = []
        while errno_of(lambda: rest.append(r.ipc.recv(0)["message"])) == "ok":
            pass
        assert rest == [*range(2, DEPTH + 1), "late"]


def test_a_receiver_waiting_for_a_message_gets_it_while_the_senders_share_is_full(mk):
    """A letter handed to a waiting receiver takes no room in the mailbox: the
    sender's full share holds up only what would be queued."""
    with mk.client() as c, process(mk, c) as r, process(mk, c) as s:
        for i in range(DEPTH):
            s.ipc.send(r.pid, {"type": "bulk", "n": i})
        assert errno_of(s.ipc.send, r.pid, {"type": "bulk"}) == "EAGAIN"
        got = {}
        th = threading.Thread(target=lambda: got.setdefault(
            "r", r.ipc.recv(30, {"type": "urgent"})))
        th.start()
        wait_for(lambda: c.proc.stat(r.pid)["state"] != "READY", timeout=10)
        assert s.ipc.send(r.pid, {"type": "urgent"}, 0)["durable"] is False
        th.join(30)
        assert got["r"]["message"] == {"type": "urgent"}
        # what waits is untouched: the share is still full, in order
        assert errno_of(s.ipc.send, r.pid, {"type": "bulk"}) == "EAGAIN"
        assert [r.ipc.recv(0)["message"]["n"] for _ in range(DEPTH)] == list(range(DEPTH))


def test_match_and_peek(mk):
    with mk.client() as c, process(mk, c) as r, process(mk, c) as s:
        s.ipc.send(r.pid, {"type": "a", "n": 1})
        s.ipc.send(r.pid, {"type": "b", "n": 2})
        s.ipc.send(r.pid, "plain")
        assert [e["message"] for e in r.ipc.peek(None, 10)] == [
            {"type": "a", "n": 1}, {"type": "b", "n": 2}, "plain"]
        assert r.ipc.peek({"type": "b"})[0]["message"]["n"] == 2
        assert r.ipc.recv(0, {"type": "b"})["message"]["n"] == 2
        assert r.ipc.mailbox()["waiting"] == 2  # peek took nothing, recv one
        assert r.ipc.recv(0)["type"] == "a"
        assert r.ipc.recv(0)["type"] is None
        assert r.ipc.peek() == []


def test_publish_reaches_every_subscriber(mk):
    with mk.client() as c, process(mk, c) as pub, process(mk, c) as other:
        subs = [process(mk, c) for _ in range(3)]
        try:
            for s in subs:
                assert s.ipc.subscribe("mail-weather") == ["mail-weather"]
            assert subs[0].ipc.subscribe("mail-weather") == ["mail-weather"]  # once
            assert pub.ipc.publish("mail-weather", {"type": "rain"}) == 3
            for s in subs:
                env = s.ipc.recv(5)
                assert (env["topic"], env["from"], env["message"]) == (
                    "mail-weather", pub.pid, {"type": "rain"})
            assert errno_of(other.ipc.recv, 0) == "ETIMEDOUT"
            assert subs[0].ipc.unsubscribe("mail-weather") == []
            assert pub.ipc.publish("mail-weather", 2) == 2
            subs[1].close()  # an exited subscriber is gone from the topic
            wait_for(lambda: subs[1].pid not in {p["pid"] for p in c.proc.ps()})
            assert pub.ipc.publish("mail-weather", 3) == 1
            assert pub.ipc.publish("mail-nobody", 0) == 0
        finally:
            for s in subs:
                s.close()


def test_mail_to_a_running_named_agent_is_delivered_now(mk):
    with mk.client() as c, process(mk, c, "mail-carol") as carol:
        got = {}
        th = threading.Thread(target=lambda: got.setdefault("e", carol.ipc.recv(30)))
        th.start()
        wait_for(lambda: c.proc.stat(carol.pid)["state"] == "WAITING")
        assert c.ipc.send("agent:mail-carol", "now")["durable"]
        th.join(30)
        assert got["e"]["message"] == "now" and got["e"]["to"] == "agent:mail-carol"
        assert got["e"]["durable"] and got["e"]["from"] == 1 and got["e"]["sender"] == "pid:1"


def test_stored_mail_is_bounded_per_sender(mk):
    with mk.client() as c, process(mk, c) as s:
        for i in range(DEPTH):
            s.ipc.send("agent:mail-nobody-yet", i)
        assert errno_of(s.ipc.send, "agent:mail-nobody-yet", "more") == "EAGAIN"
        c.ipc.send("agent:mail-nobody-yet", "from another sender")  # its own share
        with process(mk, c, "mail-nobody-yet") as late:
            got = [late.ipc.recv(5)["message"] for _ in range(DEPTH + 1)]
        assert got.index("from another sender") <= 1
        assert [m for m in got if m != "from another sender"] == list(range(DEPTH))


def _crash(k) -> None:
    k.proc.kill()  # SIGKILL: the kernel gets no chance to save anything
    k.proc.wait()


def test_mail_to_a_named_agent_survives_sigkill_and_is_delivered_once(tmp_path):
    k = boot_kernel(tmp_path)
    try:
        with k.client() as c:
            # bob is not running: the mail waits for its next process
            assert c.ipc.send("agent:bob", {"type": "order", "n": 1}) == {"id": 1, "durable": True}
            c.ipc.send("agent:bob", {"type": "order", "n": 2})
            # dave runs and takes one of two before the crash
            with process(k, c, "dave") as dave:
                c.ipc.send("agent:dave", "first")
                c.ipc.send("agent:dave", "second")
                assert dave.ipc.recv(5)["message"] == "first"
                _crash(k)
    finally:
        k.stop()
    k = boot_kernel(tmp_path)
    try:
        with k.client() as c:
            with process(k, c, "bob") as bob:
                got = [bob.ipc.recv(5) for _ in range(2)]
                assert [e["message"]["n"] for e in got] == [1, 2]
                # sent in an earlier boot: its pid means nothing now, its identity does
                assert all(e["from"] is None and e["sender"] == "pid:1" for e in got)
                assert errno_of(bob.ipc.recv, 0.1) == "ETIMEDOUT"
            with process(k, c, "dave") as dave:
                assert dave.ipc.recv(5)["message"] == "second"
                assert errno_of(dave.ipc.recv, 0.1) == "ETIMEDOUT"
            _crash(k)
    finally:
        k.stop()
    k = boot_kernel(tmp_path)
    try:
        with k.client() as c, process(k, c, "bob") as bob, process(k, c, "dave") as dave:
            assert errno_of(bob.ipc.recv, 0.1) == "ETIMEDOUT"  # once, not again
            assert errno_of(dave.ipc.recv, 0.1) == "ETIMEDOUT"
    finally:
        k.stop()


def test_the_shell_sends_and_receives(mk):
    def llmos(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "llmagentos.cli", *args], env=mk.env(),
                              capture_output=True, text=True, timeout=60)

    with mk.client() as c, process(mk, c, "mail-shell") as agent:
        r = llmos("send", "agent:mail-shell", "my order 1234 is late")
        assert r.returncode == 0, r.stderr
        r = llmos("send", str(agent.pid), '{"type": "ping", "n": 3}')
        assert r.returncode == 0, r.stderr
        got = sorted([agent.ipc.recv(5) for _ in range(2)], key=lambda e: e["durable"])
        assert got[0]["message"] == {"type": "ping", "n": 3}
        assert got[1]["message"] == "my order 1234 is late"
        agent.ipc.send(1, {"type": "reply", "text": "on its way"})
        r = llmos("recv", "--timeout", "5", "--json")
        assert r.returncode == 0, r.stderr
        env = json.loads(r.stdout)
        assert env["from"] == agent.pid and env["message"]["text"] == "on its way"
        r = llmos("recv", "--timeout", "0.1")
        assert r.returncode == 4  # timed out
        assert llmos("send", "nobody", "x").returncode == 2  # usage
        assert llmos("send", "424242", "x").returncode == 1  # ESRCH


def test_sendrecv_is_a_request_and_its_answer(mk):
    with mk.client() as c, process(mk, c) as client, process(mk, c) as server:
        done = {}

        def serve():
            env = server.ipc.recv(30)
            # the reply, and the wait for the next request, in one call
            done["next"] = server.ipc.sendrecv(env["from"], {"type": "answer",
                                                             "n": env["message"]["n"] + 1}, 30)
        th = threading.Thread(target=serve)
        th.start()
        client.ipc.send(client.pid, "noise")  # not from the server: left for later
        env = client.ipc.sendrecv(server.pid, {"type": "question", "n": 1}, 30,
                                  {"from": server.pid})
        assert env["message"] == {"type": "answer", "n": 2} and env["from"] == server.pid
        client.ipc.send(server.pid, "bye")
        th.join(30)
        assert done["next"]["message"] == "bye"
        assert client.ipc.recv(0)["message"] == "noise"
        # the message goes even when no answer comes; a bad match sends nothing
        assert errno_of(client.ipc.sendrecv, server.pid, "unanswered", 0.1) == "ETIMEDOUT"
        assert server.ipc.recv(0)["message"] == "unanswered"
        assert errno_of(client.ipc.sendrecv, server.pid, "x", 0, {"bad": 1}) == "EINVAL"
        assert errno_of(server.ipc.recv, 0) == "ETIMEDOUT"


def test_sendrecv_to_itself_answers_with_its_own_message(mk):
    """The message is handed over before the caller's own wait is set up: sent
    to the caller itself, it is what that wait takes (or leaves, unmatched)."""
    with mk.client() as c, process(mk, c) as me:
        env = me.ipc.sendrecv(me.pid, {"type": "note", "n": 1}, 5)
        assert env["message"] == {"type": "note", "n": 1} and env["from"] == me.pid
        assert errno_of(me.ipc.sendrecv, me.pid, "kept", 0.1, {"type": "other"}) == "ETIMEDOUT"
        assert me.ipc.recv(0)["message"] == "kept"
        assert errno_of(me.ipc.recv, 0) == "ETIMEDOUT"


def early_answers(c) -> int:
    return c.sys.stats()["counters"].get("early_answers", 0)


def test_a_waiting_receiver_is_answered_in_its_senders_step(mk):
    """Mail to a receiver blocked in ipc.recv goes from the sender's step to the
    receiver's socket: never queued, no task switch (kernel/mailbox.py)."""
    with mk.client() as c, process(mk, c) as r, process(mk, c) as s:
        th, got = in_thread(r.ipc.recv, 30)
        wait_for(lambda: c.proc.stat(r.pid)["state"] == "WAITING")
        before = early_answers(c)
        s.ipc.send(r.pid, {"type": "hi", "n": 1})
        th.join(30)
        assert got["result"]["message"] == {"type": "hi", "n": 1}
        assert got["result"]["from"] == s.pid
        assert early_answers(c) == before + 1
        assert r.ipc.mailbox()["waiting"] == 0
        wait_for(lambda: c.proc.stat(r.pid)["state"] != "WAITING")


def test_mail_goes_to_the_waiting_receiver_it_matches(mk):
    """Two calls of one process wait with different matches: each message is the
    answer of the call it matches, in either order; one nobody matches waits."""
    with mk.client() as c, process(mk, c) as s:
        tok = c.proc.attach(None)  # one process, two connections: two calls at once
        x, y = llmagentos.Client(mk.socket, tok["token"]), llmagentos.Client(mk.socket,
                                                                             tok["token"])
        try:
            tx, gx = in_thread(x.ipc.recv, 30, {"type": "x"})
            ty, gy = in_thread(y.ipc.recv, 30, {"type": "y"})
            wait_for(lambda: c.proc.stat(tok["pid"])["state"] == "WAITING")
            time.sleep(0.1)  # both calls are in
            s.ipc.send(tok["pid"], {"type": "other"})  # matches neither: queued
            s.ipc.send(tok["pid"], {"type": "y", "n": 1})
            ty.join(30)
            assert gy["result"]["message"] == {"type": "y", "n": 1} and tx.is_alive()
            s.ipc.send(tok["pid"], {"type": "x", "n": 2})
            tx.join(30)
            assert gx["result"]["message"] == {"type": "x", "n": 2}
            assert x.ipc.recv(0)["message"] == {"type": "other"}
        finally:
            x.close()
            y.close()


def test_a_receiver_that_hung_up_does_not_swallow_mail(mk):
    """A connection that waited in ipc.recv and went away takes no message with it:
    mail sent after it is gone waits for the process's next recv."""
    import socket as so

    with mk.client() as c, process(mk, c) as s:
        tok = c.proc.attach(None)
        keep = llmagentos.Client(mk.socket, tok["token"])  # keeps the process alive
        try:
            raw = so.socket(so.AF_UNIX)
            raw.connect(mk.socket)
            raw.sendall(msgpack.packb([0, 1, "sys.hello", [tok["token"]]]))
            raw.recv(65536)
            raw.sendall(msgpack.packb([0, 2, "ipc.recv", [60]]))
            wait_for(lambda: c.proc.stat(tok["pid"])["state"] == "WAITING")
            raw.close()
            wait_for(lambda: c.proc.stat(tok["pid"])["state"] != "WAITING")
            s.ipc.send(tok["pid"], "still here")
            assert keep.ipc.recv(5)["message"] == "still here"
        finally:
            keep.close()


def test_waits_end_by_mail_timeout_or_exit_each_once(mk):
    """Calls waiting in mailboxes (no task holds them): those sent to get their mail,
    the others ETIMEDOUT at their own deadline, one whose process is killed ESRCH
    (or its connection is gone): every call is answered once, none hangs."""
    with mk.client() as c, process(mk, c) as s:
        rs = [process(mk, c) for _ in range(12)]
        try:
            waits = [in_thread(r.ipc.recv, 0.5 + 0.1 * (i % 3)) for i, r in enumerate(rs[:10])]
            forever = in_thread(rs[10].ipc.recv, None)
            wait_for(lambda: all(c.proc.stat(r.pid)["state"] == "WAITING" for r in rs[:11]))
            for r in rs[:10:2]:
                s.ipc.send(r.pid, r.pid)
            c.proc.kill(rs[10].pid, "KILL")
            for th, _ in (*waits, forever):
                th.join(30)
                assert not th.is_alive()
            for i, (_, got) in enumerate(waits):
                if i % 2 == 0:
                    assert list(got) == ["result"] and got["result"]["message"] == rs[i].pid
                else:
                    assert list(got) == ["error"] and got["error"].name == "ETIMEDOUT"
            assert list(forever[1]) == ["error"]
            assert forever[1]["error"].name in ("ESRCH", "ECONNRESET")
            assert errno_of(s.ipc.send, rs[10].pid, "late") == "ESRCH"
            assert rs[11].ipc.mailbox()["waiting"] == 0  # (never waited: untouched)
        finally:
            for r in rs:
                r.close()


def test_customer_service_example_end_to_end(llm_kernel):
    """The seed's scenario with the real model: a human's message from the shell
    (sent before the router even runs: it waits, durably), routed by the model,
    answered by a specialist with a tool, every step in the trajectory store."""
    from pathlib import Path
    example = str(Path(__file__).resolve().parent.parent / "examples" / "customer_service.py")

    def run(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([PY, *args], env=llm_kernel.env(), capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    request = "I was charged 19.99 twice for my plan, please refund it"
    run("-m", "llmagentos.cli", "send", "agent:router", request)
    run(example, "--serve")
    try:
        env = json.loads(run("-m", "llmagentos.cli", "recv", "--timeout", "150", "--json",
                             "--type", "reply").stdout)
    finally:
        run(example, "--stop")
    reply = env["message"]
    assert reply["team"] in ("billing", "orders", "tech") and reply["text"]
    assert reply["request"] == request and env["sender"] == f"agent:{reply['team']}"
    with llm_kernel.client() as c:
        eps = c.traj.list("customer-service")
        routed = [c.traj.get(e["id"]) for e in eps if e["task"] == request]
        owners = [e["owner"] for e in routed]
        assert owners == ["agent:router", f"agent:{reply['team']}"], owners
        router, team = ([s["action"] for s in ep["trajectory"]] for ep in routed)
        assert router == [{"route": reply["team"]}]
        assert team[-1] == {"reply": reply["text"]} and routed[1]["success"]
        assert len(team) == 2 and "tool" in team[0]


def test_the_readme_section_runs_as_written(mk, tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Agents talking: mailboxes", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(python|sh)\n(.*?)```", section, re.S)
    assert [lang for lang, _ in blocks] == ["python", "sh"]
    env = mk.env()
    env["PATH"] = f"{Path(PY).parent}:{env['PATH']}"  # llmos and python3 of this venv
    outs = []
    for lang, code in blocks:
        cmd = [PY, "-c", code] if lang == "python" else ["bash", "-c", code]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60,
                           cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert re.fullmatch(r"pid:\d+ \{'type': 'hello', 'text': 'hi'\}\n"
                        r"pid:1 kept for greeter, durably\n1 extra!\nNone\n", outs[0]), outs[0]
    assert outs[1].endswith('from agent:helpdesk: {"type": "reply", "text": '
                            '"on its way: my order 1234 is late"}\n'), outs[1]


def test_a_sender_waiting_for_room_in_stored_mail_goes_on_when_some_is_taken(mk):
    with mk.client() as c, process(mk, c) as s:
        for i in range(DEPTH):
            s.ipc.send("agent:mail-slow-reader", i)
        done = {}
        th = threading.Thread(target=lambda: done.setdefault(
            "r", s.ipc.send("agent:mail-slow-reader", "waited", 30)))
        th.start()
        wait_for(lambda: c.proc.stat(s.pid)["state"] == "WAITING")
        with process(mk, c, "mail-slow-reader") as reader:
            assert reader.ipc.recv(5)["message"] == 0
            th.join(30)
            assert done["r"]["durable"]
            got = [reader.ipc.recv(5)["message"] for _ in range(DEPTH)]
        assert got == [*range(1, DEPTH), "waited"]
