"""llama.cpp's own `llama-server`, built from the source vendored in the
llama-cpp-python sdist of the installed version, and run as a peer.

The build is cached under `.cache/llama-server/<version>/` in the project
root and happens once; `build()` returns None, with the reason in
`BuildSkipped`, when the sdist cannot be fetched or the build fails, so a
bench can skip with a clear message instead of failing.

The CMake options follow what the wheel was built with (the sdist's
CMakeLists.txt: shared libraries, the common library, no curl; llama.cpp's
defaults otherwise, GGML_NATIVE among them), plus what a server alone needs:
no web UI to fetch or build, no HTTPS.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from _kernel import stop_process

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "llama-server"

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    # as the wheel: llama-cpp-python's CMakeLists.txt sets these
    "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=ON",  # llama.cpp's default, said out loud: -march=native as the wheel
    # the server alone
    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
]
BUILD_JOBS = 2


class BuildSkipped(Exception):
    """llama-server could not be fetched or built; the message says why."""


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama_cpp_python")


def binary_path(version: str | None = None) -> Path:
    return CACHE / (version or llama_cpp_version()) / "build" / "bin" / "llama-server"


def _run_logged(cmd: list[str], log: Path, timeout: float, what: str) -> None:
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise BuildSkipped(f"{what} took over {timeout:.0f}s (log: {log})") from None
        except FileNotFoundError as e:
            raise BuildSkipped(f"{what}: {e.filename} is not installed") from None
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise BuildSkipped(f"{what} failed (exit {rc}; log: {log}):\n    "
                           + "\n    ".join(tail))


def fetch_sdist(version: str, dest: Path) -> Path:
    """The llama-cpp-python sdist of ``version``, downloaded once by pip."""
    name = f"llama_cpp_python-{version}.tar.gz"
    if (dest / name).exists():
        return dest / name
    dest.mkdir(parents=True, exist_ok=True)
    _run_logged([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
                 "--no-deps", "--no-binary", ":all:", "-d", str(dest)],
                dest / "download.log", 900, "downloading the llama-cpp-python sdist")
    if not (dest / name).exists():
        raise BuildSkipped(f"pip downloaded no {name} into {dest}")
    return dest / name


def extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Unpack only vendor/llama.cpp of the sdist into ``dest`` (once)."""
    if (dest / "CMakeLists.txt").exists():
        return dest
    prefix = sdist.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    part = dest.with_name(dest.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            if not members:
                raise BuildSkipped(f"{sdist.name} holds no vendor/llama.cpp")
            # "data": nothing outside part, no links out of it, no device files
            tar.extractall(part, members=members, filter="data")
    except (OSError, tarfile.TarError) as e:
        shutil.rmtree(part, ignore_errors=True)
        raise BuildSkipped(f"cannot unpack {sdist}: {e}") from None
    part.rename(dest)  # whole or not at all: a killed extraction is redone
    return dest


def build(log=print) -> Path:
    """Path of a built llama-server; builds it the first time. BuildSkipped if it cannot."""
    version = llama_cpp_version()
    exe = binary_path(version)
    if exe.exists():
        return exe
    for tool in ("cmake", "ninja", "c++"):
        if shutil.which(tool) is None:
            raise BuildSkipped(f"{tool} is not installed")
    top = CACHE / version
    sdist = fetch_sdist(version, top / "sdist")
    src = extract_llama_cpp(sdist, top / "src")
    build_dir, blog = top / "build", top / "build.log"
    log(f"  building llama-server {version} from the sdist's llama.cpp "
        f"(once: about 18 CPU-minutes, longer on a busy machine; log: {blog})")
    t0 = time.monotonic()
    _run_logged(["cmake", "-S", str(src), "-B", str(build_dir), "-G", "Ninja", *CMAKE_FLAGS],
                blog, 600, "configuring llama.cpp")
    _run_logged(["nice", "-n", "19", "cmake", "--build", str(build_dir), "--target",
                 "llama-server", "-j", str(BUILD_JOBS)], blog, 3 * 3600, "building llama-server")
    if not exe.exists():
        raise BuildSkipped(f"the build finished without {exe}")
    log(f"  built in {time.monotonic() - t0:.0f}s")
    return exe


class PeerServer:
    """One llama-server process on a free loopback port, up until the context exits."""

    def __init__(self, exe: Path, model: Path, *args: str, wait: float = 120):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = Path(tempfile.mkdtemp(prefix="llmos-peer-")) / "server.log"
        self.log = open(self.log_path, "wb")
        self.argv = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port",
                     str(self.port), *args]
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            conn = self.connect(timeout=5)
            try:
                if conn.request_json("GET", "/health")[0] == 200:
                    break
            except (OSError, http.client.HTTPException, ValueError):
                pass  # not listening yet, or not answering while it loads the model
            finally:
                conn.close()
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"llama-server not ready after {wait:.0f}s "
                                   f"(log: {self.log_path})")
            time.sleep(0.1)

    def connect(self, timeout: float = 600) -> PeerConnection:
        return PeerConnection(self.port, timeout)

    def close(self) -> None:
        stop_process(self.proc, 15)
        self.log.close()

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PeerConnection:
    """One kept-alive HTTP connection to the server (one client)."""

    def __init__(self, port: int, timeout: float):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request_json(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data,
                          headers={"Content-Type": "application/json"} if data else {})
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")

    def completion(self, prompt: str, n_predict: int) -> dict:
        """Greedy, exactly n_predict tokens, no prompt cache: the same work every time."""
        status, out = self.request_json("POST", "/completion", {
            "prompt": prompt, "n_predict": n_predict, "temperature": 0, "ignore_eos": True,
            "cache_prompt": False})
        if status != 200:
            raise RuntimeError(f"llama-server /completion: HTTP {status}: {out}")
        return out

    def close(self) -> None:
        self.conn.close()


if __name__ == "__main__":  # build (or find) it and say where it is
    try:
        print(build())
    except BuildSkipped as e:
        print(f"llama-server skipped: {e}")
