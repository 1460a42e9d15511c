"""A remote model behind an OpenAI-compatible HTTP API: the driver of ``kind =
"openai"`` registry entries.

``OpenAIBackend`` speaks POST /v1/completions (a prompt), /v1/chat/completions
(messages) and /v1/embeddings with httpx on trio; completions and chats stream
(server-sent events, ``data:`` lines up to ``data: [DONE]``) when the caller
takes pieces. It is the device of a ``RemoteQueue`` (kernel/scheduler/remote.py),
which decides who may have a request in flight; this module only turns one
request into HTTP and the answer (or the failure) into a result or an errno.

A registry entry's keys (``OpenAIConfig.from_entry``)::

    [models.gpt-remote]
    kind = "openai"
    base_url = "http://127.0.0.1:8000"   # the server; /v1/... is appended
    model = "served-name"                # the model name the server knows
    api_key_env = "REMOTE_API_KEY"       # optional: the NAME of the env variable
    max_concurrency = 4                  # requests in flight at once
    timeout = 60                         # seconds the server may stay silent
    max_retries = 3                      # retries of 429/503

The key is read from the environment at each request and sent as a Bearer
token; it never appears in an error, a log line, ``repr``, ``describe()`` or
stats (a server that echoes it has it blotted out of its message).

Errors: 429 and 503 are retried after ``Retry-After`` (seconds or an HTTP
date; else a doubling backoff) up to ``max_retries`` times, then EAGAIN (429)
or EBUSY (503); 401/403 EACCES; any other 4xx EINVAL; 5xx, a refused
connection or a dropped or garbled stream EIO; silence past ``timeout``
ETIMEDOUT. Each carries the server's own message.
"""

from __future__ import annotations

import email.utils
import inspect
import json
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from llmagentos.drivers.sampling import SamplingParams
from llmagentos.syscalls.errno import SyscallError

CONFIG_KEYS = ("base_url", "model", "api_key_env", "max_concurrency", "timeout", "max_retries")
MAX_CONCURRENCY = 1024
MAX_RETRIES = 20
BACKOFF = 0.5          # seconds before the first retry when the server gives no Retry-After
MESSAGE_CHARS = 500    # of a server's error message, in ours
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEFAULTS = SamplingParams()
# SamplingParams fields the API has no equivalent of: refused when not at their defaults.
_NO_EQUIVALENT = ("grammar", "top_k", "min_p", "repeat_penalty", "repeat_last_n")

OnPiece = Callable[[str], Any] | Callable[[str], Awaitable[Any]] | None


@dataclass(frozen=True)
class OpenAIConfig:
    """Where the server is and how hard to try. ``api_key_env`` names the variable
    holding the key; the key itself is never stored here."""

    base_url: str
    model: str
    api_key_env: str | None = None
    max_concurrency: int = 4
    timeout: float = 60.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        def bad(msg: str) -> SyscallError:
            return SyscallError("EINVAL", f"openai backend: {msg}")

        if not isinstance(self.base_url, str) or not re.match(r"https?://[^/\s]+", self.base_url):
            raise bad(f"base_url must be an http:// or https:// URL, not {self.base_url!r}")
        if not isinstance(self.model, str) or not self.model:
            raise bad("model (the server's model name) must be a non-empty string")
        if self.api_key_env is not None and (not isinstance(self.api_key_env, str)
                                             or not _ENV_NAME.fullmatch(self.api_key_env)):
            raise bad("api_key_env must be the name of an environment variable")
        for name, top in (("max_concurrency", MAX_CONCURRENCY), ("max_retries", MAX_RETRIES)):
            v = getattr(self, name)
            least = 1 if name == "max_concurrency" else 0
            if not isinstance(v, int) or isinstance(v, bool) or not least <= v <= top:
                raise bad(f"{name} must be an integer in {least}..{top}, not {v!r}")
        t = self.timeout
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t <= 86400 \
                or not math.isfinite(t):
            raise bad(f"timeout must be a number of seconds in (0, 86400], not {t!r}")

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], where: str = "openai backend") -> OpenAIConfig:
        """From a registry entry's keys (others, such as ``kind``, are the caller's)."""
        missing = [k for k in ("base_url", "model") if k not in entry]
        if missing:
            raise SyscallError("EINVAL", f"{where}: {', '.join(missing)} is required")
        return cls(**{k: entry[k] for k in CONFIG_KEYS if k in entry})

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/")


@dataclass
class Completion:
    """One finished completion or chat answer, as the server counted it."""
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    usage_from_server: bool  # False: a stream without usage; completion_tokens counts pieces


@dataclass
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


def sampling_body(params: SamplingParams) -> dict[str, Any]:
    """The request fields for ``params``; EINVAL names what the API cannot express."""
    for name in _NO_EQUIVALENT:
        if getattr(params, name) != getattr(_DEFAULTS, name):
            raise SyscallError("EINVAL", f"sampling parameter {name}={getattr(params, name)!r} "
                                         "has no equivalent in the OpenAI API (backend "
                                         "'openai'); leave it at its default")
    body: dict[str, Any] = {"max_tokens": params.max_tokens, "temperature": params.temperature,
                            "top_p": params.top_p}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    schema = params.json_schema
    if schema is True:
        body["response_format"] = {"type": "json_object"}
    elif schema not in (None, False):
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as exc:
                raise SyscallError("EINVAL", f"json_schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise SyscallError("EINVAL", "json_schema must be a map, JSON text or true")
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": schema}}
    return body


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number or an HTTP date); None if
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, secs) if math.isfinite(secs) else None


class OpenAIBackend:
    """One OpenAI-compatible server. Open one per registry entry; close with ``aclose``."""

    kind = "openai"

    def __init__(self, config: OpenAIConfig, *, transport: httpx.AsyncBaseTransport | None = None
                 ) -> None:
        self.config = config
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self.requests = 0     # HTTP requests sent, retries included
        self.retries = 0
        self.failures = 0
        self.last_error: str | None = None

    def __repr__(self) -> str:
        c = self.config
        return f"OpenAIBackend({c.url!r}, model={c.model!r}, api_key_env={c.api_key_env!r})"

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"kind": self.kind, "node": c.url, "model": c.model, "api_key_env": c.api_key_env,
                "alive": self.last_error is None, "failures": self.failures,
                "last_error": self.last_error, "requests": self.requests,
                "retries": self.retries}

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with trio.CancelScope(shield=True):
                await client.aclose()

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, prompt: str | None, messages: list | None,
                       params: SamplingParams, *, on_piece: OnPiece = None) -> Completion:
        """One completion (``prompt``) or chat answer (``messages``). With ``on_piece``
        it streams: each piece of text is passed on as it arrives (a coroutine
        function is awaited; what it raises ends the request and is raised)."""
        if (prompt is None) == (messages is None):
            raise SyscallError("EINVAL", "give exactly one of prompt or messages")
        body: dict[str, Any] = {"model": self.config.model, **sampling_body(params)}
        if prompt is not None:
            path, body["prompt"] = "/v1/completions", prompt
        else:
            path, body["messages"] = "/v1/chat/completions", messages
        if on_piece is None:
            data = await self._request(path, body, self._read_json)
            return self._completion(data, prompt is None)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return await self._request(path, body,
                                   lambda resp: self._read_stream(resp, prompt is None, on_piece))

    async def embed(self, texts: list[str]) -> Embeddings:
        body = {"model": self.config.model, "input": list(texts), "encoding_format": "float"}
        data = await self._request("/v1/embeddings", body, self._read_json)
        try:
            items = sorted(data["data"], key=lambda d: d["index"])
            vectors = [_one_vector(d["embedding"]) for d in items]
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise self._garbled(f"embeddings answer without vectors ({exc!r})") from None
        if len(vectors) != len(texts):
            raise self._garbled(f"{len(vectors)} embeddings for {len(texts)} texts")
        return Embeddings(vectors, _usage_int(data.get("usage"), "prompt_tokens"))

    # -- HTTP ---------------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            c = self.config
            limits = httpx.Limits(max_connections=c.max_concurrency,
                                  max_keepalive_connections=c.max_concurrency)
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(c.timeout), limits=limits,
                                             transport=self._transport)
        return self._client

    def _key(self) -> str | None:
        name = self.config.api_key_env
        if name is None:
            return None
        key = os.environ.get(name)
        if not key:
            raise SyscallError("EACCES", f"openai backend {self.config.url}: the API key "
                                         f"variable {name} is not set")
        return key

    async def _request(self, path: str, body: dict, read: Callable[[httpx.Response], Any]) -> Any:
        """Send (retrying 429/503) and ``read`` the answer; every failure as an errno."""
        key = self._key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = self.config.url + path
        client = self._http()
        try:
            for attempt in range(self.config.max_retries + 1):
                self.requests += 1
                req = client.build_request("POST", url, json=body, headers=headers)
                resp = await client.send(req, stream=True)
                try:
                    if resp.status_code == 200:
                        out = await read(resp)
                        self.last_error = None
                        return out
                    await resp.aread()
                    wait = self._retry_wait(resp, attempt)
                    if wait is None:
                        raise self._status_error(resp, key)
                finally:
                    await resp.aclose()
                self.retries += 1
                await trio.sleep(wait)
        except httpx.TimeoutException as exc:
            raise self._fail("ETIMEDOUT", f"no answer within {self.config.timeout:g} s "
                                          f"({type(exc).__name__})") from None
        except httpx.ConnectError as exc:
            raise self._fail("EIO", f"cannot connect: {_scrub(str(exc), key)}") from None
        except (httpx.TransportError, httpx.StreamError) as exc:
            what = _scrub(str(exc), key) or type(exc).__name__
            raise self._fail("EIO", f"connection lost: {what}") from None
        except SyscallError as exc:
            raise self._fail(exc.name, _scrub(exc.message, key), prefixed=True) from None
        except _CallerError as exc:
            raise exc.error from None
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _retry_wait(self, resp: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None: no retry."""
        if resp.status_code not in (429, 503) or attempt >= self.config.max_retries:
            return None
        wait = retry_after(resp.headers.get("retry-after"))
        if wait is None:
            wait = BACKOFF * 2 ** attempt
        return wait if wait <= self.config.timeout else None  # not worth the wait: give up

    def _status_error(self, resp: httpx.Response, key: str | None) -> SyscallError:
        code = resp.status_code
        name = ("EAGAIN" if code == 429 else "EBUSY" if code == 503 else
                "EACCES" if code in (401, 403) else "EINVAL" if 400 <= code < 500 else "EIO")
        return SyscallError(name, f"HTTP {code}: {_scrub(_server_message(resp), key)}")

    def _fail(self, name: str, message: str, *, prefixed: bool = False) -> SyscallError:
        text = message if prefixed and message.startswith("openai backend") else \
            f"openai backend {self.config.url}: {message}"
        if name in ("EIO", "ETIMEDOUT", "EBUSY"):  # the server's fault, not the request's
            self.failures += 1
            self.last_error = text
        return SyscallError(name, text)

    def _garbled(self, what: str) -> SyscallError:
        return SyscallError("EIO", f"openai backend {self.config.url}: garbled answer: {what}")

    # -- answers ------------------------------------------------------------------------------

    async def _read_json(self, resp: httpx.Response) -> dict:
        return self._json_object(await resp.aread(), "answer")

    def _json_object(self, raw: str | bytes, what: str) -> dict:
        try:
            data = json.loads(raw)
        except ValueError:
            raise self._garbled(f"{what} is not JSON: {raw[:200]!r}") from None
        if not isinstance(data, dict):
            raise self._garbled(f"{what} is not a JSON object")
        return data

    def _completion(self, data: dict, chat: bool) -> Completion:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise self._garbled("no choices[0] text") from None
        usage = data.get("usage")
        return Completion(text or "", choice.get("finish_reason") or "stop",
                          _usage_int(usage, "prompt_tokens"),
                          _usage_int(usage, "completion_tokens"), isinstance(usage, dict))

    async def _read_stream(self, resp: httpx.Response, chat: bool, on_piece: OnPiece
                           ) -> Completion:
        is_async = inspect.iscoroutinefunction(on_piece)
        parts: list[str] = []
        pieces, finish, usage = 0, None, None
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, ": ping" comments, event:/id: fields
            payload = line[5:].strip()
            if payload == "[DONE]":
                n_prompt = _usage_int(usage, "prompt_tokens")
                n_out = _usage_int(usage, "completion_tokens") if usage else pieces
                return Completion("".join(parts), finish or "stop", n_prompt, n_out,
                                  usage is not None)
            event = self._json_object(payload, "stream event")
            if "error" in event:
                raise SyscallError("EIO", f"error in stream: {_error_text(event)}")
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                if not isinstance(choice, dict):
                    raise self._garbled("stream choice is not a JSON object")
                piece = ((choice.get("delta") or {}).get("content") if chat
                         else choice.get("text"))
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                if piece:
                    pieces += 1
                    parts.append(piece)
                    try:
                        ret = on_piece(piece)
                        if is_async:
                            await ret
                    except Exception as exc:  # the caller's own error, not the server's
                        raise _CallerError(exc) from exc
        raise SyscallError("EIO", "stream ended before [DONE] (connection dropped)")


class _CallerError(Exception):
    """What ``on_piece`` raised, carried past the translation of the server's errors."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def _one_vector(value: Any) -> list[float]:
    """An embedding; per-token vectors (a server on a model that does not pool, such as
    llama-cpp-python's) are mean-pooled and normalized, as the local device does."""
    if value and isinstance(value[0], list):
        n = len(value[0])
        mean = [sum(row[i] for row in value) / len(value) for i in range(n)]
        norm = math.sqrt(sum(x * x for x in mean))
        value = [x / norm for x in mean] if norm > 0 else mean
    vec = [float(x) for x in value]
    if not vec or not all(math.isfinite(x) for x in vec):
        raise ValueError("empty or non-finite vector")
    return vec


def _usage_int(usage: Any, key: str) -> int:
    v = usage.get(key) if isinstance(usage, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def _error_text(data: Any) -> str:
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        err = err.get("message") or err.get("detail") or json.dumps(err)
    return str(err)[:MESSAGE_CHARS]


def _server_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:MESSAGE_CHARS] or resp.reason_phrase
    return _error_text(data) if isinstance(data, dict) else str(data)[:MESSAGE_CHARS]


def _scrub(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text
