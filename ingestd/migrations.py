"""Numbered schema migrations, recorded in ``schema_migrations``.

Each migration runs in its own transaction; on PostgreSQL an advisory lock makes sure two nodes
never migrate at once, on SQLite the IMMEDIATE transaction does. A database whose schema is newer
than this code is refused and never touched. Migrations are plain SQL written for both dialects
(``{pk}``, ``{real}``... are filled in per dialect), never derived from the current models, so
that an old database is always brought forward by the same steps.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable

import peewee as pw

from ingestd import chunking, words
from ingestd.db import executemany, is_postgres
from ingestd.errors import StoreError

ADVISORY_LOCK_KEY = 0x1D6E57D  # "ingestd"

DIALECTS = {
    "sqlite": {"name": "sqlite", "pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "bigint": "INTEGER",
               "real": "REAL", "blob": "BLOB", "bool": "INTEGER", "false": "0"},
    "postgres": {"name": "postgres", "pk": "BIGSERIAL PRIMARY KEY", "bigint": "BIGINT",
                 "real": "DOUBLE PRECISION", "blob": "BYTEA", "bool": "BOOLEAN",
                 "false": "FALSE"},
}

V1_TABLES = [
    """CREATE TABLE ingestd_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE ingest_sources (
        id {pk},
        project_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        created_at {real} NOT NULL,
        UNIQUE (project_id, path))""",
    """CREATE TABLE ingest_jobs (
        id {pk},
        project_id TEXT NOT NULL,
        source_id {bigint} REFERENCES ingest_sources (id),
        source_path TEXT NOT NULL,
        source_path_raw {blob},
        original_filename TEXT,
        byte_size {bigint},
        mime_type TEXT,
        stage TEXT NOT NULL,
        status TEXT NOT NULL,
        progress {real} NOT NULL DEFAULT 0,
        message TEXT,
        error_message TEXT,
        canonical_document_id {bigint},
        content_sha256 TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        is_deep_scan {bool} NOT NULL DEFAULT {false},
        version_key TEXT UNIQUE,
        file_mtime_ns {bigint},
        file_inode {bigint},
        not_before {real} NOT NULL,
        lease_owner TEXT,
        lease_expires_at {real},
        cancel_requested {bool} NOT NULL DEFAULT {false},
        created_at {real} NOT NULL,
        updated_at {real} NOT NULL,
        started_at {real},
        completed_at {real},
        deleted_at {real},
        CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
        CHECK (progress >= 0 AND progress <= 1))""",
    # Listing is keyset pagination newest-first inside one project, optionally by one filter;
    # partial indexes leave soft-deleted rows out, so deep pages cost what the first one does.
    """CREATE INDEX ix_jobs_project ON ingest_jobs (project_id, id) WHERE deleted_at IS NULL""",
    """CREATE INDEX ix_jobs_project_status ON ingest_jobs (project_id, status, id)
        WHERE deleted_at IS NULL""",
    """CREATE INDEX ix_jobs_project_stage ON ingest_jobs (project_id, stage, id)
        WHERE deleted_at IS NULL""",
    """CREATE INDEX ix_jobs_project_source ON ingest_jobs (project_id, source_id, id)
        WHERE deleted_at IS NULL""",
    # Only queued jobs are in the claim index, only running ones in the lease index.
    """CREATE INDEX ix_jobs_claimable ON ingest_jobs (id) WHERE status = 'queued'""",
    """CREATE INDEX ix_jobs_leases ON ingest_jobs (lease_expires_at) WHERE status = 'running'""",
    """CREATE TABLE ingest_events (
        seq {bigint} PRIMARY KEY,
        type TEXT NOT NULL,
        project_id TEXT,
        job_id {bigint},
        time {real} NOT NULL,
        data TEXT NOT NULL)""",
    """CREATE INDEX ix_events_time ON ingest_events (time)""",
    """CREATE TABLE ingest_event_sequence (id INTEGER PRIMARY KEY, last_seq {bigint} NOT NULL)""",
    """INSERT INTO ingest_event_sequence (id, last_seq) VALUES (1, 0)""",
]


def _run(db: pw.Database, dialect: dict[str, str], statements: list[str]) -> None:
    for statement in statements:
        db.execute_sql(statement.format(**dialect))


def _v1(db: pw.Database, dialect: dict[str, str]) -> None:
    _run(db, dialect, V1_TABLES)
    db.execute_sql("INSERT INTO ingestd_meta (key, value) VALUES (%s, %s)" % (
        db.param, db.param), ("instance_id", uuid.uuid4().hex))


V2_DOCUMENTS = [
    """CREATE TABLE documents (
        id {pk},
        project_id TEXT NOT NULL,
        content_sha256 TEXT NOT NULL,
        source_path TEXT NOT NULL,
        original_filename TEXT,
        mime_type TEXT,
        text TEXT NOT NULL,
        page_count INTEGER NOT NULL DEFAULT 1,
        created_at {real} NOT NULL,
        deleted_at {real})""",
    """CREATE INDEX ix_documents_sha ON documents (project_id, content_sha256)
        WHERE deleted_at IS NULL""",
]


def _v2(db: pw.Database, dialect: dict[str, str]) -> None:
    _run(db, dialect, V2_DOCUMENTS)


V3_PUBLISHING = [
    """CREATE TABLE ingest_publish_cursors (
        consumer TEXT PRIMARY KEY,
        last_seq {bigint} NOT NULL,
        updated_at {real} NOT NULL)""",
]


def _v3(db: pw.Database, dialect: dict[str, str]) -> None:
    _run(db, dialect, V3_PUBLISHING)


V4_CHUNKS = [
    """ALTER TABLE documents ADD COLUMN job_id {bigint}""",
    """CREATE TABLE chunks (
        id {pk},
        document_id {bigint} NOT NULL REFERENCES documents (id),
        project_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        page INTEGER,
        start_offset INTEGER NOT NULL,
        end_offset INTEGER NOT NULL,
        text TEXT NOT NULL)""",
    """CREATE INDEX ix_chunks_document ON chunks (document_id)""",
    # Content dedup, re-ingest of a path, and clean-up on delete look jobs up by these.
    """CREATE INDEX ix_jobs_content ON ingest_jobs (project_id, content_sha256)
        WHERE status = 'completed'""",
    """CREATE INDEX ix_jobs_path ON ingest_jobs (project_id, source_path, id)""",
    """CREATE INDEX ix_jobs_document ON ingest_jobs (canonical_document_id)
        WHERE canonical_document_id IS NOT NULL""",
]
V4_SQLITE_FTS = [
    # External content: the text is stored once, in chunks; deletes reach the FTS5 index by
    # trigger (inserts did too, until V6).
    """CREATE VIRTUAL TABLE chunks_fts USING fts5(
        text, content='chunks', content_rowid='id', tokenize='unicode61 remove_diacritics 2')""",
    """CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
        INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text); END""",
    """CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
        INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id, old.text); END""",
]
V4_POSTGRES_FTS = [
    """ALTER TABLE chunks ADD COLUMN tsv tsvector
        GENERATED ALWAYS AS (to_tsvector('simple', text)) STORED""",
    """CREATE INDEX ix_chunks_tsv ON chunks USING GIN (tsv)""",
]


def _v4(db: pw.Database, dialect: dict[str, str]) -> None:
    _run(db, dialect, V4_CHUNKS)
    _run(db, dialect, V4_SQLITE_FTS if dialect["name"] == "sqlite" else V4_POSTGRES_FTS)


V5_STATS = [
    # `ingestd stats` reads a window of ended jobs per project.
    """CREATE INDEX ix_jobs_ended ON ingest_jobs (project_id, status, completed_at)
        WHERE deleted_at IS NULL AND completed_at IS NOT NULL""",
    # The claim index, now exactly the claim's WHERE: the planner then never prefers another
    # index plus a sort (it did, on PostgreSQL, before statistics caught up with a burst).
    """DROP INDEX ix_jobs_claimable""",
    """CREATE INDEX ix_jobs_claim ON ingest_jobs (id) WHERE status = 'queued' AND deleted_at IS NULL""",
]


def _v5(db: pw.Database, dialect: dict[str, str]) -> None:
    _run(db, dialect, V5_STATS)


V6_SQLITE_FTS = [
    # The index sink fills chunks_fts itself, with one INSERT ... SELECT per transaction: the
    # trigger's insert, once per chunk, cost FTS5 over twice as much per chunk.
    """DROP TRIGGER IF EXISTS chunks_fts_insert""",
]


def _v6(db: pw.Database, dialect: dict[str, str]) -> None:
    if dialect["name"] == "sqlite":
        _run(db, dialect, V6_SQLITE_FTS)


V7_INDEXES = [
    # Migration 5 was changed after it had shipped: a database migrated by its first form
    # kept ix_jobs_claimable and has ix_jobs_ended without its completed_at condition.
    """DROP INDEX IF EXISTS ix_jobs_claimable""",
    """DROP INDEX IF EXISTS ix_jobs_claim""",
    """CREATE INDEX ix_jobs_claim ON ingest_jobs (id) WHERE status = 'queued' AND deleted_at IS NULL""",
    """DROP INDEX IF EXISTS ix_jobs_ended""",
    """CREATE INDEX ix_jobs_ended ON ingest_jobs (project_id, status, completed_at)
        WHERE deleted_at IS NULL AND completed_at IS NOT NULL""",
]
_BACKFILL_BATCH = 500


def _v7(db: pw.Database, dialect: dict[str, str]) -> None:
    """Repairs. The indexes as migration 5 makes them now. Chunks for documents that have
    none: those of schema 2 and 3, which migration 4 left unsearchable (and a duplicate of
    one pointed at a document search never shows). On SQLite, the full-text index rebuilt
    from the chunks: chunks written by a daemon of schema 4 after another process had applied
    migration 6 (which dropped the trigger that daemon relied on) were never indexed."""
    _run(db, dialect, V7_INDEXES)
    _chunk_documents_without_chunks(db)
    if dialect["name"] == "sqlite":
        db.execute_sql("INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild')")


def _chunk_documents_without_chunks(db: pw.Database) -> None:
    """Live documents written before migration 4 (by schema 2 or 3, when every document was
    the built-in index's) get chunks, split with the default size and overlap; their page
    boundaries were never stored, so the chunks have no page. Later documents without chunks
    are the text sink's, which indexes nothing."""
    after, param = 0, db.param
    while True:
        rows = db.execute_sql(
            f"SELECT id, project_id, text FROM documents d WHERE id > {param} "
            "AND deleted_at IS NULL "
            "AND created_at < (SELECT applied_at FROM schema_migrations WHERE version = 4) "
            "AND NOT EXISTS "
            "(SELECT 1 FROM chunks c WHERE c.document_id = d.id) "
            f"ORDER BY id LIMIT {_BACKFILL_BATCH}", (after,)).fetchall()
        if not rows:
            return
        chunks = [(document_id, project_id, seq, piece.start, piece.end, piece.text)
                  for document_id, project_id, text in rows
                  for seq, piece in enumerate(chunking.chunk_text(text, ()))]
        if chunks:
            executemany(
                "INSERT INTO chunks (document_id, project_id, seq, page, start_offset, "
                f"end_offset, text) VALUES ({param}, {param}, {param}, NULL, {param}, {param}, "
                f"{param})", chunks, on=db)
        after = rows[-1][0]


V8_SQLITE_FTS_MERGING = [
    # FTS5 writes each transaction's chunks as a new segment and merges segments as they pile
    # up. The default merges 4 of a level at a time, so a posting is rewritten once per power
    # of 4 documents; 16 at a time rewrites it half as often. At 100,000 small documents
    # indexed 40 per transaction (a worker's group) that cut the time to index one from 130
    # to 94 us, and search p50 rose from 5.3 to 5.7 ms. crisismerge above automerge keeps
    # merging incremental: at the default (16) it merged a whole level at once, holding the
    # write lock for 180 ms instead of at most 21.
    """INSERT INTO chunks_fts (chunks_fts, rank) VALUES ('automerge', 16)""",
    """INSERT INTO chunks_fts (chunks_fts, rank) VALUES ('crisismerge', 64)""",
]


def _v8(db: pw.Database, dialect: dict[str, str]) -> None:
    if dialect["name"] == "sqlite":  # PostgreSQL's GIN index has no such setting
        _run(db, dialect, V8_SQLITE_FTS_MERGING)


# Version keys as jobs.version_key makes them now, led by the file's mtime: a key of older code
# (the hash alone, 64 characters) gets its lead from the row's file_mtime_ns. A key that has one
# is left alone, so the step may run twice.
V9_KEYS_IN_FILE_ORDER = {
    "sqlite": """UPDATE ingest_jobs SET version_key =
        printf('%020d', max(coalesce(file_mtime_ns, 0), 0)) || '.' || version_key
        WHERE length(version_key) = 64""",
    "postgres": """UPDATE ingest_jobs SET version_key =
        lpad(greatest(coalesce(file_mtime_ns, 0), 0)::text, 20, '0') || '.' || version_key
        WHERE length(version_key) = 64""",
}
V9_INDEXES = [
    # Content dedup looks documents up through their jobs (ix_jobs_content); nothing reads this
    # one, and every document's random SHA-256 put it on another page of it.
    """DROP INDEX IF EXISTS ix_documents_sha""",
]


def _v9(db: pw.Database, dialect: dict[str, str]) -> None:
    db.execute_sql(V9_KEYS_IN_FILE_ORDER[dialect["name"]])
    _run(db, dialect, V9_INDEXES)


# A chunk's text is a slice of its document's: SQLite no longer stores it twice. A new chunk's
# text is NULL and FTS5 reads it from the document, through a view (substr counts characters,
# as Python's offsets do). The sink still stores it for long documents and at a NUL (see
# sinks/index.py); chunks written before keep theirs. 2 KB files take 28% less room. The
# full-text index is made anew over the view (FTS5 keeps its content table in its definition),
# so this step reindexes every chunk once. The chunks table is migration 4's with text
# nullable, written out again: a migration keeps its own statements (one shared with another
# and edited later would change what the older one does).
_V10_CHUNK_TEXTS = """CREATE VIEW chunk_texts AS SELECT c.id AS id, c.document_id AS document_id,
    coalesce(c.text, substr(d.text, c.start_offset + 1, c.end_offset - c.start_offset)) AS text
    FROM chunks c JOIN documents d ON d.id = c.document_id"""
V10_SQLITE_CHUNKS = [
    # Written to run again over its own result (a test rolls a database's history back).
    """DROP TRIGGER IF EXISTS chunks_fts_delete""",
    """DROP TABLE IF EXISTS chunks_fts""",
    """DROP VIEW IF EXISTS chunk_texts""",
    """CREATE TABLE chunks_v10 (
        id {pk},
        document_id {bigint} NOT NULL REFERENCES documents (id),
        project_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        page INTEGER,
        start_offset INTEGER NOT NULL,
        end_offset INTEGER NOT NULL,
        text TEXT)""",
    """INSERT INTO chunks_v10 (id, document_id, project_id, seq, page, start_offset, end_offset,
        text) SELECT id, document_id, project_id, seq, page, start_offset, end_offset, text
        FROM chunks""",
    """DROP TABLE chunks""",
    """ALTER TABLE chunks_v10 RENAME TO chunks""",
    """CREATE INDEX ix_chunks_document ON chunks (document_id)""",
    _V10_CHUNK_TEXTS,
    """CREATE VIRTUAL TABLE chunks_fts USING fts5(
        text, content='chunk_texts', content_rowid='id', tokenize='unicode61 remove_diacritics 2')""",
    *V8_SQLITE_FTS_MERGING,
    # A chunk's document outlives it (documents are only ever marked deleted).
    """CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
        INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id,
            coalesce(old.text, (SELECT substr(d.text, old.start_offset + 1,
                                              old.end_offset - old.start_offset)
                                FROM documents d WHERE d.id = old.document_id))); END""",
    """INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild')""",
]
# PostgreSQL keeps storing it (its tsvector column was generated from it); the column and the
# view are as on SQLite, so readers need not ask which database they read.
V10_POSTGRES_CHUNKS = ["""ALTER TABLE chunks ALTER COLUMN text DROP NOT NULL""",
                       """DROP VIEW IF EXISTS chunk_texts""", _V10_CHUNK_TEXTS]


def _v10(db: pw.Database, dialect: dict[str, str]) -> None:
    _run(db, dialect, V10_SQLITE_CHUNKS if dialect["name"] == "sqlite" else V10_POSTGRES_CHUNKS)


# PostgreSQL's index sees the words SQLite's FTS5 sees. Its tsvector column was generated by
# to_tsvector('simple', text), whose parser keeps "2024-01-15", "example.com" or "report.pdf" as
# one word, folds by the database's locale and keeps accents, so the same query found other
# passages than on SQLite. The column is now written by the index sink from ingestd.words, and
# every chunk's is made anew here (in Python, batch by batch), then indexed in one go. Written
# to run again over its own result.
V11_POSTGRES_WORDS_BEFORE = [
    """DROP INDEX IF EXISTS ix_chunks_tsv""",
    """ALTER TABLE chunks DROP COLUMN IF EXISTS tsv""",
    """ALTER TABLE chunks ADD COLUMN tsv tsvector""",
]
V11_POSTGRES_WORDS_AFTER = ["""CREATE INDEX ix_chunks_tsv ON chunks USING GIN (tsv)"""]


def _v11(db: pw.Database, dialect: dict[str, str]) -> None:
    if dialect["name"] != "postgres":  # FTS5 is the reference: SQLite's index stays as it is
        return
    _run(db, dialect, V11_POSTGRES_WORDS_BEFORE)
    after = 0
    while True:
        rows = db.execute_sql("SELECT id, text FROM chunk_texts WHERE id > %s ORDER BY id "
                              "LIMIT %s", (after, _BACKFILL_BATCH)).fetchall()
        if not rows:
            break
        db.execute_sql("UPDATE chunks c SET tsv = CAST(v.tsv AS tsvector) "
                       "FROM unnest(%s::bigint[], %s::text[]) AS v (id, tsv) WHERE c.id = v.id",
                       ([id_ for id_, _ in rows], [words.tsvector(text) for _, text in rows]))
        after = rows[-1][0]
    _run(db, dialect, V11_POSTGRES_WORDS_AFTER)


# Deletes owed to external sinks (command, http, plugins): recorded in the transaction that
# lets go of a document, made after its commit, kept until the sink took them (retire). Written
# to run again over its own result.
V12_SINK_DELETES = [
    """CREATE TABLE IF NOT EXISTS sink_deletes (
        id {pk},
        project_id TEXT NOT NULL,
        document_id {bigint} NOT NULL,
        sink TEXT NOT NULL,
        job_id {bigint},
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before {real} NOT NULL,
        last_error TEXT,
        created_at {real} NOT NULL,
        UNIQUE (project_id, document_id))""",
    """CREATE INDEX IF NOT EXISTS ix_sink_deletes_due ON sink_deletes (not_before)""",
]


def _v12(db: pw.Database, dialect: dict[str, str]) -> None:
    _run(db, dialect, V12_SINK_DELETES)


# PostgreSQL: a B-tree index row holds at most about 2.7 KB, and Linux paths go to 4 KB: a file
# 3 KB deep got no job, ever ("index row size 3528 exceeds btree version 4 maximum 2704").
# A hash index keeps 4 bytes per path; the lookups by path are all equality. SQLite's B-tree
# takes any length (a long key spills to overflow pages). Written to run again.
V13_POSTGRES_PATHS = [
    """DROP INDEX IF EXISTS ix_jobs_path""",
    """CREATE INDEX ix_jobs_path ON ingest_jobs USING hash (source_path)""",
]


def _v13(db: pw.Database, dialect: dict[str, str]) -> None:
    if is_postgres(db):
        _run(db, dialect, V13_POSTGRES_PATHS)


# A deleted document kept its text for good: a deleted job's content stayed in the database,
# and each new version of a file left its old text behind. Now a deleted document's text is
# dropped, and so is that of those deleted before (their chunks went when they were deleted;
# any left go first: SQLite's trigger reads the document to take their words out of FTS5).
V14_DROP_TEXT = [
    """DELETE FROM chunks WHERE document_id IN
        (SELECT id FROM documents WHERE deleted_at IS NOT NULL)""",
    """UPDATE documents SET text = '' WHERE deleted_at IS NOT NULL AND text <> ''""",
]


def _v14(db: pw.Database, dialect: dict[str, str]) -> None:
    _run(db, dialect, V14_DROP_TEXT)


Migration = tuple[int, str, Callable[[pw.Database, dict[str, str]], None]]
MIGRATIONS: list[Migration] = [
    (1, "jobs, sources, events", _v1),
    (2, "documents of the built-in index", _v2),
    (3, "how far each event log was published", _v3),
    (4, "chunks and the full-text index", _v4),
    (5, "indexes for stats windows and for claiming", _v5),
    (6, "chunks reach the full-text index in one statement per transaction", _v6),
    (7, "repairs: claim and stats indexes, chunks of older documents, the full-text index", _v7),
    (8, "the full-text index merges its segments 16 at a time", _v8),
    (9, "version keys in file order; no index on documents' content", _v9),
    (10, "chunks' text read from their documents, not stored twice (SQLite)", _v10),
    (11, "the full-text index sees the words SQLite's sees (PostgreSQL)", _v11),
    (12, "deletes owed to external sinks", _v12),
    (13, "jobs looked up by a path of any length (PostgreSQL)", _v13),
    (14, "deleted documents' text dropped", _v14),
]
LATEST = MIGRATIONS[-1][0]
NEW_DATABASE = "a new database"


def _ensure_history(db: pw.Database) -> None:
    real = DIALECTS[dialect_name(db)]["real"]
    with db.atomic():
        db.execute_sql("CREATE TABLE IF NOT EXISTS schema_migrations "
                       f"(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at {real} NOT NULL)")


def dialect_name(db: pw.Database) -> str:
    return "postgres" if is_postgres(db) else "sqlite"


def current_version(db: pw.Database) -> int:
    """The highest applied migration (0 for a new database)."""
    if not _has_table(db, "schema_migrations"):
        return 0
    row = db.execute_sql("SELECT MAX(version) FROM schema_migrations").fetchone()
    return row[0] or 0


def _has_table(db: pw.Database, name: str) -> bool:
    """Whether ``name`` exists where unqualified names resolve (PostgreSQL: the search_path)."""
    if is_postgres(db):
        return db.execute_sql("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]
    return bool(db.execute_sql("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                               (name,)).fetchone())


def check_not_newer(db: pw.Database) -> int:
    version = current_version(db)
    if version > LATEST:
        raise StoreError(f"database schema is version {version}, newer than this ingestd "
                         f"(knows up to {LATEST}): upgrade ingestd; the database was not touched")
    return version


def check_current(db: pw.Database) -> None:
    """For the commands that use the database without migrating it: the schema must be this
    ingestd's. An older one is refused, not migrated: an older daemon may be using it, and
    a migration can change what its writes must do (v6 stopped a trigger that the code of v4
    relies on to index chunks). A new, empty database gets the schema."""
    version = check_not_newer(db)
    if version == 0:
        migrate(db)
    elif version < LATEST:
        raise StoreError(f"database schema is version {version}, older than this ingestd's "
                         f"({LATEST}): stop (or upgrade) the daemons using it, then run "
                         "`ingestd db migrate` or start an upgraded daemon; the database was "
                         "not touched")


def migrate(db: pw.Database, on_step: Callable[[int, str], None] | None = None,
            on_wait: Callable[[], None] | None = None) -> list[int]:
    """Apply every pending migration; return the versions applied (empty when up to date).
    ``on_step(version, name)`` is called as each begins (some take minutes on a big database),
    ``on_wait()`` before waiting for another process's migrations to end (PostgreSQL). A new
    database gets them all at once and ``on_step(LATEST, NEW_DATABASE)`` once: ten steps named
    after upgrades and repairs would tell an operator of things that never happened."""
    if check_not_newer(db) == LATEST:
        return []
    with _migration_lock(db, on_wait):
        _ensure_history(db)
        applied = []
        if current_version(db) == 0 and on_step is not None:
            on_step(LATEST, NEW_DATABASE)
            on_step = None
        for version, name, step in MIGRATIONS:
            with db.atomic():
                # Re-read inside the transaction: another process may have migrated meanwhile.
                if check_not_newer(db) >= version:
                    continue
                if on_step is not None:
                    on_step(version, name)
                step(db, DIALECTS[dialect_name(db)])
                db.execute_sql(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)"
                    % (db.param, db.param, db.param), (version, name, time.time()))
            applied.append(version)
        return applied


class _migration_lock:
    """A session-level advisory lock on PostgreSQL; nothing on SQLite (IMMEDIATE suffices)."""

    def __init__(self, db: pw.Database, on_wait: Callable[[], None] | None) -> None:
        self.db = db
        self.postgres = is_postgres(db)
        self.on_wait = on_wait

    def __enter__(self) -> None:
        if not self.postgres:
            return
        [(taken,)] = self.db.execute_sql("SELECT pg_try_advisory_lock(%s)",
                                         (ADVISORY_LOCK_KEY,)).fetchall()
        if not taken:  # another node is migrating: say so, then wait for it
            if self.on_wait is not None:
                self.on_wait()
            self.db.execute_sql("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))

    def __exit__(self, *exc: object) -> None:
        if self.postgres:
            self.db.execute_sql("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
