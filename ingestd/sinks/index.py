"""The built-in sink: documents in ingestd's own database."""

from __future__ import annotations

import time

from ingestd.config import ProjectConfig
from ingestd.models import Document as DocumentRow
from ingestd.sinks import Document


class IndexSink:
    """Stores each document's text in the ``documents`` table of the job database."""

    transactional = True

    def __init__(self, project: ProjectConfig) -> None:
        self.project = project

    def ingest(self, document: Document) -> int:
        return DocumentRow.insert(
            project_id=document.project_id, content_sha256=document.sha256,
            source_path=document.source_path, original_filename=document.original_filename,
            mime_type=document.mime_type, text=document.text, page_count=len(document.pages),
            created_at=time.time()).execute()

    def delete(self, document_id: int) -> None:
        (DocumentRow.update(deleted_at=time.time())
         .where(DocumentRow.id == document_id, DocumentRow.deleted_at.is_null()).execute())
