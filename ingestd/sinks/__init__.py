"""Where extracted text goes: the sink protocol, and choosing a project's sink.

A sink takes one :class:`Document` and returns its id (the job's ``canonical_document_id``),
and deletes a document by that id. A sink error is never swallowed: :class:`SinkError` says
whether trying again may help (``transient``); the worker retries or fails the job with its
reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ingestd.config import ProjectConfig
from ingestd.errors import ConfigError


@dataclass(frozen=True)
class Document:
    """Extracted text with what is known of where it came from."""

    project_id: str
    job_id: int
    text: str
    source_path: str
    original_filename: str
    mime_type: str
    sha256: str
    pages: tuple[tuple[int, int], ...]  # (start, end) offsets of each page in ``text``
    replaces: int | None = None  # the previous version's document (same path), to retire


class SinkError(Exception):
    """The sink did not take the document; ``str(exc)`` is the one-line reason."""

    def __init__(self, reason: str, transient: bool = True) -> None:
        super().__init__(reason)
        self.transient = transient


class Sink(Protocol):
    #: True when the sink writes into ingestd's own database: the worker then commits the
    #: document and the job's completion in one transaction (nothing half-written on cancel).
    transactional: bool

    def ingest(self, document: Document) -> int:
        """Store ``document``; return its id. Raise SinkError on failure."""

    def delete(self, document_id: int) -> None:
        """Remove the document (a job that produced it was deleted). Idempotent."""


def open_sink(project: ProjectConfig) -> Sink:
    """The sink configured for ``project`` (``[projects.NAME.sink] kind``)."""
    kind = project.sink.kind
    if kind == "index":
        from ingestd.sinks.index import IndexSink

        return IndexSink(project)
    if kind == "text":
        from ingestd.sinks.text import TextSink

        return TextSink(project)
    raise ConfigError(f"projects.{project.name}.sink.kind: unknown sink kind {kind!r} "
                      "(known: index, text)")
