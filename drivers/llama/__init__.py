"""The llama.cpp compute device, one concern a module:

- ``runtime``: the process-wide part: the backend, the one compute thread
  every decode runs on, how models are loaded.
- ``device``: ``Device`` (the model, its context and slots, the step) and
  ``Generation`` (one request's decoding state).
- ``chat``: chat messages -> prompt text (the model's template or the plain format).
- ``embed``: embeddings, on a second context the Device owns.

The contract it implements (``ComputeDevice``, the step's result types) is
drivers/device.py.
"""

from llmagentos.drivers.llama.chat import ChatFormat
from llmagentos.drivers.llama.device import Device, Generation
from llmagentos.drivers.llama.embed import Embedding, EmbeddingContext
from llmagentos.drivers.llama.runtime import (
    ComputeThread,
    compute_thread,
    default_threads,
    model_params,
)

__all__ = [
    "ChatFormat",
    "ComputeThread",
    "Device",
    "Embedding",
    "EmbeddingContext",
    "Generation",
    "compute_thread",
    "default_threads",
    "model_params",
]
