"""The daemon as a real subprocess, with a fake systemd notify socket to know when it is ready."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Sequence

from ingestd import db
from ingestd.models import Document, Event, Job

from conftest import wait_for
from proctree import descendants


class NotifySocket:
    """Records sd_notify datagrams, as systemd would receive them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30,
                 alive: Callable[[], bool] = lambda: True) -> str:
        """The first message (new or already received) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if predicate(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not alive():
                raise AssertionError(f"no matching sd_notify message in {timeout}s "
                                     f"(sender alive: {alive()}): {self.messages[-5:]}")
            self.sock.settimeout(min(remaining, 0.5))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """``python -m ingestd -c CONFIG run`` with its stderr in a log file."""

    def __init__(self, root: Path, config: Path, env: dict[str, str] | None = None,
                 log_level: str = "info", wrapper: Sequence[str] = (),
                 own_group: bool = False) -> None:
        self.root, self.config, self.log_level = root, config, log_level
        self.wrapper = list(wrapper)  # a command that runs the daemon (setpriv ...)
        self.own_group = own_group  # leads a process group of its own (see signal_group)
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None
        self.notify: NotifySocket | None = None
        self.log_path = root / "daemon.log"
        self.starts = 0
        self._log_start = 0  # where this run's lines begin in the log
        self._ended_by_test = False  # stop() or kill(): the test looked at how it ended

    def start(self, wait_ready: bool = True) -> "Daemon":
        self.starts += 1
        self._ended_by_test = False
        self.notify = NotifySocket(self.root / f"notify-{self.starts}.sock")
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **self.extra_env}
        env.pop("INGESTD_CONFIG", None)
        log = open(self.log_path, "ab")
        self._log_start = log.tell()
        self.process = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "ingestd", "-c", str(self.config), "run",
             "--log-level", self.log_level],
            stdout=log, stderr=log, env=env, cwd=self.root,
            process_group=0 if self.own_group else None)
        log.close()
        if wait_ready:
            try:
                self.notify.wait_for(lambda m: "READY=1" in m, alive=lambda: self.alive)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{self.log()[-2000:]}") from None
        return self

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def signal_group(self, number: int) -> None:
        """Signal the daemon's whole process group, its worker and extraction processes with
        it, as a shell's ``kill %1`` or ``timeout`` does (needs ``own_group``)."""
        assert self.process is not None and self.own_group
        os.killpg(self.process.pid, number)

    def stop(self, timeout: float = 60, expect: int | None = 0) -> int:
        """SIGTERM and wait; the exit code, which must be ``expect`` (None: any). Whatever the
        code (a refused start exits 1 with a line saying why), the log must be clean."""
        if self.process is None:
            return 0
        self._ended_by_test = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self.notify:
                self.notify.close()
        unclean = self.unclean_lines()
        assert not unclean, "\n".join(unclean)
        assert expect is None or code == expect, \
            f"the daemon exited with {code}, not {expect}:\n{self.log()[-3000:]}"
        return code

    def finish(self) -> None:
        """A fixture's end: a daemon the test left running (or that ended on its own) must
        stop with exit 0 and a clean log. One the test stopped or killed itself, it checked."""
        if self.process is not None and not self._ended_by_test:
            self.stop()

    def unclean_lines(self) -> list[str]:
        """This run's log lines that a clean run never writes: an uncaught exception (a bare
        traceback, outside structlog; one in a thread; one Python could only ignore), a worker
        process killed at stop."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            lines = log.read().decode(errors="replace").splitlines()
        bare = ("Traceback", "Exception in thread", "Exception ignored")
        return [line for line in lines
                if line.startswith(bare) or "worker_process_killed" in line]

    def kill(self, with_children: bool = False) -> None:
        """SIGKILL the daemon; ``with_children``: its worker processes too, as when the whole
        node goes down (alone, the workers see it gone and re-queue their jobs)."""
        assert self.process is not None
        self._ended_by_test = True
        children = descendants(self.process.pid) if with_children else []
        self.process.kill()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        if self.notify:
            self.notify.close()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def finish_all(daemons: list[Daemon]) -> None:
    """Finish every daemon (see :meth:`Daemon.finish`), all of them even when one fails; then
    the first failure."""
    failures = []
    for daemon in daemons:
        try:
            daemon.finish()
        except AssertionError as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


def node_config(root: Path, name: str, url: str, shared: Path, extra: str = "",
                sink: str = "", project: str = "acme") -> Path:
    """A config for node ``name``: its own state, log and socket; the shared folder and database
    (as ``project``)."""
    home = root / name
    home.mkdir(exist_ok=True)
    return write_config(home, f"""
        [daemon]
        state_dir = "state"
        database = "{url}"
        workers = 2
        lease_seconds = 2
        shutdown_grace_seconds = 5

        [defaults]
        settle_seconds = 0.3
        {extra}

        [projects.{project}]
        folders = ["{shared}"]
        {sink}
    """)


def write_config(root: Path, body: str) -> Path:
    path = root / "ingestd.toml"
    path.write_text(textwrap.dedent(body))
    return path


def open_db(config: Path) -> None:
    """Bind the test process's models to the daemon's database (read mostly)."""
    from ingestd import config as config_mod

    db.open_store(config_mod.load(config).daemon.database)


def jobs_for(path: Path) -> list[Job]:
    return list(Job.select().where(Job.source_path == str(path)).order_by(Job.id))


def wait_job(path: Path, status: str = "completed", timeout: float = 30) -> Job:
    """The job of ``path`` once it reached ``status``."""

    def reached() -> Job | None:
        found = [job for job in jobs_for(path) if job.status == status]
        return found[-1] if found else None

    return wait_for(reached, timeout, message=f"{path.name} {status}")


def wait_ended(path: Path, timeout: float = 30) -> Job:
    """The job of ``path`` once it ended (completed, failed or cancelled)."""

    def ended() -> Job | None:
        found = [job for job in jobs_for(path)
                 if job.status in ("completed", "failed", "cancelled")]
        return found[-1] if found else None

    return wait_for(ended, timeout, message=f"{path.name} ended")


def document_text(job: Job) -> str:
    return Document.get_by_id(job.canonical_document_id).text


def events_of_type(event_type: str) -> list[Event]:
    return list(Event.select().where(Event.type == event_type).order_by(Event.seq))


# --- claim races -----------------------------------------------------------------------------

def _claimer(url: str, owner: str, limit: int, start, results) -> None:
    from ingestd import jobs

    db.open_store(url)
    start.wait()  # everyone ready: the race starts together
    mine: list[int] = []
    while batch := jobs.claim(owner, limit=limit):
        for job in batch:
            jobs.complete(job.id, owner)
            mine.append(job.id)
    results.put(mine)


def claim_race(url: str, processes: int, limit: int) -> list[list[int]]:
    """``processes`` real processes claim (and complete) until the queue is empty; the job ids
    each one won."""
    spawn = mp.get_context("spawn")
    start, results = spawn.Barrier(processes), spawn.Queue()
    workers = [spawn.Process(target=_claimer, args=(url, f"w{n}", limit, start, results))
               for n in range(processes)]
    for worker in workers:
        worker.start()
    won = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    return won
