"""Where extracted text goes: the sink protocol, and choosing a project's sink.

A sink takes one :class:`Document` and returns its id (the job's ``canonical_document_id``),
and deletes a document by that id. A sink error is never swallowed: :class:`SinkError` says
whether trying again may help (``transient``); the worker retries or fails the job with its
reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

from ingestd.config import ProjectConfig
from ingestd.errors import IngestdError


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


class SinkError(IngestdError):
    """The sink did not take (or delete) the document; ``str(exc)`` is the one-line reason."""

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
    """The sink configured for ``project`` (``[projects.NAME.sink] kind``): a built-in kind, else
    a plugin installed under the ``ingestd.sinks`` entry-point group (see sinks/plugins.py).
    Each sink's module is imported only when chosen (they import this one)."""
    import importlib

    builtin = {"index": ("ingestd.sinks.index", "IndexSink"),
               "text": ("ingestd.sinks.text", "TextSink"),
               "command": ("ingestd.sinks.command", "CommandSink"),
               "http": ("ingestd.sinks.http", "HttpSink")}
    kind = project.sink.kind
    if kind in builtin:
        module, name = builtin[kind]
        return getattr(importlib.import_module(module), name)(project)
    from ingestd.sinks.plugins import open_plugin

    return open_plugin(project, builtin)


def check_all(projects: Iterable[ProjectConfig]) -> None:
    """Open every project's sink once, so a bad sink setting stops start-up (or a reload, or
    `config check`) with its ConfigError instead of failing every job later."""
    for project in projects:
        open_sink(project)
