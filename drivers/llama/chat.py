"""Chat formatting: messages -> prompt text, for one model.

A model's chat template comes from its registry entry, else from its GGUF
(``tokenizer.chat_template``), and is rendered with llama-cpp-python's Jinja2
formatter. A model with neither gets the plain format::

    <system content>\\n\\n            (each system message, no label)
    User: <content>\\n
    Assistant: <content>\\n
    Assistant:                         (with add_generation_prompt)

Requests in the plain format should stop at "\\nUser:" (``ChatFormat.stop``,
Device.chat_stop).

Rendering touches only the read-only model, so any thread may do it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp

from llmagentos.syscalls.errno import SyscallError


class ChatFormat:
    """Renders chat messages: the Jinja2 template if any, else the plain format."""

    def __init__(self, template: str | None, bos_text: str, eos_text: str) -> None:
        self.template = template
        self.bos_text = bos_text
        self.eos_text = eos_text
        self._jinja = None
        self.stop: list[str] = []
        if template is None:
            self.stop = ["\nUser:"]

    @classmethod
    def for_model(cls, model: Any, vocab: Any, template: str | None,
                  bos: int, eos: int) -> ChatFormat:
        """The format of a loaded model: ``template`` (a registry entry's) if given,
        else the GGUF's; ``bos`` and ``eos`` are the tokens a template may name."""
        template = template or _meta_str(model, "tokenizer.chat_template")
        return cls(template, _token_text(vocab, bos), _token_text(vocab, eos))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content", ""), str) for m in messages
        ):
            raise SyscallError("EINVAL", "messages must be a list of {role: str, content: str}")
        if self.template is None:
            return _render_plain(messages, add_generation_prompt)
        if self._jinja is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._jinja = Jinja2ChatFormatter(
                template=self.template, eos_token=self.eos_text, bos_token=self.bos_text,
                add_generation_prompt=add_generation_prompt,
            )
        self._jinja.add_generation_prompt = add_generation_prompt
        try:
            return self._jinja(messages=messages).prompt
        except Exception as exc:  # a template's raise_exception() or a jinja error
            raise SyscallError("EINVAL", f"chat template rejected the messages: {exc}") from exc

    def starts_with_bos(self, text: str) -> bool:
        """Did the template write the BOS token itself? (Then tokenizing adds none.)"""
        return bool(self.bos_text) and text.startswith(self.bos_text)


def _render_plain(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    parts = []
    for m in messages:
        role, content = m["role"], m.get("content", "")
        if role == "system":
            parts.append(f"{content}\n\n")
        else:
            parts.append(f"{role.capitalize()}: {content}\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def _meta_str(model: Any, key: str) -> str | None:
    size = 1 << 16
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size)
    if n < 0:
        return None
    if n >= size:
        buf = ctypes.create_string_buffer(n + 1)
        llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, n + 1)
    return buf.value.decode("utf-8", errors="replace")


def _token_text(vocab: Any, token: int) -> str:
    if token < 0:
        return ""
    text = llama_cpp.llama_vocab_get_text(vocab, token)
    return text.decode("utf-8", errors="replace") if text else ""
