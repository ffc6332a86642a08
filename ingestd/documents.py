"""Which document a job's content already has, and which documents a job lets go of.

A job is *current* for its document when it completed, is not deleted, and no newer completed
job (deleted or not) exists for the same path: a path's newest version is what the index shows.
A document is kept while any current job refers to it. These rules hold for every sink, since
they are read from the jobs table: the built-in index and external sinks alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import peewee as pw

from ingestd import db, jobs
from ingestd.models import Job, database

# A current job ``j`` (the rule above), as an SQL condition.
CURRENT_JOB = f"""
    j.status = 'completed' AND j.deleted_at IS NULL AND j.canonical_document_id IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM ingest_jobs n WHERE n.project_id = j.project_id
                    AND n.source_path = j.source_path AND {jobs.SAME_RAW}
                    AND n.id > j.id AND n.status = 'completed')
"""


def _same_path(job: Job) -> tuple[str, tuple]:
    """An SQL condition on a job's row, and its parameters: the row is of ``job``'s path."""
    if job.source_path_raw is None:
        return "source_path = ? AND source_path_raw IS NULL", (job.source_path,)
    return "source_path = ? AND source_path_raw = ?", (job.source_path,
                                                       bytes(job.source_path_raw))


@dataclass(frozen=True)
class Known:
    document_id: int
    first_path: str


def _query(sql: str, params: tuple) -> list[tuple]:
    return db.execute(sql, params).fetchall()


def current_for_content(project_id: str, sha256: str) -> Known | None:
    """A document of the project with this content, kept by a current job (the oldest)."""
    rows = _query(f"""SELECT j.canonical_document_id, j.source_path FROM ingest_jobs j
                      WHERE j.project_id = ? AND j.content_sha256 = ? AND {CURRENT_JOB}
                      ORDER BY j.id LIMIT 1""", (project_id, sha256))
    return Known(rows[0][0], rows[0][1]) if rows else None


def ever_completed(project_id: str, pairs: Sequence[tuple[str, str]]
                   ) -> tuple[set[str], set[str]]:
    """Of ``(sha256, path)`` pairs: the contents and the paths that a completed job of the
    project has had (deleted jobs too), in one look-up."""
    marks = ", ".join("?" * len(pairs))
    # Two searches, one per index (with OR, SQLite reads every completed job of the project).
    rows = _query(f"""SELECT content_sha256, source_path FROM ingest_jobs
                      WHERE project_id = ? AND status = 'completed'
                      AND content_sha256 IN ({marks})
                      UNION ALL SELECT content_sha256, source_path FROM ingest_jobs
                      WHERE project_id = ? AND source_path IN ({marks})
                      AND status = 'completed'""",
                  (project_id, *(sha for sha, _ in pairs), project_id,
                   *(path for _, path in pairs)))
    return {sha for sha, _ in rows}, {path for _, path in rows}


def lock_ends(ends: Iterable[tuple[str, str | None, str]]) -> None:
    """Inside a job's (or a group's) completing transaction: wait for any other transaction
    ending a job of the same content or the same path, ``(project, sha256, path)`` each.

    PostgreSQL runs those at once, each blind to the other's uncommitted documents: two would
    both index the same bytes, or both make their version the path's. A transaction-scoped
    advisory lock per content and per path (taken in one order, so two groups never deadlock)
    serializes them. SQLite's single writer already does."""
    if not isinstance(database.obj, pw.PostgresqlDatabase):
        return
    keys = sorted({f"{project}/content/{sha}" for project, sha, _ in ends if sha}
                  | {f"{project}/path/{path}" for project, _, path in ends})  # no / in a name
    if keys:
        database.execute_sql("SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) "
                             "FROM unnest(%s::text[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
                             (keys,))


def newer_version_completed(job: Job) -> int | None:
    """A completed job for the same path newer than ``job`` (deleted ones too), if any."""
    path, params = _same_path(job)
    rows = _query(f"""SELECT id FROM ingest_jobs WHERE project_id = ? AND {path}
                      AND id > ? AND status = 'completed' ORDER BY id LIMIT 1""",
                  (job.project_id, *params, job.id))
    return rows[0][0] if rows else None


def newer_job(job: Job) -> int | None:
    """The newest job for the same path made after ``job`` (not deleted; any status)."""
    path, params = _same_path(job)
    rows = _query(f"""SELECT id FROM ingest_jobs WHERE project_id = ? AND {path}
                      AND id > ? AND deleted_at IS NULL ORDER BY id DESC LIMIT 1""",
                  (job.project_id, *params, job.id))
    return rows[0][0] if rows else None


def previous_version(job: Job) -> int | None:
    """The document of the newest completed earlier job for the same path (deleted jobs too:
    their document may still be kept by another job), if no other current job keeps it."""
    path, params = _same_path(job)
    rows = _query(f"""SELECT id, canonical_document_id FROM ingest_jobs
                      WHERE project_id = ? AND {path} AND id < ? AND status = 'completed'
                      AND canonical_document_id IS NOT NULL ORDER BY id DESC LIMIT 1""",
                  (job.project_id, *params, job.id))
    if not rows:
        return None
    previous_id, document_id = rows[0]
    kept = kept_by_others(job.project_id, document_id, (previous_id, job.id))
    return None if kept else document_id


def kept_by_others(project_id: str, document_id: int, excluding: tuple[int, ...] = ()) -> bool:
    """Whether a current job of the project other than ``excluding`` refers to the document.
    Of the project: a document id is its sink's, and another project's sink (a command or
    http sink numbering its own) may give the same number to another document."""
    others = f"AND j.id NOT IN ({', '.join('?' * len(excluding))})" if excluding else ""
    return bool(_query(f"""SELECT 1 FROM ingest_jobs j WHERE j.canonical_document_id = ?
                           AND j.project_id = ? {others} AND {CURRENT_JOB}
                           LIMIT 1""", (document_id, project_id, *excluding)))


def released_by_delete(job: Job) -> int | None:
    """The document to remove when ``job`` is deleted: its own, unless another current job
    keeps it (the job itself is already marked deleted when this runs)."""
    document_id = job.canonical_document_id
    if document_id is None or kept_by_others(job.project_id, document_id, (job.id,)):
        return None
    return document_id
