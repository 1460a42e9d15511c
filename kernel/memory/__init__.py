"""The memory manager: contexts held to a token budget, an archive, long-term memory.

One SQLite file holds it all; one module a concern:

- ``schema``: the on-disk format and its migrations;
- ``db``: the shared connection (lock, transactions) and argument/FTS helpers;
- ``contexts``: contexts, their windows and ownership; ``ContextStore``, the
  memory manager the kernel holds, composes the parts below;
- ``paging``: holding a window to its budget, the archive and its note;
- ``archive``: search by words (FTS5) and by meaning (embeddings);
- ``longterm``: mem.* key-value records with tags;
- ``owners``: agent names on record, and who owns state;
- ``blocks``: shared blocks several agents read, write (versioned,
  compare-and-set) and attach to their contexts.
- ``mail``: messages to named agents, kept until received.

Threads: calls are serialised on one lock, so they may come from the trio
thread and from ``trio.to_thread`` workers. Cheap calls (append, window, read
of a few rows, pin of a live message, mem_get/put/delete) take well under a
millisecond plus one fsync and may run on the event loop. search takes a few
ms, but tens of ms for a query made only of words common in a 100k-message
archive; stats counts the archive (~10 ms at 100k). Calls that touch a whole
context (fork, delete, compact, set_budget, import_archive, pin of an archived
message) or call the embedding hook (search with ``embed``, embed_pending)
belong in ``trio.to_thread.run_sync``. bench/bench_memory.py has the numbers.

Durability: every mutating call commits (fsync, WAL, synchronous=FULL) before
it returns; a call that raises leaves nothing behind.
"""

from llmagentos.kernel.memory.archive import Archive
from llmagentos.kernel.memory.contexts import ContextStore
from llmagentos.kernel.memory.longterm import LongTermMemory
from llmagentos.kernel.memory.schema import SCHEMA_VERSION, SchemaTooNew

__all__ = ["SCHEMA_VERSION", "Archive", "ContextStore", "LongTermMemory", "SchemaTooNew"]
