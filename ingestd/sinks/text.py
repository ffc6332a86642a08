"""The plain text sink: each document's text in the ``documents`` table, nothing indexed."""

from __future__ import annotations

import time
from typing import Any

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
        with database.atomic():
            document_id = DocumentRow.insert(
                project_id=document.project_id, content_sha256=document.sha256,
                source_path=document.source_path, original_filename=document.original_filename,
                mime_type=document.mime_type, text=document.text, page_count=len(document.pages),
                job_id=document.job_id, created_at=time.time()).execute()
            self.store_parts(document_id, document)
            if document.replaces is not None:
                self.delete(document.replaces)
        return document_id

    def store_parts(self, document_id: int, document: Document) -> None:
        """What a subclass keeps besides the document row (the index: its chunks)."""

    def delete(self, document_id: int) -> None:
        (DocumentRow.update(deleted_at=time.time())
         .where(DocumentRow.id == document_id, DocumentRow.deleted_at.is_null()).execute())
