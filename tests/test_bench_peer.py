"""`make bench-peer`'s harness: the peer's build is skipped with a clear message
when it cannot happen, the sdist is unpacked safely, and agent processes that
fail are reported rather than waited on."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import boot_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import _kernel  # noqa: E402
import bench_peer  # noqa: E402
import peer_server  # noqa: E402


def make_sdist(path: Path, files: dict[str, bytes], top: str = "llama_cpp_python-9.9.9") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_only_vendored_llama_cpp_is_unpacked(tmp_path):
    sdist = make_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", {
        "CMakeLists.txt": b"the binding's",
        "vendor/llama.cpp/CMakeLists.txt": b"llama.cpp's",
        "vendor/llama.cpp/tools/server/server.cpp": b"int main() {}",
    })
    src = peer_server.extract_llama_cpp(sdist, tmp_path / "src")
    assert (src / "CMakeLists.txt").read_bytes() == b"llama.cpp's"
    assert (src / "tools/server/server.cpp").exists()
    assert not (tmp_path / "src.part").exists()


def test_an_sdist_escaping_its_folder_is_refused(tmp_path):
    sdist = make_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", {
        "vendor/llama.cpp/CMakeLists.txt": b"x",
        "vendor/llama.cpp/../../../../escaped": b"y",
    })
    with pytest.raises(peer_server.BuildSkipped, match="cannot unpack"):
        peer_server.extract_llama_cpp(sdist, tmp_path / "out" / "src")
    assert not list(tmp_path.rglob("escaped"))
    assert not (tmp_path / "out" / "src").exists()


def test_an_sdist_without_llama_cpp_is_a_skip(tmp_path):
    sdist = make_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", {"README.md": b"no"})
    with pytest.raises(peer_server.BuildSkipped, match="holds no vendor/llama.cpp"):
        peer_server.extract_llama_cpp(sdist, tmp_path / "src")


def test_bench_skips_with_a_message_when_it_cannot_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peer_server, "CACHE", tmp_path / "cache")  # nothing built there
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, ninja or compiler
    assert bench_peer.run() is None
    out = capsys.readouterr().out
    assert "bench-peer skipped" in out and "cmake is not installed" in out
    assert bench_peer.main([]) == 0


def test_a_server_that_exits_at_once_is_an_error_not_a_wait(tmp_path):
    with pytest.raises(RuntimeError, match="llama-server exited"):
        peer_server.PeerServer(Path("/bin/false"), tmp_path / "model.gguf", wait=30)


def test_an_agent_that_fails_is_reported_with_its_output(tmp_path):
    k = boot_kernel(tmp_path)  # no compute device: llm.generate is ENOSYS
    try:
        c = k.client()
        with pytest.raises(RuntimeError, match="ENOSYS"):
            _kernel.run_agents(c, [(["hello"], {"max_tokens": 2})] * 2, timeout=60)
    finally:
        k.stop()
