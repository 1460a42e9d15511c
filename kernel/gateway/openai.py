"""OpenAI requests to syscall arguments, and syscall results to OpenAI answers.

Pure translation, no I/O: app.py runs what comes out of here as the key's
process. A field of the wrong type is a 400 naming it; fields this gateway
cannot honour (n > 1, logprobs, images) are a 400 saying so; fields that only
steer OpenAI's own service (user, store, metadata, service_tier, ...) are
ignored, as OpenAI-compatible servers do.

Chat messages become the kernel's ``{role, content}`` list: content parts are
joined, ``developer`` is ``system``, a tool result is a user turn that says
whose result it is, an assistant's tool calls are the JSON the model is asked
to write, and turns of one role in a row are merged (chat templates such as
Gemma's insist that user and assistant alternate).

Tools. The model is told the tools in a system message and asked to answer a
call as ``{"name": ..., "arguments": {...}}``; the grammar makes it: with
``tool_choice`` "required" or a named function the output must be such a
call, its ``name`` one of the tools and its ``arguments`` valid against that
tool's JSON schema (a ``json_schema`` of ``anyOf`` one object per tool); with
"auto" the grammar allows that or plain text that does not open with ``{``.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from llmagentos.drivers.sampling import json_schema_to_gbnf

from .errors import ApiError, bad

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_STOP = 4


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _get(body: dict, name: str, kinds: type | tuple, default: Any = None, *,
         what: str = "") -> Any:
    """``body[name]`` if it is one of ``kinds`` (JSON null: the default)."""
    v = body.get(name)
    if v is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(v, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(v, kinds) or (float in kinds and isinstance(v, int)
                                      and not isinstance(v, bool))
    if not ok:
        raise bad(f"'{name}' must be {what or _kinds(kinds)}, not {_json_type(v)}", name)
    return v


def _kinds(kinds: tuple) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "an array", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _json_type(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(v), type(v).__name__)


def require_model(body: dict) -> str:
    model = _get(body, "model", str)
    if not model:
        raise bad("you must provide a model parameter", "model")
    return model


def sampling(body: dict, *, max_name: str = "max_tokens") -> dict:
    """The llm.generate params a request asks for (model included)."""
    p: dict[str, Any] = {"model": require_model(body)}
    for name in (max_name, "max_tokens"):
        v = _get(body, name, int)
        if v is not None:
            if v < 1:
                raise bad(f"'{name}' must be at least 1, got {v}", name)
            p["max_tokens"] = v
            break
    for name, lo, hi in (("temperature", 0, 2), ("top_p", 0, 1),
                         ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2)):
        v = _get(body, name, float)
        if v is not None:
            if not lo <= v <= hi:
                raise bad(f"'{name}' must be in {lo}..{hi}, got {v}", name)
            p[name] = float(v)
    seed = _get(body, "seed", int)
    if seed is not None:
        p["seed"] = seed % (1 << 32)  # OpenAI takes any integer; the sampler 32 bits
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) \
                or len(stop) > MAX_STOP:
            raise bad(f"'stop' must be a string or an array of up to {MAX_STOP} strings",
                      "stop")
        p["stop"] = [s for s in stop if s]
    n = _get(body, "n", int, 1)
    if n != 1:
        raise bad("this server makes one choice per request: 'n' must be 1", "n")
    if _get(body, "logprobs", (bool, int), False):
        raise bad("'logprobs' is not supported by this server", "logprobs")
    if _get(body, "logit_bias", dict, {}):
        raise bad("'logit_bias' is not supported by this server", "logit_bias")
    return p


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _get(body, "stream", bool, False)
    opts = _get(body, "stream_options", dict, {})
    return stream, bool(stream and opts.get("include_usage"))


# --- chat -------------------------------------------------------------------------------


@dataclass
class ChatPlan:
    messages: list[dict]
    params: dict
    stream: bool
    include_usage: bool
    tools: dict[str, dict] = field(default_factory=dict)  # name -> parameters schema
    tool_mode: str = "none"  # none | auto | required


def chat_request(body: dict) -> ChatPlan:
    params = sampling(body, max_name="max_completion_tokens")
    stream, include_usage = stream_flags(body)
    raw = _get(body, "messages", list)
    if not raw:
        raise bad("'messages' must be a non-empty array", "messages")
    tools, described = _tools(body)
    mode = _tool_choice(body, tools)
    messages = _messages(raw)
    rf = _get(body, "response_format", dict)
    if rf is not None:
        _response_format(rf, params)
    if mode != "none":
        if "json_schema" in params:
            raise bad("give tools or a JSON response_format, not both", "response_format")
        chosen = tools if not isinstance(mode, tuple) else {mode[1]: tools[mode[1]]}
        schema = call_schema(chosen)
        intro = _tools_prompt(described if not isinstance(mode, tuple) else
                              [d for d in described if d["name"] == mode[1]],
                              optional=mode == "auto")
        messages = _merge([{"role": "system", "content": intro}] + messages)
        if mode == "auto":
            params["grammar"] = _call_or_text_grammar(schema)
        else:
            params["json_schema"] = schema
        mode = "auto" if mode == "auto" else "required"
    return ChatPlan(messages, params, stream, include_usage, tools, mode)


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for part in c:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad(f"messages[{i}].content parts must be objects with a 'type'",
                          f"messages[{i}].content")
            if part["type"] not in ("text", "input_text"):
                raise bad(f"messages[{i}].content: parts of type {part['type']!r} are not "
                          "supported by this server (text only)", f"messages[{i}].content")
            if not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: a text part needs a string 'text'",
                          f"messages[{i}].content")
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad(f"messages[{i}].content must be a string or an array of parts",
              f"messages[{i}].content")


def _messages(raw: list) -> list[dict]:
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise bad(f"messages[{i}].role must be system, developer, user, assistant or "
                      f"tool, not {role!r:.40}", f"messages[{i}].role")
        text = _content(m, i)
        if role == "developer":
            role = "system"
        elif role in ("tool", "function"):
            who = m.get("name") or m.get("tool_call_id") or "the tool"
            role, text = "user", f"Result of {who}: {text}"
        elif role == "assistant" and m.get("tool_calls"):
            text = "\n".join(filter(None, [text, *_calls_as_text(m["tool_calls"], i)]))
        out.append({"role": role, "content": text})
    return _merge(out)


def _calls_as_text(calls: Any, i: int) -> list[str]:
    if not isinstance(calls, list):
        raise bad(f"messages[{i}].tool_calls must be an array", f"messages[{i}].tool_calls")
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"messages[{i}].tool_calls: each needs a function with a name",
                      f"messages[{i}].tool_calls")
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass  # as the client sent it
        out.append(json.dumps({"name": fn["name"], "arguments": args}))
    return out


def _merge(messages: list[dict]) -> list[dict]:
    """System turns first, as one; then turns of one role in a row joined."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    out = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    for m in messages:
        if m["role"] == "system":
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def _response_format(rf: dict, params: dict) -> None:
    kind = rf.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        params["json_schema"] = {"type": "object"}
        return
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad("response_format.json_schema must be an object with a 'schema' object",
                      "response_format")
        params["json_schema"] = spec.get("schema") or True
        return
    raise bad("response_format.type must be text, json_object or json_schema",
              "response_format")


def _tools(body: dict) -> tuple[dict[str, dict], list[dict]]:
    raw = _get(body, "tools", list, [])
    tools, described = {}, []
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}",
                      f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise bad(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -",
                      f"tools[{i}].function.name")
        if name in tools:
            raise bad(f"two tools named {name!r}", f"tools[{i}].function.name")
        schema = fn.get("parameters")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object",
                      f"tools[{i}].function.parameters")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise bad(f"tools[{i}].function.description must be a string",
                      f"tools[{i}].function.description")
        tools[name] = schema
        described.append({"name": name, "description": desc, "parameters": schema})
    return tools, described


def _tool_choice(body: dict, tools: dict) -> str | tuple:
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise bad("tool_choice needs tools", "tool_choice")
        return "none"
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in tools:
            raise bad(f"tool_choice names {name!r}, which is not among the tools",
                      "tool_choice")
        return ("function", name)
    raise bad("tool_choice must be none, auto, required or "
              "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")


def call_schema(tools: dict[str, dict]) -> dict:
    """A tool call as the model writes it: one object per tool, its arguments that
    tool's schema."""
    alts = [{"type": "object",
             "properties": {"name": {"const": name}, "arguments": schema},
             "required": ["name", "arguments"]} for name, schema in tools.items()]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def _tools_prompt(described: list[dict], optional: bool) -> str:
    lines = ["You can call these tools:"]
    for d in described:
        lines.append(f"- {d['name']}: {d['description']} Arguments (JSON schema): "
                     f"{json.dumps(d['parameters'])}")
    lines.append('To call a tool, answer with only a JSON object: {"name": "<tool name>", '
                 '"arguments": {...}}.' + (" Otherwise answer in plain text." if optional
                                           else ""))
    return "\n".join(lines)


def _call_or_text_grammar(schema: dict) -> str:
    """GBNF: a tool call (the schema's grammar, its root renamed) or plain text that
    does not open with '{'."""
    gbnf = json_schema_to_gbnf(schema)
    renamed = re.sub(r"^root ::=", "gw-tool-call ::=", gbnf, count=1, flags=re.M)
    return ('root ::= gw-tool-call | gw-plain-text\n'
            'gw-plain-text ::= [^{ \\t\\n] [^\\x00]*\n' + renamed)


def parse_tool_call(text: str, tools: dict[str, dict]) -> dict | None:
    """The model's answer as an OpenAI tool call, or None if it is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in tools \
            or not isinstance(obj.get("arguments"), dict):
        return None
    return {"id": new_id("call"), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(obj["arguments"])}}


def finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def usage(u: dict) -> dict:
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


def chat_answer(plan: ChatPlan, res: dict, rid: str, created: int) -> dict:
    message, reason = chat_message(plan, res)
    return {"id": rid, "object": "chat.completion", "created": created, "model": res["model"],
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": reason}],
            "usage": usage(res["usage"])}


def chat_message(plan: ChatPlan, res: dict) -> tuple[dict, str]:
    text = res["text"]
    if plan.tool_mode != "none":
        call = parse_tool_call(text.strip(), plan.tools)
        if call is not None:
            return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    return {"role": "assistant", "content": text}, finish(res["finish_reason"])


def chat_chunk(rid: str, created: int, model: str, delta: dict,
               reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": reason}]}


# --- completions and embeddings ------------------------------------------------------------


def completion_request(body: dict) -> tuple[str, dict, bool, bool]:
    params = sampling(body)
    stream, include_usage = stream_flags(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (token arrays and batches are not supported by "
                  "this server)", "prompt")
    for name in ("echo", "best_of", "suffix"):
        v = body.get(name)
        if v not in (None, False, 1, ""):
            raise bad(f"'{name}' is not supported by this server", name)
    return prompt, params, stream, include_usage


def completion_answer(res: dict, rid: str, created: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": res["model"],
            "choices": [{"index": 0, "text": res["text"], "logprobs": None,
                         "finish_reason": finish(res["finish_reason"])}],
            "usage": usage(res["usage"])}


def completion_chunk(rid: str, created: int, model: str, text: str,
                     reason: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}


def embedding_request(body: dict) -> tuple[list[str], str, str]:
    model = require_model(body)
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad("'input' must be a string or a non-empty array of strings (token arrays "
                  "are not supported by this server)", "input")
    fmt = _get(body, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise bad("'encoding_format' must be float or base64", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad("'dimensions' is not supported by this server", "dimensions")
    return texts, model, fmt


def embedding_answer(vectors: list, model: str, fmt: str, tokens: int) -> dict:
    import base64
    from array import array

    def enc(v: list) -> Any:
        return base64.b64encode(array("f", v).tobytes()).decode() if fmt == "base64" else v

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": enc(v)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def models_answer(rows: list[dict], created: float) -> dict:
    return {"object": "list",
            "data": [{"id": r["name"], "object": "model", "created": int(created),
                      "owned_by": "llmagentos"} for r in rows if r.get("loaded")]}


def now() -> int:
    return int(time.time())


__all__ = ["ApiError"]
