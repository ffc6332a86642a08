"""The job state machine: the only code that changes a job's state.

Every transition is ONE transaction that changes the job and inserts its event into the outbox
(``ingest_events``), and is a compare-and-set on the state the caller expects: a transition that
lost a race raises :class:`~ingestd.errors.Conflict` (or NotFound), it is never applied over the
winner. The seed's rules are kept: list hides soft-deleted jobs, get is scoped by project, cancel
only from queued or running, delete refused while running, ``message`` and ``error_message`` are
separate fields.

    queued --claim--> running --complete--> completed
      ^                 |  |---fail-------> failed  --retry--> queued
      |--retry_later----|  |---cancelled--> cancelled --retry--> queued
      |--release/rescue-|
    queued --cancel--> cancelled
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import functools
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Sequence

import peewee as pw

from ingestd.db import execute, executemany, is_postgres, transaction
from ingestd.errors import Conflict, NotFound, UsageError
from ingestd.models import Job, JobStatus, Source, Stage, database, stored_inode, stored_mtime_ns
from ingestd.wakeup import notify_sql

DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000
SOURCE_KIND_FOLDER = "folder"

# Event types (CloudEvents ``type``); the contract of DESIGN.md plus the two a worker needs.
JOB_CREATED = "io.ingestd.job.created"
JOB_STARTED = "io.ingestd.job.started"
JOB_PROGRESS = "io.ingestd.job.progress"
JOB_RETRYING = "io.ingestd.job.retrying"
JOB_REQUEUED = "io.ingestd.job.requeued"
JOB_CANCEL_REQUESTED = "io.ingestd.job.cancel_requested"
JOB_COMPLETED = "io.ingestd.job.completed"
JOB_FAILED = "io.ingestd.job.failed"
JOB_CANCELLED = "io.ingestd.job.cancelled"
JOB_DELETED = "io.ingestd.job.deleted"
FILE_REJECTED = "io.ingestd.file.rejected"
DAEMON_STARTED = "io.ingestd.daemon.started"
DAEMON_RELOADED = "io.ingestd.daemon.reloaded"
DAEMON_STOPPING = "io.ingestd.daemon.stopping"
WATCH_RESCANNED = "io.ingestd.watch.rescanned"

JOB_FIELDS = ("id", "project_id", "source_id", "source_path", "original_filename", "byte_size",
              "mime_type", "stage", "status", "progress", "message", "error_message",
              "canonical_document_id", "content_sha256", "attempts", "created_at", "updated_at",
              "completed_at", "deleted_at")
_TIME_FIELDS = ("created_at", "updated_at", "completed_at", "deleted_at")

# SQL literals, not parameters: SQLite only uses a partial index when the query's WHERE
# visibly implies the index's WHERE.
_IS_RUNNING = pw.SQL("status = 'running'")


# --- values ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileVersion:
    """What a job is made from: one version of one file, as seen on disk.

    ``path`` is the text shown to people; ``raw_path`` holds the file name's exact bytes when they
    are not valid UTF-8 (the text then carries backslash escapes), so the worker can reopen it.
    """

    path: str
    original_filename: str
    byte_size: int
    mtime_ns: int | None
    inode: int | None
    mime_type: str | None
    raw_path: bytes | None = None

    def key(self, project_id: str) -> str:
        """Identity of this version in the project: a second job for it is never created."""
        raw = self.raw_path or self.path.encode("utf-8", "surrogateescape")
        return version_key(project_id, raw, self.byte_size, self.mtime_ns, self.inode)


def version_key(project_id: str, raw_path: bytes, size: int, mtime_ns: int | None,
                inode: int | None) -> str:
    """The version's key in the jobs' unique index: its file's mtime (20 digits, 0 if unknown
    or before 1970), a dot, and a SHA-256 of the version. Files come in roughly in mtime order,
    so a burst's keys go to the end of the index: led by the hash alone, each file's key went
    to a random page of it, and every page a transaction changes is written out whole."""
    parts = [project_id.encode(), raw_path, str(size).encode(), str(mtime_ns).encode(),
             str(inode).encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()
    return f"{max(mtime_ns or 0, 0):020d}.{digest}"


# Two jobs are of the same path when their shown paths and their exact bytes agree: the
# bytes are NULL for a UTF-8 name, and a name that is not UTF-8 shows as text (bad\xff.txt)
# that another file may literally be called. (As SQL on jobs ``n`` and ``j``.)
SAME_RAW = ("(n.source_path_raw = j.source_path_raw OR "
            "(n.source_path_raw IS NULL AND j.source_path_raw IS NULL))")
# Job ``j`` is no longer its path's newest: a job was made for the path after it (any status,
# deleted too). Its version then counts as new again should it come back (a file moved back,
# a backup restored): the path's content is no longer what ``j`` read.
SUPERSEDED = f"""EXISTS (SELECT 1 FROM ingest_jobs n WHERE n.project_id = j.project_id
    AND n.source_path = j.source_path AND {SAME_RAW} AND n.id > j.id)"""


def superseded(job: Job) -> bool:
    """Whether a job was made for ``job``'s path after it (see SUPERSEDED): what the path holds
    now is the newer job's to read and dispose of, even a version the same as ``job``'s."""
    return _execute(f"SELECT 1 FROM ingest_jobs j WHERE j.id = ? AND {SUPERSEDED}",
                    (job.id,)).fetchone() is not None


def existing_version_keys(keys: Sequence[str]) -> set[str]:
    """Which of ``keys`` have a job, its path's newest (deleted ones included: their files
    stay ingested; an older version's key is free again, see SUPERSEDED)."""
    if not keys:
        return set()
    marks = ", ".join("?" * len(keys))
    rows = _execute(f"SELECT version_key FROM ingest_jobs j WHERE version_key IN ({marks}) "
                    f"AND NOT {SUPERSEDED}", keys)
    return {row[0] for row in rows.fetchall()}


def _release_superseded(keys: Sequence[str]) -> set[str]:
    """In the caller's transaction: the jobs of ``keys`` that are no longer their path's
    newest give their keys up, for a new job of the version that came back; the keys given
    up. (Each key is re-checked as it is given up: of two nodes giving up one key at once, on
    PostgreSQL, the second finds it gone and gives up nothing.)"""
    if not keys:
        return set()
    marks = ", ".join("?" * len(keys))
    key_of = dict(_execute(f"SELECT j.id, j.version_key FROM ingest_jobs j WHERE "
                           f"j.version_key IN ({marks}) AND {SUPERSEDED}", keys).fetchall())
    if not key_of:
        return set()
    marks = ", ".join("?" * len(key_of))
    given_up = _execute(f"UPDATE ingest_jobs SET version_key = NULL WHERE id IN ({marks}) "
                        f"AND version_key IN ({marks}) RETURNING id",
                        [*key_of, *key_of.values()]).fetchall()
    return {key_of[row[0]] for row in given_up}


def ended_with_version_keys(keys: Sequence[str]) -> list[Job]:
    """The completed or failed jobs (not deleted) of ``keys``, the versions of files a scan
    found still in place: with after = "move" or "delete" their originals should be gone."""
    if not keys:
        return []
    return list(Job.select().where(
        Job.version_key.in_(list(keys)), Job.deleted_at.is_null(),
        Job.status.in_([JobStatus.COMPLETED.value, JobStatus.FAILED.value])))


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    next_cursor: str | None


def now() -> float:
    return time.time()


def rfc3339(seconds: float | None) -> str | None:
    """UTC with milliseconds, e.g. ``2026-11-28T13:43:51.123Z`` (every event carries four)."""
    if seconds is None:
        return None
    fraction, whole = math.modf(seconds)
    micros = round(fraction * 1_000_000)  # as datetime.fromtimestamp rounds
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return f"{_rfc3339_second(int(whole))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=1024)
def _rfc3339_second(whole: int) -> str:
    return datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


# The model keeps its values by field name ("source" for the column source_id).
_RECORD_KEYS = ["source" if name == "source_id" else name for name in JOB_FIELDS]


def job_record(job: Job) -> dict[str, Any]:
    """The job as the contract shows it (JSON output and event data)."""
    data = job.__data__  # read straight, not through each field's descriptor: one per event
    record = dict(zip(JOB_FIELDS, map(data.get, _RECORD_KEYS)))
    for name in _TIME_FIELDS:
        record[name] = rfc3339(record[name])
    return record


# --- plain SQL on the hot paths ------------------------------------------------------------------
# Building SQL through peewee's expression tree costs more than the statement itself; the writes
# done per file (create, claim, transitions) use these few hand-written statements instead.

@dataclass(frozen=True)
class Raw:
    """An SQL expression as a column's new value, e.g. ``Raw("attempts + 1")``."""

    sql: str


_FIELDS = Job._meta.sorted_fields
_ALL_COLUMNS = ", ".join(f.column_name for f in _FIELDS)
_QUALIFIED_COLUMNS = ", ".join(f"ingest_jobs.{f.column_name}" for f in _FIELDS)


def _sql(statement: str) -> str:
    """``statement`` with ``?`` placeholders in the bound database's parameter style."""
    param = database.obj.param
    return statement if param == "?" else statement.replace("?", param)


_execute = execute


# A queued job's not_before, when it may run: a time only while it waits out a retry's delay.
# "Now" as the clock read was a time too, and a clock stepped back an hour left every job
# queued before the step waiting an hour, while newer ones ran.
DUE_NOW = 0.0
# No delay is longer: a due time further ahead than this was set before a step back.
MAX_DELAY_SECONDS = 3600.0


def due_sql(clock: str) -> str:
    """A row whose not_before has come, as SQL, ``clock`` being :func:`clock_sql`'s."""
    return f"(not_before <= {clock} OR not_before > {clock} + {MAX_DELAY_SECONDS!r})"


def clock_sql() -> str:
    """The database's clock in epoch seconds, as SQL. Leases and due times are set and compared
    with it, so nodes whose clocks disagree still agree on whose lease expired."""
    if is_postgres():
        return "extract(epoch from clock_timestamp())::double precision"
    return "((julianday('now') - 2440587.5) * 86400.0)"


_NAMES = [f.name for f in _FIELDS]
# Both drivers return numbers and text as Python wants them; only booleans (SQLite's 0/1),
# blobs (PostgreSQL's memoryview) and progress need converting: SQLite's RETURNING gives a REAL
# column's whole number as stored, an integer (0 and 1, where a SELECT gives 0.0 and 1.0).
_CONVERTED = [(index, f.python_value) for index, f in enumerate(_FIELDS)
              if isinstance(f, (pw.BooleanField, pw.BlobField)) or f is Job.progress]


def _to_job(row: Sequence[Any]) -> Job:
    values = dict(zip(_NAMES, row))
    for index, convert in _CONVERTED:
        if row[index] is not None:
            values[_NAMES[index]] = convert(row[index])
    if isinstance(values.get("source_path_raw"), memoryview):
        values["source_path_raw"] = bytes(values["source_path_raw"])
    job = Job(__no_default__=True)
    job.__data__ = values  # what peewee's own row readers fill, in one step (no dirty fields)
    return job


def _fetch(where: str, params: Sequence[Any]) -> Job | None:
    row = _execute(f"SELECT {_ALL_COLUMNS} FROM ingest_jobs WHERE {where}", params).fetchone()
    return _to_job(row) if row else None


# --- the outbox ----------------------------------------------------------------------------------

def emit(event_type: str, data: dict[str, Any], project_id: str | None = None,
         job_id: int | None = None) -> int:
    """Insert one event into the outbox, in the caller's transaction (or its own); its sequence
    (0 inside :func:`events_at_end`, which inserts it later)."""
    return _emit_all([(event_type, data, project_id, job_id)])


_collecting = threading.local()
# One encoder for every event's data: json.dumps with options builds a new one per call.
_EVENT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


@contextlib.contextmanager
def events_at_end() -> Iterator[None]:
    """Inside the caller's transaction: collect the events of the transitions made in the block
    and insert them together at its end (one sequence update, one insert). For a worker that
    ends a group of small jobs in one transaction; if the block raises, the transaction is
    rolled back and the collected events are dropped with it."""
    if getattr(_collecting, "events", None) is not None:
        yield
        return
    _collecting.events = []
    try:
        yield
        collected, _collecting.events = _collecting.events, None
        _emit_all(collected)
    finally:
        _collecting.events = None


def _emit_all(events: Sequence[tuple[str, dict[str, Any], str | None, int | None]]) -> int:
    """Insert events (type, data, project, job) with consecutive sequences; the last one.

    The sequence is one counter row, incremented inside the writer's transaction: its row lock
    (PostgreSQL) or the write lock (SQLite) is held until commit, so sequences commit in order
    with no gaps."""
    if not events:
        return 0
    collecting = getattr(_collecting, "events", None)
    if collecting is not None:
        collecting.extend(events)
        return 0
    with transaction():
        last = _execute("UPDATE ingest_event_sequence SET last_seq = last_seq + ? WHERE id = 1 "
                        "RETURNING last_seq", (len(events),)).fetchone()[0]
        moment, first = now(), last - len(events) + 1
        rows = [(first + index, event_type, project_id, job_id, moment,
                 _EVENT_JSON.encode(data))
                for index, (event_type, data, project_id, job_id) in enumerate(events)]
        executemany(_sql("INSERT INTO ingest_events (seq, type, project_id, job_id, time, data) "
                         "VALUES (?, ?, ?, ?, ?, ?)"), rows)
    return last


def _emit_job(event_type: str, job: Job) -> None:
    _emit_jobs(event_type, [job])


def _emit_jobs(event_type: str, changed: Sequence[Job]) -> None:
    _emit_all([(event_type, job_record(job), job.project_id, job.id) for job in changed])


# --- creating ------------------------------------------------------------------------------------

_source_lock = threading.Lock()


def _known_sources() -> dict[tuple[str, str], int]:
    """Source ids already looked up, kept with the open database (by its name alone, two
    PostgreSQL schemas of one database would share them)."""
    return database.obj.__dict__.setdefault("_ingestd_source_ids", {})


def ensure_source(project_id: str, folder: str) -> int:
    """The id of the project's source row for ``folder``, created if missing."""
    cache_key = (project_id, folder)
    known = _known_sources()
    with _source_lock:
        if cache_key in known:
            return known[cache_key]
    with database.atomic():
        found = Source.get_or_none(Source.project_id == project_id, Source.path == folder)
        if found is None:
            try:
                with database.atomic():
                    source_id = Source.insert(project_id=project_id, kind=SOURCE_KIND_FOLDER,
                                              path=folder, created_at=now()).execute()
            except pw.IntegrityError:  # another process created it first
                source_id = Source.get(Source.project_id == project_id,
                                       Source.path == folder).id
        else:
            source_id = found.id
    with _source_lock:
        known[cache_key] = source_id
    return source_id


def create(project_id: str, folder: str, version: FileVersion, max_attempts: int,
           *, resubmit: bool = False, is_deep_scan: bool = False) -> tuple[Job, bool]:
    """Queue a job for ``version``; return ``(job, created)``.

    Idempotent in the database: a version that already has a job returns that job with
    ``created=False``, whichever process or node created it. With ``resubmit`` (an operator's
    explicit ``jobs submit``), a live job for the version is a Conflict, and a soft-deleted one
    gives up the version to a new job.
    """
    key = version.key(project_id)
    source_id = ensure_source(project_id, folder)
    with transaction():
        existing = _fetch("version_key = ?", (key,))
        if existing is not None and _release_superseded([key]):
            existing = None  # an older version came back: new again
        if existing is not None:
            if not resubmit:
                return existing, False
            if existing.deleted_at is None:
                hint = ("; use 'jobs retry' to run it again"
                        if existing.status in (JobStatus.FAILED, JobStatus.CANCELLED) else "")
                raise Conflict(f"{version.path}: this version of the file already has job "
                               f"{existing.id} ({existing.status}){hint}")
            _execute("UPDATE ingest_jobs SET version_key = NULL WHERE id = ?", (existing.id,))
        job = _insert(project_id, source_id, version, key, max_attempts, is_deep_scan)
        if job is None:  # another process inserted this version since our look-up
            return _fetch("version_key = ?", (key,)), False
        _emit_job(JOB_CREATED, job)
        if is_postgres():
            _execute(notify_sql())  # idle workers of every node wake at commit
        return job, True


INSERT_BATCH = 400  # rows per INSERT: 20 parameters each, well under SQLite's limit


@dataclass(frozen=True)
class NewJobs:
    """Jobs of one project to create, made ready before the transaction (see
    :func:`new_jobs`): its INSERT statements and their parameters, and what they are made of
    (an insert of some of them again, should a version come back: see create_many)."""

    inserts: list[tuple[str, list[Any]]]
    project_id: str = ""
    rows: tuple[tuple[int, FileVersion, str], ...] = ()
    max_attempts: int = 0
    moment: float = 0.0


def new_jobs(project_id: str, found: Sequence[tuple[str, FileVersion]],
             max_attempts: int) -> NewJobs:
    """Make ready a job for each ``(folder, version)``, for :func:`create_many`: everything
    but the ids, which the database gives (called outside the transaction, this keeps the
    work off the write lock; a folder seen for the first time gets its source row here)."""
    sources = {folder: ensure_source(project_id, folder) for folder, _ in found}
    keyed = {version.key(project_id): (sources[folder], version) for folder, version in found}
    # In the order of their keys (mtime first): nodes that saw a burst in other orders take the
    # rows' locks in one order, and never wait for each other in a circle (a deadlock).
    rows = [(keyed[key][0], keyed[key][1], key) for key in sorted(keyed)]
    moment = now()
    return NewJobs([_insert_statement(project_id, rows[start:start + INSERT_BATCH],
                                      max_attempts, False, moment)
                    for start in range(0, len(rows), INSERT_BATCH)],
                   project_id, tuple(rows), max_attempts, moment)


def create_many(new: NewJobs) -> list[Job]:
    """Queue the jobs :func:`new_jobs` made ready, in one transaction; the jobs created (a
    version that has a job, whoever made it, is skipped: see :func:`create`)."""
    if not new.inserts:
        return []
    created: list[Job] = []
    with transaction():
        for statement, params in new.inserts:
            created += [_to_job(row) for row in _execute(statement, params).fetchall()]
        if len(created) < len(new.rows):  # versions with a job: some may have come back
            created += _create_returned(new, {job.version_key for job in created})
        created.sort(key=lambda job: job.id)
        _emit_jobs(JOB_CREATED, created)
        if created and is_postgres():
            _execute(notify_sql())  # idle workers of every node wake at commit
    return created


def _create_returned(new: NewJobs, created: set[str]) -> list[Job]:
    """The jobs of ``new``'s versions that came back to their path (their job no longer its
    newest: see SUPERSEDED), made now that those jobs gave up their keys."""
    held = [key for _, _, key in new.rows if key not in created]
    released = set()
    for start in range(0, len(held), INSERT_BATCH):
        released |= _release_superseded(held[start:start + INSERT_BATCH])
    rows = [row for row in new.rows if row[2] in released]
    made = []
    for start in range(0, len(rows), INSERT_BATCH):
        statement, params = _insert_statement(new.project_id, rows[start:start + INSERT_BATCH],
                                              new.max_attempts, False, new.moment)
        made += [_to_job(row) for row in _execute(statement, params).fetchall()]
    return made


_INSERT_COLUMNS = ("project_id", "source_id", "source_path", "source_path_raw",
                   "original_filename", "byte_size", "mime_type", "stage", "status", "progress",
                   "attempts", "max_attempts", "is_deep_scan", "version_key", "file_mtime_ns",
                   "file_inode", "not_before", "cancel_requested", "created_at", "updated_at")


def _insert(project_id: str, source_id: int, version: FileVersion, key: str,
            max_attempts: int, is_deep_scan: bool) -> Job | None:
    """Insert the job unless its version exists (ON CONFLICT: no savepoint, no aborted txn)."""
    statement, params = _insert_statement(project_id, [(source_id, version, key)], max_attempts,
                                          is_deep_scan, now())
    row = _execute(statement, params).fetchone()
    return None if row is None else _to_job(row)


def _insert_statement(project_id: str, rows: Sequence[tuple[int, FileVersion, str]],
                      max_attempts: int, is_deep_scan: bool, moment: float
                      ) -> tuple[str, list[Any]]:
    """The INSERT of ``(source_id, version, version_key)`` rows, and its parameters; versions
    that exist already (another process was first) are skipped by ON CONFLICT."""
    params: list[Any] = []
    for source_id, version, key in rows:
        params += (project_id, source_id, version.path, version.raw_path,
                   version.original_filename, version.byte_size, version.mime_type,
                   Stage.INITIAL.value, JobStatus.QUEUED.value, 0.0, 0, max_attempts,
                   is_deep_scan, key, stored_mtime_ns(version.mtime_ns),
                   stored_inode(version.inode), False, moment, moment)
    marks = ["?"] * (len(_INSERT_COLUMNS) - 1)
    marks.insert(_INSERT_COLUMNS.index("not_before"), str(DUE_NOW))
    values = ", ".join([f"({', '.join(marks)})"] * len(rows))
    return (f"INSERT INTO ingest_jobs ({', '.join(_INSERT_COLUMNS)}) VALUES {values} "
            f"ON CONFLICT (version_key) DO NOTHING RETURNING {_ALL_COLUMNS}", params)


# --- reading ---------------------------------------------------------------------------------

def get(project_id: str, job_id: int) -> Job:
    """The job, or NotFound when it does not exist, is deleted or belongs to another project."""
    job = Job.get_or_none(Job.id == job_id, Job.project_id == project_id,
                          Job.deleted_at.is_null())
    if job is None:
        raise NotFound(f"job {job_id} not found in project {project_id!r}")
    return job


def encode_cursor(job_id: int) -> str:
    return base64.urlsafe_b64encode(f"j:{job_id}".encode()).decode().rstrip("=")


MAX_INTEGER = 2**63 - 1  # ids and sequences are signed 64-bit in SQLite and PostgreSQL


def parse_integer(text: str, what: str, minimum: int = 1) -> int:
    """``text`` as an integer from ``minimum`` to MAX_INTEGER, else a UsageError naming it.

    ASCII digits only (``isdigit`` and ``int`` also take "²" and "١"); a larger integer would
    make SQLite raise OverflowError. At most 19 significant digits keeps ``int`` from refusing
    a very long string.
    """
    if text.isascii() and text.isdigit() and len(text.lstrip("0")) <= 19:
        if minimum <= (value := int(text)) <= MAX_INTEGER:
            return value
    raise UsageError(f"invalid {what} {text!r}: "
                     f"expected an integer from {minimum} to {MAX_INTEGER}")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = text.partition(":")
        if prefix != "j":
            raise ValueError
        return parse_integer(value, "cursor")
    except (ValueError, binascii.Error, UnicodeDecodeError, UsageError):
        raise UsageError(f"invalid cursor {cursor!r}: pass the next_cursor of a previous page") from None


def parse_status(status: str) -> JobStatus:
    try:
        return JobStatus(status)
    except ValueError:
        raise UsageError(f"unknown status {status!r} (one of: "
                         f"{', '.join(s.value for s in JobStatus)})") from None


def parse_stage(stage: str) -> Stage:
    try:
        return Stage(stage)
    except ValueError:
        raise UsageError(f"unknown stage {stage!r} (one of: "
                         f"{', '.join(s.value for s in Stage)})") from None


def list_jobs(project_id: str, *, status: str | None = None, stage: str | None = None,
              source_id: int | None = None, limit: int = DEFAULT_LIST_LIMIT,
              cursor: str | None = None) -> Page:
    """Newest first, soft-deleted never shown; ``limit`` is clamped to 1..MAX_LIST_LIMIT.

    Keyset pagination on ``id``: a page is stable while jobs are being added (new jobs are newer
    than every cursor), and a deep page costs what the first one does.
    """
    query = Job.select().where(Job.project_id == project_id, pw.SQL("deleted_at IS NULL"))
    if status is not None:
        query = query.where(Job.status == parse_status(status).value)
    if stage is not None:
        query = query.where(Job.stage == parse_stage(stage).value)
    if source_id is not None:
        query = query.where(Job.source == source_id)
    if cursor is not None:
        query = query.where(Job.id < decode_cursor(cursor))
    limit = max(1, min(int(limit), MAX_LIST_LIMIT))
    rows = list(query.order_by(Job.id.desc()).limit(limit + 1))
    more = len(rows) > limit
    return Page(rows[:limit], encode_cursor(rows[limit - 1].id) if more else None)


# --- transitions -------------------------------------------------------------------------------

def _lost(job_id: int, project_id: str | None, expected: Iterable[JobStatus], action: str) -> Exception:
    """The error for a compare-and-set that matched no row: say what the job is now."""
    job = _fetch("id = ?", (job_id,))
    if job is None or job.deleted_at is not None or (project_id and job.project_id != project_id):
        where = f" in project {project_id!r}" if project_id else ""
        return NotFound(f"job {job_id} not found{where}")
    wanted = " or ".join(s.value for s in expected)
    return Conflict(f"cannot {action} job {job_id}: it is {job.status}, not {wanted}")


def _transition(job_id: int, *, expect: Sequence[JobStatus], event: str | None, action: str,
                project_id: str | None = None, owner: str | None = None,
                extra: Sequence[str] = (), **changes: Any) -> Job:
    """Compare-and-set the job from one of ``expect`` with ``changes``, writing ``event``.

    ``changes`` values are parameters, or :class:`Raw` SQL; ``extra`` are further SQL conditions.
    """
    assignments, params = ["updated_at = ?"], [now()]
    for column, value in changes.items():
        if isinstance(value, Raw):
            assignments.append(f"{column} = {value.sql}")
        else:
            assignments.append(f"{column} = ?")
            params.append(value.value if isinstance(value, enum.Enum) else value)
    conditions = ["id = ?", f"status IN ({', '.join('?' * len(expect))})",
                  "deleted_at IS NULL", *extra]
    params += [job_id, *(s.value for s in expect)]
    for column, value in (("project_id", project_id), ("lease_owner", owner)):
        if value is not None:
            conditions.append(f"{column} = ?")
            params.append(value)
    with transaction():  # nested: a lost compare-and-set wrote nothing, no savepoint needed
        row = _execute(f"UPDATE ingest_jobs SET {', '.join(assignments)} "
                       f"WHERE {' AND '.join(conditions)} RETURNING {_ALL_COLUMNS}",
                       params).fetchone()
        if row is None:
            raise _lost(job_id, project_id, expect, action)
        job = _to_job(row)
        if event:
            _emit_job(event, job)
        return job


_END = dict(lease_owner=None, lease_expires_at=None)


def cancel(project_id: str, job_id: int) -> Job:
    """Cancel a queued job at once; flag a running one (its worker stops at the next check)."""
    job = get(project_id, job_id)
    if job.status == JobStatus.QUEUED:
        try:
            return _transition(job_id, project_id=project_id, expect=[JobStatus.QUEUED],
                               event=JOB_CANCELLED, action="cancel",
                               status=JobStatus.CANCELLED.value, completed_at=now(),
                               message=_cancelled_queued(job))
        except Conflict:
            job = get(project_id, job_id)  # a worker claimed it meanwhile: flag it instead
    if job.status == JobStatus.RUNNING and job.cancel_requested:
        return job  # asked already: nothing changes, so no second event
    if job.status == JobStatus.RUNNING:
        # The message shows it (cancel_requested is not one of the job's fields).
        return _transition(job_id, project_id=project_id, expect=[JobStatus.RUNNING],
                           event=JOB_CANCEL_REQUESTED, action="cancel", cancel_requested=True,
                           message="cancellation requested")
    raise Conflict(f"cannot cancel job {job_id}: it is {job.status}, not queued or running")


def _cancelled_queued(job: Job) -> str:
    return ("cancelled before it ran" if not job.attempts
            else "cancelled while it waited to be retried")


def delete(project_id: str, job_id: int, cleanup: Callable[[Job], None] | None = None) -> Job:
    """Soft delete (refused while running); ``cleanup`` removes what the job produced, in the
    same transaction. A queued job is also cancelled, so it never runs."""
    with transaction():
        job = get(project_id, job_id)
        if job.status == JobStatus.RUNNING:
            raise Conflict(f"cannot delete job {job_id}: it is running (cancel it first)")
        if job.status == JobStatus.QUEUED:  # it must never run: cancelled, with that event
            job = _transition(job_id, project_id=project_id, expect=[JobStatus.QUEUED],
                              event=JOB_CANCELLED, action="delete",
                              status=JobStatus.CANCELLED.value, completed_at=now(),
                              message=f"{_cancelled_queued(job)} (deleted)")
        moment = now()
        deleted = _transition(job_id, project_id=project_id, expect=[JobStatus(job.status)],
                              event=None, action="delete", deleted_at=moment,
                              completed_at=job.completed_at or moment)
        if cleanup is not None:
            cleanup(deleted)
        _emit_job(JOB_DELETED, deleted)
        return deleted


def retry(project_id: str, job_id: int) -> Job:
    """An operator's retry: a failed or cancelled job goes back to the queue with fresh attempts."""
    return _transition(job_id, project_id=project_id,
                       expect=[JobStatus.FAILED, JobStatus.CANCELLED], event=JOB_RETRYING,
                       action="retry", status=JobStatus.QUEUED.value, stage=Stage.INITIAL.value,
                       progress=0.0, attempts=0, not_before=DUE_NOW, cancel_requested=False,
                       completed_at=None, error_message=None, message="retry requested", **_END)


# --- what a worker does ------------------------------------------------------------------------

@dataclass(frozen=True)
class RunsAlone:
    """The jobs a worker runs one at a time, not in a group of small ones: files of
    ``mime_type`` or over ``over_bytes``, and every job of ``projects`` (their sink takes one
    document at a time)."""

    mime_type: str
    over_bytes: int
    projects: tuple[str, ...] = ()

    def sql(self) -> tuple[str, list[Any]]:
        """The condition and its parameters."""
        conditions = ["mime_type = ?", "byte_size > ?"]
        if self.projects:
            conditions.append(f"project_id IN ({', '.join('?' * len(self.projects))})")
        return f"({' OR '.join(conditions)})", [self.mime_type, self.over_bytes, *self.projects]


def claim(owner: str, limit: int = 1, lease_seconds: float = 30.0,
          projects: Sequence[str] | None = None, alone: RunsAlone | None = None) -> list[Job]:
    """Atomically move up to ``limit`` due queued jobs to running under ``owner``'s lease; of
    ``projects`` only, if given (daemons with other projects may share the database). A claim
    starts a new attempt: the message of the last one ("retry requested", a page reached) goes.

    With ``alone``, the batch ends with its first job that runs alone: a claimed job counts an
    attempt, which a worker that dies keeps (its jobs may have killed it), so no job waits
    behind a slow one, an attempt counted, while another worker may be idle.

    One statement (a materialized CTE of due ids, locked with SKIP LOCKED on PostgreSQL, then
    UPDATE ... RETURNING): two workers can never claim one job, and on PostgreSQL they never
    wait on each other's rows.
    """
    if projects is not None and not projects:
        return []
    moment, clock = now(), clock_sql()
    lock = " FOR UPDATE SKIP LOCKED" if is_postgres() else ""
    only = "" if projects is None else f"AND project_id IN ({', '.join('?' * len(projects))}) "
    slow, slow_params = alone.sql() if alone is not None else ("FALSE", [])
    with transaction():
        # MATERIALIZED: the CTE runs once. As a plain IN (subquery) PostgreSQL may run the
        # subquery again during the update, and with SKIP LOCKED get other rows: more than n.
        rows = _execute(
            f"WITH due AS MATERIALIZED (SELECT id, {slow} AS alone FROM ingest_jobs "
            f"WHERE status = 'queued' AND deleted_at IS NULL AND {due_sql(clock)} "
            f"{only}ORDER BY id LIMIT ?{lock}) "
            "UPDATE ingest_jobs SET status = 'running', lease_owner = ?, "
            f"lease_expires_at = {clock} + ?, attempts = attempts + 1, started_at = ?, "
            "message = NULL, updated_at = ? WHERE id IN (SELECT id FROM due WHERE id <= (SELECT "
            f"coalesce(min(id), {MAX_INTEGER}) FROM due WHERE alone)) AND status = 'queued' "
            f"RETURNING {_ALL_COLUMNS}",
            (*slow_params, *(projects or ()), limit, owner, float(lease_seconds), moment,
             moment)).fetchall()
        claimed = sorted((_to_job(row) for row in rows), key=lambda job: job.id)
        _emit_jobs(JOB_STARTED, claimed)
        return claimed


def project_has_jobs(project_id: str) -> bool:
    """Whether any job of ``project_id`` is in the database (deleted ones aside)."""
    return Job.select().where(Job.project_id == project_id, Job.deleted_at.is_null()).exists()


def heartbeat(owner: str, job_ids: Sequence[int], lease_seconds: float) -> dict[int, bool]:
    """Renew ``owner``'s leases; return ``{job_id: cancel_requested}`` for the jobs still held."""
    if not job_ids:
        return {}
    marks = ", ".join("?" * len(job_ids))
    # PostgreSQL: SKIP LOCKED, as a worker may be ending some of these jobs in an open group
    # transaction; waiting on their rows could close a cycle with that group (deadlock). Their
    # leases are renewed next time, if they still run.
    held = (f"SELECT id FROM ingest_jobs WHERE id IN ({marks}) AND lease_owner = ? "
            "AND status = 'running'" + (" FOR UPDATE SKIP LOCKED" if is_postgres() else ""))
    with transaction():
        _execute(f"UPDATE ingest_jobs SET lease_expires_at = {clock_sql()} + ? "
                 f"WHERE id IN ({held})", (float(lease_seconds), *job_ids, owner))
        rows = (Job.select(Job.id, Job.cancel_requested)
                .where(Job.id.in_(list(job_ids)), Job.lease_owner == owner, _IS_RUNNING))
        return {row.id: bool(row.cancel_requested) for row in rows}


def progress(job_id: int, owner: str, *, stage: Stage | None = None,
             fraction: float | None = None, message: str | None = None) -> Job:
    """Record a running job's stage and progress (0..1), with its event (the caller throttles
    them)."""
    changes: dict[str, Any] = {}
    if stage is not None:
        changes["stage"] = stage.value
    if fraction is not None:
        changes["progress"] = min(1.0, max(0.0, float(fraction)))
    if message is not None:
        changes["message"] = message
    return _transition(job_id, owner=owner, expect=[JobStatus.RUNNING],
                       event=JOB_PROGRESS, action="update", **changes)


# error_message: an earlier attempt's reason, gone once an attempt succeeds.
_COMPLETED = dict(status=JobStatus.COMPLETED.value, stage=Stage.DONE.value, progress=1.0,
                  error_message=None, **_END)


def complete(job_id: int, owner: str, *, message: str | None = None,
             canonical_document_id: int | None = None, content_sha256: str | None = None,
             mime_type: str | None = None, unless_cancel_requested: bool = False) -> Job:
    """End a running job as completed; with ``unless_cancel_requested`` a cancellation requested
    meanwhile wins (Conflict), so a cancelled job never completes. ``mime_type``, the type the
    worker sniffed, replaces the one found at the job's creation (none if the file could not
    be read then); None keeps it."""
    extra = ["NOT cancel_requested"] if unless_cancel_requested else []
    sniffed = {} if mime_type is None else {"mime_type": mime_type}
    return _transition(job_id, owner=owner, expect=[JobStatus.RUNNING], event=JOB_COMPLETED,
                       action="complete", extra=extra, completed_at=now(), message=message,
                       canonical_document_id=canonical_document_id,
                       content_sha256=content_sha256, **sniffed, **_COMPLETED)


def complete_many(owner: str, ends: Sequence[tuple[int, str, int, str, str]]) -> list[Job]:
    """:func:`complete` (with ``unless_cancel_requested``) for many running jobs in one
    statement: ``(job_id, message, canonical_document_id, content_sha256, mime_type)`` each.
    All or nothing: if any job is no longer ``owner``'s to complete (cancel requested, lease
    lost), nothing is changed and Conflict is raised. The jobs in the order given."""
    if not ends:
        return []
    moment = now()
    values = ", ".join(["(?, ?, ?, ?, ?)"] * len(ends))
    common = "".join(f", {column} = ?" for column in _COMPLETED)
    with transaction():
        rows = _execute(
            f"UPDATE ingest_jobs SET updated_at = ?, completed_at = ?{common}, "
            "message = v.column2, canonical_document_id = v.column3, content_sha256 = v.column4, "
            "mime_type = v.column5 "
            f"FROM (VALUES {values}) AS v WHERE ingest_jobs.id = v.column1 "
            "AND status = 'running' AND deleted_at IS NULL AND lease_owner = ? "
            f"AND NOT cancel_requested RETURNING {_QUALIFIED_COLUMNS}",
            [moment, moment, *_COMPLETED.values(), *(value for end in ends for value in end),
             owner]).fetchall()
        if len(rows) != len(ends):  # the transaction this raises through undoes the rest
            raise Conflict(f"{len(ends) - len(rows)} of {len(ends)} jobs could not complete")
        by_id = {job.id: job for job in map(_to_job, rows)}
        completed = [by_id[job_id] for job_id, *_ in ends]
        _emit_jobs(JOB_COMPLETED, completed)
        return completed


def fail(job_id: int, owner: str | None, error_message: str, *,
         content_sha256: str | None = None) -> Job:
    """End a running job as failed; ``owner=None`` is for the lease rescuer."""
    return _transition(job_id, owner=owner, expect=[JobStatus.RUNNING], event=JOB_FAILED,
                       action="fail", status=JobStatus.FAILED.value, completed_at=now(),
                       error_message=error_message, content_sha256=content_sha256, **_END)


def retry_later(job_id: int, owner: str, error_message: str, delay_seconds: float) -> Job:
    """A transient failure: back to the queue, due after ``delay_seconds``, if attempts remain.

    With no attempt left the job fails instead, and a job whose cancellation was requested ends
    cancelled (an operator's cancel is never undone by a retry); the caller gets the final job."""
    try:
        return _transition(job_id, owner=owner, expect=[JobStatus.RUNNING], event=JOB_RETRYING,
                           action="retry",
                           extra=["attempts < max_attempts", "NOT cancel_requested"],
                           status=JobStatus.QUEUED.value, stage=Stage.INITIAL.value,
                           progress=0.0,
                           not_before=Raw(f"{clock_sql()} + "
                                          f"{min(float(delay_seconds), MAX_DELAY_SECONDS)!r}"),
                           error_message=error_message, **_END)
    except Conflict:
        job = Job.get_by_id(job_id)
        if job.status != JobStatus.RUNNING:
            raise
        if job.cancel_requested:
            return finish_cancelled(job_id, owner)
        return fail(job_id, owner, gave_up(error_message, job.attempts))


def gave_up(reason: str, attempts: int) -> str:
    """A transient failure's reason once no attempt is left."""
    return f"{reason} (gave up after {attempts} attempts)"


def finish_cancelled(job_id: int, owner: str | None,
                     message: str = "cancelled while running") -> Job:
    """A running job stopped without a result: its cancellation was requested, or its file was
    superseded by a newer version."""
    return _transition(job_id, owner=owner, expect=[JobStatus.RUNNING], event=JOB_CANCELLED,
                       action="cancel", status=JobStatus.CANCELLED.value, completed_at=now(),
                       message=message, **_END)


def release(job_id: int, owner: str, reason: str = "re-queued at shutdown",
            attempt: int | None = None) -> Job:
    """Give a running job back to the queue without counting the attempt: the worker stopped
    for its own reasons (shutdown, a lost database connection), not the job's. A job whose
    cancellation was requested ends cancelled instead. With ``attempt``, only that run of it
    (a release tried again later must not give back a newer run by the same owner)."""
    extra = ["NOT cancel_requested"] + ([f"attempts = {int(attempt)}"] if attempt else [])
    try:
        return _transition(job_id, owner=owner, expect=[JobStatus.RUNNING], event=JOB_REQUEUED,
                           action="release", extra=extra,
                           status=JobStatus.QUEUED.value, stage=Stage.INITIAL.value,
                           progress=0.0, not_before=DUE_NOW,
                           attempts=Raw("attempts - 1"), message=reason, **_END)
    except Conflict:
        job = Job.get_by_id(job_id)
        if (job.status != JobStatus.RUNNING or not job.cancel_requested
                or (attempt and job.attempts != attempt)):
            raise
        return finish_cancelled(job_id, owner)


def rescue_expired(limit: int = 100) -> list[Job]:
    """Jobs whose lease expired (their worker died) go back to the queue, keeping the attempt they
    used; those out of attempts fail and those whose cancel was requested end cancelled."""
    still_expired = f"lease_expires_at < {clock_sql()}"
    expired = list(Job.select().where(_IS_RUNNING, pw.SQL(still_expired))
                   .order_by(Job.lease_expires_at).limit(limit))
    return _rescue_all(expired, [still_expired])


def running_owners() -> list[str]:
    """Lease owners that hold running jobs now."""
    rows = _execute("SELECT DISTINCT lease_owner FROM ingest_jobs WHERE status = 'running'")
    return [row[0] for row in rows.fetchall() if row[0]]


def running_under(owners: Sequence[str]) -> list[Job]:
    """The running jobs whose lease ``owners`` hold."""
    if not owners:
        return []
    return list(Job.select().where(_IS_RUNNING, Job.lease_owner.in_(list(owners)))
                .order_by(Job.id))


def rescue_owned(owners: Sequence[str]) -> list[Job]:
    """Rescue the running jobs of ``owners`` now, whatever their lease says: for owners known to
    be dead (a process on this host that is gone)."""
    if not owners:
        return []
    held = list(Job.select().where(_IS_RUNNING, Job.lease_owner.in_(list(owners))))
    return _rescue_all(held, [])


def _rescue_all(held: list[Job], still: list[str]) -> list[Job]:
    rescued = []
    for job in held:
        try:
            rescued.append(_rescue_one(job, still))
        except (Conflict, NotFound):
            continue  # renewed or finished meanwhile, or another node rescued it
    return rescued


def _rescue_one(job: Job, still_expired: list[str]) -> Job:
    lost = f"worker {job.lease_owner} stopped renewing its lease"
    common = dict(expect=[JobStatus.RUNNING], owner=job.lease_owner, extra=still_expired,
                  action="rescue", **_END)
    if job.cancel_requested:
        return _transition(job.id, event=JOB_CANCELLED, status=JobStatus.CANCELLED.value,
                           completed_at=now(), message="cancelled while running", **common)
    if job.attempts >= job.max_attempts:
        return _transition(job.id, event=JOB_FAILED, status=JobStatus.FAILED.value,
                           completed_at=now(),
                           error_message=gave_up(lost, job.attempts),
                           **common)
    return _transition(job.id, event=JOB_REQUEUED, status=JobStatus.QUEUED.value,
                       stage=Stage.INITIAL.value, progress=0.0, not_before=DUE_NOW,
                       message=f"re-queued: {lost}", **common)
