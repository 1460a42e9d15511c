"""The kernel's built-in tools: ``calc.eval``, ``clock.now`` and ``kv.*``.

A tool is a name (``group.call``), a description for the model, a JSON
Schema (draft 2020-12) of its arguments object, and a handler
``handler(owner, args) -> result``. The kernel checks the arguments against
the schema, the caller's capabilities (``tool:calc.*``), and writes the audit
log; a handler gets checked arguments and the calling owner (the kernel's
choice: a pid, a process name), returns a JSON- and msgpack-safe value, and
fails with a SyscallError.

``kv.*`` is a small key-value store, one namespace per owner, over a storage
object: a dict-like (in memory, or any MutableMapping the kernel makes
durable) or an SQLite file path (``open_kv``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from llmagentos.drivers import calc
from llmagentos.syscalls.errno import SyscallError

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

MAX_KEY_CHARS = 256
MAX_VALUE_BYTES = 64 * 1024  # of the value's JSON text
MAX_KEYS_PER_OWNER = 10_000
MAX_LIST = 1000

Handler = Callable[[str, dict[str, Any]], Any]


@dataclass(frozen=True)
class Tool:
    name: str  # "group.call"
    description: str
    schema: dict  # JSON Schema of the arguments object
    handler: Handler

    def describe(self) -> dict:
        """What a model (or ``tool.list``) is shown."""
        return {"name": self.name, "description": self.description, "schema": self.schema}


def _object(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"$schema": SCHEMA_DIALECT, "type": "object", "properties": properties,
            "required": list(required), "additionalProperties": False}


# --- calc and clock -------------------------------------------------------------

def _calc_eval(owner: str, args: dict[str, Any]) -> dict:
    value = calc.evaluate(args.get("expression"))
    text = repr(value)
    # The wire is msgpack: integers must fit in 64 bits; the text is exact.
    if isinstance(value, int) and not -(2 ** 63) <= value < 2 ** 64:
        as_float = float(value) if value.bit_length() <= 1023 else None
        return {"value": as_float, "text": text, "exact": False}
    return {"value": value, "text": text, "exact": True}


def _clock_now(owner: str, args: dict[str, Any]) -> dict:
    unix = time.time()
    return {
        "iso": datetime.fromtimestamp(unix, timezone.utc).isoformat(),
        "unix": unix,
        "monotonic": time.monotonic(),
        "timezone": "UTC",
    }


CALC_EVAL = Tool(
    "calc.eval",
    "Evaluate an arithmetic expression exactly as a calculator would: numbers, "
    "+ - * / // % **, parentheses, and the functions "
    + ", ".join(sorted(calc.FUNCTIONS)) + " and constants " + ", ".join(sorted(calc.CONSTANTS))
    + ". Returns the value and its exact text.",
    _object({"expression": {"type": "string", "minLength": 1, "maxLength": calc.MAX_EXPR_CHARS,
                            "description": "for example: sqrt(2) * (3 + 4) ** 2"}},
            ("expression",)),
    _calc_eval,
)

CLOCK_NOW = Tool(
    "clock.now",
    "The current time: ISO 8601 in UTC, Unix seconds, and a monotonic clock in "
    "seconds for measuring intervals.",
    _object({}),
    _clock_now,
)


# --- kv ---------------------------------------------------------------------------

class KVStore(Protocol):
    """One namespace of keys per owner; values are JSON values."""

    def get(self, owner: str, key: str) -> Any: ...
    def set(self, owner: str, key: str, value: Any) -> bool: ...  # True: created
    def delete(self, owner: str, key: str) -> None: ...
    def keys(self, owner: str, prefix: str = "") -> list[str]: ...
    def owners(self) -> list[str]: ...
    def drop(self, owner: str) -> int: ...  # every key of owner; returns how many


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise SyscallError("EINVAL", "a key must be a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise SyscallError("ENAMETOOLONG", f"a key may have at most {MAX_KEY_CHARS} characters")
    if "\0" in key:
        raise SyscallError("EINVAL", "a key must not contain NUL")
    return key


def _check_owner(owner: object) -> str:
    owner = str(owner)
    if "\0" in owner:
        raise SyscallError("EINVAL", "an owner must not contain NUL")
    return owner


def _encode(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise SyscallError("EINVAL", f"the value is not JSON: {e}") from None
    if len(text.encode()) > MAX_VALUE_BYTES:
        raise SyscallError("E2BIG", f"the value's JSON is over {MAX_VALUE_BYTES} bytes")
    return text


def _missing(key: str) -> SyscallError:
    return SyscallError("ENOENT", f"no key {key!r}")


class MappingKV:
    """KV over any str -> str MutableMapping (a dict, a dbm file...).

    Entries are stored as ``owner + "\\0" + key`` -> value JSON, so values are
    copies and owners can't see each other's keys.
    """

    def __init__(self, mapping: MutableMapping[str, str] | None = None) -> None:
        self.mapping: MutableMapping[str, str] = {} if mapping is None else mapping
        self._lock = threading.Lock()

    @staticmethod
    def _slot(owner: str, key: str) -> str:
        return f"{_check_owner(owner)}\0{_check_key(key)}"

    def get(self, owner: str, key: str) -> Any:
        with self._lock:
            try:
                return json.loads(self.mapping[self._slot(owner, key)])
            except KeyError:
                raise _missing(key) from None

    def set(self, owner: str, key: str, value: Any) -> bool:
        slot, text = self._slot(owner, key), _encode(value)
        with self._lock:
            created = slot not in self.mapping
            if created and len(self._keys(owner, "")) >= MAX_KEYS_PER_OWNER:
                raise SyscallError("EDQUOT", f"at most {MAX_KEYS_PER_OWNER} keys per owner")
            self.mapping[slot] = text
            return created

    def delete(self, owner: str, key: str) -> None:
        with self._lock:
            try:
                del self.mapping[self._slot(owner, key)]
            except KeyError:
                raise _missing(key) from None

    def keys(self, owner: str, prefix: str = "") -> list[str]:
        with self._lock:
            return self._keys(owner, prefix)

    def _keys(self, owner: str, prefix: str) -> list[str]:
        head = f"{_check_owner(owner)}\0{prefix}"
        return sorted(s.split("\0", 1)[1] for s in self.mapping if s.startswith(head))

    def owners(self) -> list[str]:
        with self._lock:
            return sorted({s.split("\0", 1)[0] for s in self.mapping})

    def drop(self, owner: str) -> int:
        head = f"{_check_owner(owner)}\0"
        with self._lock:
            slots = [s for s in self.mapping if s.startswith(head)]
            for s in slots:
                del self.mapping[s]
        return len(slots)


class SQLiteKV:
    """KV in an SQLite file (WAL): durable across kernel restarts."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (owner TEXT NOT NULL, key TEXT NOT NULL,"
                         " value TEXT NOT NULL, PRIMARY KEY (owner, key)) WITHOUT ROWID")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, owner: str, key: str) -> Any:
        owner, key = _check_owner(owner), _check_key(key)
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE owner=? AND key=?",
                                   (owner, key)).fetchone()
        if row is None:
            raise _missing(key)
        return json.loads(row[0])

    def set(self, owner: str, key: str, value: Any) -> bool:
        owner, key = _check_owner(owner), _check_key(key)
        text = _encode(value)
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                created = db.execute("SELECT 1 FROM kv WHERE owner=? AND key=?",
                                     (owner, key)).fetchone() is None
                if created:
                    (n,) = db.execute("SELECT count(*) FROM kv WHERE owner=?",
                                      (owner,)).fetchone()
                    if n >= MAX_KEYS_PER_OWNER:
                        raise SyscallError("EDQUOT",
                                           f"at most {MAX_KEYS_PER_OWNER} keys per owner")
                db.execute("INSERT OR REPLACE INTO kv (owner, key, value) VALUES (?, ?, ?)",
                           (owner, key, text))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return created

    def delete(self, owner: str, key: str) -> None:
        owner, key = _check_owner(owner), _check_key(key)
        with self._lock:
            cur = self._db.execute("DELETE FROM kv WHERE owner=? AND key=?", (owner, key))
        if cur.rowcount == 0:
            raise _missing(key)

    def keys(self, owner: str, prefix: str = "") -> list[str]:
        owner = _check_owner(owner)
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM kv WHERE owner=? AND substr(key, 1, ?)=? ORDER BY key",
                (owner, len(prefix), prefix)).fetchall()
        return [r[0] for r in rows]

    def owners(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT owner FROM kv ORDER BY owner").fetchall()
        return [r[0] for r in rows]

    def drop(self, owner: str) -> int:
        owner = _check_owner(owner)
        with self._lock:
            return self._db.execute("DELETE FROM kv WHERE owner=?", (owner,)).rowcount


def open_kv(storage: MutableMapping | str | Path | None = None) -> KVStore:
    """A KV store over a dict-like (None: a fresh dict) or an SQLite file path."""
    if storage is None or isinstance(storage, MutableMapping):
        return MappingKV(storage)
    return SQLiteKV(storage)


_KEY = {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS,
        "description": "the key, in the caller's own namespace"}


def kv_tools(store: KVStore) -> list[Tool]:
    def get(owner: str, args: dict[str, Any]) -> dict:
        return {"key": args["key"], "value": store.get(owner, args["key"])}

    def set_(owner: str, args: dict[str, Any]) -> dict:
        return {"key": args["key"], "created": store.set(owner, args["key"], args["value"])}

    def delete(owner: str, args: dict[str, Any]) -> dict:
        store.delete(owner, args["key"])
        return {"key": args["key"], "deleted": True}

    def list_(owner: str, args: dict[str, Any]) -> dict:
        prefix = args.get("prefix", "")
        limit = args.get("limit", 100)
        if not isinstance(prefix, str) or not isinstance(limit, int) or \
                not 1 <= limit <= MAX_LIST:
            raise SyscallError("EINVAL", f"prefix must be a string, limit 1..{MAX_LIST}")
        keys = store.keys(owner, prefix)
        return {"keys": keys[:limit], "truncated": len(keys) > limit}

    return [
        Tool("kv.get", "Read the value stored under a key (ENOENT if there is none).",
             _object({"key": _KEY}, ("key",)), get),
        Tool("kv.set", "Store a JSON value (string, number, bool, null, list or object) "
                       f"under a key; replaces an old value. Values up to {MAX_VALUE_BYTES} "
                       "bytes of JSON.",
             _object({"key": _KEY, "value": {"description": "any JSON value"}},
                     ("key", "value")), set_),
        Tool("kv.delete", "Remove a key and its value (ENOENT if there is none).",
             _object({"key": _KEY}, ("key",)), delete),
        Tool("kv.list", "The caller's keys, sorted, optionally only those starting with a "
                        "prefix.",
             _object({"prefix": {"type": "string", "maxLength": MAX_KEY_CHARS, "default": ""},
                      "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIST,
                                "default": 100}}), list_),
    ]


def builtin_tools(kv: KVStore | None = None) -> dict[str, Tool]:
    """Every built-in tool by name; kv.* over ``kv`` (default: in memory)."""
    tools = [CALC_EVAL, CLOCK_NOW, *kv_tools(kv if kv is not None else open_kv())]
    return {t.name: t for t in tools}
