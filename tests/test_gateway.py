"""The OpenAI-compatible HTTP gateway, through the official `openai` client: keys are
processes (scheduled, limited, accounted, audited), OpenAI-shaped answers and errors."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import openai
import psutil
import pytest
from conftest import boot_kernel, wait_for

import llmagentos

SLOW = "sim-slow"  # one slot, 5 ms a step: for what must overlap (priority, disconnect)
CONFIG = f"""
[models.{SLOW}]
kind = "sim"
decode_ms = 5.0
n_seq_max = 1
"""
HI = [{"role": "user", "content": "Say hello."}]


def http_url(k) -> str:
    return wait_for(lambda: (k.run_dir / "http").exists()
                    and (k.run_dir / "http").read_text().strip())


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw")
    (tmp / "models.toml").write_text(CONFIG)
    k = boot_kernel(tmp, "--config", str(tmp / "models.toml"), "--load", SLOW,
                    "--policy", "priority", "--http", "127.0.0.1:0", model="sim")
    k.url = http_url(k)
    yield k
    k.stop()


_n = iter(range(1_000_000))


def new_key(k, **kw) -> dict:
    with k.client() as c:
        return c.key.create(kw.pop("name", f"k{next(_n)}"), kw.pop("caps", None),
                            kw.pop("nice", 0), kw.pop("limits", None), kw.pop("model", None))


def oai(k, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=k.url + "/v1", api_key=key, max_retries=0, timeout=60)


def row(k, pid: int) -> dict:
    with k.client() as c:
        return next(r for r in c.proc.ps() if r["pid"] == pid)


# --- endpoints --------------------------------------------------------------------------


def test_health_and_models(gw):
    assert httpx.get(gw.url + "/health").json() == {"status": "ok"}
    key = new_key(gw)
    ids = {m.id for m in oai(gw, key["key"]).models.list()}
    assert ids == {"sim", SLOW}


def test_chat_runs_as_the_keys_process(gw):
    key = new_key(gw)
    r = oai(gw, key["key"]).chat.completions.create(model="sim", messages=HI, max_tokens=7,
                                                     temperature=0.2, top_p=0.9, seed=3,
                                                     stop=["\n\n"])
    assert r.object == "chat.completion" and r.model == "sim"
    assert r.choices[0].message.role == "assistant"
    assert len(r.choices[0].message.content) == 7 and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens > 0
    p = row(gw, key["pid"])  # its usage shows in ps, under its own name
    assert p["tokens_out"] == 7 and p["attached"] and p["syscalls"] >= 1


def test_streamed_chat_matches_the_plain_answer(gw):
    client = oai(gw, new_key(gw)["key"])
    whole = client.chat.completions.create(model="sim", messages=HI, max_tokens=20)
    chunks = list(client.chat.completions.create(model="sim", messages=HI, max_tokens=20,
                                                 stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20
    raw = httpx.post(gw.url + "/v1/chat/completions", headers=_auth(client.api_key),
                     json={"model": "sim", "messages": HI, "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_completions_plain_and_streamed(gw):
    client = oai(gw, new_key(gw)["key"])
    r = client.completions.create(model="sim", prompt="abc", max_tokens=5)
    assert r.object == "text_completion" and len(r.choices[0].text) == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="sim", prompt="abc", max_tokens=5, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_model_selects_the_device(gw):
    key = new_key(gw)
    r = oai(gw, key["key"]).chat.completions.create(model=SLOW, messages=HI, max_tokens=2)
    assert r.model == SLOW


def test_embeddings_float_and_base64(gw):
    client = oai(gw, new_key(gw)["key"])
    b64 = client.embeddings.create(model="sim", input=["red", "blue"])  # the SDK asks base64
    flt = client.embeddings.create(model="sim", input="red", encoding_format="float")
    assert len(b64.data) == 2 and [d.index for d in b64.data] == [0, 1]
    assert b64.data[0].embedding == pytest.approx(flt.data[0].embedding, abs=1e-6)
    assert len(flt.data[0].embedding) > 0 and b64.usage.prompt_tokens > 0


# --- keys --------------------------------------------------------------------------------


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_missing_unknown_and_revoked_keys_are_401(gw):
    body = {"model": "sim", "messages": HI, "max_tokens": 1}
    url = gw.url + "/v1/chat/completions"
    assert _error(httpx.post(url, json=body), 401)["type"] == "authentication_error"
    _error(httpx.post(url, json=body, headers={"Authorization": "Basic abc"}), 401)
    with pytest.raises(openai.AuthenticationError):
        oai(gw, "sk-llmos-not-a-key").models.list()
    key = new_key(gw)
    client = oai(gw, key["key"])
    client.chat.completions.create(**body)
    with gw.client() as c:
        c.key.revoke(key["name"])
    with pytest.raises(openai.AuthenticationError):  # at once, not at some later sweep
        client.chat.completions.create(**body)
    wait_for(lambda: key["pid"] not in {r["pid"] for r in gw.client().proc.ps()})
    killed = new_key(gw)  # a key lives as long as its process
    with gw.client() as c:
        c.proc.kill(killed["pid"], "SIGKILL")
        assert killed["name"] not in {k["name"] for k in c.key.list()}
    with pytest.raises(openai.AuthenticationError):
        oai(gw, killed["key"]).models.list()


def test_key_list_shows_no_key_and_needs_key_admin(gw):
    key = new_key(gw, name="listed", limits={"tokens": 1000}, nice=3)
    with gw.client() as c:
        rows = {k["name"]: k for k in c.key.list()}
        assert rows["listed"]["pid"] == key["pid"] and rows["listed"]["nice"] == 3
        assert rows["listed"]["limits"] == {"tokens": 1000}
        assert key["key"] not in json.dumps(rows)  # shown once only
        with pytest.raises(llmagentos.KernelError) as e:
            c.key.create("listed", None, 0, None, None)
        assert e.value.name == "EEXIST"
        with pytest.raises(llmagentos.KernelError) as e:
            c.key.create("bad\x00name", None, 0, None, None)
        assert e.value.name == "EINVAL"
        with pytest.raises(llmagentos.KernelError) as e:
            c.key.revoke("no-such-key")
        assert e.value.name == "ENOENT"
        child = c.proc.attach("not-an-admin")
    with llmagentos.connect(token=child["token"], run_dir=gw.run_dir) as cc:
        for call in (lambda: cc.key.create("x", None, 0, None, None), cc.key.list,
                     lambda: cc.key.revoke("listed")):
            with pytest.raises(llmagentos.KernelError) as e:
                call()
            assert e.value.name == "EACCES"


def test_a_key_cannot_hold_more_than_its_creator(gw):
    with gw.client() as c:
        child = c.proc.attach("small-admin", ["llm", "key.admin"], {"tokens": 100})
    with llmagentos.connect(token=child["token"], run_dir=gw.run_dir) as cc:
        for caps, nice, limits in ((["fs.write"], 0, None), (None, 0, {"tokens": 10**6}),
                                   (None, -5, None)):
            with pytest.raises(llmagentos.KernelError) as e:
                cc.key.create("too-big", caps, nice, limits, None)
            assert e.value.name == "EACCES", e.value
        ok = cc.key.create("small-key", ["llm"], 0, None, None)
    assert row(gw, ok["pid"])["ppid"] == 1
    with gw.client() as c:
        assert c.proc.stat(ok["pid"])["limits"] == {"tokens": 100}


def test_token_quota_is_429_and_usage_shows_in_ps(gw):
    key = new_key(gw, limits={"tokens": 60})
    client = oai(gw, key["key"])
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(20):
            client.completions.create(model="sim", prompt="abc", max_tokens=10)
    assert e.value.status_code == 429 and e.value.body["code"] == "insufficient_quota"
    p = row(gw, key["pid"])
    assert 50 <= p["tokens_in"] + p["tokens_out"] <= 60
    with pytest.raises(openai.RateLimitError):  # streamed: the same answer, before any event
        list(client.chat.completions.create(model="sim", messages=HI, stream=True))


def test_unknown_model_is_404(gw):
    client = oai(gw, new_key(gw)["key"])
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nothing", messages=HI)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-nothing", input="x")
    with pytest.raises(openai.NotFoundError):
        list(client.chat.completions.create(model="gpt-nothing", messages=HI, stream=True))
    _error(httpx.get(gw.url + "/v1/nothing-here"), 404)


def test_capabilities_apply(gw):
    key = new_key(gw, caps=["ctx"])  # no llm
    with pytest.raises(openai.PermissionDeniedError) as e:
        oai(gw, key["key"]).chat.completions.create(model="sim", messages=HI)
    assert "llm" in e.value.body["message"]


def test_context_header_keeps_the_conversation(gw):
    key = new_key(gw, name="conversing")
    client = oai(gw, key["key"])
    h = {"X-LLMOS-Context": "conv-1"}
    first = client.chat.completions.create(model="sim", messages=HI, max_tokens=4,
                                           extra_headers=h)
    history = HI + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "Again."}]
    client.chat.completions.create(model="sim", messages=history, max_tokens=4,
                                   extra_headers=h)
    with gw.client() as c:
        cid = next(x["id"] for x in c.ctx.list() if x["name"] == "conv-1")
        msgs = c.ctx.read(0, None, True, cid)
        audited = c.sys.audit(key["pid"], "ctx.open", None, None, 10)
    # each turn once, though the client sent the whole history the second time
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert len(audited) == 2  # state-changing calls are audited as the key's process


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"model": "sim", "messages": "hi"}, "messages"),
    ({"model": "sim", "messages": []}, "messages"),
    ({"model": "sim", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "sim", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "sim", "messages": HI, "temperature": "hot"}, "temperature"),
    ({"model": "sim", "messages": HI, "temperature": 7}, "temperature"),
    ({"model": "sim", "messages": HI, "max_tokens": "many"}, "max_tokens"),
    ({"model": "sim", "messages": HI, "max_tokens": True}, "max_tokens"),
    ({"model": "sim", "messages": HI, "stream": "yes"}, "stream"),
    ({"model": "sim", "messages": HI, "stop": [1]}, "stop"),
    ({"model": "sim", "messages": HI, "n": 3}, "n"),
    ({"model": 7, "messages": HI}, "model"),
    ({"messages": HI}, "model"),
    ({"model": "sim", "messages": HI, "tools": [{"type": "function"}]}, "tools[0]"),
    ({"model": "sim", "messages": HI, "response_format": {"type": "yaml"}}, "response_format"),
    ({"model": "sim", "messages": HI, "tool_choice": "required"}, "tool_choice"),
])
def test_wrong_types_are_400_naming_the_field(gw, body, param):
    key = new_key(gw) if not hasattr(gw, "k400") else gw.k400
    gw.k400 = key
    err = _error(httpx.post(gw.url + "/v1/chat/completions", headers=_auth(key["key"]),
                            json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_fields(gw):
    key = new_key(gw)
    url = gw.url + "/v1/chat/completions"
    for raw in (b"{", b"[1, 2]", b"\xff\xfe", b"", b"[" * 100_000, b'{"temperature": NaN}'):
        _error(httpx.post(url, headers=_auth(key["key"]), content=raw), 400)
    # fields OpenAI's own service uses and this one does not: ignored, as OpenAI ignores them
    r = httpx.post(url, headers=_auth(key["key"]), json={
        "model": "sim", "messages": HI, "max_tokens": 2, "user": "u-1", "store": False,
        "metadata": {"a": "b"}, "service_tier": "auto", "parallel_tool_calls": True,
        "some_future_field": {"x": 1}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_a_tool_schema_too_big_for_the_grammar_is_400_not_a_crash(gw):
    key = new_key(gw)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "minItems": 10**8}}}}}]
    err = _error(httpx.post(gw.url + "/v1/chat/completions", headers=_auth(key["key"]),
                            json={"model": "sim", "messages": HI, "tools": tools}), 400)
    assert "minItems" in err["message"]
    assert httpx.get(gw.url + "/health").status_code == 200


def _kernel_rss(k) -> int:
    return psutil.Process(k.proc.pid).memory_info().rss


def _http_answer(s: socket.socket) -> bytes:
    """One HTTP answer off a raw socket: the head, then Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data and (part := s.recv(65536)):
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1)) \
        if re.search(rb"(?im)^content-length:", head) else 0
    while len(body) < length and (part := s.recv(65536)):
        body += part
    return head + b"\r\n\r\n" + body


def test_a_100_mb_body_is_413_and_is_not_kept(gw):
    key = new_key(gw)["key"]
    host, port = gw.url.removeprefix("http://").split(":")
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\n")
    # Announced: refused before a byte of it is read.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall((head + "Content-Length: 100000000\r\n\r\n").encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 413")
    # Streamed without a length: read up to the bound, then refused and closed.
    rss = _kernel_rss(gw)
    sent, answer = 0, b""
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
        try:
            while sent < 100_000_000:
                if select.select([s], [], [], 0)[0]:
                    break
                s.sendall(chunk)
                sent += 0x10000
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the kernel while we were still sending: its answer came first
        try:  # the whole answer: its head and body may come in separate segments
            answer = _http_answer(s)
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request_too_large" in answer
    assert sent < 60_000_000  # the kernel stopped reading at its bound (16 MiB)
    assert _kernel_rss(gw) - rss < 48 << 20


def test_client_leaving_mid_stream_cancels_the_generation(gw):
    key = new_key(gw)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=_auth(key["key"]),
                      json={"model": SLOW, "messages": HI, "max_tokens": 1500, "stream": True},
                      timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = []
        for ln in lines:
            if ln.startswith("data:"):
                got.append(ln)
            if len(got) >= 4:
                break
        with gw.client() as c:
            assert c.proc.stat(key["pid"])["state"] == "WAITING"
    # the connection is closed: the request ends, and the device's slot comes back

    def settled():
        with gw.client() as c:
            dev = next(m for m in c.llm.models() if m["name"] == SLOW)["device"]
            return dev["running"] == 0 and dev["queue_length"] == 0 \
                and c.proc.stat(key["pid"])["state"] == "READY"
    wait_for(settled, timeout=10)
    out = row(gw, key["pid"])["tokens_out"]
    time.sleep(0.3)
    assert row(gw, key["pid"])["tokens_out"] == out < 1500


def test_a_non_streamed_request_is_cancelled_too(gw):
    key = new_key(gw)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/completions", headers=_auth(key["key"]), timeout=0.5,
                   json={"model": SLOW, "prompt": "abc", "max_tokens": 1500})

    def settled():
        with gw.client() as c:
            dev = next(m for m in c.llm.models() if m["name"] == SLOW)["device"]
            return dev["running"] == 0 and c.proc.stat(key["pid"])["state"] == "READY"
    wait_for(settled, timeout=10)
    assert row(gw, key["pid"])["tokens_out"] < 1500


# --- scheduling ---------------------------------------------------------------------------


def test_two_keys_are_served_in_nice_order(gw):
    """nice -10 and nice 10 keys streaming at once on one slot: the priority policy
    gives syscall clients ~87x the share at -10; here, clearly more."""
    lo, hi = new_key(gw, nice=-10), new_key(gw, nice=10)
    n = 300
    counts = {lo["pid"]: 0, hi["pid"]: 0}
    at_lo_done: dict = {}
    start = threading.Barrier(2)

    def run(key: dict) -> None:
        client = oai(gw, key["key"])
        start.wait()
        if key is lo:
            time.sleep(0.2)  # the nice 10 key holds the slot first
        for ch in client.chat.completions.create(model=SLOW, messages=HI, max_tokens=n,
                                                 stream=True):
            if ch.choices and ch.choices[0].delta.content:
                counts[key["pid"]] += len(ch.choices[0].delta.content)
        if key is lo:
            at_lo_done.update(counts)

    threads = [threading.Thread(target=run, args=(k,)) for k in (hi, lo)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert at_lo_done[lo["pid"]] == n
    assert at_lo_done[hi["pid"]] * 2 < n, at_lo_done  # served far less meanwhile


# --- boot and restarts --------------------------------------------------------------------


def test_http_refuses_a_public_address_without_insecure(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmagentos.kernel", "--run-dir",
                        str(tmp_path / "r"), "--state-dir", str(tmp_path / "s"), "--model",
                        "none", "--http", "0.0.0.0:0"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "--http-insecure" in r.stderr
    from llmagentos.syscalls import bootopts
    for bad in ("127.0.0.1", "127.0.0.1:99999", ":80", "127.0.0.1:-1", "10.0.0.1:80"):
        with pytest.raises(bootopts.ConfigError, match="--http"):
            bootopts.load({"http": bad})
    assert bootopts.load({"http": "0.0.0.0:80", "http_insecure": True}).http == "0.0.0.0:80"
    assert bootopts.load({"http": "[::1]:0"}).http == "[::1]:0"


def test_keys_survive_a_kernel_restart(tmp_path):
    k = boot_kernel(tmp_path, "--http", "127.0.0.1:0", model="sim")
    try:
        k.url = http_url(k)
        kept, gone = new_key(k, name="kept", limits={"tokens": 100}), new_key(k, name="gone")
        oai(k, kept["key"]).completions.create(model="sim", prompt="abc", max_tokens=40)
        with k.client() as c:
            c.key.revoke("gone")
    finally:
        k.stop()
    k = boot_kernel(tmp_path, "--http", "127.0.0.1:0", model="sim")
    try:
        k.url = http_url(k)
        with k.client() as c:
            rows = {r["name"]: r for r in c.key.list()}
        assert set(rows) == {"kept"} and rows["kept"]["tokens_out"] == 40
        p = row(k, rows["kept"]["pid"])
        assert p["name"] == "kept" and p["tokens_out"] == 40  # the quota is the key's life
        client = oai(k, kept["key"])
        with pytest.raises(openai.RateLimitError):
            for _ in range(3):  # 100 tokens in all: the last one gets what is left, then 429
                client.completions.create(model="sim", prompt="abc", max_tokens=40)
        assert sum(row(k, rows["kept"]["pid"])[t] for t in ("tokens_in", "tokens_out")) <= 100
        with pytest.raises(openai.AuthenticationError):
            oai(k, gone["key"]).models.list()
        stored = (tmp_path / "state" / "keys.db").read_bytes()
        assert kept["key"][12:].encode() not in stored  # a hash and the first characters only
    finally:
        k.stop()


def test_key_cli(gw):
    env = gw.env()

    def llmos(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmagentos.cli", *args], env=env,
                              capture_output=True, text=True, timeout=30)

    r = llmos("key", "create", "cli-key", "--nice", "5", "--limit", "tokens=500",
              "--cap", "llm")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("sk-llmos-") and "shown this once" in r.stderr
    assert oai(gw, key).models.list().data
    ls = json.loads(llmos("key", "ls", "--json").stdout)
    mine = next(x for x in ls if x["name"] == "cli-key")
    assert mine["nice"] == 5 and mine["limits"] == {"tokens": 500} and mine["caps"] == ["llm"]
    assert "cli-key" in llmos("ps").stdout
    assert f"http {gw.url}" in llmos("status").stdout
    assert llmos("key", "revoke", "cli-key").returncode == 0
    with pytest.raises(openai.AuthenticationError):
        oai(gw, key).models.list()
    assert llmos("key", "create", "x", "--limit", "tokens").returncode == 2


# --- the real model: what the grammar guarantees ----------------------------------------------

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string"},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "description": "The weather forecast for a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add",
                                           "description": "Add two integers.",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "integer"},
                                               "b": {"type": "integer"}},
                                               "required": ["a", "b"]}}}]


@pytest.fixture(scope="module")
def gw_model(tmp_path_factory):
    k = boot_kernel(tmp_path_factory.mktemp("gwm"), "--slots", "2", "--n-ctx", "1024",
                    "--http", "127.0.0.1:0", model="gemma3-270m")
    k.url = http_url(k)
    k.key = new_key(k)["key"]
    yield k
    k.stop()


@pytest.mark.model
def test_tool_calls_follow_the_tools_schema(gw_model):
    choice = "required"  # one of the tools, whose arguments follow its own schema
    r = oai(gw_model, gw_model.key).chat.completions.create(
        model="gemma3-270m", tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": "What is the weather in Paris for 3 days?"}])
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])


@pytest.mark.model
def test_tool_results_go_back_and_auto_may_answer_in_text(gw_model):
    client = oai(gw_model, gw_model.key)
    msgs = [{"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model="gemma3-270m", tools=TOOLS, messages=msgs,
                                       temperature=0, max_tokens=30)
    m = r.choices[0].message
    if m.tool_calls:  # auto: a call, valid as ever ...
        jsonschema.validate(json.loads(m.tool_calls[0].function.arguments),
                            {t["function"]["name"]: t["function"]["parameters"]
                             for t in TOOLS}[m.tool_calls[0].function.name])
    else:  # ... or text, which the grammar keeps from opening like a call
        assert m.content and not m.content.startswith("{")
    streamed = list(client.chat.completions.create(
        model="gemma3-270m", tools=TOOLS, stream=True, temperature=0, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "add"}},
        messages=[{"role": "user", "content": "Add 4 and 9."}]))
    calls = [tc for ch in streamed if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "add"
    jsonschema.validate(json.loads(calls[0].function.arguments), TOOLS[1]["function"]["parameters"])
    assert [ch.choices[0].finish_reason for ch in streamed if ch.choices][-1] == "tool_calls"


@pytest.mark.model
def test_response_format_json_schema(gw_model):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    client = oai(gw_model, gw_model.key)
    r = client.chat.completions.create(
        model="gemma3-270m", temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


@pytest.mark.model
def test_embeddings_on_the_real_model(gw_model):
    client = oai(gw_model, gw_model.key)
    r = client.embeddings.create(model="gemma3-270m",
                                 input=["a cat sat", "a kitten sat", "tax law"])
    v = [d.embedding for d in r.data]
    assert len(v) == 3 and len(v[0]) == 640 and r.usage.prompt_tokens > 3

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / (
            sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)
    assert cos(v[0], v[1]) > cos(v[0], v[2])


def test_no_key_file_or_secret_left_readable(gw):
    mode = os.stat(gw.state_dir / "keys.db").st_mode & 0o777
    assert mode == 0o600


# --- the other faces on the same port: Prometheus and MCP --------------------------------


def test_metrics_are_scraped_without_a_key(gw):
    from prometheus_client.parser import text_string_to_metric_families

    key = new_key(gw)
    oai(gw, key["key"]).chat.completions.create(model="sim", messages=HI, max_tokens=5)
    r = httpx.get(gw.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    out = {s.labels["pid"]: s.value for s in families["llmos_process_tokens_out"].samples
           if s.name.endswith("_total")}
    assert out[str(key["pid"])] == row(gw, key["pid"])["tokens_out"] > 0


async def test_a_gateway_key_is_an_mcp_server_over_stdio_and_on_the_gateway(gw):
    """`llmos mcp serve --key KEY` and POST /mcp take the same API key as /v1: the
    key's process calls the tools; an MCP session ending does not end the key."""
    from mcp import Client, StdioServerParameters
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    key = new_key(gw, caps=["llm", "tool:calc.*", "fs.read"])
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "llmagentos.cli", "mcp", "serve"],
                                   env={"LLMAGENTOS_RUN_DIR": str(gw.run_dir),
                                        "LLMAGENTOS_KEY": key["key"]})
    async with Client(params) as mcp:
        names = {t.name for t in (await mcp.list_tools()).tools}
        assert "calc.eval" in names and "fs_read" in names and "fs_write" not in names
        res = await mcp.call_tool("calc.eval", {"expression": "6 * 7"})
        assert not res.is_error and res.structured_content["value"] == 42
        res = await mcp.call_tool("fs_write", {"path": "x", "text": "y"})
        assert res.is_error
    time.sleep(0.3)  # the server's connection has closed
    assert row(gw, key["pid"])["state"] != "ZOMBIE"  # the key outlives its MCP session
    answer = oai(gw, key["key"]).chat.completions.create(model="sim", messages=HI,
                                                         max_tokens=3)
    assert answer.usage.completion_tokens == 3

    http = create_mcp_http_client(headers={"Authorization": f"Bearer {key['key']}"})
    async with http, Client(streamable_http_client(gw.url + "/mcp", http_client=http)) as mcp:
        res = await mcp.call_tool("calc.eval", {"expression": "2 ** 10"})
        assert not res.is_error and res.structured_content["value"] == 1024
    async with httpx.AsyncClient() as raw:
        r = await raw.post(gw.url + "/mcp", json={"jsonrpc": "2.0", "id": 1,
                                                  "method": "tools/list"},
                           headers={"accept": "application/json, text/event-stream"})
        assert r.status_code == 401
