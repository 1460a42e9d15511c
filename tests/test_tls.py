"""The TLS listener (`--listen HOST:PORT`): the same calls from another machine,
the kernel's identity proved by a CA made in its state dir, the token sent only
inside the encrypted channel, and whoever cannot speak TLS to it (plain text,
a wrong CA, garbage) turned away before any syscall without holding up the rest."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time

import pytest
import trio
from conftest import PY, boot_kernel, wait_for
from cryptography import x509

import llmagentos
from llmagentos.kernel import __main__ as kernel_main
from llmagentos.kernel import tls
from llmagentos.kernel.services import BootError
from llmagentos.syscalls import wire

LLMOS = [PY, "-m", "llmagentos.cli"]


@pytest.fixture(scope="module")
def tls_kernel(tmp_path_factory):
    k = boot_kernel(tmp_path_factory.mktemp("tls"), "--listen", "127.0.0.1:0")
    yield k
    k.stop()


def address(k) -> str:
    return (k.run_dir / "tls").read_text().strip()


def ca(k) -> str:
    return str(k.state_dir / "tls" / "ca.pem")


def counters(k) -> dict:
    with k.client() as c:
        return c.sys.stats()["counters"]


def test_a_tls_client_makes_syscalls(tls_kernel):
    k = tls_kernel
    addr = address(k)
    assert addr.startswith("tls://127.0.0.1:")
    with llmagentos.connect(addr, k.token, ca=ca(k)) as c:
        assert c.proc.getpid() == 1
        info = c.sys.uname()
        assert info["tls"] == addr and info["tls_ca"] == ca(k)
        assert c._sock.version() in ("TLSv1.2", "TLSv1.3")
        child = c.proc.spawn(["true"])
        assert c.proc.wait(child)["exit_code"] == 0

    async def with_trio() -> int:
        async with llmagentos.aconnect(addr, k.token, ca=ca(k)) as ac:
            return await ac.proc.getpid()
    assert trio.run(with_trio) == 1


def test_the_environment_names_a_tls_kernel(tls_kernel, monkeypatch):
    k = tls_kernel
    monkeypatch.setenv("LLMAGENTOS_ADDRESS", address(k))
    monkeypatch.setenv("LLMAGENTOS_CA", ca(k))
    monkeypatch.setenv("LLMAGENTOS_TOKEN", k.token)
    monkeypatch.delenv("LLMAGENTOS_SOCKET", raising=False)
    with llmagentos.connect() as c:
        assert c.address.kind == "tls" and c.proc.getpid() == 1


def test_the_server_certificate_names_the_machine(tls_kernel):
    cert = x509.load_pem_x509_certificate((tls_kernel.state_dir / "tls/server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName))
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    assert {"localhost", socket.gethostname().lower()} <= names
    assert {"127.0.0.1", "::1"} <= ips
    assert {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)} <= ips | names
    d = tls_kernel.state_dir / "tls"
    assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    for key in ("ca.key", "server.key"):
        assert oct(os.stat(d / key).st_mode & 0o777) == "0o600"


def test_plain_text_is_refused_before_any_syscall(tls_kernel):
    k = tls_kernel
    host, port = address(k)[len("tls://"):].rsplit(":", 1)
    watch = k.client()
    before = watch.sys.stats()["counters"]["syscalls"]
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(wire.encode_request(1, "sys.hello", [k.token], {}))
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    dec = wire.Decoder(1 << 20)
    dec.feed(got)
    (msg,) = list(dec.messages())  # told why, and never answered
    assert isinstance(msg, wire.Notification) and msg.method == "sys.close"
    assert "TLS only" in msg.args[0]
    # Our own client pointed at it in clear gets the reason as an error.
    with pytest.raises(ConnectionResetError, match="TLS only"):
        llmagentos.connect(f"tcp://{host}:{port}", k.token, timeout=10)
    assert watch.sys.stats()["counters"]["syscalls"] == before + 1  # only that stats call
    watch.close()
    wait_for(lambda: "speaks plain text; refused" in k.log.read_text())
    assert k.proc.poll() is None


def test_a_wrong_ca_is_refused(tls_kernel, tmp_path):
    k = tls_kernel
    other = tls.credentials(tmp_path, "127.0.0.1")  # another kernel's CA
    watch = k.client()
    before = watch.sys.stats()["counters"]["syscalls"]
    with pytest.raises(PermissionError, match="not who it claims"):
        llmagentos.connect(address(k), k.token, ca=str(other.ca))
    with pytest.raises(PermissionError, match="not who it claims"):  # nor the system's CAs
        llmagentos.connect(address(k), k.token, ca="")

    async def with_trio() -> None:
        async with llmagentos.aconnect(address(k), k.token, ca=str(other.ca)):
            pass
    with pytest.raises(PermissionError):
        trio.run(with_trio)
    assert watch.sys.stats()["counters"]["syscalls"] == before + 1
    watch.close()
    wait_for(lambda: "unknown ca" in k.log.read_text().lower())
    with pytest.raises(FileNotFoundError, match="no CA file"):
        llmagentos.connect(address(k), k.token, ca=str(tmp_path / "missing.pem"))


def test_a_wrong_token_is_refused(tls_kernel):
    k = tls_kernel
    with pytest.raises(PermissionError, match="bad or expired token"):
        llmagentos.connect(address(k), "not-the-token", ca=ca(k))
    host, port = address(k)[len("tls://"):].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=ca(k))
    with ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10),
                         server_hostname=host) as s:  # a call before sys.hello
        s.sendall(wire.encode_request(1, "sys.null", [], {}))
        dec = wire.Decoder(1 << 20)
        dec.feed(s.recv(65536))
        (resp,) = list(dec.messages())
        assert resp.error["name"] == "EPERM"


def test_garbage_clients_do_not_hold_up_the_others(tls_kernel):
    k = tls_kernel
    host, port = address(k)[len("tls://"):].rsplit(":", 1)
    refused = counters(k).get("tls_refused", 0)
    junk = []
    for i in range(8):
        s = socket.create_connection((host, int(port)), timeout=10)
        if i % 4 == 1:
            s.sendall(os.urandom(4096))
        elif i % 4 == 2:
            s.sendall(b"\x16\x03\x01\xff\xff")  # a handshake record that never arrives
        elif i % 4 == 3:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        junk.append(s)  # i % 4 == 0: says nothing at all
    try:
        t0 = time.monotonic()
        with llmagentos.connect(address(k), k.token, ca=ca(k), timeout=20) as c:
            for _ in range(200):
                c.sys.null()
        with k.client() as c:  # the Unix socket too
            assert c.proc.getpid() == 1
        assert time.monotonic() - t0 < 20  # generous: nothing waited for the junk
    finally:
        for s in junk:
            s.close()
    wait_for(lambda: counters(k)["tls_refused"] == refused + 8)  # each one, once
    assert k.proc.poll() is None


def test_certificates_are_reused_across_a_reboot(tmp_path):
    k = boot_kernel(tmp_path, "--listen", "127.0.0.1:0")
    d = k.state_dir / "tls"
    first = {n: (d / n).read_bytes() for n in ("ca.pem", "ca.key", "server.pem", "server.key")}
    k.stop()
    saved_ca = tmp_path / "handed-out-ca.pem"  # what a remote node was given
    saved_ca.write_bytes(first["ca.pem"])
    k = boot_kernel(tmp_path, "--listen", "127.0.0.1:0")
    try:
        assert {n: (d / n).read_bytes() for n in first} == first
        with llmagentos.connect(address(k), k.token, ca=str(saved_ca)) as c:
            assert c.proc.getpid() == 1
    finally:
        k.stop()
    # A host the certificate does not name yet: a new server certificate from the
    # same CA, so the CA file handed out keeps working.
    k = boot_kernel(tmp_path, "--listen", "127.0.0.2:0")
    try:
        assert (d / "ca.pem").read_bytes() == first["ca.pem"]
        assert (d / "server.pem").read_bytes() != first["server.pem"]
        assert address(k).startswith("tls://127.0.0.2:")
        with llmagentos.connect(address(k), k.token, ca=str(saved_ca)) as c:
            assert c.proc.getpid() == 1
    finally:
        k.stop()


def test_bring_your_own_certificate(tmp_path):
    own = tls.credentials(tmp_path / "own", "127.0.0.1")
    k = boot_kernel(tmp_path, "--listen", "127.0.0.1:0", "--tls-cert", str(own.cert),
                    "--tls-key", str(own.key))
    try:
        assert not (k.state_dir / "tls").exists()
        with llmagentos.connect(address(k), k.token, ca=str(own.ca)) as c:
            assert c.sys.uname()["tls_ca"] is None
        with pytest.raises(PermissionError):  # the CA it would have made is not it
            llmagentos.connect(address(k), k.token, ca="")
    finally:
        k.stop()


@pytest.mark.parametrize("flags,says", [
    (["--tcp", "127.0.0.1:abc"], "HOST:PORT"),  # was a traceback from int() at boot
    (["--tcp", "127.0.0.1:70000"], "HOST:PORT"),
    (["--listen", "0.0.0.0"], "HOST:PORT"),
    (["--listen", ":7443"], "HOST:PORT"),
    (["--listen", "127.0.0.1:0", "--tls-cert", "c.pem"], "give both"),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "give --listen"),
])
def test_bad_listener_options_are_usage_errors(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit) as e:
        kernel_main.parse_args(["--run-dir", str(tmp_path), "--model", "none", *flags])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_an_unusable_certificate_is_a_boot_error(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(BootError, match="cannot serve TLS"):
        tls.server_context(tls.Credentials(bad, bad, None))


def test_the_client_never_sends_a_token_in_clear_off_this_machine():
    for addr in ("tcp://10.1.2.3:7000", "tcp://example.org:7000", "tcp://[2001:db8::1]:7000"):
        with pytest.raises(ValueError, match="in clear"):
            llmagentos.connect(addr, "secret", timeout=1)
    for addr in ("tls://host", "tls://:80", "tls://host:99999", "tcp://host:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            llmagentos.connect(addr, "secret", timeout=1)


def test_spawned_processes_call_their_own_kernel(tmp_path):
    """LLMAGENTOS_ADDRESS set where the kernel was booted names some other kernel
    for the shell; the kernel's own processes still find it by LLMAGENTOS_SOCKET."""
    env = dict(os.environ, LLMAGENTOS_ADDRESS="tls://127.0.0.1:9", LLMAGENTOS_CA="/nowhere")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        k = boot_kernel(tmp_path)
    finally:
        for key, v in old.items():
            if v is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = v
    try:
        with k.client() as c:
            pid = c.proc.spawn([PY, "-c", "import llmagentos; "
                                "print(llmagentos.connect().proc.getpid())"])
            assert c.proc.wait(pid)["exit_code"] == 0
            assert c.proc.logs(pid)["data"].strip() == str(pid).encode()
    finally:
        k.stop()


def test_llmos_join_says_what_a_remote_node_needs(tls_kernel):
    env = tls_kernel.env()
    r = subprocess.run([*LLMOS, "join"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert f"LLMAGENTOS_ADDRESS={address(tls_kernel)}" in r.stdout
    assert (tls_kernel.state_dir / "tls/ca.pem").read_text().strip() in r.stdout
    assert "LLMAGENTOS_CA=" in r.stdout and "LLMAGENTOS_TOKEN=" in r.stdout
    assert tls_kernel.token not in r.stdout  # how to fetch it, never the secret itself
    r = subprocess.run([*LLMOS, "join", "--json"], env=env, capture_output=True, text=True,
                       timeout=30)
    assert json.loads(r.stdout)["address"] == address(tls_kernel)


def test_llmos_join_without_a_listener(kernel):
    r = subprocess.run([*LLMOS, "join"], env=kernel.env(), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "--listen" in r.stderr


async def test_a_silent_client_is_dropped_at_the_handshake_deadline(tmp_path, monkeypatch,
                                                                     nursery):
    """In process, with the deadline shortened: a peer that opens the TLS port and
    says nothing is closed by the kernel instead of holding its place for ever."""
    from collections import Counter
    from types import SimpleNamespace

    from llmagentos.kernel import server

    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 0.5)
    ctx = tls.server_context(tls.credentials(tmp_path, "127.0.0.1"))
    services = SimpleNamespace(
        stats=Counter(), connections=set(), tools=SimpleNamespace(drop_conn=lambda c: None),
        config=SimpleNamespace(max_connections=8, max_unauthenticated=8, max_frame=1 << 20))
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(server.serve_listener, services, listener, ctx)
    peer = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
    with trio.fail_after(10):  # generous: the deadline is half a second
        assert await peer.receive_some(1024) == b""  # closed by the kernel
        while services.connections:  # and forgotten
            await trio.sleep(0.01)
    assert services.stats["tls_refused"] == 1
    await peer.aclose()
