"""`ingestd events`: recent events, replay after a sequence, and a live follow that switches from
the database to the daemon's socket (and back, and again) with no gap and no duplicate.

The command runs as the console script does, a real subprocess, against a real daemon subprocess,
its real socket and the real SQLite file."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from peewee import fn

from ingestd import db, jobs
from ingestd.events import installation_id, overflow_line, to_line
from ingestd.models import Event, EventSequence, Job, database

from conftest import run_cli, wait_for
from harness import Daemon, finish_all, open_db, write_config

# The command as the console script runs it; at info, the follower says on stderr when it
# switches between the daemon's socket and the database.
EVENTS = (sys.executable, "-m", "ingestd")
SOCKET_LOG = re.compile(r"\b(event_socket_[a-z_]+)\b")


class EventsCommand:
    """``ingestd events`` as a subprocess; a thread collects its stdout lines (unless
    ``read=False``)."""

    count = 0

    def __init__(self, config: Path, *args: str, read: bool = True) -> None:
        EventsCommand.count += 1
        self.stderr_path = config.parent / f"events-{EventsCommand.count}.err"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [*EVENTS, "-c", str(config), "events", "--log-level", "info", *args],
                stdout=subprocess.PIPE, stderr=stderr, text=True, encoding="utf-8")
        self.lines: list[str] = []
        self.reader: threading.Thread | None = None
        if read:
            self.start_reading()

    def start_reading(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def sequences(self) -> list[int]:
        return [int(json.loads(line)["sequence"]) for line in list(self.lines)]

    def wait_for_sequence(self, seq: int, timeout: float = 60) -> None:
        def reached() -> bool:
            lines = self.lines
            return bool(lines) and int(json.loads(lines[-1])["sequence"]) >= seq

        wait_for(lambda: reached() or self.process.poll() is not None, timeout,
                 message=f"sequence {seq} printed")
        code = self.process.poll()
        assert code is None, f"events exited {code}: {self.stderr()}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def socket_log(self) -> list[str]:
        """The follower's socket log events, in order (connected, unavailable, closed ...)."""
        return [found.group(1) for found in map(SOCKET_LOG.search, self.stderr().splitlines())
                if found]

    def socket_state(self) -> str | None:
        states = [s for s in self.socket_log()
                  if s in ("event_socket_connected", "event_socket_unavailable")]
        return states[-1] if states else None

    def finish(self, timeout: float = 60) -> int:
        """Wait for a command that ends by itself; its exit code."""
        code = self.process.wait(timeout=timeout)
        if self.reader is not None:
            self.reader.join(timeout)
        return code

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C, as a user stops ``-f``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.finish(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# --- fixtures and helpers ---------------------------------------------------------------------

class Site:
    """Two projects' folders, a config, the database bound in this process, and daemons."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders = {name: root / "drop" / name for name in ("acme", "other")}
        for folder in self.folders.values():
            folder.mkdir(parents=True)
        self.config = self.write_config()
        open_db(self.config)
        self.daemons: list[Daemon] = []
        self.commands: list[EventsCommand] = []

    def write_config(self, daemon_extra: str = "") -> Path:
        return write_config(self.root, f"""
            [daemon]
            state_dir = "state"
            workers = 2
            shutdown_grace_seconds = 5
            {daemon_extra}

            [defaults]
            settle_seconds = 0.2
            max_bytes = 1000000

            [projects.acme]
            folders = ["{self.folders['acme']}"]

            [projects.other]
            folders = ["{self.folders['other']}"]
        """)

    def daemon(self, daemon_extra: str = "") -> Daemon:
        """Start a daemon (with extra [daemon] keys); stopped when the test ends."""
        self.write_config(daemon_extra)
        running = Daemon(self.root, self.config).start()
        self.daemons.append(running)
        return running

    def events(self, *args: str, read: bool = True) -> EventsCommand:
        command = EventsCommand(self.config, *args, read=read)
        self.commands.append(command)
        return command

    def close(self) -> None:
        for command in self.commands:
            command.kill()
        finish_all(self.daemons)
        db.close_store()


@pytest.fixture
def site(tmp_path: Path):
    made = Site(tmp_path)
    yield made
    made.close()


def fake_event_socket(site: "Site") -> socket.socket:
    """A listener at the daemon's event socket path, played by the test instead of a daemon."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(site.config.parent / "state" / "events.sock"))
    listener.listen(4)
    listener.settimeout(30)
    return listener


def last_seq() -> int:
    return Event.select(fn.MAX(Event.seq)).scalar() or 0


def db_lines(after: int, upto: int) -> list[str]:
    """The database's events ``after < seq <= upto`` as the command must print them in JSON."""
    installation = installation_id()
    rows = Event.select().where((Event.seq > after) & (Event.seq <= upto)).order_by(Event.seq)
    return [to_line(row, installation) for row in rows]


def drop_files(folder: Path, prefix: str, count: int) -> list[Path]:
    paths = [folder / f"{prefix}{i:04d}.txt" for i in range(count)]
    for i, path in enumerate(paths):
        path.write_text(f"{prefix} file {i}")
    return paths


def completed(count: int, project: str | None = None) -> bool:
    query = Job.select().where(Job.status == "completed")
    if project is not None:
        query = query.where(Job.project_id == project)
    return query.count() >= count


def submit(site: Site, project: str, path: Path) -> None:
    """`ingestd jobs submit`: a job (and its event) written by the CLI, daemon up or down."""
    result = run_cli("jobs", "submit", "-p", project, str(path), config=site.config)
    assert result.returncode == 0, result.stderr


def completions(project: str, after: int) -> list[int]:
    """The sequences of ``project``'s job.completed events after ``after``."""
    query = Event.select(Event.seq).where((Event.seq > after) & (Event.type == jobs.JOB_COMPLETED)
                                          & (Event.project_id == project)).order_by(Event.seq)
    return [row.seq for row in query]


def reject(path: str, project: str = "acme") -> int:
    """An event written as the daemon writes a rejected file; its sequence."""
    return jobs.emit(jobs.FILE_REJECTED, {"path": path, "reason": "empty file"}, project_id=project)


def assert_exactly_once(command: EventsCommand, after: int) -> int:
    """Every sequence after ``after`` printed once, in order, as the database has it; the last."""
    printed = command.sequences()
    assert printed, command.stderr()
    last = printed[-1]
    assert printed == list(range(after + 1, last + 1))
    assert command.lines == db_lines(after, last)
    return last


def no_traceback(stderr: str) -> None:
    for sign in ("Traceback", "Exception ignored", "BrokenPipeError"):
        assert sign not in stderr, stderr


# --- the tests ---------------------------------------------------------------------------------

class TestFollow:
    def test_since_and_follow_in_the_middle_of_a_burst_prints_each_sequence_once(self, site):
        """Started mid-burst of 1,000 files, `--since N -f` prints N+1.. to the end, once, in order."""
        site.daemon()
        drop_files(site.folders["acme"], "burst", 1000)
        wait_for(lambda: last_seq() >= 400, timeout=60, message="the burst under way")
        since = last_seq() // 2
        follower = site.events("--since", str(since), "-f", "--json")
        wait_for(lambda: completed(1000), timeout=180, interval=0.2, message="1,000 completed")
        end = last_seq()
        follower.wait_for_sequence(end, timeout=60)
        # It replays from the database until it has caught up, then connects: on a loaded
        # machine that can come just after the last line it printed.
        wait_for(lambda: follower.socket_state() == "event_socket_connected", timeout=30,
                 message="following on the socket")
        assert follower.interrupt() == 130
        assert assert_exactly_once(follower, since) >= end
        no_traceback(follower.stderr())

    def test_follow_polls_while_the_daemon_is_down_then_uses_its_socket(self, site):
        """Daemon down: the database is polled; daemon up, restarted: the socket; never a gap."""
        early = drop_files(site.folders["acme"], "early", 2)
        for path in early:
            submit(site, "acme", path)
        follower = site.events("--since", "0", "-f", "--json")
        follower.wait_for_sequence(last_seq())
        wait_for(lambda: follower.socket_state() == "event_socket_unavailable",
                 message="the follower polling")
        late = drop_files(site.folders["acme"], "late", 1)[0]
        submit(site, "acme", late)
        follower.wait_for_sequence(last_seq())  # seen by polling alone

        running = site.daemon()
        wait_for(lambda: follower.socket_state() == "event_socket_connected",
                 message="the follower on the socket")
        drop_files(site.folders["acme"], "live", 30)
        wait_for(lambda: completed(33), timeout=60, message="33 completed")
        follower.wait_for_sequence(last_seq())

        running.stop()
        wait_for(lambda: follower.socket_state() == "event_socket_unavailable",
                 message="the follower back to polling")
        while_down = drop_files(site.folders["other"], "down", 1)[0]
        submit(site, "other", while_down)
        follower.wait_for_sequence(last_seq())
        running.start()
        wait_for(lambda: follower.socket_state() == "event_socket_connected",
                 message="the follower reconnected")
        drop_files(site.folders["acme"], "again", 30)
        wait_for(lambda: completed(64), timeout=60, message="64 completed")
        end = last_seq()
        follower.wait_for_sequence(end)

        assert follower.interrupt() == 130
        assert assert_exactly_once(follower, 0) >= end
        assert follower.socket_log().count("event_socket_connected") >= 2
        no_traceback(follower.stderr())

    def test_a_follower_dropped_for_overflow_reconnects_and_fills_the_gap(self, site):
        """A follower that stops reading is cut off by the daemon; it resumes from the database."""
        site.daemon("subscriber_buffer_bytes = 65536")
        since = last_seq()
        follower = site.events("--since", str(since), "-f", "--json", read=False)
        wait_for(lambda: follower.socket_state() == "event_socket_connected", message="following")
        drop_files(site.folders["acme"], "flood", 1000)  # ~2 MB of events: stdout is not read
        wait_for(lambda: completed(1000), timeout=180, interval=0.2, message="1,000 completed")
        end = last_seq()
        follower.start_reading()
        follower.wait_for_sequence(end)
        assert "event_socket_overflow" in follower.socket_log(), follower.stderr()
        assert follower.interrupt() == 130
        assert assert_exactly_once(follower, since) >= end

    def test_a_stream_that_skips_ahead_is_filled_from_the_database(self, site):
        """Whatever the socket does (skip, repeat, garble, overflow), each sequence prints once."""
        listener = fake_event_socket(site)
        for i in range(10):
            reject(f"/drop/acme/before{i}.txt")
        installation = installation_id()

        def sent(*seqs: int) -> bytes:
            return b"".join((to_line(Event.get_by_id(seq), installation) + "\n").encode()
                            for seq in seqs)

        try:
            follower = site.events("--since", "0", "-f", "--json")
            first, _ = listener.accept()
            with Repeating(first, sent(5)):  # a repeat, often: the socket never looks idle,
                follower.wait_for_sequence(10)  # so only the gap fill can find 12..14
                first.sendall(sent(reject("/drop/acme/in-order.txt")))
                follower.wait_for_sequence(11)
                with database.atomic():
                    for i in range(9):
                        reject(f"/drop/acme/skipped{i}.txt")  # 12..20, committed, then "published"
                first.sendall(b"{not json\n" + sent(15, 16, 17, 18, 19, 20))
                follower.wait_for_sequence(20)
            first.sendall((overflow_line(installation, 20) + "\n").encode())
            second, _ = listener.accept()  # dropped: the follower comes back
            second.sendall(sent(reject("/drop/acme/after.txt")))
            follower.wait_for_sequence(21)
        finally:
            listener.close()
        assert follower.interrupt() == 130
        assert assert_exactly_once(follower, 0) == 21
        assert ["event_socket_gap", "event_socket_overflow"] == [
            name for name in follower.socket_log() if name in ("event_socket_gap",
                                                              "event_socket_overflow")]

    def test_a_socket_of_another_database_is_not_trusted(self, site):
        """Lines from a daemon of another database are ignored: the follower polls its own."""
        listener = fake_event_socket(site)
        for i in range(3):
            reject(f"/drop/acme/mine{i}.txt")
        try:
            follower = site.events("--since", "0", "-f", "--json")
            peer, _ = listener.accept()
            follower.wait_for_sequence(3)
            stranger = Event(seq=4, type=jobs.FILE_REJECTED, project_id="acme", time=0,
                             data='{"path":"/elsewhere.txt","reason":"not ours"}')
            peer.sendall((to_line(stranger, "another-installation") + "\n").encode())
            wait_for(lambda: "event_socket_foreign" in follower.socket_log(), message="refused")
            reject("/drop/acme/mine3.txt")
            follower.wait_for_sequence(4)
        finally:
            listener.close()
        assert follower.interrupt() == 130
        assert follower.lines == db_lines(0, 4)


class Repeating:
    """Sends ``data`` on ``sock`` every 50 ms from a thread, while in the ``with`` block."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        self.sock, self.data = sock, data
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.sock.sendall(self.data)
            self.stop.wait(0.05)

    def __enter__(self) -> "Repeating":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)

class TestFilters:
    def test_type_and_project_select_events_in_a_replay(self, site):
        """`--type io.ingestd.job.completed -p acme` prints exactly acme's completed events."""
        site.daemon()
        drop_files(site.folders["acme"], "a", 3)
        drop_files(site.folders["other"], "o", 2)
        wait_for(lambda: completed(5), message="5 completed")
        command = site.events("--since", "0", "--type", "io.ingestd.job.completed", "-p", "acme",
                              "--json")
        assert command.finish() == 0, command.stderr()
        expected = completions("acme", after=0)
        assert command.sequences() == expected and len(expected) == 3
        assert all(json.loads(line)["source"].endswith(":project:acme") for line in command.lines)
        unknown = site.events("--since", "0", "-p", "nope")
        assert unknown.finish() == 3 and "unknown project 'nope'" in unknown.stderr()

    def test_several_patterns_and_short_names_match(self, site):
        """Several --type globs add up; a short name (`daemon.*`) matches as the readable form shows."""
        site.daemon()
        drop_files(site.folders["other"], "o", 2)
        wait_for(lambda: completed(2), message="2 completed")
        command = site.events("--since", "0", "--type", "io.ingestd.job.c*", "--type", "daemon.*",
                              "--json")
        assert command.finish() == 0, command.stderr()
        expected = [row.seq for row in Event.select().order_by(Event.seq)
                    if row.type in (jobs.JOB_CREATED, jobs.JOB_COMPLETED, jobs.DAEMON_STARTED)]
        assert command.sequences() == expected and len(expected) == 5

    def test_a_filtered_follow_skips_what_it_hides_and_still_continues(self, site):
        """Live, filtered: only acme's completions appear, each once, after hidden events."""
        site.daemon()
        follower = site.events("-f", "--type", "io.ingestd.job.completed", "-p", "acme",
                               "--json")
        wait_for(lambda: follower.socket_state() == "event_socket_connected", message="following")
        start = last_seq()
        drop_files(site.folders["other"], "hidden", 5)
        drop_files(site.folders["acme"], "shown", 3)
        wait_for(lambda: completed(8), message="8 completed")
        wait_for(lambda: len(follower.lines) >= 3, message="3 completions printed")
        drop_files(site.folders["acme"], "zz-barrier", 1)
        wait_for(lambda: len(follower.lines) >= 4, message="the barrier printed")
        assert follower.interrupt() == 130
        expected = completions("acme", after=start)
        assert follower.sequences() == expected and len(expected) == 4


def assert_since_refused(site: "Site", since: int, *reasons: str) -> None:
    """`--since N`, with and without -f: exit 1, nothing printed, the reasons on stderr."""
    for args in (["--since", str(since)], ["--since", str(since), "-f"]):
        command = site.events(*args, "--json")
        assert command.finish() == 1
        stderr = command.stderr()
        assert all(reason in stderr for reason in reasons), stderr
        assert command.lines == [] and "Traceback" not in stderr


class TestReplay:
    def test_since_before_the_retained_range_is_gone(self, site):
        """Pruned events cannot be replayed: exit 1 with a one-line reason naming the resume point."""
        for i in range(10):
            reject(f"/drop/acme/old{i}.txt")
        database.execute_sql("DELETE FROM ingest_events WHERE seq <= 5")  # as prune() deletes
        assert_since_refused(site, 2, "events after sequence 2 are gone", "--since 5")
        command = site.events("--since", "5", "--json")
        assert command.finish() == 0
        assert command.sequences() == [6, 7, 8, 9, 10]

    def test_a_follower_across_a_restore_says_so_instead_of_skipping(self, site):
        """The database goes back to a backup taken after event 3 (events 4 and 5 gone, the
        counter back at 3), then gets new events 4..7: other events than the 4 and 5 printed.
        The follower must not skip 4..5 as seen: it ends (exit 1) saying what happened."""
        for i in range(5):
            reject(f"/drop/acme/before{i}.txt")
        follower = site.events("--since", "0", "-f", "--json")
        follower.wait_for_sequence(5)
        with database.atomic():  # what restoring the backup does to the outbox
            database.execute_sql("DELETE FROM ingest_events WHERE seq > 3")
            EventSequence.update(last_seq=3).execute()
        for i in range(4):
            reject(f"/drop/acme/after{i}.txt")
        assert follower.finish() == 1
        assert "restored from a backup or replaced while following" in follower.stderr()
        assert follower.sequences() == [1, 2, 3, 4, 5]

    def test_since_past_the_last_event_is_refused(self, site):
        """A resume point the database never reached (restored from a backup since): its next
        events would be skipped silently, so it is refused, naming where to resume."""
        for i in range(3):
            reject(f"/drop/acme/r{i}.txt")
        assert_since_refused(site, 9, "there is no event 9: the last is 3", "--since 3")
        assert site.events("--since", "3", "--json").finish() == 0

    def test_without_flags_the_last_20_events(self, site):
        """No --since, no -f: the newest 20 retained events, oldest first; filters look further back."""
        started = jobs.emit(jobs.DAEMON_STARTED, {"pid": 4242})
        for i in range(30):
            reject(f"/drop/acme/r{i}.txt")
        command = site.events("--json")
        assert command.finish() == 0, command.stderr()
        assert command.sequences() == list(range(last_seq() - 19, last_seq() + 1))
        command = site.events("--type", "daemon.*", "--json")
        assert command.finish() == 0
        assert command.sequences() == [started]
        command = site.events("--type", "io.ingestd.file.*", "-p", "acme", "--json")
        assert command.finish() == 0
        assert command.sequences() == list(range(last_seq() - 19, last_seq() + 1))
        for none in (["--type", "job.failed"], ["--type", "daemon.*", "-p", "acme"]):
            command = site.events(*none, "--json")
            assert command.finish() == 0 and command.sequences() == [], none

    def test_follow_alone_prints_the_last_20_then_what_comes(self, site):
        """-f without --since starts as `tail -f` does: the newest 20, then live ones."""
        for i in range(30):
            reject(f"/drop/acme/r{i}.txt")
        recent = list(range(last_seq() - 19, last_seq() + 1))
        follower = site.events("-f", "--json")
        wait_for(lambda: len(follower.lines) >= 20, message="the last 20 printed")
        later = reject("/drop/acme/later.txt")
        follower.wait_for_sequence(later)
        assert follower.interrupt() == 130
        assert follower.sequences() == [*recent, later]

    def test_readable_output_is_one_line_per_event(self, site):
        """Text output: one line per event, sequence first, short type, the facts; names escaped."""
        running = site.daemon()
        [path] = drop_files(site.folders["acme"], "readable", 1)
        wait_for(lambda: completed(1), message="completed")
        reject("/drop/acme/bad\nname\x1b.txt")
        code, lines = on_terminal(site.config, "--since", "0")
        assert code == 0
        rows = list(Event.select().order_by(Event.seq))
        assert len(lines) == len(rows)
        for line, row in zip(lines, rows):
            assert re.match(r"^\d{20} \d{4}-\d\d-\d\dT[\d:.]+Z \S+ \S+", line), line
            assert line.startswith(f"{row.seq:020d} ") and "io.ingestd." not in line
            assert line.split(" ")[2] == row.type.removeprefix("io.ingestd.")
        job = Job.get(Job.source_path == str(path))
        by_type = {line.split(" ")[2]: line for line in lines}
        assert by_type["job.completed"].endswith(f" job.completed acme #{job.id} {path} completed")
        assert by_type["daemon.started"].endswith(f" pid {running.process.pid}")
        assert by_type["file.rejected"].endswith(r" acme /drop/acme/bad\nname\x1b.txt: empty file")

    def test_json_is_the_default_when_stdout_is_not_a_terminal(self, site):
        """Piped without --json: the raw CloudEvents lines, byte for byte."""
        for i in range(3):
            reject(f"/drop/acme/j{i}.txt")
        command = site.events("--since", "0")
        assert command.finish() == 0
        assert command.lines == db_lines(0, 3)

    def test_readable_lines_are_the_default_on_a_terminal(self, site):
        """On a terminal, without --json: readable lines, not JSON."""
        seq = reject("/drop/acme/tty.txt")
        code, lines = on_terminal(site.config, "--since", "0")
        assert code == 0
        assert lines == [
            f"{seq:020d} {json.loads(db_lines(0, 1)[0])['time']} file.rejected acme "
            "/drop/acme/tty.txt: empty file"]


def on_terminal(config: Path, *args: str) -> tuple[int, list[str]]:
    """``ingestd events ARGS`` with its stdout on a pseudo-terminal: its exit code and lines."""
    master, slave = pty.openpty()
    process = subprocess.Popen([*EVENTS, "-c", str(config), "events", *args], stdout=slave,
                               stderr=subprocess.DEVNULL)
    os.close(slave)
    output = read_terminal(master, process)
    return process.wait(timeout=30), output.decode().splitlines()


def read_terminal(master: int, process: subprocess.Popen, timeout: float = 30) -> bytes:
    """Everything written to a pseudo-terminal until its writer exits (or the deadline)."""
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the writer closed its side
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    return output


class TestPipes:
    def test_a_reader_closing_early_ends_the_replay_quietly(self, site):
        """`ingestd events --since 0 | head -1`: exit 0, nothing on stderr about the pipe."""
        with database.atomic():
            for i in range(1500):
                reject(f"/drop/acme/pipe{i:04d}-{'x' * 200}.txt")
        command = site.events("--since", "0", "--json", read=False)
        first = command.process.stdout.readline()
        command.process.stdout.close()
        assert json.loads(first)["sequence"] == f"{1:020d}"
        assert command.finish() == 0
        no_traceback(command.stderr())

    @pytest.mark.parametrize("backlog", [1500, 3])
    def test_a_reader_closing_early_ends_a_follow_quietly(self, site, backlog):
        """`ingestd events -f | head -1` ends when head does: on the next write, or while idle."""
        with database.atomic():
            for i in range(backlog):
                reject(f"/drop/acme/follow{i:04d}-{'x' * 200}.txt")
        command = site.events("--since", "0", "-f", "--json", read=False)
        assert json.loads(command.process.stdout.readline())["sequence"] == f"{1:020d}"
        command.process.stdout.close()
        assert command.finish(timeout=30) == 0
        no_traceback(command.stderr())


def test_the_real_cli_replays_and_follows(site):
    """`ingestd events --since N` and `ingestd events -f` as the console script runs them."""
    first = jobs.emit(jobs.DAEMON_STARTED, {"pid": 1})
    reject("/drop/acme/cli.txt")
    replay = run_cli("events", "--since", str(first - 1), "--json", config=site.config)
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.splitlines() == db_lines(first - 1, last_seq())
    env = {k: v for k, v in os.environ.items() if k != "INGESTD_CONFIG"}
    follower = subprocess.Popen([sys.executable, "-m", "ingestd", "-c", str(site.config), "events",
                                 "-f", "--since", str(last_seq())], stdout=subprocess.PIPE,
                                text=True, env=env)
    try:
        after = last_seq()
        expected = jobs.emit(jobs.DAEMON_STOPPING, {"pid": 1})
        ready, _, _ = select.select([follower.stdout], [], [], 30)
        assert ready, "the follower printed nothing"
        line = follower.stdout.readline()
        assert json.loads(line)["sequence"] == str(expected).zfill(20) and expected == after + 1
    finally:
        follower.terminate()
        follower.wait(timeout=30)
    gone = run_cli("events", "--since", "-5", config=site.config)
    assert gone.returncode == 2
