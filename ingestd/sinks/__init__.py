"""Where extracted text goes: the sink protocol, and choosing a project's sink.

A sink takes one :class:`Document` and returns its id (the job's ``canonical_document_id``),
and deletes a document by that id. A sink error is never swallowed: :class:`SinkError` says
whether trying again may help (``transient``); the worker retries or fails the job with its
reason.

A job has a deadline (``job_timeout_seconds``). The worker calls ``ingest`` inside
:func:`job_deadline`; a sink that can block (a program, a network call) asks
:func:`time_limit` how long it may wait, at most its own timeout, and stops there with a
transient SinkError. The worker fails a job whose sink failed past its deadline with the job
timeout's reason, not a retry. A sink that ignores the deadline still works: it just may run
past it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from ingestd.config import Config, ProjectConfig
from ingestd.errors import ConfigError, IngestdError


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


# Per thread (and task): one sink object serves every worker of its project at once.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "ingestd_sink_deadline", default=None)


@contextlib.contextmanager
def _within(variable: contextvars.ContextVar, value: object) -> Iterator[None]:
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def job_deadline(at: float) -> contextlib.AbstractContextManager[None]:
    """Sink calls in this block are for a job that must end by ``at`` (``time.monotonic()``)."""
    return _within(_deadline, at)


_abandoned: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "ingestd_sink_abandoned", default=None)


def job_abandoned(check: Callable[[], bool]) -> contextlib.AbstractContextManager[None]:
    """Sink calls in this block are for a job that is no longer the worker's once ``check()``
    (a stop put it back in the queue, its lease was lost): a sink about to start work that
    could not be undone asks :func:`abandoned` first."""
    return _within(_abandoned, check)


def abandoned() -> bool:
    """Whether the job this sink call is for is no longer the worker's (see job_abandoned)."""
    check = _abandoned.get()
    return check is not None and check()


def time_limit(own_seconds: float) -> tuple[float, str]:
    """How long a blocking sink call may take, and the setting that says so: the sink's own
    ``timeout_seconds``, or less if the job's deadline is nearer. SinkError when the job has
    no time left."""
    at = _deadline.get()
    left = own_seconds if at is None else at - time.monotonic()
    if left >= own_seconds:
        return own_seconds, "timeout_seconds"
    if left <= 0:
        raise SinkError("the job's time ran out before the sink was called (job_timeout_seconds)")
    return left, "job_timeout_seconds"


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


class OpenSinks:
    """Each project's sink, opened once and kept while the project's configuration is the
    same object (a reload makes new ones: their sinks are opened again). Call it with the
    project."""

    def __init__(self) -> None:
        self._opened: dict[str, tuple[ProjectConfig, Sink]] = {}

    def __call__(self, project: ProjectConfig) -> Sink:
        opened = self._opened.get(project.name)
        if opened is None or opened[0] is not project:
            opened = self._opened[project.name] = (project, open_sink(project))
        return opened[1]

    def keep(self, project: ProjectConfig, sink: Sink) -> None:
        """Use ``sink`` for ``project`` (a test's own)."""
        self._opened[project.name] = (project, sink)


def check_all(config: Config) -> None:
    """Open every project's sink once, so a bad sink setting stops start-up (or a reload, or
    `config check`) with its ConfigError instead of failing every job later: every sink's
    problem, one line each naming the config file, as the config's own problems."""
    where = str(config.source) if config.source else "<zero-config>"
    problems = []
    for project in config.projects.values():
        try:
            open_sink(project)
        except ConfigError as exc:
            problems += [f"{where}: {line}" for line in exc.problems]
    if problems:
        raise ConfigError(*problems)
