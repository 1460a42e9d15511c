"""The fs sandbox: what an agent can do in its root, and the ways out it can't take.

Every escape test runs in a world with a secret outside the root; the
fixture proves at teardown that nothing outside the root and the writable
mount changed (names, bytes, modes), whatever the test did.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from llmagentos.drivers.sandbox import READ_MAX, Mount, Quota, Sandbox, parse_path, walk_tree
from llmagentos.syscalls.errno import SyscallError

SECRET = b"TOP SECRET: the kernel's signing key"


def errno_of(fn, *args, **kwargs) -> str:
    with pytest.raises(SyscallError) as info:
        fn(*args, **kwargs)
    return info.value.name


def snapshot(top: Path) -> dict:
    """Every name under top with its type, mode and content hash (no following)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = None
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            out[str(p.relative_to(top))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                            digest)
    return out


class World:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.root = tmp / "root"
        self.outside = tmp / "outside"
        self.secret = self.outside / "secret.txt"
        self.ro = tmp / "shared_ro"
        self.rw = tmp / "shared_rw"
        for d in (self.outside, self.outside / "dir", self.ro, self.rw):
            d.mkdir(parents=True)
        self.secret.write_bytes(SECRET)
        (self.outside / "dir" / "secret.txt").write_bytes(SECRET)
        (self.ro / "readme.txt").write_bytes(b"read me")
        self.sb = Sandbox(self.root, {"/shared": Mount(self.ro, writable=False),
                                      "/scratch": Mount(self.rw, writable=True)})
        self.passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
        self.before = self.outside_state()

    def outside_state(self) -> dict:
        top = {p.name for p in self.tmp.iterdir()}
        return {"top": top, "outside": snapshot(self.outside), "ro": snapshot(self.ro)}

    def check_untouched(self) -> None:
        assert self.outside_state() == self.before
        assert self.secret.read_bytes() == SECRET
        assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == self.passwd


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.sb.close_all()
    w.check_untouched()


# --- the ordinary life of a sandbox -----------------------------------------------

def test_write_read_roundtrip_and_persistence(world):
    sb = world.sb
    sb.mkdir("/notes")
    assert sb.write_file("/notes/a.txt", b"hello") == 5
    assert sb.read_file("notes/a.txt") == b"hello"
    assert (world.root / "notes" / "a.txt").read_bytes() == b"hello"
    # A new Sandbox on the same root (a kernel restart) sees the same files.
    again = Sandbox(world.root)
    assert again.read_file("/notes/a.txt") == b"hello"
    assert again.usage()["bytes"] == 5 and again.usage()["files"] == 2


def test_fd_modes(world):
    sb = world.sb
    fd = sb.open("/f.txt", "w")
    assert fd == 3
    sb.write(fd, b"abc")
    sb.write(fd, "déf")
    sb.close(fd)
    fd = sb.open("/f.txt", "ba")
    sb.write(fd, b"!")
    sb.close(fd)
    fd = sb.open("/f.txt", "r")
    assert sb.read(fd, 3) == b"abc"
    assert sb.read(fd) == "déf!".encode()
    assert sb.read(fd) == b""
    sb.seek(fd, 1)
    assert sb.read(fd, 2) == b"bc"
    sb.close(fd)
    fd = sb.open("/f.txt", "r+")
    sb.write(fd, b"X")
    sb.close(fd)
    assert sb.read_file("/f.txt") == "Xbcdéf!".encode()
    assert errno_of(sb.open, "/f.txt", "x") == "EEXIST"
    assert errno_of(sb.open, "/nope.txt", "r") == "ENOENT"
    assert errno_of(sb.open, "/nope.txt", "r+") == "ENOENT"
    assert errno_of(sb.open, "/f.txt", "rw") == "EINVAL"
    assert errno_of(sb.open, "/", "r") == "EISDIR"
    sb.mkdir("/d")
    assert errno_of(sb.open, "/d", "r") == "EISDIR"
    assert errno_of(sb.open, "/f.txt/x", "w") == "ENOTDIR"


def test_stat_listdir_mounts(world):
    sb = world.sb
    sb.write_file("/b.txt", b"12345")
    sb.mkdir("/a")
    st = sb.stat("/b.txt")
    assert st["type"] == "file" and st["size"] == 5 and st["mode"] == 0o644
    assert abs(st["mtime"] - time.time()) < 60
    assert sb.stat("/")["type"] == "dir"
    names = [(e["name"], e["type"]) for e in sb.listdir("/")]
    assert names == [("a", "dir"), ("b.txt", "file"), ("scratch", "dir"), ("shared", "dir")]
    assert sb.listdir("/shared") == [{"name": "readme.txt", "type": "file", "size": 7}]
    assert sb.read_file("/shared/readme.txt") == b"read me"
    assert sb.stat("/shared")["writable"] is False
    sb.write_file("/scratch/out.txt", b"ok")
    assert (world.rw / "out.txt").read_bytes() == b"ok"
    assert sb.exists("/a") and not sb.exists("/zzz")


def test_mkdir_unlink_rmdir_rename(world):
    sb = world.sb
    sb.mkdir("/x/y/z", parents=True)
    sb.mkdir("/x/y/z", parents=True)  # like mkdir -p: fine when present
    assert errno_of(sb.mkdir, "/x") == "EEXIST"
    assert errno_of(sb.mkdir, "/q/r") == "ENOENT"
    sb.write_file("/x/f", b"data")
    assert errno_of(sb.rmdir, "/x") == "ENOTEMPTY"
    assert errno_of(sb.unlink, "/x") == "EISDIR"
    assert errno_of(sb.rmdir, "/x/f") == "ENOTDIR"
    sb.rename("/x/f", "/g")
    assert sb.read_file("/g") == b"data"
    sb.write_file("/h", b"longer data")
    sb.rename("/g", "/h")  # replaces /h
    assert sb.read_file("/h") == b"data"
    assert sb.usage()["bytes"] == 4
    sb.unlink("/h")
    sb.rmdir("/x/y/z")
    assert errno_of(sb.unlink, "/h") == "ENOENT"
    assert sb.usage() == {"bytes": 0, "files": 2, "max_bytes": sb.quota.max_bytes,
                          "max_files": sb.quota.max_files}


def test_rescan_sees_writes_of_others(world):
    sb = Sandbox(world.root, quota=Quota(max_bytes=100, max_files=10))
    (world.root / "from_exec.bin").write_bytes(b"x" * 90)
    sb.write_file("/a", b"y" * 20)  # the counter hasn't seen the 90 bytes yet
    sb.rescan()
    assert sb.usage()["bytes"] == 110
    assert errno_of(sb.write_file, "/b", b"z") == "EDQUOT"


def test_read_file_too_big_is_efbig(world):
    sb = world.sb
    sb.write_file("/big", b"x" * 100)
    assert errno_of(sb.read_file, "/big", max_bytes=10) == "EFBIG"
    assert READ_MAX >= 1024 * 1024


def test_parse_path_is_pure_and_strict():
    assert parse_path("/a//b/./c/") == ("a", "b", "c")
    assert parse_path("a") == ("a",)
    assert parse_path("/") == ()
    for bad, name in [("", "EINVAL"), ("a\0b", "EINVAL"), (b"/a", "EINVAL"), (None, "EINVAL"),
                      ("a/../b", "EACCES"), ("x" * 256, "ENAMETOOLONG")]:
        assert errno_of(parse_path, bad) == name


# --- escape attempts: each refused, nothing outside touched -----------------------

@pytest.mark.parametrize("path", [
    "../outside/secret.txt",                 # .. at the start
    "/../outside/secret.txt",
    "notes/../../outside/secret.txt",        # .. in the middle
    "notes/..",                              # .. at the end
    "/..",
    "..",
    "/shared/../../outside/secret.txt",      # .. out of a mount
])
def test_dotdot_refused_everywhere(world, path):
    sb = world.sb
    sb.mkdir("/notes")
    assert errno_of(sb.read_file, path) == "EACCES"
    assert errno_of(sb.write_file, path, b"pwned") == "EACCES"
    assert errno_of(sb.open, path, "a") == "EACCES"
    assert errno_of(sb.stat, path) == "EACCES"


def test_mkdir_listdir_unlink_with_dotdot(world):
    sb = world.sb
    assert errno_of(sb.mkdir, "../evil") == "EACCES"
    assert errno_of(sb.mkdir, "a/../../evil", parents=True) == "EACCES"
    assert errno_of(sb.listdir, "..") == "EACCES"
    assert errno_of(sb.listdir, "/shared/..") == "EACCES"
    assert errno_of(sb.unlink, "../outside/secret.txt") == "EACCES"
    assert errno_of(sb.rmdir, "../outside/dir") == "EACCES"
    assert not (world.tmp / "evil").exists()


def test_etc_passwd_is_inside_the_root(world):
    sb = world.sb
    assert errno_of(sb.read_file, "/etc/passwd") == "ENOENT"
    assert errno_of(sb.write_file, "/etc/passwd", b"root::0:0::/:/bin/sh") == "ENOENT"
    sb.mkdir("/etc")
    sb.write_file("/etc/passwd", b"mine")  # a file of the sandbox, not the host's
    assert (world.root / "etc" / "passwd").read_bytes() == b"mine"


def test_absolute_host_path_is_inside_the_root(world):
    sb = world.sb
    host = str(world.secret)  # /tmp/.../outside/secret.txt
    assert errno_of(sb.read_file, host) == "ENOENT"
    assert errno_of(sb.open, host, "w") == "ENOENT"
    sb.mkdir(str(world.secret.parent), parents=True)
    sb.write_file(host, b"shadow copy")
    assert (world.root / host.lstrip("/")).read_bytes() == b"shadow copy"


def test_symlink_to_outside_file_not_followed(world):
    # A hostile co-tenant (a host-side actor) plants a symlink in the root.
    os.symlink(world.secret, world.root / "link")
    os.symlink("../outside/secret.txt", world.root / "rel")
    sb = world.sb
    for name in ("/link", "/rel"):
        assert errno_of(sb.read_file, name) == "ELOOP"
        for mode in ("r", "w", "a", "r+"):
            assert errno_of(sb.open, name, mode) == "ELOOP"
        assert errno_of(sb.write_file, name, b"pwned") == "ELOOP"
        assert errno_of(sb.write_file, name, b"pwned", append=True) == "ELOOP"
        # stat describes the link itself and leaks nothing of the target.
        assert sb.stat(name) == {**sb.stat(name), "type": "symlink", "size": 0}
    assert errno_of(sb.open, "/link", "x") == "EEXIST"


def test_symlink_to_outside_dir_as_intermediate_component(world):
    os.symlink(world.outside, world.root / "out")
    sb = world.sb
    assert errno_of(sb.read_file, "/out/secret.txt") == "ELOOP"
    assert errno_of(sb.write_file, "/out/new.txt", b"x") == "ELOOP"
    assert errno_of(sb.listdir, "/out") == "ELOOP"
    assert errno_of(sb.mkdir, "/out/sub") == "ELOOP"
    assert errno_of(sb.mkdir, "/out/sub", parents=True) == "ELOOP"
    assert errno_of(sb.unlink, "/out/secret.txt") == "ELOOP"
    assert errno_of(sb.rename, "/out/secret.txt", "/stolen") == "ELOOP"
    assert errno_of(sb.stat, "/out/dir") == "ELOOP"


def test_symlink_deep_inside_and_to_root(world):
    sb = world.sb
    sb.mkdir("/a/b", parents=True)
    os.symlink("/", world.root / "a" / "b" / "c")
    assert errno_of(sb.listdir, "/a/b/c") == "ELOOP"
    assert errno_of(sb.read_file, "/a/b/c/etc/passwd") == "ELOOP"


def test_symlink_inside_a_mount_not_followed(world):
    os.symlink(world.outside, world.rw / "out")
    assert errno_of(world.sb.read_file, "/scratch/out/secret.txt") == "ELOOP"
    assert errno_of(world.sb.write_file, "/scratch/out/x", b"x") == "ELOOP"


def test_unlink_and_rename_move_the_link_not_the_target(world):
    os.symlink(world.secret, world.root / "link")
    sb = world.sb
    sb.rename("/link", "/moved")
    assert errno_of(sb.read_file, "/moved") == "ELOOP"
    sb.write_file("/plain", b"mine")
    sb.rename("/plain", "/moved")  # replaces the link, writes nothing through it
    assert sb.read_file("/moved") == b"mine"
    os.symlink(world.secret, world.root / "link2")
    sb.unlink("/link2")
    assert not (world.root / "link2").exists()


def test_dir_swapped_for_symlink_between_check_and_use(world, monkeypatch):
    """The walk hands back an fd of the dir it checked; swapping the name
    afterwards changes nothing: the file lands in the checked dir."""
    sb = world.sb
    sb.mkdir("/d")
    real_walk = Sandbox._walk

    def walk_then_swap(self, place, names):
        fd = real_walk(self, place, names)
        if names == ("d",):
            os.rename(world.root / "d", world.root / "d.real")
            os.symlink(world.outside, world.root / "d")
        return fd

    monkeypatch.setattr(Sandbox, "_walk", walk_then_swap)
    sb.write_file("/d/new.txt", b"inside")
    monkeypatch.undo()
    assert (world.root / "d.real" / "new.txt").read_bytes() == b"inside"
    assert not (world.outside / "new.txt").exists()
    assert errno_of(sb.read_file, "/d/secret.txt") == "ELOOP"


def test_race_dir_and_symlink_flipping(world):
    """A co-tenant flips /d between a real dir and a symlink out, as fast as
    it can, while the agent reads and writes through /d: it only ever gets
    the inside file or a refusal (ELOOP; ENOENT or ENOTDIR when it looked in
    mid-flip)."""
    sb = world.sb
    sb.mkdir("/d")
    sb.write_file("/d/secret.txt", b"inside")
    d, spare = world.root / "d", world.root / "spare"
    stop = threading.Event()

    def flipper():
        while not stop.is_set():
            os.rename(d, spare)
            os.symlink(world.outside, d)
            os.unlink(d)
            os.rename(spare, d)
            time.sleep(0.0002)  # leave the agent some windows with the real dir

    seen = {"ok": 0, "ELOOP": 0, "ENOENT": 0, "ENOTDIR": 0}
    t = threading.Thread(target=flipper)
    t.start()
    try:
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            try:
                assert sb.read_file("/d/secret.txt") == b"inside"
                sb.write_file("/d/w.txt", b"w")
                seen["ok"] += 1
            except SyscallError as e:
                assert e.name in ("ELOOP", "ENOENT", "ENOTDIR"), e
                seen[e.name] += 1
    finally:
        stop.set()
        t.join()
    assert seen["ok"] > 0
    assert seen["ELOOP"] + seen["ENOENT"] + seen["ENOTDIR"] > 0, seen
    assert not (world.outside / "w.txt").exists()


def test_hard_link_to_outside_file_refused(world):
    os.link(world.secret, world.root / "hl")  # same file system: the co-tenant's trick
    sb = world.sb
    for mode in ("r", "r+", "w", "a"):
        assert errno_of(sb.open, "/hl", mode) == "EACCES"
    assert errno_of(sb.read_file, "/hl") == "EACCES"
    assert errno_of(sb.write_file, "/hl", b"") == "EACCES"  # must not truncate the secret
    sb.unlink("/hl")  # removing the name inside is harmless
    assert world.secret.read_bytes() == SECRET


def test_nul_byte_and_long_names(world):
    sb = world.sb
    assert errno_of(sb.write_file, "/a\0/../../outside/secret.txt", b"x") == "EINVAL"
    assert errno_of(sb.open, "ok\0", "w") == "EINVAL"
    assert errno_of(sb.write_file, "/" + "n" * 256, b"x") == "ENAMETOOLONG"
    assert errno_of(sb.mkdir, "/" + "é" * 128) == "ENAMETOOLONG"  # 256 bytes in UTF-8
    assert errno_of(sb.stat, "/a" * 2049) == "ENAMETOOLONG"
    assert errno_of(sb.write_file, "/\ud800", b"x") == "EINVAL"  # a lone surrogate
    sb.write_file("/" + "n" * 255, b"x")  # 255 is the longest allowed


def test_rename_out_of_root_and_into_readonly_mount(world):
    sb = world.sb
    sb.write_file("/mine.txt", b"x")
    assert errno_of(sb.rename, "/mine.txt", "../outside/mine.txt") == "EACCES"
    assert errno_of(sb.rename, "../outside/secret.txt", "/stolen.txt") == "EACCES"
    assert errno_of(sb.rename, "/mine.txt", "/shared/mine.txt") == "EROFS"
    assert errno_of(sb.rename, "/shared/readme.txt", "/readme.txt") == "EROFS"
    assert errno_of(sb.rename, "/mine.txt", "/scratch/mine.txt") == "EXDEV"
    assert errno_of(sb.rename, "/mine.txt", str(world.secret)) == "ENOENT"


def test_readonly_mount_refuses_every_write(world):
    sb = world.sb
    assert errno_of(sb.write_file, "/shared/new.txt", b"x") == "EROFS"
    for mode in ("w", "a", "x", "r+"):
        assert errno_of(sb.open, "/shared/readme.txt", mode) == "EROFS"
    assert errno_of(sb.mkdir, "/shared/sub") == "EROFS"
    assert errno_of(sb.unlink, "/shared/readme.txt") == "EROFS"
    assert errno_of(sb.rmdir, "/shared/sub") == "EROFS"
    assert sb.read_file("/shared/readme.txt") == b"read me"


def test_mount_points_and_root_cannot_be_removed(world):
    sb = world.sb
    assert errno_of(sb.rmdir, "/scratch") == "EBUSY"
    assert errno_of(sb.unlink, "/scratch") == "EBUSY"
    assert errno_of(sb.rename, "/scratch", "/elsewhere") == "EBUSY"
    assert errno_of(sb.rmdir, "/") == "EBUSY"
    assert errno_of(sb.mkdir, "/shared") == "EEXIST"
    assert world.rw.is_dir()


def test_fifo_and_device_nodes_refused(world):
    os.mkfifo(world.root / "fifo")
    sb = world.sb
    start = time.monotonic()
    for mode in ("r", "w", "a", "r+"):
        assert errno_of(sb.open, "/fifo", mode) == "EACCES"  # and never blocks
    assert time.monotonic() - start < 2
    if os.geteuid() == 0:
        os.mknod(world.root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        assert errno_of(sb.open, "/null", "w") == "EACCES"
        assert sb.stat("/null")["type"] == "chardev"
    assert sb.stat("/fifo")["type"] == "fifo"


def test_tilde_not_expanded(world):
    sb = world.sb
    assert errno_of(sb.write_file, "~/.bashrc", b"x") == "ENOENT"
    sb.mkdir("~")
    sb.write_file("~/.bashrc", b"x")
    assert (world.root / "~" / ".bashrc").read_bytes() == b"x"
    assert not (Path.home() / ".bashrc").exists() or \
        (Path.home() / ".bashrc").read_bytes() != b"x"


def test_backslashes_and_encoded_dots_are_literal_names(world):
    sb = world.sb
    name = "..\\..\\outside\\secret.txt"
    assert errno_of(sb.read_file, name) == "ENOENT"
    sb.write_file(name, b"literal")
    assert (world.root / name).read_bytes() == b"literal"
    enc = "%2e%2e/%2e%2e/outside/secret.txt"
    assert errno_of(sb.read_file, enc) == "ENOENT"
    sb.mkdir("%2e%2e/%2e%2e/outside", parents=True)
    sb.write_file(enc, b"also literal")
    assert (world.root / "%2e%2e" / "%2e%2e" / "outside" / "secret.txt").exists()
    for odd in ("\u2025", "\uff0e\uff0e", ". .", "...", ".. "):  # look-alikes of ..
        sb.write_file(f"/{odd}", b"fine")
        assert (world.root / odd).read_bytes() == b"fine"


def test_quota_bytes(world):
    sb = Sandbox(world.root, quota=Quota(max_bytes=1000, max_files=100))
    sb.write_file("/a", b"x" * 600)
    assert errno_of(sb.write_file, "/b", b"x" * 500) == "EDQUOT"
    fd = sb.open("/a", "a")
    assert errno_of(sb.write, fd, b"x" * 401) == "EDQUOT"
    sb.write(fd, b"x" * 400)
    sb.close(fd)
    assert sb.usage()["bytes"] == 1000
    fd = sb.open("/a", "r+")  # overwriting in place does not grow the file
    sb.write(fd, b"y" * 1000)
    assert errno_of(sb.seek, fd, -1) == "EINVAL"
    sb.close(fd)
    sb.write_file("/a", b"")  # truncation gives the bytes back
    assert sb.usage()["bytes"] == 0
    sb.write_file("/b", b"x" * 1000)
    sb.unlink("/b")
    sb.write_file("/c", b"x" * 1000)


def test_quota_files(world):
    sb = Sandbox(world.root, quota=Quota(max_bytes=10_000, max_files=3))
    sb.mkdir("/d")
    sb.write_file("/d/1", b"")
    sb.write_file("/2", b"")
    assert errno_of(sb.write_file, "/3", b"") == "EDQUOT"
    assert errno_of(sb.mkdir, "/e") == "EDQUOT"
    assert errno_of(sb.mkdir, "/e/f", parents=True) == "EDQUOT"
    assert errno_of(sb.open, "/3", "x") == "EDQUOT"
    sb.write_file("/2", b"replace, not a new file")
    sb.unlink("/2")
    sb.write_file("/3", b"")
    assert not (world.root / "e").exists()


def test_fd_exhaustion_emfile(world):
    sb = Sandbox(world.root, max_fds=4)
    sb.write_file("/f", b"x")
    fds = [sb.open("/f") for _ in range(4)]
    assert fds == [3, 4, 5, 6]
    assert errno_of(sb.open, "/f") == "EMFILE"
    assert errno_of(sb.open, "/new", "w") == "EMFILE"
    assert not (world.root / "new").exists()  # refused before creating anything
    assert sb.read_file("/f") == b"x"  # the conveniences use no table slot
    sb.close(fds[1])
    assert sb.open("/f") == 4  # lowest free number, as POSIX
    sb.close_all()
    assert sb.open_fds() == {}


def test_bad_fd_ebadf(world):
    sb = world.sb
    sb.write_file("/f", b"x")
    for bad in (0, 1, 2, 99, -1, "3", True, None):
        assert errno_of(sb.read, bad) == "EBADF"
    fd = sb.open("/f", "r")
    assert errno_of(sb.write, fd, b"y") == "EBADF"
    sb.close(fd)
    assert errno_of(sb.read, fd) == "EBADF"
    assert errno_of(sb.close, fd) == "EBADF"
    fd = sb.open("/f", "a")
    assert errno_of(sb.read, fd) == "EBADF"
    assert errno_of(sb.write, fd, 123) == "EINVAL"


def test_non_string_paths_and_root_names(world):
    sb = world.sb
    assert errno_of(sb.stat, b"/etc") == "EINVAL"
    assert errno_of(sb.open, 42) == "EINVAL"
    assert errno_of(sb.open, "") == "EINVAL"
    assert errno_of(sb.open, "////") == "EISDIR"
    assert errno_of(sb.open, "/./.") == "EISDIR"
    assert [e["name"] for e in sb.listdir("//./")] == ["scratch", "shared"]


def test_errors_never_name_host_paths(world):
    os.symlink(world.secret, world.root / "link")
    for fn, args in [(world.sb.read_file, ("/link",)), (world.sb.read_file, ("/nope/x",)),
                     (world.sb.listdir, ("/nope",)), (world.sb.open, ("/hl2", "r"))]:
        with pytest.raises(SyscallError) as info:
            fn(*args)
        assert str(world.tmp) not in info.value.message


def test_bad_mount_configuration(tmp_path):
    with pytest.raises(ValueError):
        Sandbox(tmp_path / "r", {"/a/b": Mount(tmp_path)})
    with pytest.raises(ValueError):
        Sandbox(tmp_path / "r", {"/x": Mount(tmp_path / "nonexistent")})
    assert not (tmp_path / "r").exists()


def test_walk_holds_one_fd_per_level_not_per_subdir(tmp_path):
    top = tmp_path / "tree"
    for i in range(300):
        (top / f"d{i}").mkdir(parents=True)
        (top / f"d{i}" / "f").write_bytes(b"x")
    deep = top.joinpath(*["n"] * 40)
    deep.mkdir(parents=True)
    os.symlink(tmp_path, top / "loop")  # never followed: no infinite walk
    base = len(os.listdir("/proc/self/fd"))
    most = [0]

    def visit(dfd, entry, st):
        most[0] = max(most[0], len(os.listdir("/proc/self/fd")) - base)

    walk_tree(os.open(top, os.O_RDONLY | os.O_DIRECTORY), visit)
    assert most[0] <= 40 + 3
    assert len(os.listdir("/proc/self/fd")) == base  # all closed
    sb = Sandbox(top)
    assert sb.usage()["files"] == 300 * 2 + 40 + 1 and sb.usage()["bytes"] == 300
