"""The command sink: the user's own program, run once per document.

For people whose retrieval stack is a script: ingestd runs ``command`` (no shell) with one JSON
object on stdin and reads the document id from stdout. The same JSON objects are what the http
sink POSTs (the code both use: :mod:`ingestd.sinks.external`).

stdin, to ingest::

    {"action": "ingest", "project": "acme", "job_id": 12, "text": "...",
     "source_path": "/srv/drop/acme/a.pdf", "original_filename": "a.pdf",
     "mime_type": "application/pdf", "sha256": "<64 hex>", "pages": [[0, 1200], [1200, 2310]],
     "replaces": 7}

``pages`` are [start, end) offsets into ``text`` in characters (code points); ``replaces`` is
the id of the same path's previous document, which ingestd deletes (with a delete run) after
this one is stored, or null. stdout: the new document's id, a bare integer or a JSON object
with an integer ``"id"``. A retry sends the same object again (same ``job_id`` and ``sha256``),
so a program that wants exactly-once can key on them.

stdin, to delete (a job that produced the document was deleted, or a newer version replaced
it): ``{"action": "delete", "project": "acme", "document_id": 7}``; stdout is ignored. An
unknown id must succeed (deletes are repeated after failures).

Exit status: 0 is success. 75 (``EX_TEMPFAIL`` from sysexits.h) means "try again later": the job
is retried with backoff. Any other status, or death by a signal, is permanent: the job fails (or
completes with a warning under ``sink_errors = "warn"``). Either way the last non-empty line of
stderr is the reason shown in the job's ``error_message``. A run longer than
``timeout_seconds``, or than the job has left of ``job_timeout_seconds``, is killed with its
whole process group; the first counts as transient, the second fails the job (timed out). A
job cancelled meanwhile waits for the run: a program killed half-way may have stored the
document, whose id only its answer tells (the cancelled job's end then deletes it).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from typing import Any, Iterator

from ingestd import proc
from ingestd.config import ProjectConfig
from ingestd.errors import ConfigError
from ingestd.sinks import Document, SinkError, abandoned, time_limit
from ingestd.sinks.external import (DEFAULT_TIMEOUT_SECONDS, Options, delete_message, encode,
                                    ingest_message, parse_document_id, shorten, timed_out)

EX_TEMPFAIL = 75
OUTPUT_GRACE_SECONDS = 0.5  # reading on after the program exited (see _communicate)
POLL_SECONDS = 0.1


# --- the sink ---------------------------------------------------------------------------------

class CommandSink:
    """Runs the configured program per document; see the module docstring for its contract."""

    transactional = False
    options = ("command", "timeout_seconds")

    def __init__(self, project: ProjectConfig) -> None:
        options = Options(project, self.options)
        self.project_id = project.name
        self.argv = _argv(options)
        self.timeout = options.positive_number("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)

    def ingest(self, document: Document) -> int:
        stdout = self._run(ingest_message(document))
        return parse_document_id(stdout, f"on the stdout of {self.argv[0]}")

    def delete(self, document_id: int) -> None:
        self._run(delete_message(self.project_id, document_id))

    def _run(self, message: dict[str, Any]) -> bytes:
        """One run with ``message`` on stdin; its stdout, or SinkError."""
        seconds, setting = time_limit(self.timeout)
        process = self._start()
        with process, _running(process):
            try:
                stdout, stderr = _communicate(process, encode(message), seconds)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                raise SinkError(timed_out(seconds, setting)) from None
            except BaseException:  # interrupted: leave nothing running behind us
                _kill_group(process)
                raise
        if process.returncode != 0:
            raise _exit_error(process.returncode, stderr)
        return stdout

    def _start(self) -> subprocess.Popen:
        # A session of its own: a timeout kills the program and everything it started, and
        # the daemon's SIGTERM (or a terminal's ^C) does not reach it mid-document.
        try:
            return subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            missing = isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError))
            raise SinkError(f"cannot run {self.argv[0]}: {exc.strerror or exc}",
                            transient=not missing) from None


def _argv(options: Options) -> list[str]:
    """``command`` as an argv: a list of strings, or one string split like a shell would
    (quotes respected) but never run by one."""
    value, key = options.required("command"), options.key("command")
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: cannot split {value!r}: {exc}") from None
    if (not isinstance(value, list) or not value
            or not all(isinstance(part, str) for part in value) or not value[0]):
        raise ConfigError(f"{key}: must be a non-empty list of strings (the program, then its "
                          "arguments), or one string")
    return value


def _communicate(process: subprocess.Popen, data: bytes, seconds: float) -> tuple[bytes, bytes]:
    """Send ``data``, then read stdout and stderr until they close or, once the program has
    exited, for OUTPUT_GRACE_SECONDS more: a child it left running in the background (``cmd &``
    in a script) may hold them open for as long as it lives. TimeoutExpired after ``seconds``."""
    deadline = time.monotonic() + seconds
    exited_at = None
    while True:
        now = time.monotonic()
        wait = deadline - now if exited_at is None else exited_at + OUTPUT_GRACE_SECONDS - now
        try:
            return process.communicate(data, timeout=max(0.0, min(wait, POLL_SECONDS)))
        except subprocess.TimeoutExpired as exc:
            data = None  # sent: communicate() goes on where it stopped
            if exited_at is None and process.poll() is not None:
                exited_at = time.monotonic()
            elif exited_at is not None and time.monotonic() >= exited_at + OUTPUT_GRACE_SECONDS:
                return exc.stdout or b"", exc.stderr or b""
            if exited_at is None and time.monotonic() >= deadline:
                raise


# The process groups of the programs running now: a worker that stops kills them (stop_all).
_groups: set[int] = set()
_groups_lock = threading.Lock()


@contextlib.contextmanager
def _running(process: subprocess.Popen) -> Iterator[None]:
    # Its job let go (a stop released it before stop_all takes this lock): killed before it
    # is sent the document, which would otherwise be stored for a job back in the queue.
    with _groups_lock:
        refused = abandoned()
        if not refused:
            _groups.add(process.pid)
    if refused:
        _kill_group(process)
        raise SinkError("killed at its start: the job is no longer this worker's")
    try:
        yield
    finally:
        with _groups_lock:
            _groups.discard(process.pid)


def stop_all() -> None:
    """Kill every sink program still running. For a worker that stops: it has put their jobs
    back in the queue, so an ingest finishing after that would be done again by the next run
    (the programs run in sessions of their own, which the daemon's SIGTERM does not reach).
    One starting now is killed by :func:`_running`: its job is let go already."""
    with _groups_lock:
        groups = list(_groups)
    _kill_groups(groups)


def programs_of(parents: list[int]) -> list[int]:
    """The sink programs that the processes ``parents`` started and that still run: their
    children leading sessions of their own (see _start; a worker's extraction processes do
    not). Takes no lock: a signal handler asks."""
    return [pid for pid, info in proc.children(parents).items() if info.session == pid]


def kill_programs_of(parents: list[int]) -> None:
    """Kill :func:`programs_of` ``parents`` from outside them (the daemon killing its worker
    processes at once, whose stop_all never runs): stop the parents first, or one may start
    another meanwhile."""
    _kill_groups(programs_of(parents))


def _kill_groups(groups: list[int]) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the program's process group and reap the program."""
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: group id == its pid
    except ProcessLookupError:
        pass
    process.wait()


def _exit_error(code: int, stderr: bytes) -> SinkError:
    """The failure of a finished run: its last stderr line, transient only for EX_TEMPFAIL."""
    lines = [line.strip() for line in stderr.decode("utf-8", errors="replace").splitlines()]
    last = next((line for line in reversed(lines) if line), "")
    reason = shorten(last) if last else f"{_how_it_ended(code)} (nothing on stderr)"
    return SinkError(reason, transient=code == EX_TEMPFAIL)


def _how_it_ended(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"killed by signal {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"
