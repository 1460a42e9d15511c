"""Mailboxes: every process's message queue, topics, and mail to named agents.

Addresses. ``ipc.send(dest, message)`` takes a pid or ``agent:NAME``:

- Mail to a pid lives in memory only: it is lost when the receiving process
  exits or the kernel stops, as data in a pipe would be.
- Mail to ``agent:NAME`` is durable: it is committed to the memory database
  (kernel/memory/mail.py) before ipc.send answers, and kept until a process
  named NAME receives it: the running one, else the next one to start, in
  this boot or a later one. Receiving it deletes it in the commit that hands
  it out, so it is delivered once. (A receiver that vanishes while that
  answer is on its way loses the message: the kernel never hands one out
  twice.)

The kernel stamps each message with its sender, the pid and identity of the
connection it came on (``from``, ``sender``); nothing in the message can
change them. ``from`` is nil for durable mail sent in an earlier boot, whose
pids mean nothing now; ``sender`` (``agent:NAME`` or ``pid:N``) is the one to
reply to.

Fair delivery. A mailbox keeps one FIFO queue per sender (and per address:
a sender's mail to a pid and to agent:NAME are two queues) and serves the
queues in turn, so a sender with thousands waiting delays another's message
by one at most. Each sender may have ``depth`` messages (boot option
mailbox_depth) and `queue_bytes` bytes waiting in one mailbox: a flood fills
only the flooder's own share. Past it ipc.send waits up to its timeout for
room, then is EAGAIN; a message that a receiver is waiting for is handed over
all the same, since it waits nowhere.

Waiting. An ipc.recv with nothing to take waits in its mailbox's list of
waiters, with no task: the sender of the next message it matches answers it
in its own step, so the message goes from the sender's connection to the
receiver's socket with no task switch in between, as L4 hands a message to
a thread blocked in receive. send, recv and sendrecv run inline; only a
sender facing a full mailbox and durable mail (its row is taken in a worker
thread) go on in a task. Nothing polls: one timer answers ETIMEDOUT when a
wait's timeout passes (kernel/mailwait.py). A process's exit answers its
waiting calls and wakes its blocked senders with ESRCH.

Size. A message is any MessagePack value whose encoding fits `max_message`:
the frame limit less room for the envelope its receiver gets. A larger one is
E2BIG, and the connection goes on.

Topics. ipc.publish puts a copy into the mailbox of every subscriber (memory
only, under the same per-sender bounds: a subscriber whose share is full
misses it) and answers how many got one.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import msgpack
import trio

from llmagentos.syscalls import wire
from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.table import check_name

from .mailwait import Waiter, Waits, deadline_of, timed_out
from .memory.mail import Header, MailStore
from .proc import PCB

if TYPE_CHECKING:
    from .dispatch import Call
    from .proc import ProcessTable

AGENT = "agent:"
QUEUE_BYTES = 64 << 20  # bytes one sender may have waiting in one mailbox (at least)
ENVELOPE_ROOM = 64 << 10  # what an envelope adds to a message, and then some
MAX_TOPIC = 255
MAX_TOPICS = 256  # subscriptions of one process
MATCH_KEYS = frozenset({"from", "type", "topic"})


@dataclass(eq=False, slots=True)
class Letter:
    """One message waiting in a mailbox."""

    id: int
    queue: tuple  # whose queue it waits in: ("pid", pid) or ("agent", sender, boot)
    sender: str  # identity: agent:NAME or pid:N
    pid: int | None  # the sender's pid; None if it was sent in an earlier boot
    to: int | str  # the address it was sent to
    type: str | None  # a dict message's "type" field
    topic: str | None
    size: int
    time: float
    body: bytes | None  # the message, MessagePack; None: durable, in the store until taken
    row: int | None = None  # its row in the store (durable mail)

    def matches(self, match: dict | None) -> bool:
        if not match:
            return True
        frm = match.get("from")
        if frm is not None and (self.pid != frm if isinstance(frm, int) else self.sender != frm):
            return False
        if "type" in match and self.type != match["type"]:
            return False
        return "topic" not in match or self.topic == match["topic"]

    def envelope(self, body: bytes, message: Any = None) -> dict[str, Any]:
        """What the receiver gets; ``message`` (not None): the body, decoded already
        (the sender's own, handed over as it came: it is encoded again at once)."""
        return {"id": self.id, "from": self.pid, "sender": self.sender, "to": self.to,
                "type": self.type, "topic": self.topic, "time": self.time,
                "durable": self.row is not None,
                "message": msgpack.unpackb(body, raw=False, strict_map_key=False)
                if message is None else message}


class Mailbox:
    """One process's waiting mail: a queue per sender, served in turn."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.queues: dict[tuple, deque[Letter]] = {}  # insertion order is the turn order
        self.bytes: dict[tuple, int] = {}
        self.rows: set[int] = set()  # store rows ever put here (never twice)
        self.topics: set[str] = set()
        self.closed = False
        self.waiters: list[Waiter] = []  # oldest first
        self._room = trio.Event()

    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def has_room(self, queue: tuple, size: int, depth: int, max_bytes: int) -> bool:
        q = self.queues.get(queue)
        return q is None or (len(q) < depth and self.bytes[queue] + size <= max_bytes)

    def put(self, letter: Letter, front: bool = False) -> None:
        q = self.queues.get(letter.queue)
        if q is None:
            q = self.queues[letter.queue] = deque()
            self.bytes[letter.queue] = 0
        if front:
            q.appendleft(letter)
        elif letter.row is not None and q and q[-1].row is not None and q[-1].row > letter.row:
            # durable mail keeps the order of its rows whichever commit came back first
            i = len(q)
            while i > 0 and q[i - 1].row is not None and q[i - 1].row > letter.row:
                i -= 1
            q.insert(i, letter)
        else:
            q.append(letter)
        self.bytes[letter.queue] += letter.size

    def take(self, match: dict | None) -> Letter | None:
        """The first matching letter of the first queue that has one; that
        queue goes to the back of the turn order."""
        for key, q in self.queues.items():
            for i, letter in enumerate(q):
                if letter.matches(match):
                    del q[i]
                    del self.queues[key]
                    if q:
                        self.queues[key] = q  # served: to the back of the line
                        self.bytes[key] -= letter.size
                    else:
                        del self.bytes[key]
                    self._room.set()
                    self._room = trio.Event()
                    return letter
        return None

    def plan(self, match: dict | None, n: int) -> list[Letter]:
        """The next n letters `take` would hand out, left where they are."""
        lists = [[x for x in q if x.matches(match)] for q in self.queues.values()]
        out: list[Letter] = []
        for turn in itertools.zip_longest(*lists):
            out += [x for x in turn if x is not None]
            if len(out) >= n:
                break
        return out[:n]

    async def room(self) -> None:
        await self._room.wait()

    def close(self) -> None:
        self.closed = True
        self._room.set()


async def _wait(pcb: PCB, event: Callable[[], Awaitable[None]], deadline: float) -> None:
    """Sleep until the event or the deadline, the process shown WAITING meanwhile."""
    pcb.waiting_calls += 1
    try:
        if deadline == float("inf"):
            await event()
        else:
            with trio.move_on_at(deadline):
                await event()
    finally:
        pcb.waiting_calls -= 1


def _kind(message: Any) -> str | None:
    """A dict message's "type" field, what ipc.recv matches on."""
    kind = message.get("type") if isinstance(message, dict) else None
    return kind if isinstance(kind, str) else None


def check_topic(topic: str) -> str:
    if not topic or len(topic) > MAX_TOPIC or not topic.isprintable():
        raise SyscallError("EINVAL", f"a topic is 1..{MAX_TOPIC} printable characters")
    return topic


def check_match(match: dict | None) -> dict | None:
    if not match:
        return None
    if not MATCH_KEYS.issuperset(match):
        unknown = set(match) - MATCH_KEYS
        raise SyscallError("EINVAL", f"match takes the keys {sorted(MATCH_KEYS)}, not "
                                     f"{sorted(unknown)}")
    frm = match.get("from")
    if frm is not None and (isinstance(frm, bool) or not isinstance(frm, (int, str))):
        raise SyscallError("EINVAL", "match 'from' is a pid or an identity ('agent:NAME')")
    for k in ("type", "topic"):
        if k in match and not isinstance(match[k], str):
            raise SyscallError("EINVAL", f"match {k!r} must be a string")
    return match


class Mailboxes:
    """Every live process's mailbox (made at its first use), the topics, and
    the durable mail of named agents."""

    def __init__(self, procs: ProcessTable, store: MailStore, boot: str, depth: int,
                 max_frame: int) -> None:
        self.procs = procs
        self.store = store
        self.boot = boot  # this boot's id: tells this boot's pids from earlier ones'
        self.depth = depth
        self.max_message = max_frame - min(ENVELOPE_ROOM, max_frame // 4)
        self.queue_bytes = max(QUEUE_BYTES, 4 * self.max_message)
        self.boxes: dict[int, Mailbox] = {}
        self.topics: dict[str, set[int]] = {}
        self._ids = itertools.count(1)
        self._taken: dict[str, trio.Event] = {}  # agent name -> set when its stored mail shrinks
        self.waits = Waits()  # calls waiting with no task (the kernel runs waits.timer)

    # --- mailboxes ------------------------------------------------------------------
    def box(self, pcb: PCB) -> Mailbox:
        """The process's mailbox; a named agent's starts with its stored mail."""
        box = self.boxes.get(pcb.pid)
        if box is None:
            if pcb.exited:
                raise SyscallError("ESRCH", f"pid {pcb.pid} has exited")
            box = self.boxes[pcb.pid] = Mailbox(pcb.pid)
            if pcb.agent:
                for h in self.store.pending(pcb.agent):
                    self._deliver_stored(box, h)
        return box

    def _deliver_stored(self, box: Mailbox, h: Header) -> None:
        if h.id in box.rows:
            return
        box.rows.add(h.id)
        self._deliver(box, Letter(h.id, ("agent", h.sender, h.boot), h.sender,
                       h.pid if h.boot == self.boot else None, AGENT + h.agent, h.type, None,
                       h.size, h.created, None, h.id))

    def drop(self, pcb: PCB) -> None:
        """The process exited: its memory mail goes, its stored mail stays for
        the next process of its name, and whoever waits on it is woken."""
        box = self.boxes.pop(pcb.pid, None)
        if box is None:
            return
        box.close()
        for w in list(box.waiters):
            self.waits.answer(w, error=SyscallError("ESRCH", f"pid {pcb.pid} has exited"))
        for topic in box.topics:
            subs = self.topics.get(topic)
            if subs is not None:
                subs.discard(pcb.pid)
                if not subs:
                    del self.topics[topic]

    def _pack(self, message: Any) -> bytes:
        body = wire.pack(message)
        if len(body) > self.max_message:
            raise SyscallError("E2BIG", f"a message is at most {self.max_message} bytes "
                                        f"encoded, this one is {len(body)}")
        return body

    def _pack_unless_small(self, call: Call, message: Any) -> bytes | None:
        """The message's encoding, or None where its request shows it fits: a
        value decoded from n bytes encodes again in under 2n (a float32 alone
        grows, 5 bytes to 9). A message handed to a waiting receiver then goes
        out in its answer encoded once; one that is queued is encoded then."""
        return None if 0 < call.size <= self.max_message // 2 else self._pack(message)

    # --- send -----------------------------------------------------------------------
    def send_now(self, call: Call, dest: int | str, message: Any, timeout: float) -> Any:
        """ipc.send's inline step: mail to a pid with room is put (and handed to
        a waiting receiver) at once; a full mailbox or durable mail goes on in a task."""
        if isinstance(dest, int):
            sent = self._put(call.caller, dest, message, self._pack_unless_small(call, message))
            if sent is not None:
                return sent
        return call.defer(self.send, call, dest, message, timeout)

    async def send(self, call: Call, dest: int | str, message: Any, timeout: float) -> dict:
        body, kind = self._pack(message), _kind(message)
        deadline = trio.current_time() + timeout  # for room in a full mailbox
        if isinstance(dest, str):
            if not dest.startswith(AGENT):
                raise SyscallError("EINVAL", f"dest is a pid or 'agent:NAME', not {dest!r:.80}")
            return await self._send_stored(call, check_name(dest[len(AGENT):]), body, kind,
                                           deadline)
        me = call.caller
        while True:
            sent = self._put(me, dest, message, body)
            if sent is not None:
                return sent
            box = self.boxes[dest]
            if trio.current_time() >= deadline:
                raise SyscallError("EAGAIN", f"the mailbox of pid {dest} holds all the unread "
                                             f"messages it takes from you ({self.depth} or "
                                             f"{self.queue_bytes} bytes)")
            await _wait(me, box.room, deadline)
            if box.closed:
                raise SyscallError("ESRCH", f"pid {dest} exited")

    def _put(self, me: PCB, dest: int, message: Any, body: bytes | None) -> dict | None:
        """Mail to a pid: the answer of a call waiting for it, else queued if the
        sender's share of the mailbox has room (None: it has not). A letter handed
        over takes no room: a receiver waiting for it never waits on a full share.
        ``body``: the message's encoding; None: made here if it is queued."""
        target = self.procs.procs.get(dest)
        if target is None or target.exited:
            raise SyscallError("ESRCH", f"no process with pid {dest}")
        box = self.box(target)
        letter = Letter(next(self._ids), ("pid", me.pid), me.identity, me.pid, dest,
                        _kind(message), None, 0, time.time(), body)
        if box.waiters and self._hand(box, letter, message):
            return {"id": letter.id, "durable": False}
        if body is None:
            letter.body = body = self._pack(message)
        letter.size = len(body)
        if not box.has_room(letter.queue, letter.size, self.depth, self.queue_bytes):
            return None
        box.put(letter)
        return {"id": letter.id, "durable": False}

    def _hand(self, box: Mailbox, letter: Letter, message: Any = None) -> bool:
        """Mail in memory to the oldest call waiting in the box that it matches,
        as that call's answer (False: none took it). ``message``: the sender's
        message as it came (not None), what the body would decode to."""
        for w in list(box.waiters):
            if letter.matches(w.match) and self.waits.answer(w, letter.envelope(
                    letter.body, message)):
                return True  # (False: its caller hung up; the next one, or the queue)
        return False

    def _deliver(self, box: Mailbox, letter: Letter, front: bool = False) -> None:
        """Hand a letter to a call waiting for it, else queue it. Mail in memory
        is that call's answer at once; durable mail is queued and the call goes
        on in a task that takes its row."""
        if letter.row is None and not front and box.waiters and self._hand(box, letter):
            return
        box.put(letter, front)
        if letter.row is not None and box.waiters:
            for w in list(box.waiters):
                if letter.matches(w.match):
                    self.waits.unwait(w)
                    if not w.call.conn.closed:
                        w.call.defer(self._recv, w.call, box, w.match, w.deadline, w.timeout,
                                     None)
                        return

    def hang_up(self, conn: Any) -> None:
        """A connection closed: its calls waiting for mail wait no more."""
        box = self.boxes.get(conn.pcb.pid)
        if box is not None:
            self.waits.hang_up(box, conn)

    async def _send_stored(self, call: Call, name: str, body: bytes, kind: str | None,
                           deadline: float) -> dict:
        me = call.caller
        taken = None
        try:
            while True:
                # made before the try, so a take while the put runs is not missed
                taken = self._taken.setdefault(name, trio.Event())
                try:
                    # Once committed it is acknowledged mail: the process that holds
                    # the name must get it, whatever happens to this call meanwhile.
                    with trio.CancelScope(shield=True):
                        h = await call.in_thread(self.store.put, name, me.identity, me.pid,
                                                 self.boot, kind, body, self.depth,
                                                 self.queue_bytes)
                    break
                except SyscallError as e:
                    if e.name != "EAGAIN" or trio.current_time() >= deadline:
                        raise
                await _wait(me, taken.wait, deadline)
        finally:  # no event left behind for a name nobody waits on
            if self._taken.get(name) is taken and not taken.statistics().tasks_waiting:
                del self._taken[name]
        holder = self.procs.names.holder(name)
        if holder is not None:
            self._deliver_stored(self.box(holder), h)
        return {"id": h.id, "durable": True}

    # --- receive ----------------------------------------------------------------------
    def recv_now(self, call: Call, timeout: float | None, match: dict | None) -> Any:
        """ipc.recv's inline step: mail waiting in memory is the answer at once;
        otherwise a task waits for it (or takes the durable letter's row)."""
        match = check_match(match)
        now = trio.current_time()
        return self._recv_now(call, self.box(call.caller), match, deadline_of(timeout, now),
                              timeout, now)

    def _recv_now(self, call: Call, box: Mailbox, match: dict | None, deadline: float,
                  timeout: float | None, now: float) -> Any:
        letter = box.take(match)
        if letter is not None and letter.row is None:
            return letter.envelope(letter.body)
        if letter is not None:
            return call.defer(self._recv, call, box, match, deadline, timeout, letter)
        self._check_wait(box, match, deadline, timeout, now)
        return self.waits.park(call, box, match, deadline, timeout)

    async def recv(self, call: Call, timeout: float | None, match: dict | None) -> Any:
        match = check_match(match)
        deadline = deadline_of(timeout)
        return await self._recv(call, self.box(call.caller), match, deadline, timeout, None)

    async def _recv(self, call: Call, box: Mailbox, match: dict | None, deadline: float,
                    timeout: float | None, letter: Letter | None) -> Any:
        while True:
            if letter is None:
                letter = box.take(match)
            if letter is None:
                self._check_wait(box, match, deadline, timeout)
                return self.waits.park(call, box, match, deadline, timeout)
            body = letter.body if letter.row is None else await self._take_stored(
                call, box, letter)
            if body is not None:
                return letter.envelope(body)
            letter = None  # (taken meanwhile; cannot happen while names are held singly)

    @staticmethod
    def _check_wait(box: Mailbox, match: dict | None, deadline: float,
                    timeout: float | None, now: float | None = None) -> None:
        """Nothing to take: ESRCH if the process is gone, ETIMEDOUT past the deadline."""
        if box.closed:
            raise SyscallError("ESRCH", f"pid {box.pid} has exited")
        if (trio.current_time() if now is None else now) >= deadline:
            raise timed_out(match, timeout)

    def sendrecv_now(self, call: Call, dest: int | str, message: Any, timeout: float | None,
                     match: dict | None) -> Any:
        """A request and its answer in one call (as L4's call and reply-and-wait):
        half the trips of ipc.send then ipc.recv. Inline while neither waits."""
        match = check_match(match)  # before anything is sent
        if isinstance(dest, int):
            me = call.caller
            # Handed over first: its receiver wakes while this call's own wait is set
            # up (nothing can answer that wait before this step ends: one thread).
            if self._put(me, dest, message, self._pack_unless_small(call, message)) is not None:
                now = trio.current_time()
                return self._recv_now(call, self.box(me), match, deadline_of(timeout, now),
                                      timeout, now)
        return call.defer(self.sendrecv, call, dest, message, timeout, match)

    async def sendrecv(self, call: Call, dest: int | str, message: Any, timeout: float | None,
                       match: dict | None) -> Any:
        start = trio.current_time()
        await self.send(call, dest, message, 1e9 if timeout is None else timeout)
        left = None if timeout is None else max(0.0, timeout - (trio.current_time() - start))
        return await self.recv(call, left, match)

    async def _take_stored(self, call: Call, box: Mailbox, letter: Letter) -> bytes | None:
        """Delete a stored letter's row and return its body (None: it was gone)."""
        try:
            with trio.CancelScope(shield=True):  # the delete and the answer go together
                body = await call.in_thread(self.store.take, letter.row)
        except BaseException:
            self._deliver(box, letter, front=True)
            raise
        name = str(letter.to)[len(AGENT):]
        ev = self._taken.pop(name, None)
        if ev is not None:
            ev.set()
        return body

    async def peek(self, call: Call, match: dict | None, limit: int) -> list[dict]:
        box = self.box(call.caller)
        out, used = [], 0
        for letter in box.plan(check_match(match), limit):
            body = letter.body if letter.row is None else await call.in_thread(
                self.store.body, letter.row)
            if body is None:
                continue
            used += len(body)
            if out and used > self.max_message:  # the answer must fit one frame
                break
            out.append(letter.envelope(body))
        return out

    # --- topics ---------------------------------------------------------------------
    def subscribe(self, pcb: PCB, topic: str) -> list[str]:
        box = self.box(pcb)
        if check_topic(topic) not in box.topics and len(box.topics) >= MAX_TOPICS:
            raise SyscallError("EMFILE", f"a process subscribes to at most {MAX_TOPICS} topics")
        box.topics.add(topic)
        self.topics.setdefault(topic, set()).add(pcb.pid)
        return sorted(box.topics)

    def unsubscribe(self, pcb: PCB, topic: str) -> list[str]:
        box = self.box(pcb)
        if topic not in box.topics:
            raise SyscallError("ENOENT", f"pid {pcb.pid} is not subscribed to {topic:.80}")
        box.topics.discard(topic)
        subs = self.topics[topic]
        subs.discard(pcb.pid)
        if not subs:
            del self.topics[topic]
        return sorted(box.topics)

    def publish(self, pcb: PCB, topic: str, message: Any) -> int:
        body, kind = self._pack(message), _kind(message)
        queue, sender, now, n = ("pid", pcb.pid), pcb.identity, time.time(), 0
        for pid in sorted(self.topics.get(check_topic(topic), ())):
            box = self.boxes[pid]
            if box.has_room(queue, len(body), self.depth, self.queue_bytes):
                self._deliver(box, Letter(next(self._ids), queue, sender, pcb.pid, pid, kind,
                                          topic, len(body), now, body))  # one body, every copy
                n += 1
        return n

    def describe(self, pcb: PCB) -> dict[str, Any]:
        box = self.box(pcb)
        senders = [{"sender": q[0].sender, "from": q[0].pid, "waiting": len(q),
                    "bytes": box.bytes[key], "durable": key[0] == "agent"}
                   for key, q in box.queues.items()]
        return {"pid": pcb.pid, "agent": pcb.agent, "waiting": box.waiting(),
                "senders": senders, "topics": sorted(box.topics), "depth": self.depth,
                "queue_bytes": self.queue_bytes, "max_message": self.max_message}
