"""The OpenAI-compatible HTTP gateway (``llmos boot --http``) and its API keys.

- ``keys``: API keys, each a named process of the kernel's own (durable);
- ``openai``: OpenAI requests to syscall arguments and results back;
- ``errors``: errnos as OpenAI error answers;
- ``app``: the Starlette app, each request run as its key's process;
- ``serve``: the Hypercorn (trio) listener in the kernel's nursery.

Only ``keys`` is imported at boot; the HTTP stack loads when --http is given.
"""
