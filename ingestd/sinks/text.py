"""The plain text sink: each document's text in the ``documents`` table, nothing indexed."""

from __future__ import annotations

import time
from typing import Any

from ingestd import db
from ingestd.config import ProjectConfig
from ingestd.errors import ConfigError
from ingestd.models import Document as DocumentRow, database
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

    def option(self, name: str, default: Any, kind: type) -> Any:
        value = self.project.sink.options.get(name, default)
        if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"projects.{self.project.name}.sink.{name}: must be a positive "
                              f"{kind.__name__}")
        return value

    def ingest(self, document: Document) -> int:
        """The document row (and its parts); ``replaces`` is retired by the worker, not here."""
        param = database.param
        with db.transaction():  # the worker's savepoint undoes it if the job's end fails
            document_id = database.execute_sql(
                "INSERT INTO documents (project_id, content_sha256, source_path, "
                "original_filename, mime_type, text, page_count, job_id, created_at) "
                f"VALUES ({', '.join([param] * 9)}) RETURNING id",
                (document.project_id, document.sha256, document.source_path,
                 document.original_filename, document.mime_type, document.text,
                 len(document.pages), document.job_id, time.time())).fetchone()[0]
            self.store_parts(document_id, document)
        return document_id

    def store_parts(self, document_id: int, document: Document) -> None:
        """What a subclass keeps besides the document row (the index: its chunks)."""

    def delete(self, document_id: int) -> None:
        (DocumentRow.update(deleted_at=time.time())
         .where(DocumentRow.id == document_id, DocumentRow.deleted_at.is_null()).execute())
