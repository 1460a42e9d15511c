"""The memory manager's on-disk format: the schema of its SQLite file, and migrations.

The schema version lives in ``PRAGMA user_version``. ``MIGRATIONS[i]`` takes a
database from version ``i`` to ``i + 1``; a migration and the version bump
commit together, so a crash mid-upgrade leaves the old version intact. A
database newer than this code is refused rather than guessed at. Migrations
change the schema only by addition: append to the list, never edit an entry
that has shipped.

Layout (version 1):

- ``contexts``: one row per context. ``next_seq`` is the next message number;
  ``paged``/``paged_first``/``paged_last`` describe the archived messages not
  yet covered by a summary (what the paging note talks about), kept
  incrementally so appending never has to count the archive.
- ``messages``: every message of every context, live or archived, never
  deleted by paging. ``pos`` orders the conversation: an ordinary message has
  ``pos = seq``; a summary sits at ``upto + 0.5`` and the paging note just
  after the newest archived message, so each stands where the text it
  replaces used to be. Ties are broken by ``seq``. The paging note is the
  single row with ``kind = 'note'`` and ``seq = 0``.
- ``messages_fts``: a contentless FTS5 index over live and archived message
  text (not the note). Column ``ctxkey`` holds ``c<ctx id>`` so a search
  intersects with one context's documents inside the index.
- ``memories`` / ``memory_tags`` / ``memories_fts``: long-term memory, a
  key-value store per namespace with tags and full-text search.

Version 2 adds ``agent_names``: each agent name and the identity that owns it
(``init``, ``agent:NAME`` or an unnamed process's one-boot identity).

Version 3 adds shared blocks (blocks.py): ``blocks``, one row per block with
its current version and text, replaced whole by each write; and
``block_attachments``, which blocks each context shows to the model, gone with
the context or the block.

Version 4 adds ``mail``: messages sent to a named agent and not yet received
(kernel/memory/mail.py). ``id`` is AUTOINCREMENT: it orders mail and is never
handed out twice, so a kernel that has seen a row id once never mistakes a
later message for it.
"""

from __future__ import annotations

import sqlite3

_TOKENIZE = "porter unicode61 remove_diacritics 2"

# Each migration is a sequence of single SQL statements (trigger bodies make
# splitting a script on ';' unsafe, and executescript() would commit early).
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE contexts (
            id          INTEGER PRIMARY KEY,
            name        TEXT UNIQUE,
            owner       TEXT NOT NULL,
            budget      INTEGER NOT NULL CHECK (budget > 0),
            created     REAL NOT NULL,
            next_seq    INTEGER NOT NULL DEFAULT 1,
            paged       INTEGER NOT NULL DEFAULT 0,
            paged_first INTEGER,
            paged_last  INTEGER
        )""",
        "CREATE INDEX contexts_owner ON contexts(owner)",
        """CREATE TABLE messages (
            id        INTEGER PRIMARY KEY,
            ctx       INTEGER NOT NULL REFERENCES contexts(id) ON DELETE CASCADE,
            seq       INTEGER NOT NULL,
            pos       REAL NOT NULL,
            role      TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
            kind      TEXT NOT NULL DEFAULT 'message'
                      CHECK (kind IN ('message', 'summary', 'note')),
            content   TEXT NOT NULL,
            tokens    INTEGER NOT NULL CHECK (tokens >= 0),
            pinned    INTEGER NOT NULL DEFAULT 0,
            state     TEXT NOT NULL CHECK (state IN ('live', 'archived')),
            summary   INTEGER,
            created   REAL NOT NULL,
            embedding BLOB,
            UNIQUE (ctx, seq)
        )""",
        # The window, paging and the note read (ctx, state) in conversation order;
        # read() walks (ctx, pos) across both states. Neither needs a sort, and
        # with tokens in the index stats() counts the archive without the table.
        "CREATE INDEX messages_state ON messages(ctx, state, pos, seq, tokens)",
        "CREATE INDEX messages_pos ON messages(ctx, pos, seq)",
        """CREATE INDEX messages_unembedded ON messages(ctx)
            WHERE state = 'archived' AND embedding IS NULL""",
        f"""CREATE VIRTUAL TABLE messages_fts USING fts5(
            ctxkey, content, content='', tokenize='{_TOKENIZE}'
        )""",
        """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages
            WHEN new.kind != 'note' BEGIN
            INSERT INTO messages_fts(rowid, ctxkey, content)
                VALUES (new.id, 'c' || new.ctx, new.content);
        END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
            WHEN old.kind != 'note' BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, ctxkey, content)
                VALUES ('delete', old.id, 'c' || old.ctx, old.content);
        END""",
        # Message text is immutable; only the note's is rewritten, and the note
        # is not indexed. The trigger keeps the index right should that change.
        """CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages
            WHEN new.kind != 'note' BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, ctxkey, content)
                VALUES ('delete', old.id, 'c' || old.ctx, old.content);
            INSERT INTO messages_fts(rowid, ctxkey, content)
                VALUES (new.id, 'c' || new.ctx, new.content);
        END""",
        """CREATE TABLE memories (
            id        INTEGER PRIMARY KEY,
            namespace TEXT NOT NULL,
            key       TEXT NOT NULL,
            value     TEXT NOT NULL,
            tags      TEXT NOT NULL DEFAULT '[]',
            created   REAL NOT NULL,
            updated   REAL NOT NULL,
            UNIQUE (namespace, key)
        )""",
        """CREATE TABLE memory_tags (
            tag TEXT NOT NULL,
            mem INTEGER NOT NULL REFERENCES memories(id) ON DELETE CASCADE,
            PRIMARY KEY (tag, mem)
        ) WITHOUT ROWID""",
        "CREATE INDEX memory_tags_mem ON memory_tags(mem)",
        f"""CREATE VIRTUAL TABLE memories_fts USING fts5(
            ns, key, value, tags, content='', tokenize='{_TOKENIZE}'
        )""",
        """CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories BEGIN
            INSERT INTO memories_fts(rowid, ns, key, value, tags)
                VALUES (new.id, new.namespace, new.key, new.value, new.tags);
        END""",
        """CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories BEGIN
            INSERT INTO memories_fts(memories_fts, rowid, ns, key, value, tags)
                VALUES ('delete', old.id, old.namespace, old.key, old.value, old.tags);
        END""",
        """CREATE TRIGGER memories_fts_update AFTER UPDATE ON memories BEGIN
            INSERT INTO memories_fts(memories_fts, rowid, ns, key, value, tags)
                VALUES ('delete', old.id, old.namespace, old.key, old.value, old.tags);
            INSERT INTO memories_fts(rowid, ns, key, value, tags)
                VALUES (new.id, new.namespace, new.key, new.value, new.tags);
        END""",
    ),
    (
        # Agent names and who owns them (kernel/names.py). Names already in use
        # (contexts and memories of agent:NAME) go to init: only the shell user,
        # or a holder of agent.adopt, may take them up until init hands them on.
        """CREATE TABLE agent_names (
            name    TEXT PRIMARY KEY,
            owner   TEXT NOT NULL,
            created REAL NOT NULL
        ) WITHOUT ROWID""",
        """INSERT OR IGNORE INTO agent_names(name, owner, created)
            SELECT substr(owner, 7), 'init', CAST(strftime('%s', 'now') AS REAL) FROM contexts
            WHERE owner GLOB 'agent:?*'""",
        """INSERT OR IGNORE INTO agent_names(name, owner, created)
            SELECT substr(namespace, 7), 'init', CAST(strftime('%s', 'now') AS REAL) FROM memories
            WHERE namespace GLOB 'agent:?*'""",
    ),
    (
        """CREATE TABLE blocks (
            name    TEXT PRIMARY KEY,
            version INTEGER NOT NULL CHECK (version >= 0),
            text    TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            writer  TEXT NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE block_attachments (
            ctx      INTEGER NOT NULL REFERENCES contexts(id) ON DELETE CASCADE,
            block    TEXT NOT NULL REFERENCES blocks(name) ON DELETE CASCADE,
            attached REAL NOT NULL,
            PRIMARY KEY (ctx, block)
        ) WITHOUT ROWID""",
        "CREATE INDEX block_attachments_block ON block_attachments(block)",
    ),
    (
        """CREATE TABLE mail (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            agent   TEXT NOT NULL,
            sender  TEXT NOT NULL,
            pid     INTEGER NOT NULL,
            boot    TEXT NOT NULL,
            type    TEXT,
            body    BLOB NOT NULL,
            created REAL NOT NULL
        )""",
        "CREATE INDEX mail_agent ON mail(agent, sender, boot, id)",
        "CREATE INDEX mail_sender ON mail(sender, boot)",
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    """The database was written by a newer LLMAgentOS than this one."""


def migrate(db: sqlite3.Connection) -> int:
    """Apply the missing migrations, each in its own transaction; return the version."""
    while True:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"database schema is version {version}, this kernel knows up to "
                    f"{SCHEMA_VERSION}: run a newer LLMAgentOS or use another state dir"
                )
            if version == SCHEMA_VERSION:
                db.execute("COMMIT")
                return version
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            # user_version lives in the database header: it commits with the DDL.
            db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
