"""The trajectory store: every step an agent takes, durable, for learning.

An *episode* is one attempt at a task (kind ``episode``) or an expert
demonstration (kind ``demo``): task text, family, owner, and its steps
(observation, action, reward, info: tool calls, tokens). Episodes are
FTS-indexed by task text, so demonstrations can be retrieved by similarity
(imitation), and aggregated per family and per discrete choice (meta-learning
warm starts). SQLite in WAL mode, one commit per call, like the memory store.
Writes are owner-only; reads are open to every process: experience is the
system's to learn from. Episodes are records and stay; an unnamed process's
unfinished ones are ended at the next boot (end_unfinished), so the next
process to get its pid cannot write to them.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from llmagentos.syscalls.errno import SyscallError

SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,            -- episode | demo
    task TEXT NOT NULL,
    family TEXT,
    owner TEXT NOT NULL,           -- agent:NAME or pid:N
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    steps INTEGER NOT NULL DEFAULT 0,
    total_reward REAL NOT NULL DEFAULT 0,
    success INTEGER,               -- NULL while running or when undecided
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS episodes_family ON episodes(family, kind, id);
CREATE TABLE IF NOT EXISTS steps (
    episode INTEGER NOT NULL REFERENCES episodes(id) ON DELETE CASCADE,
    t INTEGER NOT NULL,
    observation TEXT,
    action TEXT,
    reward REAL NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    time REAL NOT NULL,
    PRIMARY KEY (episode, t)
);
CREATE VIRTUAL TABLE IF NOT EXISTS episodes_fts USING fts5(
    task, content='episodes', content_rowid='id', tokenize='porter');
CREATE TRIGGER IF NOT EXISTS episodes_ai AFTER INSERT ON episodes BEGIN
    INSERT INTO episodes_fts(rowid, task) VALUES (new.id, new.task);
END;
CREATE TRIGGER IF NOT EXISTS episodes_ad AFTER DELETE ON episodes BEGIN
    INSERT INTO episodes_fts(episodes_fts, rowid, task) VALUES ('delete', old.id, old.task);
END;
"""

KINDS = ("episode", "demo")
MAX_TEXT = 1 << 20
_COLS = ("id", "kind", "task", "family", "owner", "pid", "started", "ended", "steps",
         "total_reward", "success", "meta")


def _json(value: Any, what: str) -> str:
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError) as e:  # map keys of bytes, nesting
        raise SyscallError("EINVAL", f"{what} cannot be stored as JSON: {e}") from None
    if len(text) > MAX_TEXT:
        raise SyscallError("E2BIG", f"{what} is over {MAX_TEXT} bytes as JSON")
    return text


def _row(r: tuple) -> dict:
    d = dict(zip(_COLS, r))
    d["meta"] = json.loads(d["meta"])
    d["success"] = None if d["success"] is None else bool(d["success"])
    return d


class TrajectoryStore:
    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def _episode(self, episode: int, owner: str | None) -> dict:
        r = self._db.execute(f"SELECT {', '.join(_COLS)} FROM episodes WHERE id = ?",
                             (episode,)).fetchone()
        if r is None:
            raise SyscallError("ENOENT", f"no episode {episode}")
        ep = _row(r)
        if owner is not None and ep["owner"] != owner:
            raise SyscallError("EACCES", f"episode {episode} belongs to {ep['owner']}")
        return ep

    def begin(self, owner: str, pid: int, task: str, family: str | None, kind: str,
              meta: dict | None) -> int:
        if kind not in KINDS:
            raise SyscallError("EINVAL", f"kind must be one of {KINDS}")
        if not task.strip():
            raise SyscallError("EINVAL", "task text must not be empty")
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO episodes(kind, task, family, owner, pid, started, meta) "
                "VALUES (?,?,?,?,?,?,?)",
                (kind, task[:10_000], family, owner, pid, time.time(), _json(meta or {}, "meta")))
            return cur.lastrowid

    def step(self, owner: str | None, episode: int, observation: Any, action: Any,
             reward: float, info: dict | None) -> int:
        with self._lock:
            ep = self._episode(episode, owner)
            if ep["ended"] is not None:
                raise SyscallError("EINVAL", f"episode {episode} has ended")
            t = ep["steps"]
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT INTO steps(episode, t, observation, action, reward, info, time) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (episode, t, _json(observation, "observation"), _json(action, "action"),
                     reward, _json(info or {}, "info"), time.time()))
                self._db.execute("UPDATE episodes SET steps = steps + 1, "
                                 "total_reward = total_reward + ? WHERE id = ?",
                                 (reward, episode))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return t

    def end(self, owner: str | None, episode: int, success: bool | None,
            meta: dict | None) -> dict:
        with self._lock:
            ep = self._episode(episode, owner)
            if ep["ended"] is not None:
                raise SyscallError("EINVAL", f"episode {episode} has ended")
            merged = {**ep["meta"], **(meta or {})}
            self._db.execute("UPDATE episodes SET ended = ?, success = ?, meta = ? WHERE id = ?",
                             (time.time(), None if success is None else int(success),
                              _json(merged, "meta"), episode))
            return self._episode(episode, None)

    def end_unfinished(self, owner_prefix: str) -> int:
        """End every open episode whose owner starts with ``owner_prefix``
        (success undecided); returns how many. At boot, for ``pid:``: the
        processes that ran them are gone and their pids will be handed out again."""
        with self._lock:
            return self._db.execute(
                "UPDATE episodes SET ended = ? WHERE ended IS NULL"
                " AND substr(owner, 1, ?) = ?",
                (time.time(), len(owner_prefix), owner_prefix)).rowcount

    def list(self, family: str | None, kind: str | None, owner: str | None,
             limit: int) -> list[dict]:
        where, args = [], []
        for col, val in (("family", family), ("kind", kind), ("owner", owner)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = f"SELECT {', '.join(_COLS)} FROM episodes"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [_row(r) for r in reversed(rows)]

    def get(self, episode: int) -> dict:
        with self._lock:
            ep = self._episode(episode, None)
            rows = self._db.execute(
                "SELECT t, observation, action, reward, info, time FROM steps "
                "WHERE episode = ? ORDER BY t", (episode,)).fetchall()
        ep["trajectory"] = [{"t": t, "observation": json.loads(o), "action": json.loads(a),
                             "reward": r, "info": json.loads(i), "time": tm}
                            for t, o, a, r, i, tm in rows]
        return ep

    def search(self, query: str, family: str | None, kind: str, k: int,
               success: bool | None) -> list[dict]:
        words = re.findall(r"\w+", query.lower())[:16]
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in words)
        sql = (f"SELECT {', '.join('e.' + c for c in _COLS)} FROM episodes_fts f "
               "JOIN episodes e ON e.id = f.rowid WHERE episodes_fts MATCH ? AND e.kind = ?")
        args: list = [match, kind]
        if family is not None:
            sql += " AND e.family = ?"
            args.append(family)
        if success is not None:
            sql += " AND e.success = ?"
            args.append(int(success))
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY bm25(episodes_fts) LIMIT ?",
                                    (*args, k)).fetchall()
            out = [_row(r) for r in rows]
            for ep in out:  # a demonstration is its actions, for few-shot prompts
                ep["actions"] = [json.loads(a) for (a,) in self._db.execute(
                    "SELECT action FROM steps WHERE episode = ? ORDER BY t", (ep["id"],))]
        return out

    def stats(self, family: str) -> dict:
        """Per-family outcomes, and per discrete choice (meta['choice']) the
        counts a new task of the family can be warm-started from."""
        with self._lock:
            rows = self._db.execute(
                "SELECT success, total_reward, steps, meta FROM episodes "
                "WHERE family = ? AND kind = 'episode' AND ended IS NOT NULL", (family,)
            ).fetchall()
        choices: dict[str, dict] = {}
        for success, reward, _steps, meta in rows:
            choice = json.loads(meta).get("choice")
            if choice is None:
                continue
            c = choices.setdefault(str(choice), {"n": 0, "successes": 0, "reward": 0.0})
            c["n"] += 1
            c["successes"] += bool(success)
            c["reward"] += reward
        for c in choices.values():
            c["success_rate"] = c["successes"] / c["n"]
            c["mean_reward"] = c.pop("reward") / c["n"]
        n = len(rows)
        return {
            "family": family, "episodes": n,
            "success_rate": (sum(bool(r[0]) for r in rows) / n) if n else None,
            "mean_reward": (sum(r[1] for r in rows) / n) if n else None,
            "mean_steps": (sum(r[2] for r in rows) / n) if n else None,
            "choices": choices,
        }
