"""Running one claimed job: reading -> extracting -> indexing -> done.

Reading streams the file once, computing its sha256, and checks it is still the version the job
was made for. Extraction goes by the sniffed type (PDFs in a separate process, see procpool).
The text goes to the project's sink. Every outcome ends in exactly one transition of
:mod:`ingestd.jobs`: completed, failed (permanent reason), queued again (transient, with
backoff), or cancelled. The original is moved or deleted only after the job's end committed.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import structlog

from ingestd import db, documents, intake, jobs, originals, retire, sinks
from ingestd.config import ProjectConfig
from ingestd.errors import Conflict
from ingestd.extract import PDF, Extracted, ExtractError, extract_text
from ingestd.models import Job, JobStatus, Stage, database
from ingestd.procpool import ExtractionTimeout, ExtractorPool
from ingestd.sinks import Document, Sink, SinkError
from ingestd.sinks.text import TextSink
from ingestd.sniff import SNIFF_BYTES, sniff_head

log = structlog.get_logger(__name__)
READ_CHUNK = 1 << 20
MAX_BACKOFF_SECONDS = 300.0
# How long an external sink's stored document waits for its completing transaction while the
# database fails (a server restart takes seconds) before the job goes back to the queue.
CUT_OFF_RETRY_SECONDS = 60.0


class Permanent(Exception):
    """The file will never ingest as it is: fail now with this reason."""


class Transient(Exception):
    """Trying again later may work: retry with backoff while attempts remain."""


class Cancelled(Exception):
    """An operator cancelled the job."""


class Superseded(Exception):
    """The file changed or vanished for good after the job was made; its new version has (or will
    get) its own job."""


class Abandoned(Exception):
    """The job is no longer ours (lease lost, or released at shutdown): stop without a transition."""


@dataclass
class Control:
    """What the pool tells a running job, set from other threads."""

    # Set by the pool's threads, read between the job's steps (plain flags: nothing waits on
    # them, and two Events cost 7 us to make, once per file).
    cancelled: bool = False  # the job was asked to cancel (seen at a heartbeat)
    abandoned: bool = False  # the job is no longer ours (lease lost, released at a stop)
    begun: bool = False  # claimed in a batch, and its turn came
    stage: str = Stage.INITIAL.value
    started: float = field(default_factory=time.monotonic)
    stage_started: float = field(default_factory=time.monotonic)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # for metrics
    fraction: float = 0.0  # progress, as the job knows it
    shown: tuple[str, float] | None = None  # (stage, progress) as last written to the job row

    def enter(self, stage: str) -> None:
        """Account the time of the stage being left; the last one is closed with ``enter("")``."""
        now = time.monotonic()
        if self.stage != Stage.INITIAL.value:
            self.stage_seconds[self.stage] = self.stage_seconds.get(self.stage, 0.0) + (
                now - self.stage_started)
        self.stage, self.stage_started = stage, now


@dataclass
class Context:
    owner: str
    project: ProjectConfig
    sink: Sink
    extractors: ExtractorPool
    control: Control
    progress_interval: float
    deadline: float = 0.0
    # One of a worker's group of small jobs: prepared without the early duplicate look-up, and
    # ended in the group's transaction with no savepoints, where a lost compare-and-set raises
    # (the worker rolls the group back and ends its jobs one by one).
    grouped: bool = False
    # Called as the job's extraction gets under way (for a PDF: once its extraction process
    # has the file). The worker hands its previous job's end over then, not before: see
    # WorkerPool._run.
    on_extracting: Callable[[], None] = lambda: None

    def atomic(self) -> Any:
        """A savepoint to undo this job's writes on its own; none in a group."""
        return db.transaction() if self.grouped else database.atomic()

    def must_stop(self) -> bool:
        """Whether :meth:`check` would raise."""
        try:
            self.check()
        except (Abandoned, Cancelled, ExtractionTimeout):
            return True
        return False

    def check(self) -> None:
        """Raise if the job must stop: abandoned, cancelled, or past its deadline."""
        if self.control.abandoned:
            raise Abandoned()
        if self.control.cancelled:
            raise Cancelled()
        if time.monotonic() > self.deadline:
            raise ExtractionTimeout()


class _Progress:
    """Stage and progress writes, throttled: a job faster than one interval writes none at all.
    What a long step leaves unwritten (no update comes during it) the worker's heartbeat writes
    (see WorkerPool.heartbeat)."""

    def __init__(self, job: Job, ctx: Context) -> None:
        self.job, self.ctx = job, ctx
        self.last_write = time.monotonic()
        self.stage: Stage = Stage.INITIAL
        self.fraction = 0.0

    def update(self, stage: Stage | None = None, fraction: float | None = None) -> None:
        if stage is not None:
            self.stage = stage
            self.ctx.control.enter(stage.value)
        if fraction is not None:
            self.fraction = self.ctx.control.fraction = fraction
        now = time.monotonic()
        if now - self.last_write >= self.ctx.progress_interval:
            self.last_write = now
            jobs.progress(self.job.id, self.ctx.owner, stage=self.stage, fraction=self.fraction)
            self.ctx.control.shown = (self.stage.value, self.fraction)


def run_job(job: Job, ctx: Context) -> Job | None:
    """Run ``job`` to its end and dispose of its original; the final job (None: abandoned)."""
    final = execute(job, ctx)
    if final is not None:
        after_end(final, ctx.project)
    return final


def after_end(final: Job, project: ProjectConfig) -> None:
    """What follows a committed end: the original of a completed or failed job is moved or
    deleted as the project says."""
    if final.status in (JobStatus.COMPLETED, JobStatus.FAILED):
        originals.dispose(final, project)


def execute(job: Job, ctx: Context) -> Job | None:
    """Run ``job`` to its end transition, touching no file; the final job (None: abandoned)."""
    return conclude(job, ctx, prepare(job, ctx))


@dataclass
class Prepared:
    """What :func:`prepare` found: the text to index, a known document with the same content,
    or the exception that decides the job's end."""

    sha: str | None = None
    mime: str = ""
    extracted: Extracted | None = None
    known: documents.Known | None = None
    error: Exception | None = None
    # For the built-in sinks: the document and the sink's rows for it (chunks), made before
    # the completing transaction, which holds the write lock.
    document: Document | None = None
    parts: list[tuple] = field(default_factory=list)


def prepare(job: Job, ctx: Context) -> Prepared:
    """Read and extract: everything before the job's end that writes nothing but (throttled)
    progress. A worker prepares a group of small jobs, then concludes them in one transaction,
    so the write lock is never held while files are read."""
    ctx.deadline = time.monotonic() + ctx.project.job_timeout_seconds
    found = Prepared()
    try:
        progress = _Progress(job, ctx)
        progress.update(Stage.READING, 0.0)
        data, found.sha = read_version(job, ctx.project, ctx.check,
                                       lambda head: _check_type(job, ctx.project, head))
        found.mime = _check_type(job, ctx.project, data)
        ctx.check()
        if not ctx.grouped:  # a group's small files are cheap to extract: only its end looks
            found.known = documents.current_for_content(job.project_id, found.sha)
        if found.known is None:  # else nothing to extract: the project has this content
            progress.update(Stage.EXTRACTING, 0.1)
            found.extracted = _extract(data, found.mime, ctx, progress)
            progress.update(Stage.INDEXING, 0.9)
            if isinstance(ctx.sink, TextSink):  # the built-in sinks: split the text now, not
                # in the completing transaction, holding the write lock (1 s for 100 MB)
                found.document = _document(job, found.extracted, found.mime, found.sha, None)
                found.parts = ctx.sink.parts_of(found.document)
    except (Abandoned, Cancelled, Superseded, Permanent, ExtractError, ExtractionTimeout,
            Transient, SinkError, Conflict) as exc:
        found.error = exc
    return found


def conclude(job: Job, ctx: Context, found: Prepared) -> Job | None:
    """The job's end transition for what :func:`prepare` found (None: abandoned)."""
    bound = log.bind(job_id=job.id, project=job.project_id, path=job.source_path)
    sha, mime = found.sha, found.mime or None  # no type: the file was not read
    try:
        if found.error is not None:
            raise found.error
        ctx.check()
        if found.known is not None:
            final = _complete_duplicate(job, ctx, sha, mime)
        else:
            final = _index(job, ctx, found, sha)
    except Abandoned:
        bound.info("job_abandoned")
        return None
    except Cancelled:
        final = jobs.finish_cancelled(job.id, ctx.owner)
    except Superseded as exc:
        final = jobs.finish_cancelled(job.id, ctx.owner, message=f"superseded: {exc}")
    except (Permanent, ExtractError) as exc:
        final = jobs.fail(job.id, ctx.owner, str(exc), content_sha256=sha)
    except ExtractionTimeout:
        final = _timed_out(job, ctx, sha)
    except SinkError as exc:
        if ctx.control.abandoned:  # let go (a stop, a lost lease): its sink program killed
            bound.info("job_abandoned", reason=f"sink: {exc}")
            return None
        final = _sink_failed(job, ctx, exc, sha, mime)
    except Transient as exc:
        final = _transient(job, ctx, exc, sha, mime)
    except Conflict:
        if ctx.grouped:
            raise
        if ctx.control.abandoned:  # a stop released it: a progress write then found it queued
            bound.info("job_abandoned")
            return None
        bound.warning("job_taken_over", reason="the job changed under this worker")
        return None
    return _finish(bound, final, ctx)


def _finish(bound: structlog.BoundLogger, final: Job, ctx: Context) -> Job:
    ctx.control.enter("")
    _log_end(bound, final)
    return final


def _timed_out(job: Job, ctx: Context, sha: str | None) -> Job:
    return jobs.fail(job.id, ctx.owner, f"timed out after {ctx.project.job_timeout_seconds:g} s "
                                        "(job_timeout_seconds)", content_sha256=sha)


def _sink_failed(job: Job, ctx: Context, exc: SinkError, sha: str | None,
                 mime: str | None) -> Job:
    """A transient sink failure at or past the job's deadline is the job's timeout (the sink
    was given only the job's remaining time, see sinks.time_limit): no time is left to retry."""
    if exc.transient and time.monotonic() >= ctx.deadline:
        return _timed_out(job, ctx, sha)
    return _transient(job, ctx, exc, sha, mime)


def _transient(job: Job, ctx: Context, exc: Exception, sha: str | None,
               mime: str | None) -> Job:
    """Retry with backoff while attempts remain; a sink's failure may end as a warning (a
    completion: with the sniffed ``mime``)."""
    reason = f"sink: {exc}" if isinstance(exc, SinkError) else str(exc)
    last_chance = job.attempts >= job.max_attempts or (
        isinstance(exc, SinkError) and not exc.transient)
    if isinstance(exc, SinkError) and last_chance:
        if ctx.project.sink_errors == "warn":
            warning = f"completed without the sink (sink_errors = warn): {exc}"
            try:
                return jobs.complete(job.id, ctx.owner, content_sha256=None, message=warning,
                                     mime_type=mime, unless_cancel_requested=True)
            except Conflict:
                return _after_lost_completion(job, ctx)
        if exc.transient:  # out of attempts: said as retry_later says it
            reason = jobs.gave_up(reason, job.attempts)
        return jobs.fail(job.id, ctx.owner, reason, content_sha256=sha)
    delay = min(MAX_BACKOFF_SECONDS, 2.0 ** max(0, job.attempts - 1))
    return jobs.retry_later(job.id, ctx.owner, reason, delay)


def _log_end(bound: structlog.BoundLogger, final: Job) -> None:
    if final.status == JobStatus.FAILED:
        bound.warning("job_failed", reason=final.error_message, attempts=final.attempts)
    elif final.status == JobStatus.QUEUED:
        bound.info("job_retrying", reason=final.error_message, attempts=final.attempts)
    elif final.status == JobStatus.COMPLETED:
        # Every completion is in the event log; at info, a burst would also flood the journal
        # (journald drops a service's lines past its rate limit, 10,000 per 30 s by default).
        bound.debug("job_completed", message=final.message)
    else:
        bound.info(f"job_{final.status}", message=final.message)


# --- reading ---------------------------------------------------------------------------------

def read_version(job: Job, project: ProjectConfig, check: Callable[[], None] = lambda: None,
                 check_head: Callable[[bytes], object] = lambda head: None
                 ) -> tuple[bytes, str]:
    """The file's bytes and sha256, if it is still the version the job was made for: at its
    source path, else (a retried job that failed, after = "move" or "delete") its copy in
    failed/. A file longer than one read has ``check_head`` called on its first read (its type
    is known then) and ``check`` between reads (the job's deadline, a cancel)."""
    reading = (check, check_head)
    try:
        return _read_at(originals.fs_path(job), job, project, reading, moved=False)
    except FileNotFoundError:
        pass
    copy = originals.quarantined(job, project)
    if copy is not None:
        _check_newest(job)
        try:
            return _read_at(copy, job, project, reading, moved=True)
        except FileNotFoundError:
            pass
    raise Transient("file vanished before it was read")


def _read_at(path: bytes, job: Job, project: ProjectConfig,
             reading: tuple[Callable[[], None], Callable[[bytes], object]],
             moved: bool) -> tuple[bytes, str]:
    """Read ``path`` as the job's version; FileNotFoundError if there is nothing there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise  # the caller may look for the file elsewhere (failed/)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the name is now a symlink
            raise Permanent("the file was replaced by a symlink") from None
        if exc.errno == errno.ENXIO:  # a socket, or a device node with no driver behind it
            raise Permanent(f"not a regular file ({_kind_at(path)})") from None
        raise Transient(f"cannot open: {exc.strerror}") from None
    before = os.fstat(fd)
    kind = intake.irregular_kind(before.st_mode)
    if kind is not None:  # before fdopen, which refuses a directory with a traceback's error
        os.close(fd)
        raise Permanent(f"not a regular file ({kind})")
    with os.fdopen(fd, "rb") as handle:
        if not originals.is_version(job, before, moved):
            raise Superseded("the file changed after this job was made")
        if before.st_size > project.max_bytes:
            raise Permanent(f"too large ({before.st_size} bytes; max_bytes is {project.max_bytes})")
        data, digest = _read_all(handle, project.max_bytes, *reading)
        if intake.signature_of(os.fstat(fd)) != intake.signature_of(before):
            raise Superseded("the file changed while it was being read")
    return data, digest


def _kind_at(path: bytes) -> str:
    try:
        return intake.irregular_kind(os.lstat(path).st_mode) or "an unusual kind of file"
    except OSError:
        return "an unusual kind of file"


def _check_newest(job: Job) -> None:
    """A quarantined version whose path has a newer job since is superseded: ingested now, it
    would sit in the sink beside the newer version's document."""
    newer = documents.newer_job(job)
    if newer is not None:
        raise Superseded(f"a newer version of the file has job {newer}")


def _read_all(handle, limit: int, check: Callable[[], None],
              check_head: Callable[[bytes], object]) -> tuple[bytes, str]:
    digest, chunks, size = hashlib.sha256(), [], 0
    while chunk := handle.read(READ_CHUNK):
        if len(chunks) == 1:  # a long file: refuse its type before reading all of it
            check_head(chunks[0])
        if chunks:
            check()
        size += len(chunk)
        if size > limit:
            raise Permanent(f"too large (over max_bytes {limit} while reading)")
        digest.update(chunk)
        chunks.append(chunk)
    return b"".join(chunks), digest.hexdigest()


def _check_type(job: Job, project: ProjectConfig, data: bytes) -> str:
    """Sniff the bytes actually read; a type the project does not allow fails the job."""
    mime = sniff_head(data[:SNIFF_BYTES], job.original_filename or "")
    if not intake.type_allowed(project, mime):
        raise Permanent(f"type {mime} is not allowed (allowed: {', '.join(project.allowed_types)})")
    return mime


# --- extracting and indexing -------------------------------------------------------------------

def _extract(data: bytes, mime: str, ctx: Context, progress: _Progress) -> Extracted:
    if mime != PDF:
        ctx.on_extracting()
        return extract_text(data, mime, ctx.check)

    def on_page(done: int, total: int) -> None:
        progress.update(fraction=0.1 + 0.8 * done / max(total, 1))

    return ctx.extractors.extract_pdf(data, ctx.deadline, on_page, ctx.check,
                                      on_sent=ctx.on_extracting,
                                      max_characters=ctx.project.max_bytes)


def conclude_group(group: Sequence[tuple[Job, Context, Prepared]]) -> list[Job | None]:
    """End a worker's group of small prepared jobs, in its transaction; the final jobs.

    New content under a path with no earlier version, the bulk of any burst, goes in together:
    one look-up, one insert per sink table, one update and one event insert for them all. The
    rest (duplicates, new versions, failures, cancels) then end one by one through
    :func:`conclude`, each as if alone (a duplicate of a file earlier in the group finds the
    document just made). A job of the group that cannot complete raises Conflict (from
    ``jobs.complete_many``): the worker rolls the group back and ends its jobs one by one."""
    documents.lock_ends([(job.project_id, found.sha, job.source_path)
                         for job, _, found in group if found.sha])
    together = _new_in_group(group)
    finals: dict[int, Job | None] = {}
    for sink, items in _by_sink(together).items():
        ids = sink.ingest_many([(found.document, found.parts) for _, _, found in items])
        owner = items[0][1].owner
        completed = jobs.complete_many(owner, [
            (job.id, _indexed_message(found.extracted), document_id, found.sha, found.mime)
            for (job, _, found), document_id in zip(items, ids)])
        # Asked once (structlog asks the same stdlib logger): this runs holding the write lock.
        debug = logging.getLogger(__name__).isEnabledFor(logging.DEBUG)
        for (job, ctx, _), final in zip(items, completed):
            ctx.control.enter("")
            if debug:
                log.debug("job_completed", job_id=job.id, project=job.project_id,
                          path=job.source_path, message=final.message)
            finals[job.id] = final
    for job, ctx, found in group:
        if job.id not in finals:
            finals[job.id] = conclude(job, ctx, found)
    return [finals[job.id] for job, _, _ in group]


def _new_in_group(group: Sequence[tuple[Job, Context, Prepared]]
                  ) -> list[tuple[Job, Context, Prepared]]:
    """The jobs of ``group`` whose end is to index their document and complete: prepared, not
    stopped, content and path unique in the group and never completed in the project before."""
    candidates = [(job, ctx, found) for job, ctx, found in group
                  if found.document is not None and not ctx.must_stop()]
    shas = collections.Counter(found.sha for _, _, found in candidates)
    paths = collections.Counter(job.source_path for job, _, _ in candidates)
    candidates = [(job, ctx, found) for job, ctx, found in candidates
                  if shas[found.sha] == 1 and paths[job.source_path] == 1]
    by_project: dict[str, list[tuple[str, str]]] = {}
    for job, _, found in candidates:
        by_project.setdefault(job.project_id, []).append((found.sha, job.source_path))
    seen = {project_id: documents.ever_completed(project_id, pairs)
            for project_id, pairs in by_project.items()}
    return [(job, ctx, found) for job, ctx, found in candidates
            if found.sha not in seen[job.project_id][0]
            and job.source_path not in seen[job.project_id][1]]


def _by_sink(items: Sequence[tuple[Job, Context, Prepared]]
             ) -> dict[TextSink, list[tuple[Job, Context, Prepared]]]:
    grouped: dict[TextSink, list[tuple[Job, Context, Prepared]]] = {}
    for item in items:
        grouped.setdefault(item[1].sink, []).append(item)
    return grouped


def _document(job: Job, extracted: Extracted, mime: str, sha: str,
              replaces: int | None) -> Document:
    return Document(project_id=job.project_id, job_id=job.id, text=extracted.text,
                    source_path=job.source_path, original_filename=job.original_filename or "",
                    mime_type=mime, sha256=sha, pages=extracted.pages, replaces=replaces)


def _indexed_message(extracted: Extracted) -> str:
    replaced = (f"; {extracted.replaced} invalid UTF-8 sequence(s) read as U+FFFD"
                if extracted.replaced else "")
    return f"{len(extracted.text)} characters from {len(extracted.pages)} page(s){replaced}"


def _index(job: Job, ctx: Context, found: Prepared, sha: str) -> Job:
    """Hand the text to the sink and complete, retiring the path's previous document.

    For a sink in our own database all of it is one transaction, which also re-checks for a
    duplicate (two workers may have read the same content at once): a search sees the old
    document or the new one, never neither or both, and a cancel leaves nothing behind. An
    external sink is called before the completing transaction, and told to delete the
    previous document after it (see retire)."""
    extracted, mime = found.extracted, found.mime
    message = _indexed_message(extracted)
    if ctx.sink.transactional:
        try:
            with ctx.atomic():
                _lock_ends(job, sha)
                known = documents.current_for_content(job.project_id, sha)
                if known is not None:
                    return _complete_duplicate(job, ctx, sha, mime, known)
                previous = documents.previous_version(job)
                if found.document is not None:  # the built-in sinks, its parts made before
                    # A group has no savepoint to undo a job stopped part-way.
                    document_id = ctx.sink.ingest_many(
                        [(found.document, found.parts)],
                        None if ctx.grouped else ctx.check)[0]
                else:
                    document_id = ctx.sink.ingest(_document(job, extracted, mime, sha, previous))
                if not ctx.grouped:  # past its deadline (or cancelled) while indexing: undone
                    ctx.check()
                _let_go_previous(ctx, job, previous)
                return _complete(job, ctx, message, document_id, sha, mime)
        except Conflict:
            if ctx.grouped:
                raise
            return _after_lost_completion(job, ctx)
    # An external sink may block: give it the time left, and let it see the job let go.
    with sinks.job_deadline(ctx.deadline), sinks.job_abandoned(lambda: ctx.control.abandoned):
        document_id = ctx.sink.ingest(_document(job, extracted, mime, sha,
                                                documents.previous_version(job)))
    try:
        final, owed = _again_if_cut_off(job, ctx, document_id, lambda: _complete_stored(
            job, ctx, message, document_id, sha, mime))
    except Conflict:
        _undo_ingest(ctx, job, document_id)  # cancelled meanwhile: leave nothing behind
        return _after_lost_completion(job, ctx)
    except Superseded:
        _undo_ingest(ctx, job, document_id)  # a newer version completed first: nor here
        raise
    retire.settle(owed, ctx.sink)
    return final


def _complete_stored(job: Job, ctx: Context, message: str, document_id: int, sha: str,
                     mime: str) -> tuple[Job, retire.Owed | None]:
    """The completing transaction of a document an external sink stored."""
    with ctx.atomic():
        _lock_ends(job, sha)
        final = _complete(job, ctx, message, document_id, sha, mime)
        previous = documents.previous_version(job)  # as it is now, under the lock
        # A sink may answer with the id it gave before (it updates by path): that
        # document is the new one now.
        return final, _let_go_previous(ctx, job, None if previous == document_id else previous)


def _again_if_cut_off(job: Job, ctx: Context, document_id: int,
                      complete: Callable[[], tuple[Job, retire.Owed | None]]
                      ) -> tuple[Job, retire.Owed | None]:
    """The sink holds the document already: a completing transaction the database failed (a
    server restarting: the old connection cut, new ones refused a while; SQLite locked past
    its busy timeout) is tried again, on a new connection, with backoff for up to
    CUT_OFF_RETRY_SECONDS, rather than the job run again and the document stored twice, the
    first never deleted. Should an earlier try have committed after all (the connection lost
    as the server answered), the job is completed with this document."""
    give_up_at, delay = time.monotonic() + CUT_OFF_RETRY_SECONDS, 0.0
    while True:
        try:
            if delay:
                current = Job.get_or_none(Job.id == job.id)
                if (current is not None and current.status == JobStatus.COMPLETED
                        and current.canonical_document_id == document_id):
                    return current, None
            return complete()
        except db.ERRORS as exc:
            # Within an outer transaction (none today: an external sink's job runs alone) a
            # new connection could not take over what it wrote.
            delay = min(max(2 * delay, 0.25), 2.0)
            if (db.refused(exc) or database.in_transaction() or ctx.control.abandoned
                    or time.monotonic() + delay > give_up_at):
                raise
            log.info("completion_tried_again", job_id=job.id, project=job.project_id,
                     reason=str(db.as_store_error(exc)), in_seconds=delay)
            db.reset_connection()
            time.sleep(delay)


def _let_go_previous(ctx: Context, job: Job, document_id: int | None) -> retire.Owed | None:
    """In the completing transaction: the path's previous document leaves the sink (an
    external sink's delete is owed, made after the commit: see retire). The new one is in
    already, so a failure of the index's delete is logged, not the job's failure."""
    try:
        return retire.let_go(ctx.project, ctx.sink, document_id, job.id)
    except SinkError as exc:
        log.warning("previous_document_not_deleted", job_id=job.id, project=job.project_id,
                    path=job.source_path, document_id=document_id, reason=str(exc))
        return None


def _undo_ingest(ctx: Context, job: Job, document_id: int) -> None:
    """An external sink's document whose job did not complete leaves it again: owed, like a
    previous version's, so that a sink failing now is tried again later."""
    with db.transaction():
        owed = retire.let_go(ctx.project, ctx.sink, document_id, job.id)
    retire.settle(owed, ctx.sink)


def _complete_duplicate(job: Job, ctx: Context, sha: str, mime: str,
                        known: documents.Known | None = None) -> Job:
    """Same content as a document the project keeps (``known``, found in this transaction):
    point at it, index nothing. Without ``known`` it is looked for here: one found before the
    completing transaction may be gone since (its job deleted), and then there is no text to
    index but by reading the file again."""
    with ctx.atomic():
        if known is None:
            _lock_ends(job, sha)
            known = documents.current_for_content(job.project_id, sha)
            if known is None:
                raise Transient("the document with the same content was deleted meanwhile")
        previous = documents.previous_version(job)
        # The same document as the path's previous one: its content is unchanged (a touch).
        owed = _let_go_previous(ctx, job, None if previous == known.document_id else previous)
        final = _complete(job, ctx, f"duplicate of document {known.document_id} "
                                    f"(first seen as {known.first_path})", known.document_id,
                          sha, mime)
    retire.settle(owed, ctx.sink)  # inside an outer transaction it waits for the daemon
    return final


def _lock_ends(job: Job, sha: str) -> None:
    """In a completing transaction: wait for others ending this content or path (PostgreSQL)."""
    documents.lock_ends([(job.project_id, sha, job.source_path)])


def _complete(job: Job, ctx: Context, message: str, document_id: int, sha: str,
              mime: str) -> Job:
    """Complete with the sniffed ``mime``, unless a newer version of the file completed first
    (a long PDF overtaken by its small replacement): its text must not come back as the
    path's. In a group that rolls the group back (Conflict), so that no document of it is left
    behind. Called in the completing transaction, after :func:`_lock_ends`."""
    newer = documents.newer_version_completed(job)
    if newer is not None:
        if ctx.grouped:
            raise Conflict(f"job {job.id} was superseded by job {newer}")
        raise Superseded(f"a newer version of the file completed first (job {newer})")
    return jobs.complete(job.id, ctx.owner, message=message, canonical_document_id=document_id,
                         content_sha256=sha, mime_type=mime, unless_cancel_requested=True)


def _after_lost_completion(job: Job, ctx: Context) -> Job:
    """Completion lost its compare-and-set: cancelled meanwhile, or no longer ours."""
    current = Job.get_by_id(job.id)
    if current.status == JobStatus.RUNNING and current.lease_owner == ctx.owner:
        return jobs.finish_cancelled(job.id, ctx.owner)
    raise Conflict(f"job {job.id} is {current.status}")
