"""OS process containment: each agent process, and each process's exec runs,
live in a group the kernel can cap, list and kill as a whole, however its
processes fork, double-fork or ``setsid``.

``Containment.probe`` finds once at boot what holds here, strongest first:

``cgroup2``
    A writable cgroup v2 directory: the kernel's own cgroup (from
    ``/proc/self/cgroup``) below the cgroup2 mount, which is ``/sys/fs/cgroup``
    on a pure-v2 machine, a subtree delegated to the user for a non-root
    kernel, or the hybrid ``unified`` mount. Kill is ``cgroup.kill`` (the
    kernel kills every member atomically, forks in flight included). The
    ``memory`` and ``pids`` caps hold where those controllers are enabled in
    the kernel's own cgroup's ``cgroup.subtree_control`` (or can be: the root
    cgroup, or a delegated one without processes); otherwise v2 still contains
    and kills, without caps, and ``controllers`` says so.
``cgroup1``
    The v1 ``memory`` and ``pids`` hierarchies (plus ``freezer`` when it is
    writable), each below the kernel's own cgroup in that hierarchy. Kill is:
    freeze, SIGKILL every pid in ``cgroup.procs``, thaw, until empty (without
    a freezer: SIGSTOP until no new member appears, then SIGKILL).
``subreaper``
    Neither. The kernel becomes a child subreaper
    (``prctl(PR_SET_CHILD_SUBREAPER)``), so orphans re-parent to it instead of
    to the system's init, and a group is what a sweep of ``/proc`` finds: the
    process, its descendants by parent links, every process seen in the group
    on an earlier sweep (``tick()``, every ``SWEEP_S``) and any adopted orphan
    whose environment carries the process's ``LLMAGENTOS_PID``. Kill is
    SIGSTOP until no new member appears, then SIGKILL. What escapes: a
    descendant that scrubs ``LLMAGENTOS_PID`` from its environment *and* loses
    its parent (double fork) between two sweeps is no longer attributed to its
    process; it survives SIGKILL of that process, and kernel shutdown only
    kills it when the kernel owns all its children (no Ray cluster). No caps.

Layout: one parent per kernel, ``llmagentos-<hash of the run dir>``, so two
kernels never touch each other's groups, and the next boot on a run dir kills
and removes what a crashed kernel left there:

    llmagentos-<id>/
        p<pid>/     the agent process and everything it starts
        x<pid>/     its exec runs: memory and pids caps over all of them
            r<n>/   one run

``Group.join_self()`` is what a child calls between fork and exec (a
``preexec_fn`` or the agent launcher): only ``os`` calls on paths prepared in
advance. Groups are thread-safe to create and kill (exec runs from worker
threads).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from .procfs import children_map, proc_table

LEVELS = ("cgroup2", "cgroup1", "subreaper")
V1_HIERARCHIES = ("memory", "pids", "freezer")
CAPS = ("memory", "pids")  # the controllers that bound a group
SWEEP_S = 0.25  # subreaper: how often tick() should run
KILL_ROUNDS = 200  # bound on freeze/stop-and-kill rounds of one kill()
_PR_SET_CHILD_SUBREAPER = 36


def kernel_name(run_dir: Path) -> str:
    """The per-kernel parent group's name, derived from the run dir (which
    one kernel at a time holds)."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(run_dir))).hexdigest()[:12]
    return f"llmagentos-{digest}"


class Unavailable(Exception):
    """A containment level does not work here; the message says why."""


# --- small file helpers ------------------------------------------------------

def _read(path: str) -> str:
    """A cgroup or /proc file's text; "" once it is gone. (A cgroup removed
    between opening its file and reading it answers ENODEV.)"""
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return ""
    except OSError as e:
        if e.errno == errno.ENODEV:
            return ""
        raise


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _pids_in(procs_file: str) -> set[int]:
    return {int(x) for x in _read(procs_file).split()}


def _kill(pid: int, sig: int) -> None:
    if pid == os.getpid():  # the kernel may live in a leaf of its own groups (v2)
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _own_cgroups() -> dict[str, str]:
    """{controller: path} from /proc/self/cgroup; "" is the v2 entry."""
    out = {}
    for line in _read("/proc/self/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        for c in ctrls.split(",") if ctrls else [""]:
            out.setdefault(c, path)
    return out


def _mounts() -> tuple[tuple[str, str] | None, dict[str, tuple[str, str]]]:
    """(v2 (mount point, root), {v1 controller: (mount point, root)}) from mountinfo."""
    v2 = None
    v1: dict[str, tuple[str, str]] = {}
    for line in _read("/proc/self/mountinfo").splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        root, point = fields[3], fields[4].replace("\\040", " ")
        if rfields[0] == "cgroup2" and v2 is None:
            v2 = (point, root)
        elif rfields[0] == "cgroup":
            for opt in rfields[2].split(","):
                if opt in V1_HIERARCHIES:
                    v1.setdefault(opt, (point, root))
    return v2, v1


def _dir_below(mount: tuple[str, str], own: str | None) -> str | None:
    """The host dir of the cgroup ``own`` inside that mount, if it is visible."""
    point, root = mount
    if own is None:
        return None
    if root != "/":
        if own != root and not own.startswith(root.rstrip("/") + "/"):
            return None
        own = own[len(root.rstrip("/")):] or "/"
    return os.path.join(point, own.lstrip("/")).rstrip("/") or "/"


def _subdirs_bottom_up(top: str) -> list[str]:
    """Every cgroup dir below and including top, children before parents."""
    out = []
    for dirpath, _, _ in os.walk(top, topdown=False):
        out.append(dirpath)
    return out


def _rmdir(path: str) -> bool:
    """Remove one cgroup dir; True when it is gone."""
    for _ in range(50):
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY:
                return False
            time.sleep(0.002)  # its last member is still exiting
    return False


def _stop_then_kill(members: Callable[[], set[int]]) -> None:
    """Kill a set of processes that may be forking: SIGSTOP every member until
    a round finds none new (a stopped process can't fork), then SIGKILL all."""
    stopped: set[int] = set()
    for _ in range(KILL_ROUNDS):
        new = members() - stopped
        if not new:
            break
        for pid in new:
            _kill(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped | members():
        _kill(pid, signal.SIGKILL)


# --- groups -------------------------------------------------------------------

class Group:
    """A set of OS processes that are signalled, capped and killed together."""

    def __init__(self, owner: "Containment", name: str, parent: "Group | None") -> None:
        self.owner = owner
        self.name = name
        self.parent = parent
        self.children: dict[str, Group] = {}
        self.removed = False
        self.marker: bytes | None = None  # subreaper: an environment entry its members carry

    @property
    def path(self) -> str:
        return f"{self.parent.path}/{self.name}" if self.parent else self.name

    @property
    def procs_files(self) -> tuple[str, ...]:
        """The ``cgroup.procs`` files a process writes its pid (or "0") to in
        order to join: one for v2, one per v1 hierarchy, none for subreaper."""
        return ()

    def join_self(self) -> None:
        """Put the calling process in the group (between fork and exec)."""

    def add(self, pid: int) -> bool:
        """Put a started process in the group; False when it is gone."""
        raise NotImplementedError

    def pids(self) -> set[int]:
        """Every live member, subgroups included."""
        raise NotImplementedError

    def signal(self, sig: int, also: int | None = None) -> None:
        """Send sig to every member, the process's root ``also`` first (it may not
        have joined yet). First, so that its handler runs before it sees its
        children die of the same signal: one that saw them die first might be
        exiting, its handlers gone, when its own copy came (an MCP bridge died
        of a SIGTERM it handles)."""
        members = self.pids()
        if also:
            _kill(also, sig)
            members.discard(also)
        for pid in sorted(members):
            _kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL every member, subgroups included, however they fork."""
        raise NotImplementedError

    def oom_kills(self) -> int:
        """Processes the memory cap killed in this group so far (0 without one)."""
        return 0

    def child(self, name: str, memory_bytes: int | None = None,
              pids_max: int | None = None) -> "Group":
        return self.owner.create(name, memory_bytes, pids_max, parent=self)

    def walk(self) -> Iterable["Group"]:
        yield self
        for c in list(self.children.values()):
            yield from c.walk()

    def remove(self) -> None:
        """Kill what is left and forget the group (its dirs go)."""
        self.kill()
        with self.owner.lock:
            for c in list(self.children.values()):
                c.remove()
            if not self._remove_dirs():
                self.owner.stale.append(self)
            self.removed = True
            if self.parent is not None:
                self.parent.children.pop(self.name, None)
            else:
                self.owner.groups.pop(self.name, None)

    def _remove_dirs(self) -> bool:
        return True


class _CgroupGroup(Group):
    def __init__(self, owner: "Containment", name: str, parent: Group | None,
                 dirs: dict[str, str]) -> None:
        super().__init__(owner, name, parent)
        self.dirs = dirs  # hierarchy ("" for v2) -> dir
        self._procs = tuple(os.path.join(d, "cgroup.procs") for d in dirs.values())
        self._zero = b"0"

    @property
    def procs_files(self) -> tuple[str, ...]:
        return self._procs

    def join_self(self) -> None:
        for path in self._procs:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, self._zero)
            finally:
                os.close(fd)

    def add(self, pid: int) -> bool:
        """Move pid in, then the descendants it started before the move (a
        process started from outside has run a while by the time its starter
        gets here); what it forks after the move is born inside."""
        if not self._move(pid):
            return False
        table = proc_table()
        kids = children_map(table)
        stack = list(kids.get(pid, ()))
        while stack:
            p = stack.pop()
            self._move(p)
            stack.extend(kids.get(p, ()))
        return True

    def _move(self, pid: int) -> bool:
        try:
            for path in self._procs:
                _write(path, str(pid))
        except ProcessLookupError:
            return False
        except OSError as e:
            if e.errno == errno.ESRCH:
                return False
            raise
        return True

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs.values():
            for sub in _subdirs_bottom_up(d):
                out |= _pids_in(os.path.join(sub, "cgroup.procs"))
        return out

    def kill(self) -> None:
        v2 = self.dirs.get("")
        if v2 is not None and os.path.exists(os.path.join(v2, "cgroup.kill")):
            try:
                _write(os.path.join(v2, "cgroup.kill"), "1")
            except FileNotFoundError:
                return
            self._wait_empty()
            return
        freezer = self.dirs.get("freezer")
        if freezer is None:
            _stop_then_kill(self.pids)
            self._wait_empty()
            return
        state = os.path.join(freezer, "freezer.state")
        for _ in range(KILL_ROUNDS):
            if not self.pids():
                return
            try:
                _write(state, "FROZEN")
                for _ in range(25):  # frozen within a few ms unless a task sleeps in D state
                    if _read(state).strip() == "FROZEN":
                        break
                    time.sleep(0.002)
                for pid in self.pids():
                    _kill(pid, signal.SIGKILL)
            except FileNotFoundError:
                return
            finally:
                try:
                    _write(state, "THAWED")  # the killed die once thawed
                except FileNotFoundError:
                    pass
            self._wait_empty(0.05)

    def _wait_empty(self, timeout: float = 1.0) -> None:
        end = time.monotonic() + timeout
        while self.pids() and time.monotonic() < end:
            time.sleep(0.002)

    def oom_kills(self) -> int:
        mem = self.dirs.get("memory")
        files = [os.path.join(mem, "memory.oom_control")] if mem else []
        if "" in self.dirs:
            files.append(os.path.join(self.dirs[""], "memory.events"))
        for path in files:
            for line in _read(path).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def _remove_dirs(self) -> bool:
        ok = True
        for d in self.dirs.values():
            for sub in _subdirs_bottom_up(d):
                ok = _rmdir(sub) and ok
        return ok


class _SweepGroup(Group):
    """Subreaper mode: members found by sweeping /proc."""

    def __init__(self, owner: "Containment", name: str, parent: Group | None) -> None:
        super().__init__(owner, name, parent)
        self.root: tuple[int, int] | None = None  # (pid, start time)
        self.known: set[tuple[int, int]] = set()

    def add(self, pid: int) -> bool:
        table = proc_table()
        if pid not in table:
            return False
        self.root = (pid, table[pid][1])
        self.known.add(self.root)
        return True

    def refresh(self, table: dict, kids: dict[int, list[int]], adopted: list[int]) -> set[int]:
        """Members now, zombies included (and remember them)."""
        seeds = [p for p, st in self.known if p in table and table[p][1] == st]
        if self.marker is not None:
            seeds += [p for p in adopted if self.marker in _environ(p)]
        members: set[int] = set()
        while seeds:
            pid = seeds.pop()
            if pid not in members:
                members.add(pid)
                seeds.extend(kids.get(pid, ()))
        self.known = {(p, table[p][1]) for p in members}
        return members

    def pids(self) -> set[int]:
        table = proc_table()
        kids = children_map(table)
        adopted = self.owner.adopted(table, kids)
        out: set[int] = set()
        for g in self.walk():
            if isinstance(g, _SweepGroup):
                out |= {p for p in g.refresh(table, kids, adopted) if table[p][2] != "Z"}
        return out

    def kill(self) -> None:
        _stop_then_kill(self.pids)


class Containment:
    """What this kernel can do to keep process trees together (see the module doc)."""

    def __init__(self, level: str, name: str, bases: dict[str, str],
                 controllers: tuple[str, ...], reason: str = "") -> None:
        self.level = level
        self.name = name
        self.bases = bases  # hierarchy ("" for v2) -> the kernel's parent dir
        self.controllers = controllers
        self.reason = reason  # why a stronger level is not used
        self.groups: dict[str, Group] = {}
        self.stale: list[Group] = []  # groups whose dirs could not be removed yet
        self.lock = threading.RLock()
        # subreaper: every child of ours that is no group's root is an adopted
        # orphan of some group (the kernel says so when it starts nothing else)
        self.own_all_children = False
        self._zombies: set[int] = set()
        self._leaf: tuple[str, str] | None = None  # v2: (the kernel's own leaf, where it was)
        self._enabled: list[tuple[str, str]] = []  # v2: (dir, controller) we turned on

    # --- probing ------------------------------------------------------------------
    @classmethod
    def probe(cls, name: str, prefer: str = "auto") -> "Containment":
        """The strongest level that works here (or exactly ``prefer``: ValueError
        when that one does not)."""
        if prefer not in ("auto", *LEVELS):
            raise ValueError(f"containment must be auto, {', '.join(LEVELS)}; not {prefer!r}")
        v2_mount, v1_mounts = _mounts()
        own = _own_cgroups()
        tried: dict[str, Containment | str] = {}
        for level in ("cgroup2", "cgroup1"):
            if prefer not in ("auto", level):
                continue
            try:
                if level == "cgroup2":
                    tried[level] = cls._probe_v2(name, v2_mount, own.get(""))
                else:
                    tried[level] = cls._probe_v1(name, v1_mounts, own)
            except Unavailable as e:
                tried[level] = str(e)
        if prefer in ("cgroup2", "cgroup1"):
            got = tried[prefer]
            if isinstance(got, str):
                raise ValueError(f"{prefer} containment is not available: {got}")
            return got

        def full(c: Containment | str) -> bool:
            return not isinstance(c, str) and set(CAPS) <= set(c.controllers)

        order = [lv for lv in ("cgroup2", "cgroup1") if full(tried.get(lv, ""))] + \
                [lv for lv in ("cgroup2", "cgroup1") if not isinstance(tried.get(lv, ""), str)]
        chosen = tried[order[0]] if order and prefer == "auto" else None
        for level, c in tried.items():
            if not isinstance(c, str) and c is not chosen:
                c._drop_bases()  # a probe's leftover parent dir
        def unused(c: Containment | str) -> str:
            if isinstance(c, str):
                return c
            return "no " + " or ".join(x for x in CAPS if x not in c.controllers) + \
                " controller to use"

        why = "; ".join(f"{lv}: {unused(c)}" for lv, c in tried.items() if c is not chosen)
        if chosen is not None:
            chosen.reason = why
            return chosen
        return cls._subreaper(name, why or "forced")

    @classmethod
    def _probe_v2(cls, name: str, mount: tuple[str, str] | None, own: str | None
                  ) -> "Containment":
        if mount is None:
            raise Unavailable("no cgroup2 mount")
        top = _dir_below(mount, own)
        if top is None or not os.path.isdir(top):
            raise Unavailable("the kernel's own cgroup is not visible in the cgroup2 mount")
        base = os.path.join(top, name)
        try:
            os.makedirs(base, exist_ok=True)
        except OSError as e:
            raise Unavailable(f"can't create {base}: {e.strerror}") from None
        if not os.path.exists(os.path.join(base, "cgroup.kill")) and \
                not os.path.exists(os.path.join(base, "cgroup.freeze")):
            _rmdir(base)
            raise Unavailable("cgroup2 without cgroup.kill or cgroup.freeze (Linux < 5.2)")
        if not os.access(os.path.join(base, "cgroup.procs"), os.W_OK):
            _rmdir(base)
            raise Unavailable(f"{base}/cgroup.procs is not writable")
        self = cls("cgroup2", name, {"": base}, ())
        self._clear_leftovers()
        self._hand_down_caps(top, base)
        return self

    def _hand_down_caps(self, top: str, base: str) -> None:
        """v2: enable memory and pids for the groups below ``base``. v2 lets only
        a cgroup without processes hand controllers down; when the kernel's own
        cgroup refuses for that reason and the kernel is its only process (a
        delegated service or scope), the kernel moves into a leaf of its own,
        ``base/kernel`` (moved back at close)."""
        subtree = os.path.join(top, "cgroup.subtree_control")
        available = set(_read(os.path.join(top, "cgroup.controllers")).split())
        missing = [c for c in CAPS if c in available
                   and c not in _read(subtree).split()]
        for c in missing:
            try:
                _write(subtree, f"+{c}")
                self._enabled.append((top, c))
            except OSError as e:
                if e.errno != errno.EBUSY or _pids_in(os.path.join(top, "cgroup.procs")) != {
                        os.getpid()} or self._leaf is not None:
                    continue
                try:
                    leaf = os.path.join(base, "kernel")
                    os.makedirs(leaf, exist_ok=True)
                    _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
                    self._leaf = (leaf, top)
                    _write(subtree, f"+{c}")
                    self._enabled.append((top, c))
                except OSError:
                    continue
        got = []
        for c in CAPS:
            if c in _read(subtree).split():
                try:
                    _write(os.path.join(base, "cgroup.subtree_control"), f"+{c}")
                    self._enabled.append((base, c))
                    got.append(c)
                except OSError:
                    pass
        self.controllers = tuple(got)

    def _give_back_caps(self) -> None:
        """Close: undo what _hand_down_caps did, the kernel's move included."""
        for d, c in reversed(self._enabled):
            try:
                _write(os.path.join(d, "cgroup.subtree_control"), f"-{c}")
            except OSError:
                pass
        self._enabled = []
        if self._leaf is not None:
            leaf, top = self._leaf
            try:
                _write(os.path.join(top, "cgroup.procs"), str(os.getpid()))
                self._leaf = None
            except OSError:
                pass  # stays in the leaf; the next boot removes it once empty

    @classmethod
    def _probe_v1(cls, name: str, mounts: dict[str, tuple[str, str]], own: dict[str, str]
                  ) -> "Containment":
        bases: dict[str, str] = {}
        why = []
        for h in V1_HIERARCHIES:
            if h not in mounts:
                why.append(f"no v1 {h} hierarchy")
                continue
            top = _dir_below(mounts[h], own.get(h))
            if top is None:
                why.append(f"own {h} cgroup not visible")
                continue
            base = os.path.join(top, name)
            try:
                os.makedirs(base, exist_ok=True)
                if not os.access(os.path.join(base, "cgroup.procs"), os.W_OK):
                    raise PermissionError(errno.EACCES, "cgroup.procs not writable")
            except OSError as e:
                why.append(f"{h}: {e.strerror}")
                continue
            bases[h] = base
        if not bases:
            raise Unavailable("; ".join(why) or "no v1 hierarchy")
        self = cls("cgroup1", name, bases, tuple(h for h in V1_HIERARCHIES if h in bases),
                   "; ".join(why))
        self._clear_leftovers()
        return self

    @classmethod
    def _subreaper(cls, name: str, reason: str) -> "Containment":
        if not _set_subreaper(True):
            reason += f"; prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}"
        return cls("subreaper", name, {}, (), reason)

    def describe(self) -> dict:
        return {"level": self.level, "controllers": list(self.controllers),
                "group": self.name, "reason": self.reason}

    # --- groups -------------------------------------------------------------------
    def create(self, name: str, memory_bytes: int | None = None, pids_max: int | None = None,
               parent: Group | None = None, marker: str | None = None) -> Group:
        """A new, empty group (below ``parent`` when given). ``marker``: an
        environment entry ("K=V") the group's processes inherit, which lets the
        subreaper sweep claim its orphans. OSError when the cgroup can't be made
        (the parent is gone, or the system is out of them)."""
        with self.lock:
            self._retry_stale()
            siblings = parent.children if parent is not None else self.groups
            if parent is not None and parent.removed:
                raise FileNotFoundError(errno.ENOENT, f"group {parent.path} is gone")
            if self.level == "subreaper":
                group: Group = _SweepGroup(self, name, parent)
            else:
                dirs = {}
                try:
                    for h, base in self.bases.items():
                        top = parent.dirs[h] if isinstance(parent, _CgroupGroup) else base
                        if parent is not None and h == "":
                            self._delegate(top)
                        d = os.path.join(top, name)
                        os.mkdir(d)
                        dirs[h] = d
                    group = _CgroupGroup(self, name, parent, dirs)
                    self._set_caps(group, memory_bytes, pids_max)
                except OSError:
                    for d in dirs.values():
                        _rmdir(d)
                    raise
            if marker is not None:
                group.marker = b"\0" + marker.encode() + b"\0"
            siblings[name] = group
            return group

    def _delegate(self, d: str) -> None:
        """v2: give a group's children the caps it has (it holds no process itself)."""
        have = set(_read(os.path.join(d, "cgroup.controllers")).split())
        on = set(_read(os.path.join(d, "cgroup.subtree_control")).split())
        for c in CAPS:
            if c in have and c not in on:
                _write(os.path.join(d, "cgroup.subtree_control"), f"+{c}")

    def _set_caps(self, group: _CgroupGroup, memory_bytes: int | None,
                  pids_max: int | None) -> None:
        d2 = group.dirs.get("")
        if memory_bytes is not None:
            if d2 is not None and os.path.exists(os.path.join(d2, "memory.max")):
                _write(os.path.join(d2, "memory.max"), str(int(memory_bytes)))
                if os.path.exists(os.path.join(d2, "memory.swap.max")):
                    _write(os.path.join(d2, "memory.swap.max"), "0")
            elif "memory" in group.dirs:
                mem = group.dirs["memory"]
                _write(os.path.join(mem, "memory.limit_in_bytes"), str(int(memory_bytes)))
                memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
                if os.path.exists(memsw):  # no escape into swap either
                    try:
                        _write(memsw, str(int(memory_bytes)))
                    except OSError:
                        pass
        if pids_max is not None:
            d = d2 if d2 is not None else group.dirs.get("pids")
            if d is not None and os.path.exists(os.path.join(d, "pids.max")):
                _write(os.path.join(d, "pids.max"), str(int(pids_max)))

    def _retry_stale(self) -> None:
        self.stale = [g for g in self.stale if not g._remove_dirs()]

    def all_groups(self) -> list[Group]:
        with self.lock:
            return list(self.groups.values())

    # --- the kernel's sweeps ------------------------------------------------------
    def sweep(self) -> None:
        """Shutdown: kill every group that is left and remove them."""
        for g in self.all_groups():
            g.remove()
        if self.level == "subreaper" and self.own_all_children:
            def orphans() -> set[int]:  # every adopted child of ours, and theirs
                table = proc_table()
                kids = children_map(table)
                out: set[int] = set()
                stack = self.adopted(table, kids)
                while stack:
                    p = stack.pop()
                    if p not in out:
                        out.add(p)
                        stack.extend(kids.get(p, ()))
                return out

            _stop_then_kill(orphans)

    def close(self) -> None:
        """Kill and remove everything, the per-kernel parent dirs too."""
        self.sweep()
        with self.lock:
            self._retry_stale()
        self._give_back_caps()
        self._drop_bases()
        if self.level == "subreaper":
            _set_subreaper(False)

    def _drop_bases(self) -> None:
        for base in self.bases.values():
            for d in _subdirs_bottom_up(base) if os.path.isdir(base) else []:
                _rmdir(d)

    def _clear_leftovers(self) -> None:
        """Boot: what a crashed kernel of this run dir left is killed, then removed."""
        leftovers = []
        for h, base in self.bases.items():
            try:
                entries = sorted(os.listdir(base))
            except FileNotFoundError:  # another holder of the name removed it: nothing left
                continue
            leftovers += [e for e in entries if os.path.isdir(os.path.join(base, e))]
        for entry in sorted(set(leftovers)):
            dirs = {h: os.path.join(b, entry) for h, b in self.bases.items()
                    if os.path.isdir(os.path.join(b, entry))}
            g = _CgroupGroup(self, entry, None, dirs)
            g.kill()
            g._remove_dirs()

    # --- subreaper ----------------------------------------------------------------
    def _sweep_groups(self) -> list[_SweepGroup]:
        return [h for g in self.all_groups() for h in g.walk() if isinstance(h, _SweepGroup)]

    def roots(self) -> set[int]:
        return {g.root[0] for g in self._sweep_groups() if g.root is not None}

    def adopted(self, table: dict, kids: dict[int, list[int]]) -> list[int]:
        """Our live children that we did not start (orphans re-parented to us)."""
        roots = self.roots()
        return [p for p in kids.get(os.getpid(), ()) if p not in roots and table[p][2] != "Z"]

    def tick(self) -> None:
        """Subreaper: learn each group's members while their parent links still
        show them, and reap the orphans that died here."""
        if self.level != "subreaper":
            return
        table = proc_table()
        kids = children_map(table)
        adopted = self.adopted(table, kids)
        groups = self._sweep_groups()
        for g in groups:
            g.refresh(table, kids, adopted)
        # A zombie child must show on two sweeps in a row before we wait for it,
        # so a child that code of ours waits for itself is left to that code.
        roots = {g.root[0] for g in groups if g.root is not None}
        known = {p for g in groups for p, _ in g.known}
        me = os.getpid()
        zombies = {p for p, (pp, _, state) in table.items()
                   if pp == me and state == "Z" and p not in roots
                   and (self.own_all_children or p in known)}
        for pid in zombies & self._zombies:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        self._zombies = zombies


def _set_subreaper(on: bool) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def _environ(pid: int) -> bytes:
    """A process's initial environment as NUL-framed entries (b"\\0K=V\\0...")."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return b"\0" + f.read()
    except OSError:
        return b""
