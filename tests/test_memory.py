"""The memory manager's storage: ContextStore on a real SQLite file.

A fixed tokenizer stands in for the model's (words x 1.3, rounded up) so the
numbers are deterministic; the kernel passes the real one.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from llmagentos.kernel.memory import ContextStore
from llmagentos.kernel.memory import schema as store
from llmagentos.syscalls.errno import SyscallError


def count_tokens(text: str) -> int:
    return math.ceil(len(text.split()) * 1.3)


WORDS = (
    "agent kernel process memory budget token window model device batch prefill decode "
    "sequence scheduler slot policy signal pipe file sandbox tool driver request reply "
    "plan step goal task reward policy gradient table value state action observation "
    "river mountain garden window lamp paper orange silver quiet rapid gentle bright"
).split()


def chatter(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "memory.db"


@pytest.fixture
def cs(db: Path):
    with ContextStore(db, count_tokens) as s:
        yield s


def window_tokens(cs: ContextStore, ctx: int) -> int:
    return sum(m["tokens"] for m in cs.window(ctx))


def errno_of(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.name


# -- paging ------------------------------------------------------------------


def test_two_thousand_turns_stay_in_budget_and_turn_5_is_recalled(cs: ContextStore) -> None:
    rng = random.Random(5)
    ctx = cs.create("agent:alice", budget=512)
    system = cs.append(ctx, "system", "You are a careful assistant.", pinned=True)
    vault_seq = None
    for turn in range(1, 2001):
        role = "user" if turn % 2 else "assistant"
        text = chatter(rng, rng.randint(5, 60))
        if turn == 5:
            text = "remember this: the vault code is 7391"
        r = cs.append(ctx, role, text)
        if turn == 5:
            vault_seq = r["seq"]
        window = cs.window(ctx)
        assert sum(m["tokens"] for m in window) <= 512, f"turn {turn}"
        assert window[0]["seq"] == system["seq"]  # the pinned system prompt stays first
        assert window[-1]["seq"] == r["seq"]  # the newest message is always live

    st = cs.stats(ctx)
    assert st["live_tokens"] <= 512
    assert st["archived_messages"] > 1500
    assert st["live_messages"] + st["archived_messages"] == 2001 + 1  # + the note

    notes = [m for m in cs.window(ctx) if m["kind"] == "note"]
    assert len(notes) == 1
    assert "paged to the archive" in notes[0]["content"]
    assert "ctx.search" in notes[0]["content"]

    hits = cs.search(ctx, "what is the vault code?")
    assert hits[0]["seq"] == vault_seq
    assert hits[0]["archived"] is True
    assert "7391" in hits[0]["content"]
    # Nothing was deleted: the full history reads back in order.
    history = [m for m in cs.read(ctx) if m["kind"] == "message"]
    assert [m["seq"] for m in history] == list(range(1, 2002))


def test_note_is_single_counts_towards_budget_and_sits_before_the_live_tail(
    cs: ContextStore,
) -> None:
    ctx = cs.create("pid:1", budget=40)
    for i in range(1, 13):
        cs.append(ctx, "user", f"message number {i} with six words")  # 8 tokens each
    window = cs.window(ctx)
    notes = [m for m in window if m["kind"] == "note"]
    assert len(notes) == 1 and notes[0]["seq"] == 0 and notes[0]["role"] == "system"
    assert window[0]["kind"] == "note"  # paged messages were older than everything live
    assert sum(m["tokens"] for m in window) <= 40
    archived = [m["seq"] for m in cs.read(ctx) if m["state"] == "archived"]
    assert notes[0]["content"].startswith(
        f"[memory] {len(archived)} earlier messages (seq 1\u2013{max(archived)})"
    )


def test_pinned_messages_are_never_paged(cs: ContextStore) -> None:
    rng = random.Random(1)
    ctx = cs.create("pid:2", budget=120)
    pinned = [cs.append(ctx, "system", "rule one: be brief", pinned=True)["seq"]]
    for turn in range(300):
        r = cs.append(ctx, "user", chatter(rng, 8), pinned=(turn == 150))
        if turn == 150:
            pinned.append(r["seq"])
        live = {m["seq"] for m in cs.window(ctx)}
        assert {s for s in pinned} <= live
    assert all(m["state"] == "live" for s in pinned for m in cs.read(ctx, s, s + 1))
    assert cs.stats(ctx)["pinned_messages"] == 2


def test_a_message_over_budget_is_edquot_and_stores_nothing(cs: ContextStore) -> None:
    ctx = cs.create("pid:3", budget=20)
    cs.append(ctx, "user", "hello there")
    before = cs.stats(ctx)
    with pytest.raises(SyscallError) as e:
        cs.append(ctx, "user", "word " * 100)
    assert errno_of(e) == "EDQUOT"
    assert cs.stats(ctx) == before
    assert cs.append(ctx, "user", "still works")["seq"] == 2  # no seq was consumed


def test_pinned_messages_filling_the_budget_refuse_more_pins(cs: ContextStore) -> None:
    ctx = cs.create("pid:4", budget=30)
    cs.append(ctx, "system", "one two three four five six seven eight nine ten", pinned=True)
    cs.append(ctx, "system", "one two three four five six seven eight nine ten", pinned=True)
    with pytest.raises(SyscallError) as e:  # 13 + 13 + 5 > 30, and pins cannot move
        cs.append(ctx, "user", "a b c d", pinned=True)
    assert errno_of(e) == "EDQUOT"
    assert len(cs.read(ctx)) == 2


def test_window_reserve_leaves_room_for_the_reply(cs: ContextStore) -> None:
    ctx = cs.create("pid:5", budget=100)
    cs.append(ctx, "system", "be helpful", pinned=True)
    for i in range(10):
        cs.append(ctx, "user", f"turn {i} has some words in it")
    full = cs.window(ctx)
    part = cs.window(ctx, reserve=40)
    assert sum(m["tokens"] for m in part) <= 60
    assert part[0]["pinned"] and part[-1]["seq"] == full[-1]["seq"]
    assert [m["seq"] for m in part] == [m["seq"] for m in full if m in part]
    assert len(cs.read(ctx, include_archived=False)) == len(full)  # a view: nothing paged


def test_set_budget_pages_down(cs: ContextStore) -> None:
    ctx = cs.create("pid:6", budget=1000)
    for i in range(50):
        cs.append(ctx, "user", f"turn {i} has some words in it")
    paged = cs.set_budget(ctx, 100)
    assert paged > 0
    assert window_tokens(cs, ctx) <= 100
    assert cs.stats(ctx)["budget"] == 100


def test_pin_recalls_an_archived_message(cs: ContextStore) -> None:
    ctx = cs.create("pid:7", budget=50)
    first = cs.append(ctx, "user", "the password hint is blue heron")["seq"]
    for i in range(20):
        cs.append(ctx, "user", f"filler message {i} here")
    assert cs.read(ctx, first, first + 1)[0]["state"] == "archived"
    m = cs.pin(ctx, first)
    assert m["pinned"] and m["state"] == "live"
    assert first in {m["seq"] for m in cs.window(ctx)}
    assert window_tokens(cs, ctx) <= 50
    cs.pin(ctx, first, pinned=False)
    assert not cs.read(ctx, first, first + 1)[0]["pinned"]


def test_compact_stands_a_summary_in_for_the_archive(cs: ContextStore) -> None:
    ctx = cs.create("pid:8", budget=60)
    cs.append(ctx, "system", "be brief", pinned=True)
    for i in range(30):
        cs.append(ctx, "user", f"step {i}: moved the lamp to the garden")
    archived = [m["seq"] for m in cs.read(ctx) if m["state"] == "archived"]
    upto = max(archived)
    r = cs.compact(ctx, "Summary: the lamp was moved to the garden many times.", upto)
    assert r["covered"] == len(archived)
    window = cs.window(ctx)
    assert window[0]["pinned"]
    assert window[1]["kind"] == "summary" and window[1]["seq"] == r["seq"]
    assert not any(m["kind"] == "note" for m in window)  # the summary covers all paged
    assert sum(m["tokens"] for m in window) <= 60
    assert len([m for m in cs.read(ctx) if m["state"] == "archived"]) == len(archived)
    assert cs.search(ctx, "summary lamp garden", k=1)[0]["seq"] == r["seq"]
    with pytest.raises(SyscallError) as e:
        cs.compact(ctx, "again", upto)
    assert errno_of(e) == "EINVAL"
    # Paging resumes after the summary; the note counts only what it does not cover.
    for i in range(10):
        cs.append(ctx, "user", f"later step {i} happened")
    note = [m for m in cs.window(ctx) if m["kind"] == "note"]
    assert note and f"(seq {upto + 1}" in note[0]["content"]


# -- fork, names, restart -------------------------------------------------------


def test_fork_copies_window_pins_and_archive_independently(cs: ContextStore) -> None:
    ctx = cs.create("pid:10", budget=50)
    cs.append(ctx, "system", "you are a fork test", pinned=True)
    for i in range(20):
        cs.append(ctx, "user", f"the orange river number {i}")
    child = cs.fork(ctx, "pid:11")
    assert cs.read(child) == cs.read(ctx)
    assert cs.window(child) == cs.window(ctx)
    assert cs.stats(child)["owner"] == "pid:11"
    assert cs.search(child, "river 3", k=1) == cs.search(ctx, "river 3", k=1)
    r = cs.append(child, "user", "only in the child")
    assert r["seq"] == cs.stats(ctx)["next_seq"]
    assert not cs.search(ctx, "only in the child child")
    assert cs.search(child, "only in the child")[0]["seq"] == r["seq"]
    cs.delete(ctx)
    assert len(cs.read(child)) > 20


def test_named_context_reopens_after_a_restart(db: Path) -> None:
    with ContextStore(db, count_tokens) as cs:
        ctx = cs.create("agent:alice", name="alice", budget=64)
        cs.append(ctx, "system", "you are alice", pinned=True)
        for i in range(30):
            cs.append(ctx, "user", f"alice remembers item {i}")
        before_read, before_window = cs.read(ctx), cs.window(ctx)
    with ContextStore(db, count_tokens) as cs:  # a kernel restart
        again = cs.open("alice", "agent:alice")
        assert again == ctx
        assert cs.read(again) == before_read
        assert cs.window(again) == before_window
        assert cs.append(again, "user", "after the restart")["seq"] == 32
        assert cs.search(again, "item 3")[0]["content"] == "alice remembers item 3"
        with pytest.raises(SyscallError) as e:
            cs.open("alice", "agent:mallory")
        assert errno_of(e) == "EACCES"


def test_schema_is_versioned_and_a_newer_database_is_refused(db: Path) -> None:
    ContextStore(db, count_tokens).close()
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(store.SchemaTooNew):
        ContextStore(db, count_tokens)


# -- errno paths --------------------------------------------------------------


def test_errno_paths(cs: ContextStore) -> None:
    ctx = cs.create("agent:bob", name="bob", budget=100)
    cs.append(ctx, "user", "hi")

    def expect(errno: str, fn, *args, **kw) -> None:
        with pytest.raises(SyscallError) as e:
            fn(*args, **kw)
        assert e.value.name == errno, (fn.__name__, args, kw, e.value)

    for fn, args in [
        (cs.append, (999, "user", "x")),
        (cs.read, (999,)),
        (cs.window, (999,)),
        (cs.stats, (999,)),
        (cs.search, (999, "x")),
        (cs.fork, (999, "pid:1")),
        (cs.delete, (999,)),
        (cs.pin, (999, 1)),
        (cs.compact, (999, "s", 1)),
        (cs.set_budget, (999, 10)),
    ]:
        expect("ENOENT", fn, *args)
    expect("ENOENT", cs.open, "nobody", "agent:x")
    expect("ENOENT", cs.pin, ctx, 42)
    expect("ENOENT", cs.mem_get, "pid:1", "nope")
    expect("ENOENT", cs.mem_delete, "pid:1", "nope")

    expect("EEXIST", cs.create, "agent:bob", name="bob")

    for fn, args in [
        (cs.append, (ctx, "user", "x")),
        (cs.read, (ctx,)),
        (cs.window, (ctx,)),
        (cs.stats, (ctx,)),
        (cs.search, (ctx, "hi")),
        (cs.fork, (ctx, "pid:66")),
        (cs.delete, (ctx,)),
        (cs.pin, (ctx, 1)),
    ]:
        expect("EACCES", fn, *args, owner="pid:66")
    expect("EACCES", cs.open, "bob", "pid:66")
    assert cs.stats(ctx, owner="agent:bob")["live_messages"] == 1  # the owner passes

    expect("EDQUOT", cs.append, ctx, "user", "w " * 200)
    expect("EDQUOT", cs.mem_put, "pid:1", "big", "x" * (2 << 20))

    expect("EINVAL", cs.append, ctx, "root", "x")
    expect("EINVAL", cs.append, ctx, "user", b"bytes")
    expect("EINVAL", cs.append, "1", "user", "x")
    expect("EINVAL", cs.create, "pid:1", budget=0)
    expect("EINVAL", cs.create, "pid:1", budget=True)
    expect("EINVAL", cs.create, "", budget=10)
    expect("EINVAL", cs.window, ctx, reserve=-1)
    expect("EINVAL", cs.pin, ctx, 0)
    expect("EINVAL", cs.search, ctx, "x", k=0)
    expect("EINVAL", cs.mem_put, "pid:1", "k", {1, 2})
    expect("EINVAL", cs.mem_put, "pid:1", "k", "v", tags="notalist")
    assert cs.stats(ctx)["live_messages"] == 1  # no failed call left anything behind


def test_a_role_of_any_type_is_checked(cs: ContextStore) -> None:
    """A role that is not a string, hashable or not, is EINVAL (a list or dict
    was a TypeError out of the role lookup), in every call that takes one."""
    ctx = cs.create("pid:1", budget=100)
    cs.append(ctx, "user", "hello")
    for role in (["user"], {"user": 1}, {"user"}, None, 1, b"user", "User", "user "):
        for fn, args in [
            (cs.append, (ctx, role, "x")),
            (cs.compact, (ctx, "summary", 1)),
            (cs.import_archive, (ctx, [("user", "ok"), (role, "x")])),
        ]:
            with pytest.raises(SyscallError) as e:
                fn(*args, role=role) if fn == cs.compact else fn(*args)
            assert errno_of(e) == "EINVAL", (fn.__name__, role, e.value)
    with pytest.raises(SyscallError) as e:
        cs.import_archive(ctx, [("user", b"bytes")])
    assert errno_of(e) == "EINVAL"
    assert [m["content"] for m in cs.read(ctx)] == ["hello"]  # nothing half-stored


def test_integers_sqlite_cannot_hold_are_einval(cs: ContextStore) -> None:
    """The wire carries ints up to 2**64 - 1, SQLite holds 64-bit signed ones:
    a context id, seq, bound, budget or k past that is EINVAL (it was an
    OverflowError, an EIO to the caller); the extremes it holds still work."""
    ctx = cs.create("pid:1", budget=100)
    cs.append(ctx, "user", "hello there")
    big, small = 2**63, -(2**63) - 1
    for fn, args, kw in [
        (cs.read, (ctx, big), {}),
        (cs.read, (ctx, 0, big), {}),
        (cs.read, (ctx, small), {}),
        (cs.read, (big,), {}),
        (cs.stats, (2**64 - 1,), {}),
        (cs.append, (big, "user", "x"), {}),
        (cs.pin, (ctx, big), {}),
        (cs.set_budget, (ctx, big), {}),
        (cs.create, ("pid:1",), {"budget": big}),
        (cs.window, (ctx, big), {}),
        (cs.compact, (ctx, "s", big), {}),
        (cs.mem_search, ("pid:1", "x", big), {}),
    ]:
        with pytest.raises(SyscallError) as e:
            fn(*args, **kw)
        assert errno_of(e) == "EINVAL", (fn.__name__, args, e.value)
    assert [m["seq"] for m in cs.read(ctx, -(2**63), 2**63 - 1)] == [1]
    assert cs.read(ctx, 2**63 - 1) == []
    with pytest.raises(SyscallError) as e:
        cs.pin(ctx, 2**63 - 1)
    assert errno_of(e) == "ENOENT"
    with pytest.raises(SyscallError) as e:
        cs.stats(2**63 - 1)
    assert errno_of(e) == "ENOENT"
    assert cs.set_budget(ctx, 2**63 - 1) == 0
    assert cs.window(ctx, 2**63 - 1) == []  # all room reserved for the reply
    assert cs.mem_search("pid:1", "x", 2**63 - 1) == []


HOSTILE = [
    '"',
    '"unbalanced',
    "*",
    "vault*",
    "NEAR(vault code, 2)",
    "NEAR",
    "(",
    ")) OR ((",
    "AND OR NOT",
    "content:vault",
    "ctxkey:c1",
    "^vault",
    "-vault",
    "vault + code",
    "{content ctxkey}: x",
    "'; DROP TABLE messages; --",
    "",
    "   ",
    "_",
    "é́ 密码 🙂",
    "\x00\x01",
    "a" * 5000,
]


@pytest.mark.parametrize("query", HOSTILE)
def test_search_accepts_any_text(cs: ContextStore, query: str) -> None:
    ctx = cs.create("pid:20", budget=30)
    cs.append(ctx, "user", "the vault code is 7391")
    for i in range(10):
        cs.append(ctx, "user", f"noise {i} about content and rivers")
    assert isinstance(cs.search(ctx, query), list)
    cs.mem_put("pid:20", "vault", "code 7391", tags=["secret"])
    assert isinstance(cs.mem_search("pid:20", query), list)


def test_search_finds_through_stemming_and_ranks_rare_words(cs: ContextStore) -> None:
    ctx = cs.create("pid:21", budget=1000)
    cs.append(ctx, "user", "we were running through the forest")
    for i in range(30):
        cs.append(ctx, "user", f"the forest is green today {i}")
    hits = cs.search(ctx, "runs in a forest", k=3)
    assert hits[0]["seq"] == 1
    assert hits[0]["archived"] is False and hits[0]["score"] > 0


# -- long-term memory -------------------------------------------------------------


def test_long_term_memory(db: Path) -> None:
    with ContextStore(db, count_tokens) as cs:
        assert cs.mem_put("agent:alice", "home", "Alice lives in Lisbon", tags=["fact"])
        assert cs.mem_put("agent:alice", "prefs", {"tea": "green", "n": 3}, tags=["pref", "fact"])
        assert cs.mem_put("agent:bob", "home", "Bob lives in Oslo", tags=["fact"])
        assert not cs.mem_put("agent:alice", "home", "Alice lives in Porto", tags=["fact", "new"])
        got = cs.mem_get("agent:alice", "prefs")
        assert got["value"] == {"tea": "green", "n": 3} and got["tags"] == ["fact", "pref"]

    with ContextStore(db, count_tokens) as cs:  # survives a restart
        assert cs.mem_get("agent:alice", "home")["value"] == "Alice lives in Porto"
        hits = cs.mem_search("agent:alice", "where does she live?")
        assert [h["key"] for h in hits] == ["home"]  # bob's is another namespace
        assert not cs.mem_search("agent:alice", "Lisbon")  # the old value is unindexed
        assert [h["key"] for h in cs.mem_search("agent:alice", "green tea")] == ["prefs"]
        assert [h["key"] for h in cs.mem_search("agent:alice", "", tags=["pref"])] == ["prefs"]
        assert [h["key"] for h in cs.mem_search("agent:alice", "lives", tags=["pref"])] == []
        assert {m["key"] for m in cs.mem_list("agent:alice")} == {"home", "prefs"}
        assert [m["key"] for m in cs.mem_list("agent:alice", tags=["new"])] == ["home"]
        cs.mem_delete("agent:alice", "home")
        assert [m["key"] for m in cs.mem_list("agent:alice")] == ["prefs"]
        assert not cs.mem_search("agent:alice", "Porto")
        assert cs.mem_search("agent:bob", "Oslo")[0]["value"] == "Bob lives in Oslo"


def test_long_term_memory_checks_tags_and_values_of_any_shape(cs: ContextStore) -> None:
    """Tags that are not a list, and a value nested too deep to encode, are
    EINVAL (they were TypeError and RecursionError); lists, tuples and sets of
    strings still pass, and a failed put leaves the old value."""
    cs.mem_put("pid:1", "k", "old", tags=["t"])
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    for fn, args in [
        (cs.mem_put, ("pid:1", "k", "v", 5)),
        (cs.mem_put, ("pid:1", "k", "v", "t")),
        (cs.mem_put, ("pid:1", "k", "v", [None])),
        (cs.mem_put, ("pid:1", "k", deep)),
        (cs.mem_list, ("pid:1", 5)),
        (cs.mem_list, ("pid:1", "t")),
        (cs.mem_search, ("pid:1", "x", 5, 5)),
        (cs.mem_search, ("pid:1", "x", 5, [1])),
    ]:
        with pytest.raises(SyscallError) as e:
            fn(*args)
        assert errno_of(e) == "EINVAL", (fn.__name__, args[3:], e.value)
    assert cs.mem_get("pid:1", "k")["value"] == "old"
    for tags in (("t",), {"t"}, ["t", "t"]):
        assert [m["key"] for m in cs.mem_list("pid:1", tags)] == ["k"]
        assert not cs.mem_put("pid:1", "k", "new", tags)
        assert cs.mem_get("pid:1", "k")["tags"] == ["t"]


# -- embeddings -------------------------------------------------------------------

CONCEPTS = {"car": "vehicle", "automobile": "vehicle", "truck": "vehicle", "cat": "animal"}


def toy_embed(texts: list[str]) -> list[list[float]]:
    """Bag of concepts: synonyms share a dimension (so similarity is not merely
    lexical); other words fall in 32 hashed buckets."""
    concepts = sorted(set(CONCEPTS.values()))
    out = []
    for t in texts:
        v = [0.0] * (len(concepts) + 32)
        for w in t.lower().split():
            w = w.strip(".,?")
            if w in CONCEPTS:
                v[concepts.index(CONCEPTS[w])] += 1.0
            else:
                v[len(concepts) + zlib.crc32(w.encode()) % 32] += 1.0
        out.append(v)
    return out


def test_embeddings_blend_with_fts(db: Path) -> None:
    with ContextStore(db, count_tokens, embed=toy_embed) as cs:
        ctx = cs.create("pid:30", budget=30)
        target = cs.append(ctx, "user", "my car is red")["seq"]
        for i in range(20):
            cs.append(ctx, "user", f"pause number {i} here")
        assert cs.embed_pending(limit=8) == 8
        while cs.embed_pending():
            pass
        st = cs.stats(ctx)
        assert st["embedded_messages"] == st["archived_messages"]
        # No word of the query occurs in the message: only the vector finds it.
        hits = cs.search(ctx, "automobile", k=3)
        assert hits[0]["seq"] == target and hits[0]["archived"]
        assert cs.search(ctx, "pause number 7", k=1)[0]["content"] == "pause number 7 here"
        fork = cs.fork(ctx, "pid:31")
        assert cs.search(fork, "automobile", k=1)[0]["seq"] == target


# -- durability --------------------------------------------------------------------

CRASH_WRITER = textwrap.dedent(
    """
    import math, sys, threading
    from llmagentos.kernel.memory import ContextStore

    store = ContextStore(sys.argv[1], lambda t: math.ceil(len(t.split()) * 1.3))
    ctxs = [store.create(f"pid:{i}", name=f"crash{i}", budget=60) for i in range(4)]
    out = threading.Lock()

    def writer(ctx):
        i = 0
        while True:
            i += 1
            r = store.append(ctx, "user", f"ctx {ctx} message {i} acknowledged")
            with out:
                sys.stdout.write(f"{ctx} {r['seq']} {i}\\n")
                sys.stdout.flush()

    for c in ctxs:
        threading.Thread(target=writer, args=(c,), daemon=True).start()
    threading.Event().wait()
    """
)


def test_every_acknowledged_append_survives_sigkill(db: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_WRITER, str(db)], stdout=subprocess.PIPE, text=True
    )
    acked = []
    deadline = time.monotonic() + 20
    try:
        while len(acked) < 600 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(line)
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 600, "the writer died or was too slow"
    # Lines flushed before the kill are acknowledged; a torn last line is not.
    lines = acked + rest.split("\n")[:-1]
    acks = [tuple(int(x) for x in ln.split()) for ln in lines]

    with ContextStore(db, count_tokens) as cs:
        for ctx, seq, i in acks:
            got = cs.read(ctx, seq, seq + 1)
            assert got and got[0]["content"] == f"ctx {ctx} message {i} acknowledged"
        for ctx in {a[0] for a in acks}:
            msgs = [m for m in cs.read(ctx) if m["kind"] == "message"]
            assert [m["seq"] for m in msgs] == list(range(1, len(msgs) + 1))  # no holes
            assert window_tokens(cs, ctx) <= 60
        raw = cs._db
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        raw.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")


# -- concurrency and the bench ------------------------------------------------------


def test_bench_runs_small() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        import bench_memory
    finally:
        sys.path.pop(0)
    result = bench_memory.run(archived=2000, appends=200, queries=20)
    assert result["appends_per_s"] > 0
    assert result["archived"] >= 2000
    assert result["search_hit_rate"] == 1.0


def test_random_operations_keep_the_invariants(db: Path) -> None:
    """Whatever mix of appends, pins, budget changes and compactions: the
    window fits the budget, pins stay live, nothing is lost, one note at most,
    and the window is in conversation order."""
    with ContextStore(db, count_tokens) as cs:
        for seed in range(12):
            rng = random.Random(seed)
            budget = rng.choice([30, 60, 200])
            ctx = cs.create(f"pid:{seed}", budget=budget)
            texts: dict[int, str] = {}
            for _ in range(150):
                op = rng.random()
                try:
                    if op < 0.7:
                        text = chatter(rng, rng.randint(1, 30))
                        r = cs.append(ctx, "user", text, pinned=rng.random() < 0.03)
                        texts[r["seq"]] = text
                    elif op < 0.8 and texts:
                        cs.pin(ctx, rng.choice(list(texts)), pinned=rng.random() < 0.5)
                    elif op < 0.9:
                        budget = rng.choice([30, 60, 200, 400])
                        cs.set_budget(ctx, budget)
                    else:
                        cs.compact(ctx, "summary: " + chatter(rng, 5), rng.randint(1, 200))
                except SyscallError as e:
                    assert e.name in ("EDQUOT", "EINVAL"), e
                st = cs.stats(ctx)
                budget = st["budget"]
                window = cs.window(ctx)
                assert sum(m["tokens"] for m in window) == st["live_tokens"] <= budget
                assert sum(m["kind"] == "note" for m in window) <= 1
                everything = cs.read(ctx)
                assert [m for m in everything if m["state"] == "live"] == window
                assert all(m["state"] == "live" for m in everything if m["pinned"])
                stored = {m["seq"]: m["content"] for m in everything if m["kind"] == "message"}
                assert stored == texts
            first_live = [m for m in cs.window(ctx) if not m["pinned"] and m["kind"] == "message"]
            assert all(
                m["state"] == "archived" or m["pinned"]
                for m in cs.read(ctx)
                if m["kind"] == "message" and first_live and m["seq"] < first_live[0]["seq"]
            ), "paging takes the oldest first"
