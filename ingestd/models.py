"""Peewee models of the tables created by :mod:`ingestd.migrations`.

The models are bound to :data:`database` (a proxy initialised by :func:`ingestd.db.open_store`).
Times are stored as float seconds since the epoch (UTC), which both SQLite and PostgreSQL compare
and aggregate natively; they are shown as RFC 3339 at the edges.
"""

from __future__ import annotations

import enum

import peewee as pw

database = pw.DatabaseProxy()


# A version's stat in 64-bit signed columns. An mtime past 2262-04-11 (touch -d 2300-01-01) does
# not fit: every later one is kept as the largest (a file changing from one such time to another
# at the same size and inode is not told apart). An inode is an unsigned 64-bit number (NFS,
# overlay file systems use the high bit): kept as its two's complement, which loses nothing.
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def stored_mtime_ns(mtime_ns: int | None) -> int | None:
    return None if mtime_ns is None else min(max(mtime_ns, INT64_MIN), INT64_MAX)


def stored_inode(inode: int | None) -> int | None:
    return inode - 2**64 if inode is not None and inode > INT64_MAX else inode


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class Stage(str, enum.Enum):
    INITIAL = "initial"
    READING = "reading"
    EXTRACTING = "extracting"
    INDEXING = "indexing"
    DONE = "done"

    def __str__(self) -> str:
        return self.value


TERMINAL = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class BaseModel(pw.Model):
    class Meta:
        database = database


class Meta(BaseModel):
    """Facts about this database, such as the installation id used in event ids."""

    key = pw.TextField(primary_key=True)
    value = pw.TextField()

    class Meta:
        table_name = "ingestd_meta"


class SchemaMigration(BaseModel):
    version = pw.IntegerField(primary_key=True)
    name = pw.TextField()
    applied_at = pw.FloatField()

    class Meta:
        table_name = "schema_migrations"


class Source(BaseModel):
    """One watched folder of a project (the seed's implicit "default source")."""

    id = pw.AutoField()
    project_id = pw.TextField()
    kind = pw.TextField()
    path = pw.TextField()
    created_at = pw.FloatField()

    class Meta:
        table_name = "ingest_sources"


class Job(BaseModel):
    """An ingest job: one version of one file of one project."""

    id = pw.AutoField()
    project_id = pw.TextField()
    source = pw.ForeignKeyField(Source, column_name="source_id", null=True)
    source_path = pw.TextField()
    source_path_raw = pw.BlobField(null=True)
    original_filename = pw.TextField(null=True)
    byte_size = pw.BigIntegerField(null=True)
    mime_type = pw.TextField(null=True)
    stage = pw.TextField()
    status = pw.TextField()
    progress = pw.FloatField(default=0.0)
    message = pw.TextField(null=True)
    error_message = pw.TextField(null=True)
    canonical_document_id = pw.BigIntegerField(null=True)
    content_sha256 = pw.TextField(null=True)
    attempts = pw.IntegerField(default=0)
    max_attempts = pw.IntegerField()
    is_deep_scan = pw.BooleanField(default=False)
    version_key = pw.TextField(null=True)
    file_mtime_ns = pw.BigIntegerField(null=True)  # as stored_mtime_ns() keeps it
    file_inode = pw.BigIntegerField(null=True)  # as stored_inode() keeps it
    not_before = pw.FloatField()
    lease_owner = pw.TextField(null=True)
    lease_expires_at = pw.FloatField(null=True)
    cancel_requested = pw.BooleanField(default=False)
    created_at = pw.FloatField()
    updated_at = pw.FloatField()
    started_at = pw.FloatField(null=True)
    completed_at = pw.FloatField(null=True)
    deleted_at = pw.FloatField(null=True)

    class Meta:
        table_name = "ingest_jobs"


class Event(BaseModel):
    """The outbox: one row per state change, numbered by a gap-free database-wide sequence."""

    seq = pw.BigIntegerField(primary_key=True)
    type = pw.TextField()
    project_id = pw.TextField(null=True)
    job_id = pw.BigIntegerField(null=True)
    time = pw.FloatField()
    data = pw.TextField()

    class Meta:
        table_name = "ingest_events"


class EventSequence(BaseModel):
    """A single row holding the last event sequence handed out (see jobs.emit)."""

    id = pw.IntegerField(primary_key=True)
    last_seq = pw.BigIntegerField()

    class Meta:
        table_name = "ingest_event_sequence"


class Document(BaseModel):
    """A document of the built-in index: the text of one file content in one project."""

    id = pw.AutoField()
    project_id = pw.TextField()
    content_sha256 = pw.TextField()
    source_path = pw.TextField()
    original_filename = pw.TextField(null=True)
    mime_type = pw.TextField(null=True)
    text = pw.TextField()
    page_count = pw.IntegerField(default=1)
    job_id = pw.BigIntegerField(null=True)
    created_at = pw.FloatField()
    deleted_at = pw.FloatField(null=True)

    class Meta:
        table_name = "documents"


class Chunk(BaseModel):
    """A passage of a document, the unit of full-text search."""

    id = pw.AutoField()
    document = pw.ForeignKeyField(Document, column_name="document_id")
    project_id = pw.TextField()
    seq = pw.IntegerField()
    page = pw.IntegerField(null=True)
    start_offset = pw.IntegerField()
    end_offset = pw.IntegerField()
    # SQLite: NULL, the slice start:end of the document's text (read through chunk_texts).
    text = pw.TextField(null=True)

    class Meta:
        table_name = "chunks"
