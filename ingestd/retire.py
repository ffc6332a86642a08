"""Retiring documents: a document no current job refers to leaves its sink.

A path's new version replaces its previous document, and ``jobs delete`` lets go of the job's
own (unless another current job keeps it: see documents). The built-in index deletes inside
that same transaction. A command, http or plugin sink cannot: it is another program, it may
fail, and its call (up to the sink's timeout) must not run while the write lock is held. So
the transaction records the delete it owes (:func:`let_go`); once it has committed, the caller
makes the delete at once (:func:`settle`). A failure, or a crash before it, leaves the row:
the daemon tries it again with backoff (:func:`retry_due`). Before each try the document is
looked up again: one that a current job refers to (a sink that handed out the same id again)
is kept, and the row dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import structlog

from ingestd import db, documents, jobs
from ingestd.config import ProjectConfig
from ingestd.db import execute as _execute, transaction
from ingestd.models import Job, database
from ingestd.sinks import Sink, SinkError

log = structlog.get_logger(__name__)
RETRY_SECONDS = 5.0  # how often the daemon looks for deletes due again
FIRST_TRY_SECONDS = 120.0  # the daemon leaves a new row this long to its own first try
CLAIM_SECONDS = 300.0  # a row being tried is not due again before this (its try may hang)
BACKOFF_SECONDS = (5.0, 600.0)  # after a failure: 5 s, doubling, at most 10 minutes
BATCH = 20  # deletes tried per look, one claimed at a time


@dataclass(frozen=True)
class Owed:
    """A delete owed to ``project_id``'s sink, the one ``sink`` names (see sink_name)."""

    id: int
    project_id: str
    document_id: int
    sink: str
    job_id: int | None
    attempts: int


_COLUMNS = "id, project_id, document_id, sink, job_id, attempts"


def sink_name(project: ProjectConfig) -> str:
    """The sink a delete is owed to: its kind, and for a command or http sink a digest of what
    it runs or calls (a url's query may hold a token: it is neither kept nor logged). Its
    document ids are its own: after a reload to another sink, what is owed to the old one is
    dropped (said in the log), never sent to the new one."""
    where = {"command": "command", "http": "url"}.get(project.sink.kind)
    if where is None:
        return f"{project.sink.kind} sink"
    target = json.dumps(project.sink.options.get(where), ensure_ascii=False).encode()
    return f"{project.sink.kind} sink {hashlib.sha256(target).hexdigest()[:12]}"


def let_go(project: ProjectConfig, sink: Sink, document_id: int | None, job_id: int | None
           ) -> Owed | None:
    """In the caller's transaction: ``document_id`` (if any) leaves the project's ``sink``.
    A transactional sink deletes it here; another is owed the delete, returned for
    :func:`settle` once the transaction committed."""
    if document_id is None:
        return None
    if sink.transactional:
        sink.delete(document_id)
        return None
    return _record(project, document_id, job_id)


def _record(project: ProjectConfig, document_id: int, job_id: int | None) -> Owed | None:
    """Owe the delete of ``document_id`` to the project's sink; None if it is owed already
    (another job let go of it first)."""
    row = _execute(
        "INSERT INTO sink_deletes (project_id, document_id, sink, job_id, attempts, "
        f"not_before, created_at) VALUES (?, ?, ?, ?, 0, {jobs.clock_sql()} + ?, ?) "
        f"ON CONFLICT (project_id, document_id) DO NOTHING RETURNING {_COLUMNS}",
        (project.name, document_id, sink_name(project), job_id, FIRST_TRY_SECONDS,
         jobs.now())).fetchone()
    return None if row is None else Owed(*row)


def settle(owed: Owed | None, sink: Sink, say_failure: bool = True) -> str | None:
    """Make the owed delete now, after the transaction that recorded it committed: None once
    it is done (or the document turned out to be kept), else why not (the row stays, due again
    after a backoff; logged unless the caller says it itself). Never inside a transaction:
    its rollback would undo the record, not the delete."""
    if owed is None or database.in_transaction():
        return None  # inside one: the daemon makes it once it is committed
    try:
        if documents.kept_by_others(owed.project_id, owed.document_id):
            _forget(owed)
            return None
        try:
            sink.delete(owed.document_id)
        except Exception as exc:  # a sink's own failure (any exception): tried again later
            failure = exc if isinstance(exc, SinkError) else SinkError(
                f"{type(exc).__name__}: {exc}")
            _failed(owed, failure, say_failure)
            return str(failure)
        _forget(owed)
    except db.ERRORS as exc:  # the row stays: the daemon tries again
        db.reset_connection()
        log.warning("sink_delete_not_recorded", project=owed.project_id,
                    document_id=owed.document_id, reason=str(db.as_store_error(exc)))
        return str(db.as_store_error(exc))
    if owed.attempts:  # said once it failed before
        log.info("sink_document_deleted", project=owed.project_id,
                 document_id=owed.document_id, job_id=owed.job_id, attempts=owed.attempts + 1)
    return None


def delete_job(project: ProjectConfig, job_id: int, sink: Sink) -> tuple[Job, str | None]:
    """``jobs delete``: the job's soft delete and its document's retirement (unless another
    current job keeps it); the job, and a note if its document is not out of the sink yet.
    It first waits for the transactions ending jobs of its content or path
    (documents.lock_ends): on PostgreSQL one of them may be making a duplicate that keeps the
    document, unseen until it commits."""
    owed: list[Owed | None] = []
    with transaction():
        job = jobs.get(project.name, job_id)
        documents.lock_ends([(project.name, job.content_sha256, job.source_path)])

        def release_document(deleted: Job) -> None:
            owed.append(let_go(project, sink, documents.released_by_delete(deleted), job_id))

        deleted = jobs.delete(project.name, job_id, release_document)
    pending = owed[0] if owed else None
    reason = settle(pending, sink, say_failure=False)
    if reason is None or pending is None:
        return deleted, None
    return deleted, (f"its document {pending.document_id} is still in the sink ({reason}); "
                     "the daemon tries again")


def _forget(owed: Owed) -> None:
    with transaction():
        _execute("DELETE FROM sink_deletes WHERE id = ?", (owed.id,))


def _failed(owed: Owed, exc: SinkError, say: bool) -> None:
    """Due again after a backoff; a permanent failure only after the longest one (the sink's
    program may be fixed: a delete owed is never dropped)."""
    first, longest = BACKOFF_SECONDS
    delay = min(longest, first * 2 ** owed.attempts) if exc.transient else longest
    with transaction():
        _execute(f"UPDATE sink_deletes SET attempts = attempts + 1, last_error = ?, "
                 f"not_before = {jobs.clock_sql()} + ? WHERE id = ?",
                 (str(exc), delay, owed.id))
    if not say:
        return
    (log.warning if exc.transient else log.error)(
        "sink_delete_failed", project=owed.project_id, document_id=owed.document_id,
        job_id=owed.job_id, attempts=owed.attempts + 1, reason=str(exc),
        then=f"tried again in {delay:g} s")


def retry_due(projects: Iterable[ProjectConfig], sink_of: Callable[[ProjectConfig], Sink]
              ) -> int:
    """The daemon's periodic try of the deletes due for ``projects``, up to BATCH of them;
    how many were done.

    Each row is claimed just before its try (its due time moved past a try's longest wait),
    so two daemons sharing the database do not make the same delete at once."""
    by_name = {project.name: project for project in projects}
    done = 0
    for _ in range(BATCH if by_name and _any_due(list(by_name)) else 0):
        owed = _claim_due(list(by_name))
        if owed is None:
            break
        project = by_name[owed.project_id]
        if sink_name(project) != owed.sink:
            log.warning("sink_delete_dropped", project=owed.project_id,
                        document_id=owed.document_id, reason=f"the project's sink is now "
                        f"{sink_name(project)}, not the {owed.sink} that held the document")
            _forget(owed)
            continue
        try:
            sink = sink_of(project)
        except Exception as exc:  # a plugin's own failure: tried again once the claim lapses
            log.warning("sink_not_opened", project=project.name, reason=str(exc))
            continue
        done += settle(owed, sink) is None
    return done


def _any_due(project_ids: list[str]) -> bool:
    """Whether a delete is due: a read, so that a look with nothing to do (nearly every one)
    takes no write lock."""
    marks = ", ".join("?" * len(project_ids))
    return _execute(f"SELECT 1 FROM sink_deletes WHERE project_id IN ({marks}) AND "
                    f"{jobs.due_sql(jobs.clock_sql())} LIMIT 1", project_ids).fetchone() is not None


def _claim_due(project_ids: list[str]) -> Owed | None:
    clock, marks = jobs.clock_sql(), ", ".join("?" * len(project_ids))
    with transaction():
        row = _execute(
            f"UPDATE sink_deletes SET not_before = {clock} + ? WHERE id = (SELECT id FROM "
            f"sink_deletes WHERE project_id IN ({marks}) AND {jobs.due_sql(clock)} "
            f"ORDER BY id LIMIT 1) AND {jobs.due_sql(clock)} RETURNING {_COLUMNS}",
            (CLAIM_SECONDS, *project_ids)).fetchone()
    return None if row is None else Owed(*row)


def count_owed(project_ids: Sequence[str]) -> tuple[int, str | None]:
    """How many deletes are owed to the sinks of ``project_ids``, and the reason the most
    tried one last failed."""
    if not project_ids:
        return 0, None
    marks = ", ".join("?" * len(project_ids))
    total = _execute(f"SELECT count(*) FROM sink_deletes WHERE project_id IN ({marks})",
                     project_ids).fetchone()[0]
    row = _execute(f"SELECT last_error FROM sink_deletes WHERE project_id IN ({marks}) AND "
                   "last_error IS NOT NULL ORDER BY attempts DESC, id LIMIT 1",
                   project_ids).fetchone()
    return total, (row[0] if row else None)
