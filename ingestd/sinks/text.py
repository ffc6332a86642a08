"""The plain text sink: each document's text in the ``documents`` table, nothing indexed."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from ingestd import db
from ingestd.config import ProjectConfig
from ingestd.errors import ConfigError
from ingestd.models import Chunk as ChunkRow, Document as DocumentRow, database
from ingestd.sinks import Document


class TextSink:
    """Stores documents in ingestd's own database (so it commits with the job)."""

    transactional = True
    options: tuple[str, ...] = ()

    def __init__(self, project: ProjectConfig) -> None:
        self.project = project
        unknown = set(project.sink.options) - set(self.options)
        if unknown:
            raise ConfigError(f"projects.{project.name}.sink: unknown option(s) "
                              f"{', '.join(sorted(unknown))} for kind {project.sink.kind!r}")

    def option(self, name: str, default: int, minimum: int = 1) -> int:
        """The integer sink option ``name``, at least ``minimum``."""
        value = self.project.sink.options.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            wanted = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
            raise ConfigError(f"projects.{self.project.name}.sink.{name}: must be {wanted}")
        return value

    def ingest(self, document: Document) -> int:
        """The document row (and its parts); ``replaces`` is retired by the worker, not here."""
        return self.ingest_many([(document, self.parts_of(document))])[0]

    def parts_of(self, document: Document) -> list[tuple]:
        """What the sink keeps besides the document row, as rows without the document's id
        (the index: its chunks). A worker works these out before its transaction, so the
        database's write lock is not held while text is split."""
        return []

    def ingest_many(self, documents: Sequence[tuple[Document, list[tuple]]],
                    check: Callable[[], None] | None = None) -> list[int]:
        """Insert documents with their parts (from :meth:`parts_of`) in one statement per
        table; their ids, in order. ``check`` raises to stop a long document's parts part-way
        (the job's deadline, a cancel); the caller's savepoint undoes what was written."""
        param, moment = database.param, time.time()
        values = ", ".join([f"({', '.join([param] * 9)})"] * len(documents))
        params: list[Any] = []
        for document, _ in documents:
            params += (document.project_id, document.sha256, document.source_path,
                       document.original_filename, document.mime_type, document.text,
                       len(document.pages), document.job_id, moment)
        with db.transaction():  # the worker's savepoint undoes it if the job's end fails
            rows = database.execute_sql(
                "INSERT INTO documents (project_id, content_sha256, source_path, "
                "original_filename, mime_type, text, page_count, job_id, created_at) "
                f"VALUES {values} RETURNING id, job_id", params).fetchall()
            by_job = {job_id: document_id for document_id, job_id in rows}
            if len(by_job) != len(documents):
                raise ValueError("ingest_many takes one document per job")
            ids = [by_job[document.job_id] for document, _ in documents]
            self.store_parts([(document_id, parts)
                              for document_id, (_, parts) in zip(ids, documents) if parts],
                             check)
        return ids

    def store_parts(self, parts: list[tuple[int, list[tuple]]],
                    check: Callable[[], None] | None = None) -> None:
        """Store each document's parts under its id, calling ``check`` now and then if given."""

    def delete(self, document_id: int) -> None:
        """Mark the document deleted and drop its text and chunks: deleting a job is how an
        operator takes content out, and each new version of a file lets its old document go.
        The row stays, as a deleted job's does (stats count the pages its job ingested).
        Chunks too, here: the document may be the index's, from before a reload to this sink."""
        with db.transaction():  # the worker's savepoint undoes it if the job's end fails
            # The chunks first: SQLite takes their words out of FTS5 by reading the document.
            ChunkRow.delete().where(ChunkRow.document == document_id).execute()
            (DocumentRow.update(deleted_at=time.time(), text="")
             .where(DocumentRow.id == document_id, DocumentRow.deleted_at.is_null()).execute())
