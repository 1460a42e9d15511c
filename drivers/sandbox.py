"""The fs driver: a process's private root directory plus mounts.

Every path an agent gives is virtual: ``/notes/a.txt``, or ``notes/a.txt``
relative to ``/``. ``/`` is the private root (a host dir in the kernel's state
dir, so files survive a kernel restart); a mount such as ``/shared`` puts a
host dir, read-only or writable, at a top-level name.

No escape. The rules, each enforced here (not by permission bits: the kernel
may run as root, which bypasses them):

- A path is split into names and checked before any system call: ``..`` is
  refused (EACCES), ``.`` and empty names are dropped, NUL is EINVAL, a name
  over 255 bytes or a path over 4096 is ENAMETOOLONG. ``~``, ``\\``, ``%2e``
  are ordinary characters of a name.
- Host paths are never built from agent input. The walk starts at the mount's
  host dir and opens one name at a time with ``openat(dirfd, name,
  O_NOFOLLOW | O_DIRECTORY)``, so the check and the use are the same system
  call: a directory swapped for a symlink between two calls is refused, not
  followed. No symlink is ever followed (ELOOP), at any depth.
- Only regular files with a single link are opened (a hard link may name a
  file outside the root): the opened fd is checked with ``fstat`` before any
  byte moves or the file is truncated. FIFOs, devices, sockets: EACCES.
- Writes into a read-only mount: EROFS. rename between mounts: EXDEV. A mount
  point itself can't be removed or renamed: EBUSY.
- Quotas on the private root: bytes of regular files and number of entries
  (files, dirs, anything): EDQUOT, checked on create and on write. Writable
  mounts have no quota here. What other writers (the exec driver) add is
  seen after ``rescan()``.
- Open files live in a per-Sandbox fd table (numbers from 3), at most
  ``max_fds`` at once (EMFILE).

Error messages name virtual paths only, never host paths.
"""

from __future__ import annotations

import errno as _errno
import os
import secrets
import stat as _stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmagentos.syscalls.errno import ERRNO, SyscallError

NAME_MAX = 255
PATH_MAX = 4096
READ_MAX = 16 * 1024 * 1024  # the most one read() or read_file() returns
FIRST_FD = 3

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MODES = {  # mode -> (open flags, readable, writable, creates)
    "r": (os.O_RDONLY, True, False, False),
    "r+": (os.O_RDWR, True, True, False),
    "w": (os.O_WRONLY | os.O_TRUNC, False, True, True),
    "a": (os.O_WRONLY | os.O_APPEND, False, True, True),
    "x": (os.O_WRONLY, False, True, True),
}


@dataclass(frozen=True)
class Mount:
    """A host dir shown at a top-level virtual name."""

    host_path: Path
    writable: bool = False


@dataclass(frozen=True)
class Quota:
    """Limits of the private root."""

    max_bytes: int = 64 * 1024 * 1024
    max_files: int = 4096


@dataclass
class _Place:
    """Where a virtual path lands: a mount (``""`` for the private root) and
    the names below that mount's host dir."""

    vpath: str
    mount: str
    base: Path
    writable: bool
    names: tuple[str, ...]

    @property
    def private(self) -> bool:
        return self.mount == ""


@dataclass
class _OpenFile:
    osfd: int
    vpath: str
    readable: bool
    writable: bool
    append: bool
    private: bool


def _error(name: str, message: str) -> SyscallError:
    return SyscallError(name, message)


def _from_os(e: OSError, vpath: str) -> SyscallError:
    name = _errno.errorcode.get(e.errno or 0, "EIO")
    if name == "ELOOP":
        return _error("ELOOP", f"{vpath}: symbolic links are not followed in the sandbox")
    if name not in ERRNO:
        name = "EIO"
    return _error(name, f"{vpath}: {os.strerror(e.errno or _errno.EIO).lower()}")


def _kind(mode: int) -> str:
    for test, name in ((_stat.S_ISREG, "file"), (_stat.S_ISDIR, "dir"),
                       (_stat.S_ISLNK, "symlink"), (_stat.S_ISFIFO, "fifo"),
                       (_stat.S_ISSOCK, "socket"), (_stat.S_ISCHR, "chardev"),
                       (_stat.S_ISBLK, "blockdev")):
        if test(mode):
            return name
    return "other"


def parse_path(path: object) -> tuple[str, ...]:
    """Check a virtual path and split it into names. Pure: no system calls."""
    if not isinstance(path, str):
        raise _error("EINVAL", f"a path must be a string, not {type(path).__name__}")
    if path == "":
        raise _error("EINVAL", "empty path")
    if "\0" in path:
        raise _error("EINVAL", "path contains a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise _error("EINVAL", "path is not encodable as a file name") from None
    if len(os.fsencode(path)) > PATH_MAX:
        raise _error("ENAMETOOLONG", f"path is longer than {PATH_MAX} bytes")
    names = []
    for name in path.split("/"):
        if name in ("", "."):
            continue
        if name == "..":
            raise _error("EACCES", f"{path!r}: '..' is not allowed in sandbox paths")
        if len(os.fsencode(name)) > NAME_MAX:
            raise _error("ENAMETOOLONG", f"a name in {path!r} is longer than {NAME_MAX} bytes")
        names.append(name)
    return tuple(names)


def walk_tree(top_fd: int, visit: Callable[[int, os.DirEntry, os.stat_result], None],
              on_dir: Callable[[int], None] | None = None) -> None:
    """Visit every entry below the dir ``top_fd`` as ``visit(dir_fd, entry,
    lstat)``, depth first, never following a symlink, holding one fd per level
    (not per subdir). ``on_dir(fd)`` sees each dir's own fd, the top's too.
    Entries that vanish or change meanwhile are skipped. Closes ``top_fd``.
    """
    def listing(dfd: int):
        if on_dir is not None:
            on_dir(dfd)
        subdirs = []
        for entry in os.scandir(dfd):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            visit(dfd, entry, st)
            if _stat.S_ISDIR(st.st_mode):
                subdirs.append(entry.name)
        return iter(subdirs)

    stack = [(top_fd, iter(()))]
    try:
        stack[-1] = (top_fd, listing(top_fd))
        while stack:
            dfd, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(dfd)
                stack.pop()
                continue
            try:
                sub = os.open(name, _DIR | os.O_NONBLOCK, dir_fd=dfd)
            except OSError:
                continue
            stack.append((sub, iter(())))
            stack[-1] = (sub, listing(sub))
    finally:
        for dfd, _ in stack:
            os.close(dfd)


def tree_usage(root: Path | str) -> tuple[int, int]:
    """(bytes of regular files, entries) below the dir ``root``, never
    following a symlink: what a quota counts."""
    seen = [0, 0]

    def count(dfd: int, entry: os.DirEntry, st: os.stat_result) -> None:
        seen[1] += 1
        if _stat.S_ISREG(st.st_mode):
            seen[0] += st.st_size

    walk_tree(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), count)
    return seen[0], seen[1]


MAX_TRASH_PASSES = 8


def discard(path: Path, trash: Path) -> bool:
    """Move a tree into the trash dir: one rename, so it is gone from its place
    at once, however large; `empty_trash` removes it later. False if absent."""
    trash.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.rename(path, trash / secrets.token_hex(8))
    except FileNotFoundError:
        return False
    return True


def empty_trash(trash: Path) -> int:
    """Remove everything in the trash dir; returns the entries removed.

    Iterative and shallow whatever the depth of a tree (shutil.rmtree recursed
    into a 1,500-deep tree and raised RecursionError): a directory that is not
    empty is moved up into the trash itself (one rename) and emptied in its
    turn, so no walk goes deeper than one level and at most two fds are open.
    Nothing is followed: entries are opened O_NOFOLLOW and removed by name.
    Entries that appear meanwhile (code still running in the tree) are taken
    in the next pass; after MAX_TRASH_PASSES passes that removed nothing, what
    remains waits for the next call. Blocking: run it in a worker thread.
    """
    try:
        tfd = os.open(trash, _DIR)
    except FileNotFoundError:
        return 0
    removed, stuck = 0, 0
    try:
        while stuck < MAX_TRASH_PASSES:
            names = os.listdir(tfd)
            if not names:
                break
            before = removed
            for name in names:
                removed += _empty_one(tfd, name)
            stuck = stuck + 1 if removed == before else 0
    finally:
        os.close(tfd)
    return removed


def _empty_one(tfd: int, name: str) -> int:
    try:
        st = os.stat(name, dir_fd=tfd, follow_symlinks=False)
        if not _stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=tfd)
            return 1
        dfd = os.open(name, _DIR | os.O_NONBLOCK, dir_fd=tfd)
    except FileNotFoundError:
        return 0
    removed = 0
    try:
        with os.scandir(dfd) as it:
            entries = list(it)
        for e in entries:
            try:
                if not e.is_dir(follow_symlinks=False):
                    os.unlink(e.name, dir_fd=dfd)
                    removed += 1
                    continue
                try:
                    os.rmdir(e.name, dir_fd=dfd)
                    removed += 1
                except OSError as err:
                    if err.errno not in (_errno.ENOTEMPTY, _errno.EEXIST):
                        raise
                    os.rename(e.name, secrets.token_hex(8), src_dir_fd=dfd, dst_dir_fd=tfd)
            except FileNotFoundError:
                continue
    finally:
        os.close(dfd)
    try:
        os.rmdir(name, dir_fd=tfd)
        removed += 1
    except OSError as err:
        if err.errno not in (_errno.ENOTEMPTY, _errno.EEXIST, _errno.ENOENT):
            raise
    return removed


class Sandbox:
    """A process's file system: private root, mounts, fd table and quota.

    Thread-safe: the kernel calls it from worker threads.
    """

    def __init__(self, root: Path, mounts: dict[str, Mount] | None = None, *,
                 quota: Quota | None = None, max_fds: int = 64) -> None:
        self.mounts: dict[str, Mount] = {}
        for point, mount in (mounts or {}).items():
            names = parse_path(point)
            if len(names) != 1:
                raise ValueError(f"mount point {point!r} must be one top-level name")
            if not Path(mount.host_path).is_dir():
                raise ValueError(f"mount {point!r}: {mount.host_path} is not a directory")
            self.mounts[names[0]] = Mount(Path(mount.host_path), mount.writable)
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.quota = quota or Quota()
        self.max_fds = max_fds
        self._lock = threading.RLock()
        self._fds: dict[int, _OpenFile] = {}
        self._bytes = 0
        self._files = 0
        self.rescan()

    # --- accounting --------------------------------------------------------

    def rescan(self) -> None:
        """Recount the private root's usage from disk (after others wrote it)."""
        with self._lock:
            self._bytes, self._files = tree_usage(self.root)

    def usage(self) -> dict:
        with self._lock:
            return {"bytes": self._bytes, "files": self._files,
                    "max_bytes": self.quota.max_bytes, "max_files": self.quota.max_files}

    def _charge_file(self, place: _Place) -> None:
        if place.private and self._files + 1 > self.quota.max_files:
            raise _error("EDQUOT", f"{place.vpath}: the sandbox may hold at most "
                                   f"{self.quota.max_files} files")

    def _uncharge(self, place: _Place, st: os.stat_result) -> None:
        if place.private:
            self._files = max(0, self._files - 1)
            if _stat.S_ISREG(st.st_mode):
                self._bytes = max(0, self._bytes - st.st_size)

    # --- path resolution ---------------------------------------------------

    def _place(self, path: object) -> _Place:
        names = parse_path(path)
        vpath = "/" + "/".join(names)
        if names and names[0] in self.mounts:
            m = self.mounts[names[0]]
            return _Place(vpath, "/" + names[0], m.host_path, m.writable, names[1:])
        return _Place(vpath, "", self.root, True, names)

    def _walk(self, place: _Place, names: tuple[str, ...]) -> int:
        """Open the directory ``names`` below the place's base, one name at a
        time, never following a symlink. Returns a dir fd the caller closes."""
        try:
            fd = os.open(place.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise _from_os(e, place.mount or "/") from None
        for name in names:
            try:
                nfd = os.open(name, _DIR, dir_fd=fd)
            except OSError as e:
                err = e
                if e.errno == _errno.ENOTDIR:
                    # O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR: tell which.
                    try:
                        if _stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                            err = OSError(_errno.ELOOP, "symlink")
                    except OSError:
                        pass
                os.close(fd)
                raise _from_os(err, place.vpath) from None
            os.close(fd)
            fd = nfd
        return fd

    def _parent(self, place: _Place) -> tuple[int, str]:
        return self._walk(place, place.names[:-1]), place.names[-1]

    @staticmethod
    def _need_write(place: _Place) -> None:
        if not place.writable:
            raise _error("EROFS", f"{place.vpath}: {place.mount} is mounted read-only")

    # --- files ---------------------------------------------------------------

    def _open_os(self, path: object, mode: str) -> tuple[int, _Place, tuple]:
        """Open a regular file; returns (os fd, place, mode entry)."""
        spec = _MODES.get(mode.replace("b", "") if isinstance(mode, str) else None)
        if spec is None:
            raise _error("EINVAL", f"mode must be one of {sorted(_MODES)}, not {mode!r}")
        flags, _readable, writable, creates = spec
        place = self._place(path)
        if not place.names:
            raise _error("EISDIR", f"{place.vpath}: is a directory")
        if writable:
            self._need_write(place)
        dfd, name = self._parent(place)
        try:
            return self._open_at(dfd, name, place, mode.replace("b", ""), flags, creates), \
                place, spec
        finally:
            os.close(dfd)

    def _open_at(self, dfd: int, name: str, place: _Place, mode: str, flags: int,
                 creates: bool) -> int:
        vpath = place.vpath
        try:
            pre = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            pre = None
        except OSError as e:
            raise _from_os(e, vpath) from None
        if pre is None:
            if not creates:
                raise _error("ENOENT", f"{vpath}: no such file")
            self._charge_file(place)
            access = flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND)
            try:
                fd = os.open(name, access | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC | os.O_NOCTTY, 0o644, dir_fd=dfd)
            except OSError as e:
                raise _from_os(e, vpath) from None
            if place.private:
                self._files += 1
            return fd
        if mode == "x":
            raise _error("EEXIST", f"{vpath}: already exists")
        self._check_regular(pre, vpath)
        # Open without O_TRUNC and never blocking (a FIFO swapped in would),
        # then judge the fd itself: that, not the name, is what we'd use.
        try:
            fd = os.open(name, (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=dfd)
        except OSError as e:
            raise _from_os(e, vpath) from None
        try:
            st = os.fstat(fd)
            self._check_regular(st, vpath)
            if (st.st_dev, st.st_ino) != (pre.st_dev, pre.st_ino):
                raise _error("EAGAIN", f"{vpath}: changed while being opened")
            os.set_blocking(fd, True)
            if flags & os.O_TRUNC:
                os.ftruncate(fd, 0)
                if place.private:
                    self._bytes = max(0, self._bytes - st.st_size)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _check_regular(st: os.stat_result, vpath: str) -> None:
        if _stat.S_ISLNK(st.st_mode):
            raise _error("ELOOP", f"{vpath}: symbolic links are not followed in the sandbox")
        if _stat.S_ISDIR(st.st_mode):
            raise _error("EISDIR", f"{vpath}: is a directory")
        if not _stat.S_ISREG(st.st_mode):
            raise _error("EACCES", f"{vpath}: not a regular file ({_kind(st.st_mode)})")
        if st.st_nlink > 1:
            raise _error("EACCES", f"{vpath}: has {st.st_nlink} hard links; "
                                   "hard-linked files are not opened")

    def open(self, path: str, mode: str = "r") -> int:
        """Open a regular file; mode 'r', 'r+', 'w', 'a' or 'x'. Returns an fd."""
        with self._lock:
            if len(self._fds) >= self.max_fds:
                raise _error("EMFILE", f"at most {self.max_fds} files may be open at once")
            osfd, place, (flags, readable, writable, _) = self._open_os(path, mode)
            fd = FIRST_FD
            while fd in self._fds:
                fd += 1
            self._fds[fd] = _OpenFile(osfd, place.vpath, readable, writable,
                                      bool(flags & os.O_APPEND), place.private)
            return fd

    def _file(self, fd: object) -> _OpenFile:
        f = self._fds.get(fd) if isinstance(fd, int) and not isinstance(fd, bool) else None
        if f is None:
            raise _error("EBADF", f"{fd!r} is not an open file descriptor")
        return f

    def read(self, fd: int, n: int = -1) -> bytes:
        """Read up to n bytes (n < 0: to the end), at most READ_MAX per call."""
        with self._lock:
            f = self._file(fd)
            if not f.readable:
                raise _error("EBADF", f"fd {fd} ({f.vpath}) is not open for reading")
            want = READ_MAX if n is None or n < 0 else min(n, READ_MAX)
            chunks, got = [], 0
            try:
                while got < want:
                    chunk = os.read(f.osfd, want - got)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
                    if n is not None and n >= 0:
                        break  # a plain read: one call, like read(2)
            except OSError as e:
                raise _from_os(e, f.vpath) from None
            return b"".join(chunks)

    def write(self, fd: int, data: bytes | str) -> int:
        """Write all of data at the fd's offset (or the end, in append mode)."""
        with self._lock:
            f = self._file(fd)
            if not f.writable:
                raise _error("EBADF", f"fd {fd} ({f.vpath}) is not open for writing")
            return self._write(f, data)

    def _write(self, f: _OpenFile, data: bytes | str) -> int:
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise _error("EINVAL", "data must be bytes or str")
        try:
            before = os.fstat(f.osfd).st_size
            pos = before if f.append else os.lseek(f.osfd, 0, os.SEEK_CUR)
            grow = max(0, pos + len(data) - before)
            if f.private and self._bytes + grow > self.quota.max_bytes:
                raise _error("EDQUOT", f"{f.vpath}: writing {len(data)} bytes would pass "
                                       f"the sandbox quota of {self.quota.max_bytes} bytes")
            view, done = memoryview(data), 0
            while done < len(view):
                done += os.write(f.osfd, view[done:])
            if f.private:
                self._bytes += os.fstat(f.osfd).st_size - before
        except OSError as e:
            raise _from_os(e, f.vpath) from None
        return done

    def seek(self, fd: int, offset: int, whence: int = os.SEEK_SET) -> int:
        with self._lock:
            f = self._file(fd)
            if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
                raise _error("EINVAL", f"bad whence {whence!r}")
            try:
                return os.lseek(f.osfd, offset, whence)
            except OSError as e:
                raise _from_os(e, f.vpath) from None

    def close(self, fd: int) -> None:
        with self._lock:
            f = self._file(fd)
            del self._fds[fd]
            os.close(f.osfd)

    def close_all(self) -> None:
        """Close every open fd (the process exited)."""
        with self._lock:
            for f in self._fds.values():
                os.close(f.osfd)
            self._fds.clear()

    def open_fds(self) -> dict[int, str]:
        with self._lock:
            return {fd: f.vpath for fd, f in self._fds.items()}

    def read_file(self, path: str, max_bytes: int = READ_MAX) -> bytes:
        """A whole regular file; EFBIG when it is larger than max_bytes."""
        with self._lock:
            osfd, place, _ = self._open_os(path, "r")
            try:
                size = os.fstat(osfd).st_size
                if size > max_bytes:
                    raise _error("EFBIG", f"{place.vpath} is {size} bytes, over the "
                                          f"{max_bytes} a whole read may return")
                chunks, got = [], 0
                while got <= max_bytes:
                    chunk = os.read(osfd, max_bytes + 1 - got)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
                if got > max_bytes:
                    raise _error("EFBIG", f"{place.vpath} grew past {max_bytes} bytes")
                return b"".join(chunks)
            except OSError as e:
                raise _from_os(e, place.vpath) from None
            finally:
                os.close(osfd)

    def write_file(self, path: str, data: bytes | str, *, append: bool = False) -> int:
        """Create or replace (or append to) a file with data; returns bytes
        written. Uses no slot of the fd table."""
        mode = "a" if append else "w"
        with self._lock:
            osfd, place, _ = self._open_os(path, mode)
            try:
                return self._write(_OpenFile(osfd, place.vpath, False, True, append,
                                             place.private), data)
            finally:
                os.close(osfd)

    # --- directories and names ----------------------------------------------

    def stat(self, path: str) -> dict:
        """size, type, mtime, mode (permission bits) of a path; never follows
        a symlink (one is reported as type 'symlink', size 0)."""
        with self._lock:
            place = self._place(path)
            try:
                if not place.names:
                    st = os.stat(place.base)
                else:
                    dfd, name = self._parent(place)
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    finally:
                        os.close(dfd)
            except OSError as e:
                raise _from_os(e, place.vpath) from None
            kind = _kind(st.st_mode)
            return {"path": place.vpath, "type": kind,
                    "size": st.st_size if kind == "file" else 0,
                    "mtime": st.st_mtime, "mode": _stat.S_IMODE(st.st_mode),
                    "writable": place.writable, "mount": place.mount or "/"}

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except SyscallError as e:
            if e.name in ("ENOENT", "ENOTDIR"):
                return False
            raise
        return True

    def listdir(self, path: str = "/") -> list[dict]:
        """Entries of a directory, sorted by name: {name, type, size}."""
        with self._lock:
            place = self._place(path)
            dfd = self._walk(place, place.names)
            try:
                out = {}
                for entry in os.scandir(dfd):
                    if place.vpath == "/" and entry.name in self.mounts:
                        continue  # shadowed by the mount
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed meanwhile
                    kind = _kind(st.st_mode)
                    out[entry.name] = {"name": entry.name, "type": kind,
                                       "size": st.st_size if kind == "file" else 0}
            except OSError as e:
                raise _from_os(e, place.vpath) from None
            finally:
                os.close(dfd)
            if place.vpath == "/":
                for name in self.mounts:
                    out[name] = {"name": name, "type": "dir", "size": 0}
            return [out[k] for k in sorted(out)]

    def mkdir(self, path: str, parents: bool = False) -> None:
        """Make a directory (and, with parents, the missing ones above it;
        then an existing one is fine, as with ``mkdir -p``)."""
        with self._lock:
            place = self._place(path)
            if not place.names:
                if parents:
                    return
                raise _error("EEXIST", f"{place.vpath}: already exists")
            self._need_write(place)
            if not parents:
                dfd, name = self._parent(place)
                try:
                    self._mkdir_at(dfd, name, place)
                finally:
                    os.close(dfd)
                return
            # One walk down, creating what is missing: each level is opened from
            # the one above (O_NOFOLLOW), never re-walked from the root.
            try:
                fd = os.open(place.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise _from_os(e, place.mount or "/") from None
            try:
                for depth, name in enumerate(place.names, 1):
                    part = _Place(place.vpath, place.mount, place.base, place.writable,
                                  place.names[:depth])
                    try:
                        self._mkdir_at(fd, name, part)
                    except SyscallError as e:
                        if e.name != "EEXIST":
                            raise
                    try:
                        nfd = os.open(name, _DIR, dir_fd=fd)
                    except OSError as e:
                        if e.errno in (_errno.ENOTDIR, _errno.ELOOP):
                            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                            link = _stat.S_ISLNK(st.st_mode)
                            raise _error("ELOOP" if link else "ENOTDIR",
                                         f"{place.vpath}: a component is "
                                         f"{'a symbolic link' if link else 'not a dir'}") \
                                from None
                        raise _from_os(e, place.vpath) from None
                    os.close(fd)
                    fd = nfd
            finally:
                os.close(fd)

    def _mkdir_at(self, dfd: int, name: str, place: _Place) -> None:
        try:
            os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _from_os(e, place.vpath) from None
        else:
            raise _error("EEXIST", f"{place.vpath}: already exists")
        self._charge_file(place)
        try:
            os.mkdir(name, 0o755, dir_fd=dfd)
        except OSError as e:
            raise _from_os(e, place.vpath) from None
        if place.private:
            self._files += 1

    def _removable(self, path: str) -> _Place:
        place = self._place(path)
        if not place.names:
            what = "the root" if place.private else f"mount point {place.mount}"
            raise _error("EBUSY", f"{place.vpath} is {what}")
        self._need_write(place)
        return place

    def unlink(self, path: str) -> None:
        """Remove a file (or a symlink, FIFO...: the name only). Dirs: EISDIR."""
        with self._lock:
            place = self._removable(path)
            dfd, name = self._parent(place)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if _stat.S_ISDIR(st.st_mode):
                    raise _error("EISDIR", f"{place.vpath}: is a directory (use rmdir)")
                os.unlink(name, dir_fd=dfd)
                self._uncharge(place, st)
            except OSError as e:
                raise _from_os(e, place.vpath) from None
            finally:
                os.close(dfd)

    def rmdir(self, path: str) -> None:
        """Remove an empty directory."""
        with self._lock:
            place = self._removable(path)
            dfd, name = self._parent(place)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if not _stat.S_ISDIR(st.st_mode):
                    raise _error("ENOTDIR", f"{place.vpath}: not a directory")
                os.rmdir(name, dir_fd=dfd)
                self._uncharge(place, st)
            except OSError as e:
                raise _from_os(e, place.vpath) from None
            finally:
                os.close(dfd)

    def rename(self, src: str, dst: str) -> None:
        """Move a name within one mount (or within the private root).
        A symlink is moved as itself, never followed."""
        with self._lock:
            s = self._removable(src)
            d = self._removable(dst)
            if s.mount != d.mount:
                raise _error("EXDEV", f"{s.vpath} -> {d.vpath}: rename across mounts; "
                                      "copy and remove instead")
            sfd, sname = self._parent(s)
            try:
                dfd, dname = self._parent(d)
                try:
                    moved = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
                    try:
                        old = os.stat(dname, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        old = None
                    os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
                    same = old is not None and (old.st_dev, old.st_ino) == (moved.st_dev,
                                                                            moved.st_ino)
                    if old is not None and not same:
                        self._uncharge(d, old)
                except OSError as e:
                    raise _from_os(e, f"{s.vpath} -> {d.vpath}") from None
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
