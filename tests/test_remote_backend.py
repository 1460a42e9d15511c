"""The remote backend (drivers/openai_backend.py) and its run queue
(kernel/scheduler/remote.py), against llama-cpp-python's own OpenAI-compatible
server on the packaged model, and against tiny HTTP servers written here for
what a real server will not do on demand (hang, throttle, echo a key)."""

from __future__ import annotations

import json
import os
import textwrap
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate

import h11
import pytest
import trio

from llmagentos.drivers.openai_backend import (
    OpenAIBackend,
    OpenAIConfig,
    retry_after,
    sampling_body,
)
from llmagentos.drivers.sampling import SamplingParams
from llmagentos.kernel.scheduler.remote import RemoteQueue
from llmagentos.syscalls.errno import SyscallError

KEY_ENV = "LLMOS_TEST_REMOTE_KEY"
KEY = "sk-test-5f1c0ffee-not-a-real-key"
GREEDY = {"temperature": 0.0, "max_tokens": 8}


def queue_for(url: str, policy: str = "fair", **cfg) -> RemoteQueue:
    return RemoteQueue(OpenAIBackend(OpenAIConfig(url, "m", **cfg)), policy)


@asynccontextmanager
async def running(queue: RemoteQueue):
    async with trio.open_nursery() as n:
        await n.start(queue.run)
        try:
            yield queue
        finally:
            n.cancel_scope.cancel()


# -- a tiny HTTP server (h11 on trio): one request per connection -----------------------------

@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict
    closed: trio.Event = field(default_factory=trio.Event)  # the client hung up


class Reply:
    def __init__(self, conn: h11.Connection, stream: trio.SocketStream, seen: Seen) -> None:
        self.conn, self.stream, self.seen = conn, stream, seen

    async def _send(self, event) -> None:
        try:
            await self.stream.send_all(self.conn.send(event))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.seen.closed.set()
            raise

    async def start(self, status: int, headers=()) -> None:
        await self._send(h11.Response(status_code=status,
                                      headers=[("connection", "close"), *headers]))

    async def data(self, chunk: bytes) -> None:
        await self._send(h11.Data(data=chunk))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def json(self, status: int, obj, headers=()) -> None:
        raw = json.dumps(obj).encode()
        await self.start(status, [("content-type", "application/json"),
                                  ("content-length", str(len(raw))), *headers])
        await self.data(raw)
        await self.end()


class FakeServer:
    def __init__(self, handler) -> None:
        self.handler = handler
        self.requests: list[Seen] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _conn(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        req, body = None, b""
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                return
        seen = Seen(req.target.decode(), {k.decode(): v.decode() for k, v in req.headers},
                    json.loads(body or b"{}"))
        self.requests.append(seen)

        async def watch() -> None:
            try:
                while await stream.receive_some(1):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            seen.closed.set()

        async with trio.open_nursery() as n:
            n.start_soon(watch)
            try:
                await self.handler(seen, Reply(conn, stream, seen))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            n.cancel_scope.cancel()
        await stream.aclose()


@asynccontextmanager
async def fake_server(handler):
    srv = FakeServer(handler)
    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, srv._conn, 0)
        srv.port = listeners[0].socket.getsockname()[1]
        try:
            yield srv
        finally:
            n.cancel_scope.cancel()


def sse(*events) -> list[bytes]:
    return [b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
            for e in events]


def completion(text: str, usage=(3, 2)) -> dict:
    return {"choices": [{"text": text, "finish_reason": "stop", "index": 0}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}


WORDS = [f" w{i}" for i in range(12)]


async def slow_stream(seen: Seen, reply: Reply) -> None:
    """The same 12 pieces every time, one every 20 ms, until the client hangs up."""
    await reply.start(200, [("content-type", "text/event-stream")])
    for w in WORDS:
        await reply.data(sse({"choices": [{"text": w, "index": 0, "finish_reason": None}]})[0])
        await trio.sleep(0.02)
    for chunk in sse({"choices": [{"text": "", "index": 0, "finish_reason": "stop"}]}, b"[DONE]"):
        await reply.data(chunk)
    await reply.end()


# -- configuration and the mapping of sampling parameters --------------------------------------

def test_config_from_registry_entry_checks_every_key():
    cfg = OpenAIConfig.from_entry({"kind": "openai", "base_url": "http://h:1/", "model": "x"})
    assert (cfg.url, cfg.max_concurrency, cfg.timeout, cfg.max_retries) == ("http://h:1", 4,
                                                                           60.0, 3)
    for bad in ({"model": "x"}, {"base_url": "ftp://h", "model": "x"},
                {"base_url": "http://h", "model": ""},
                {"base_url": "http://h", "model": "x", "max_concurrency": 0},
                {"base_url": "http://h", "model": "x", "max_concurrency": True},
                {"base_url": "http://h", "model": "x", "timeout": float("nan")},
                {"base_url": "http://h", "model": "x", "max_retries": -1},
                {"base_url": "http://h", "model": "x", "api_key_env": "sk-abc def"}):
        with pytest.raises(SyscallError) as e:
            OpenAIConfig.from_entry(bad)
        assert e.value.name == "EINVAL"


def test_sampling_params_map_to_the_api_or_are_refused_by_name():
    body = sampling_body(SamplingParams(max_tokens=5, temperature=0.2, top_p=0.9, stop=["\n"],
                                        seed=7, presence_penalty=0.5,
                                        json_schema={"type": "object"}))
    assert body == {"max_tokens": 5, "temperature": 0.2, "top_p": 0.9, "stop": ["\n"],
                    "seed": 7, "presence_penalty": 0.5,
                    "response_format": {"type": "json_schema", "json_schema": {
                        "name": "output", "schema": {"type": "object"}}}}
    assert sampling_body(SamplingParams(json_schema=True))["response_format"] == {
        "type": "json_object"}
    for name, value in (("grammar", 'root ::= "a"'), ("top_k", 5), ("min_p", 0.0),
                        ("repeat_penalty", 1.1), ("repeat_last_n", 8)):
        with pytest.raises(SyscallError) as e:
            sampling_body(SamplingParams(**{name: value}))
        assert e.value.name == "EINVAL" and name in e.value.message
        assert "openai" in e.value.message
    with pytest.raises(SyscallError, match="EINVAL"):
        sampling_body(SamplingParams(json_schema="{not json"))


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after("0") == 0.0
    assert retry_after("2.5") == 2.5
    assert retry_after("-3") == 0.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert retry_after(formatdate(1000.0 + 30, usegmt=True), now=1000.0) == pytest.approx(30)
    assert retry_after(formatdate(1000.0 - 30, usegmt=True), now=1000.0) == 0.0


async def test_refused_params_fail_before_anything_is_sent():
    async def never(seen, reply):
        raise AssertionError("nothing should be sent")

    async with fake_server(never) as srv, running(queue_for(srv.url)) as q:
        with pytest.raises(SyscallError, match="top_k"):
            await q.generate(1, "hi", None, {"top_k": 3})
        with pytest.raises(SyscallError, match="EINVAL"):
            await q.generate(1, "hi", [{"role": "user", "content": "x"}], {})
        assert srv.requests == []


# -- failures as errnos ------------------------------------------------------------------------

async def test_a_server_that_never_answers_is_ETIMEDOUT():
    async def hang(seen, reply):
        await trio.sleep_forever()

    async with fake_server(hang) as srv, running(queue_for(srv.url, timeout=0.5)) as q:
        with pytest.raises(SyscallError) as e:
            await q.generate(1, "hi", None, GREEDY)
        assert e.value.name == "ETIMEDOUT"
        st = q.stats()
        assert (st["running"], st["queue_length"], st["failed"]) == (0, 0, 1)


async def test_429_with_retry_after_is_retried_until_it_succeeds():
    async def busy_twice(seen, reply):
        if len(srv.requests) <= 2:
            await reply.json(429, {"error": {"message": "slow down"}}, [("retry-after", "0")])
        else:
            await reply.json(200, completion("done", (4, 1)))

    async with fake_server(busy_twice) as srv, running(queue_for(srv.url)) as q:
        res = await q.generate(1, "hi", None, GREEDY)
        assert res.text == "done" and len(srv.requests) == 3
        assert res.usage["prompt_tokens"] == 4 and res.usage["completion_tokens"] == 1
        assert q.stats()["backend"]["retries"] == 2


async def test_throttling_past_max_retries_is_EAGAIN_or_EBUSY_with_the_servers_message():
    status = 429

    async def always_busy(seen, reply):
        await reply.json(status, {"error": {"message": f"overloaded {status}"}},
                         [("retry-after", "0")])

    async with fake_server(always_busy) as srv, running(queue_for(srv.url, max_retries=2)) as q:
        with pytest.raises(SyscallError) as e:
            await q.generate(1, "hi", None, GREEDY)
        assert e.value.name == "EAGAIN" and "overloaded 429" in e.value.message
        assert len(srv.requests) == 3  # the first try and two retries
        status = 503
        with pytest.raises(SyscallError) as e:
            await q.generate(1, "hi", None, GREEDY)
        assert e.value.name == "EBUSY" and "overloaded 503" in e.value.message


async def test_http_errors_map_to_errnos_with_the_servers_message():
    answers = {"/v1/completions": (400, {"error": {"message": "max_tokens too large"}}),
               "/v1/chat/completions": (500, {"error": {"message": "model crashed"}})}

    async def fail(seen, reply):
        await reply.json(*answers[seen.path])

    async with fake_server(fail) as srv, running(queue_for(srv.url)) as q:
        with pytest.raises(SyscallError) as e:
            await q.generate(1, "hi", None, GREEDY)
        assert e.value.name == "EINVAL" and "max_tokens too large" in e.value.message
        with pytest.raises(SyscallError) as e:
            await q.generate(1, None, [{"role": "user", "content": "hi"}], GREEDY)
        assert e.value.name == "EIO" and "model crashed" in e.value.message


async def test_a_garbled_or_dropped_stream_is_EIO():
    bodies = iter([[b"data: {not json\n\n"],
                   sse({"choices": [{"text": "half", "index": 0}]})])  # then no [DONE]

    async def garble(seen, reply):
        await reply.start(200, [("content-type", "text/event-stream")])
        for chunk in next(bodies):
            await reply.data(chunk)
        await reply.end()

    async with fake_server(garble) as srv, running(queue_for(srv.url)) as q:
        for what in ("not JSON", "before \\[DONE\\]"):
            with pytest.raises(SyscallError, match=what) as e:
                await q.generate(1, "hi", None, GREEDY, on_token=lambda p: None)
            assert e.value.name == "EIO"
        assert q.stats()["running"] == 0


async def test_connection_refused_is_EIO():
    async with fake_server(None) as srv:
        url = srv.url  # a port that was just free
    async with running(queue_for(url)) as q:
        with pytest.raises(SyscallError) as e:
            await q.generate(1, "hi", None, GREEDY)
        assert e.value.name == "EIO" and "connect" in e.value.message


async def test_request_body_carries_the_mapped_params(monkeypatch):
    async def ok(seen, reply):
        await reply.json(200, completion("{}"))

    async with fake_server(ok) as srv, running(queue_for(srv.url)) as q:
        await q.generate(1, "hi", None, {"temperature": 0.0, "max_tokens": 3, "stop": ["X"],
                                         "seed": 1, "json_schema": {"type": "object"}})
        body = srv.requests[0].body
        assert body["model"] == "m" and body["prompt"] == "hi" and body["stop"] == ["X"]
        assert body["seed"] == 1 and body["max_tokens"] == 3 and "stream" not in body
        assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}


# -- the API key ---------------------------------------------------------------------------------

async def test_api_key_is_read_from_the_env_var_sent_as_bearer_and_never_shown(monkeypatch):
    async def echo_key(seen, reply):  # a server careless enough to echo the key back
        auth = seen.headers.get("authorization", "")
        if auth != "Bearer good-" + KEY:
            await reply.json(401, {"error": {"message": f"bad key {auth}"}})
        else:
            await reply.json(200, completion("ok"))

    async with fake_server(echo_key) as srv:
        q = queue_for(srv.url, api_key_env=KEY_ENV)
        async with running(q):
            monkeypatch.delenv(KEY_ENV, raising=False)
            with pytest.raises(SyscallError) as e:
                await q.generate(1, "hi", None, GREEDY)
            assert e.value.name == "EACCES" and KEY_ENV in e.value.message
            monkeypatch.setenv(KEY_ENV, "good-" + KEY)  # read at request time
            assert (await q.generate(1, "hi", None, GREEDY)).text == "ok"
            assert srv.requests[-1].headers["authorization"] == "Bearer good-" + KEY
            monkeypatch.setenv(KEY_ENV, KEY)
            with pytest.raises(SyscallError) as e:
                await q.generate(1, "hi", None, GREEDY)
            assert e.value.name == "EACCES" and "bad key" in e.value.message
            for text in (str(e.value), repr(e.value), e.value.message, repr(q.backend),
                         repr(q.backend.config), json.dumps(q.stats(), default=str)):
                assert KEY not in text


# -- the run queue -----------------------------------------------------------------------------

async def test_stop_cancels_the_request_in_flight_holds_it_and_cont_reissues_it():
    async with fake_server(slow_stream) as srv, running(queue_for(srv.url)) as q:
        shown: list[str] = []
        first = trio.Event()

        def on_token(piece: str) -> None:
            shown.append(piece)
            if len(shown) == 3:  # mid-stream, a few pieces in
                q.stop(7)
                first.set()

        async with trio.open_nursery() as n:
            result = []

            async def caller():
                result.append(await q.generate(7, "hi", None, GREEDY, on_token=on_token))

            n.start_soon(caller)
            await first.wait()
            with trio.fail_after(10):
                await srv.requests[0].closed.wait()  # the server saw the connection closed
            st = q.stats()
            assert (st["running"], st["queue_length"]) == (0, 1)
            await trio.sleep(0.3)
            assert len(srv.requests) == 1  # held while stopped
            q.cont(7)
        assert len(srv.requests) == 2
        res = result[0]
        # Discarded and re-issued whole; the caller is not shown the same text twice.
        assert res.text == "".join(WORDS) == "".join(shown)
        assert res.usage["completion_tokens"] == len(WORDS)  # counted pieces: no usage sent
        assert q.stats()["reissued"] == 1


async def test_release_and_a_cancelled_caller_close_the_http_request_at_once():
    async with fake_server(slow_stream) as srv, running(queue_for(srv.url)) as q:
        first = trio.Event()
        errors = []

        async def caller():
            try:
                await q.generate(3, "hi", None, GREEDY, on_token=lambda p: first.set())
            except SyscallError as e:
                errors.append(e.name)

        async with trio.open_nursery() as n:
            n.start_soon(caller)
            await first.wait()
            await q.release(3)
            with trio.fail_after(10):
                await srv.requests[0].closed.wait()
        assert errors == ["ECANCELED"]
        assert (q.stats()["running"], q.stats()["queue_length"]) == (0, 0)

        first = trio.Event()
        with trio.move_on_after(10) as scope:
            async with trio.open_nursery() as n:
                n.start_soon(caller)
                await first.wait()
                n.cancel_scope.cancel()  # the caller is killed
        assert not scope.cancelled_caught
        with trio.fail_after(10):
            await srv.requests[1].closed.wait()
        assert (q.stats()["running"], q.stats()["queue_length"]) == (0, 0)


async def test_what_on_token_raises_ends_the_request_and_is_raised_as_it_is():
    async with fake_server(slow_stream) as srv, running(queue_for(srv.url)) as q:
        def refuse(piece: str) -> None:
            raise SyscallError("EPIPE", "the reader went away")

        with pytest.raises(SyscallError) as e:
            await q.generate(1, "hi", None, GREEDY, on_token=refuse)
        assert (e.value.name, e.value.message) == ("EPIPE", "the reader went away")
        with trio.fail_after(10):
            await srv.requests[0].closed.wait()
        assert q.stats()["running"] == 0 and q.stats()["backend"]["alive"]


async def test_at_most_max_concurrency_in_flight_and_the_queue_drains():
    in_flight, most = 0, 0

    async def counted(seen, reply):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await trio.sleep(0.05)
        in_flight -= 1
        await reply.json(200, completion("x"))

    async with fake_server(counted) as srv, running(queue_for(srv.url,
                                                               max_concurrency=2)) as q:
        async with trio.open_nursery() as n:
            for pid in range(6):
                n.start_soon(q.generate, pid, "hi", None, GREEDY)
        assert most == 2 and len(srv.requests) == 6
        st = q.stats()
        assert (st["running"], st["queue_length"], st["completed"]) == (0, 0, 6)


# -- against llama-cpp-python's own server -----------------------------------------------------

@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    from openai_server import OpenAIServer

    os.environ[KEY_ENV] = KEY
    srv = OpenAIServer(embedding=True, api_key=KEY,
                       log=tmp_path_factory.mktemp("llama-server") / "server.log").start()
    yield srv
    srv.stop()
    os.environ.pop(KEY_ENV, None)


def real_queue(srv, policy: str = "fair", **cfg) -> RemoteQueue:
    return queue_for(srv.base_url, policy, api_key_env=KEY_ENV, **cfg)


@pytest.mark.model
@pytest.mark.timeout(60)
async def test_generate_and_chat_against_a_real_server(llama_server):
    async with running(real_queue(llama_server)) as q:
        res = await q.generate(1, "The capital of France is", None, GREEDY)
        assert res.text.strip() and res.finish_reason in ("stop", "length")
        u = res.usage
        assert u["prompt_tokens"] > 0 and 0 < u["completion_tokens"] <= 8
        assert u["device_time"] > 0 and u["cached_tokens"] == 0
        chat = await q.generate(1, None, [{"role": "user", "content": "Say hello."}],
                                {"temperature": 0.0, "max_tokens": 8})
        assert chat.finish_reason in ("stop", "length") and chat.usage["prompt_tokens"] > 0
        own = q.usage(1)
        assert own["requests"] == 2
        assert own["tokens_in"] == u["prompt_tokens"] + chat.usage["prompt_tokens"]
        assert own["tokens_out"] == u["completion_tokens"] + chat.usage["completion_tokens"]
        st = q.stats()
        assert (st["completed"], st["running"], st["tokens_in"]) == (2, 0, own["tokens_in"])


@pytest.mark.model
@pytest.mark.timeout(60)
async def test_stream_pieces_arrive_while_the_request_is_in_flight(llama_server):
    async with running(real_queue(llama_server)) as q:
        whole = await q.generate(1, "Once upon a time", None, GREEDY)
        pieces, in_flight = [], []

        async def on_token(piece: str) -> None:
            pieces.append(piece)
            in_flight.append(q.stats()["running"])

        res = await q.generate(1, "Once upon a time", None, GREEDY, on_token=on_token)
        assert len(pieces) > 1 and set(in_flight) == {1}
        assert "".join(pieces) == res.text == whole.text  # greedy: the same text either way
        assert res.usage["completion_tokens"] == len(pieces)


@pytest.mark.model
@pytest.mark.timeout(60)
async def test_embed_against_a_real_server(llama_server):
    async with running(real_queue(llama_server)) as q:
        res = await q.embed(1, ["hello world", "the cat sat on the mat"])
        assert len(res.vectors) == 2 and len(res.vectors[0]) == len(res.vectors[1]) > 100
        for v in res.vectors:
            assert sum(x * x for x in v) == pytest.approx(1.0, rel=1e-3)
        assert res.vectors[0] != res.vectors[1]
        assert res.usage["prompt_tokens"] > 0 and q.usage(1)["tokens_in"] > 0


@pytest.mark.model
@pytest.mark.timeout(60)
async def test_queued_owners_come_out_in_nice_order(llama_server):
    q = real_queue(llama_server, "priority", max_concurrency=1)
    order = []

    async def one(pid: int, nice: int) -> None:
        await q.generate(pid, "Count: one, two,", None, {"temperature": 0.0, "max_tokens": 2},
                         nice=nice)
        order.append(pid)

    async with running(q), trio.open_nursery() as n:
        n.start_soon(one, 1, 0)
        while q.stats()["running"] < 1:
            await trio.sleep(0.01)
        for pid, nice in ((2, 10), (3, 0), (4, -10)):  # queued in the opposite order
            n.start_soon(one, pid, nice)
        while q.stats()["queue_length"] < 3 and order == []:
            await trio.sleep(0.01)
        assert q.stats()["queue_length"] == 3  # all queued behind the one in flight
    assert order == [1, 4, 3, 2]


@pytest.mark.model
@pytest.mark.timeout(90)
async def test_server_killed_mid_stream_is_EIO_and_nothing_is_left_in_flight(llama_server):
    from openai_server import OpenAIServer

    srv = await trio.to_thread.run_sync(OpenAIServer().start)
    try:
        q = queue_for(srv.base_url)
        async with running(q):
            def kill_on_first(piece: str) -> None:
                srv.kill()

            t0 = time.monotonic()
            with pytest.raises(SyscallError) as e:
                await q.generate(1, "Write a long story.", None,
                                 {"temperature": 0.0, "max_tokens": 200},
                                 on_token=kill_on_first)
            assert e.value.name == "EIO" and time.monotonic() - t0 < 30
            st = q.stats()
            assert (st["running"], st["queue_length"], st["failed"]) == (0, 0, 1)
            assert st["backend"]["alive"] is False and st["backend"]["last_error"]
    finally:
        srv.stop()


# -- through the kernel: a registry entry of kind "openai" ------------------------------------

@pytest.mark.model
@pytest.mark.timeout(90)
def test_agents_reach_a_remote_model_through_syscalls(llama_server, tmp_path):
    """A kernel whose registry names the server: generate, chat, stream and embed by
    syscalls, a spawned process on it by default, usage in the process table, and the
    key nowhere in what the kernel shows."""
    from conftest import PY, boot_kernel

    conf = tmp_path / "models.toml"
    conf.write_text(f'[models.far]\nkind = "openai"\nbase_url = "{llama_server.base_url}"\n'
                    f'api_key_env = "{KEY_ENV}"\nmax_concurrency = 2\n')
    (tmp_path / "k").mkdir()
    k = boot_kernel(tmp_path / "k", "--config", str(conf), "--load", "far", "--slots", "2",
                    "--n-ctx", "512", model="sim")
    try:
        with k.client() as c:
            res = c.llm.generate("The capital of France is", None,
                                 {"model": "far", "temperature": 0, "max_tokens": 8})
            assert res["model"] == "far" and res["text"].strip()
            assert res["usage"]["prompt_tokens"] > 0
            pieces = []
            streamed = c.call("llm.generate", "The capital of France is", None,
                              {"model": "far", "temperature": 0, "max_tokens": 8}, True,
                              False, on_notify=lambda m, a: pieces.append(a[1]))
            assert "".join(pieces) == streamed["text"] == res["text"]
            chat = c.llm.generate(None, [{"role": "user", "content": "Say hi."}],
                                  {"model": "far", "max_tokens": 4})
            assert chat["model"] == "far"
            assert len(c.llm.embed(["a cat"], "far")[0]) > 100
            with pytest.raises(Exception) as e:  # no GBNF over this API
                c.llm.generate("x", None, {"model": "far", "grammar": 'root ::= "a"'})
            assert getattr(e.value, "name", None) == "EINVAL" and "grammar" in str(e.value)
            pid = c.proc.spawn([PY, "-c", "import llmagentos; c = llmagentos.connect(); "
                                "print(c.llm.generate('Hello', None, {'max_tokens': 4})"
                                "['model'])"], "remote-agent", None, None, None, None, 0,
                               "local", "far")
            assert c.proc.wait(pid, 60)["exit_code"] == 0
            assert c.proc.logs(pid)["data"].decode().strip() == "far"
            quota = c.proc.spawn([PY, "-c", textwrap.dedent("""
                import llmagentos
                c = llmagentos.connect()
                try:
                    for _ in range(20):
                        c.llm.generate("Count to ten:", None, {"max_tokens": 8})
                except llmagentos.errors.KernelError as e:
                    print(e.name, c.proc.stat()["usage"]["tokens_out"])
            """)], "quota", None, None, None, {"tokens": 40}, 0, "local", "far")
            assert c.proc.wait(quota, 60)["exit_code"] == 0
            name, out = c.proc.logs(quota)["data"].decode().split()
            assert name == "EDQUOT" and 0 < int(out) <= 40  # the server's usage, counted
            rows = {m["name"]: m for m in c.llm.models()}
            assert rows["far"]["kind"] == "openai" and rows["far"]["loaded"]
            shown = json.dumps([rows, c.sys.stats()], default=str)
            assert KEY not in shown
    finally:
        k.stop()
    assert KEY not in k.log.read_text()
    # The remote model as the kernel's default: hello and uname answered (they were EIO).
    (tmp_path / "k2").mkdir()
    k = boot_kernel(tmp_path / "k2", "--config", str(conf), model="far")
    try:
        with k.client() as c:
            info = c.sys.uname()
            assert (info["model"], info["slots"]) == ("far", 2)
            assert c.llm.generate("Hello", None, {"max_tokens": 4})["model"] == "far"
    finally:
        k.stop()
