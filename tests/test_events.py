"""Publishing: the outbox reaches the event log and the socket exactly once, in order, through
kills, rotation and slow subscribers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ingestd import db, jobs, publish
from ingestd.events import EventRow, format_sequence, installation_id, source_uri, to_line
from ingestd.models import Event, Job, database
from ingestd.publish import Publisher
from ingestd.stream import EventStream

import corpus
from conftest import run_cli, wait_for
from harness import Daemon, finish_all, open_db, wait_job, write_config

REQUIRED = {"specversion": str, "id": str, "source": str, "type": str, "time": str,
            "datacontenttype": str, "sequence": str, "data": dict}


def config_text(root: Path, extra: str = "") -> str:
    drop = root / "drop"
    drop.mkdir(exist_ok=True)
    return f"""
        [daemon]
        state_dir = "state"
        workers = 2
        shutdown_grace_seconds = 5
        {extra}

        [defaults]
        settle_seconds = 0.2
        max_bytes = 100000000

        [projects.acme]
        folders = ["{drop}"]
    """


@pytest.fixture
def start(tmp_path):
    """Start a daemon (extra [daemon] keys allowed); stopped after the test."""
    started: list[Daemon] = []

    def make(extra: str = "") -> Daemon:
        running = Daemon(tmp_path, write_config(tmp_path, config_text(tmp_path, extra))).start()
        started.append(running)
        open_db(running.config)
        return running

    yield make
    finish_all(started)
    db.close_store()


class Subscriber:
    """A socket client reading in a thread (or not reading at all). The thread only receives
    bytes, the lines are parsed when asked for: a reader that parsed as it read fell over 1 MB
    behind a burst on a loaded machine, and the daemon rightly cut it off as stuck."""

    def __init__(self, path: Path, read: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self._received: list[bytes] = []
        self._lock = threading.Lock()
        self._parsed: list[dict] = []
        self._rest = b""  # a line received in part
        self.closed = threading.Event()
        if read:
            threading.Thread(target=self.read_all, daemon=True).start()

    def read_all(self) -> None:
        while chunk := self.sock.recv(1 << 20):
            with self._lock:
                self._received.append(chunk)
        self.closed.set()

    @property
    def lines(self) -> list[dict]:
        """The events received so far, whole lines only."""
        with self._lock:
            data, self._received = self._rest + b"".join(self._received), []
            whole, _, self._rest = data.rpartition(b"\n")
            self._parsed.extend(json.loads(line) for line in whole.splitlines())
            return list(self._parsed)

    def sequences(self) -> list[int]:
        return [int(event["sequence"]) for event in self.lines
                if event["type"] != "io.ingestd.stream.overflow"]


def last_seq() -> int:
    return Event.select(Event.seq).order_by(Event.seq.desc()).first().seq


def log_sequences(path: Path) -> list[int]:
    """The sequences of the log's whole lines (the last may still be being written)."""
    whole = path.read_text().rpartition("\n")[0]
    return [int(json.loads(line)["sequence"]) for line in whole.splitlines()]


def drop_files(folder: Path, count: int, prefix: str = "f") -> None:
    for i in range(count):
        (folder / f"{prefix}{i:05d}.txt").write_text(f"{prefix} {i}")


def completed() -> int:
    return Job.select().where(Job.status == "completed").count()


def test_a_subscriber_sees_every_event_of_5000_jobs_in_order(start, tmp_path):
    """Every sequence from the first received to the last committed, once each, in order."""
    daemon = start()
    subscriber = Subscriber(daemon.root / "state" / "events.sock")
    drop_files(tmp_path / "drop", 5000)
    wait_for(lambda: completed() == 5000, timeout=120, interval=0.2, message="5,000 completed")
    final = last_seq()
    wait_for(lambda: subscriber.sequences() and subscriber.sequences()[-1] >= final, timeout=30,
             message="the subscriber caught up")
    got = subscriber.sequences()
    assert got == list(range(got[0], final + 1))
    completed_events = [e for e in subscriber.lines if e["type"] == "io.ingestd.job.completed"]
    assert len(completed_events) == 5000


def test_a_subscriber_that_never_reads_is_dropped_with_an_overflow_line(start, tmp_path):
    """Processing never waits for a stuck subscriber: it gets an overflow line and is cut off."""
    daemon = start("subscriber_buffer_bytes = 1048576")
    sock_path = daemon.root / "state" / "events.sock"
    stuck = Subscriber(sock_path, read=False)
    reader = Subscriber(sock_path)
    drop_files(tmp_path / "drop", 5000)
    wait_for(lambda: completed() == 5000, timeout=120, interval=0.2, message="5,000 completed")
    stuck.sock.settimeout(60)  # a daemon that never cut it off: a timeout, not a hung suite
    stuck.read_all()  # now read what it was sent: lines, then the overflow notice, then EOF
    assert stuck.lines[-1]["type"] == "io.ingestd.stream.overflow"
    received = stuck.sequences()
    notice = int(stuck.lines[-1]["data"]["last_sequence"])
    assert notice == (received[-1] if received else 0)
    assert received == list(range(received[0], received[0] + len(received))) if received else True
    wait_for(lambda: reader.sequences() and reader.sequences()[-1] >= last_seq(), timeout=30,
             message="the reading subscriber caught up")
    assert reader.lines[-1]["type"] != "io.ingestd.stream.overflow"


def numbered_lines(count: int, size: int) -> list[tuple[int, str]]:
    """``count`` event-like lines of about ``size`` bytes, sequences 1..count."""
    return [(seq, json.dumps({"type": "io.ingestd.test", "sequence": format_sequence(seq),
                              "pad": "x" * size})) for seq in range(1, count + 1)]


@pytest.fixture
def stream(tmp_path):
    """An event socket served on its own, 20 KB of buffer per subscriber."""
    served = EventStream(tmp_path / "events.sock", 0o600, "test-installation", 20_000)
    served.start()
    yield served
    served.stop()


def test_a_batch_larger_than_the_buffer_reaches_a_subscriber_that_keeps_up(stream):
    """One batch of 100 KB (a backlog published at once) to a subscriber with nothing queued:
    it is not behind, so it gets every line, not an overflow notice."""
    subscriber = Subscriber(stream.path)
    wait_for(lambda: stream.subscribers == 1, message="the subscriber accepted")
    stream.publish(numbered_lines(100, 1000))
    wait_for(lambda: len(subscriber.lines) >= 100, message="100 lines received")
    assert subscriber.sequences() == list(range(1, 101))


def test_a_stop_ends_each_subscriber_on_a_whole_line_saying_what_it_missed(stream):
    """A slow subscriber at a stop gets a moment to read what is queued; then its connection
    ends on a whole line, and if events were left, with the overflow notice naming the last
    one it got (from where `ingestd events --since` resumes)."""
    stream.buffer_bytes = 10_000_000
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    client.connect(str(stream.path))
    wait_for(lambda: stream.subscribers == 1, message="the subscriber accepted")
    received = bytearray()

    def read_slowly() -> None:  # under 1 MB/s: 5 MB take longer than a stop waits
        while chunk := client.recv(1024):
            received.extend(chunk)
            time.sleep(0.001)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    stream.publish(numbered_lines(5000, 1000))
    stream.stop()
    reader.join(30)
    assert received.endswith(b"\n")
    lines = [json.loads(line) for line in received.decode().splitlines()]
    sequences = [int(line["sequence"]) for line in lines if line["type"] == "io.ingestd.test"]
    assert sequences == list(range(1, len(sequences) + 1))
    if len(sequences) < 5000:
        assert lines[-1]["type"] == "io.ingestd.stream.overflow"
        assert int(lines[-1]["data"]["last_sequence"]) == sequences[-1]
        assert lines[-1]["data"]["reason"].startswith("the daemon stopped")


def test_sigkill_between_commit_and_publish_then_restart_logs_every_event_once(start, tmp_path):
    """Events committed while no publisher ran, or before a kill, appear once after restart."""
    daemon = start()
    drop_files(tmp_path / "drop", 800)
    wait_for(lambda: completed() >= 100, timeout=60, message="some completed")
    daemon.kill(with_children=True)
    # Committed with no daemon at all: a job made by the CLI.
    (tmp_path / "drop" / "while-down.txt").write_text("cli")
    assert run_cli("jobs", "submit", "-p", "acme", str(tmp_path / "drop" / "while-down.txt"),
                   config=daemon.config).returncode == 0
    daemon.start()
    wait_for(lambda: completed() == 801, timeout=120, message="all completed")
    final = last_seq()
    event_log = daemon.root / "state" / "events.jsonl"
    wait_for(lambda: log_sequences(event_log)[-1] == final, timeout=30, message="log caught up")
    assert log_sequences(event_log) == list(range(1, final + 1))


def test_the_clis_cancel_shows_up_on_the_socket(start, tmp_path):
    """A change made by another process (the CLI) is published by the running daemon."""
    daemon = start()
    subscriber = Subscriber(daemon.root / "state" / "events.sock")
    path = tmp_path / "drop" / "long.pdf"
    corpus.make_pdf(path, [f"page {i} lorem ipsum" for i in range(12_000)])
    job = wait_job(path, "running")
    assert run_cli("jobs", "cancel", "-p", "acme", str(job.id), config=daemon.config).returncode == 0
    wait_for(lambda: any(e["type"] == "io.ingestd.job.cancelled" and e["subject"] == str(job.id)
                         for e in subscriber.lines), timeout=30, message="cancelled on the socket")
    types = [e["type"] for e in subscriber.lines if e.get("subject") == str(job.id)]
    assert "io.ingestd.job.cancel_requested" in types


@pytest.mark.parametrize("use_sigusr1", [True, False])
def test_rotation_by_rename_loses_no_line(start, tmp_path, use_sigusr1):
    """logrotate without copytruncate: renamed away (with or without SIGUSR1), nothing lost."""
    daemon = start()
    event_log = daemon.root / "state" / "events.jsonl"
    drop_files(tmp_path / "drop", 300, "a")
    wait_for(lambda: completed() >= 50, timeout=60, message="some completed")
    rotated = event_log.with_name("events.jsonl.1")
    os.rename(event_log, rotated)
    if use_sigusr1:
        daemon.signal(signal.SIGUSR1)
    drop_files(tmp_path / "drop", 300, "b")
    wait_for(lambda: completed() == 600, timeout=60, message="all completed")
    final = last_seq()
    wait_for(lambda: event_log.exists() and log_sequences(event_log)[-1] == final, timeout=30,
             message="new log caught up")
    assert log_sequences(rotated) + log_sequences(event_log) == list(range(1, final + 1))


def test_event_log_lines_are_valid_cloudevents(start, tmp_path):
    """Each line is one JSON object with the required CloudEvents attributes and types."""
    daemon = start()
    (tmp_path / "drop" / "x.txt").write_text("x")
    wait_job(tmp_path / "drop" / "x.txt")
    event_log = daemon.root / "state" / "events.jsonl"
    wait_for(lambda: len(log_sequences(event_log)) >= 4, message="events in the log")
    for line in event_log.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        for name, kind in REQUIRED.items():
            assert isinstance(event[name], kind), (name, event)
        assert event["specversion"] == "1.0" and event["type"].startswith("io.ingestd.")
        assert event["datacontenttype"] == "application/json"
        assert event["time"].endswith("Z") and len(event["sequence"]) == 20
        assert event["id"].startswith(f"{installation_id()}-{int(event['sequence'])}-")
        if event["type"].startswith("io.ingestd.job."):
            assert event["subject"] == str(event["data"]["id"])
            assert event["source"].endswith(":project:acme")


@pytest.mark.parametrize("project, shown", [("acme", "acme"), ("Team A #1", "Team%20A%20%231"),
                                             ("a:b/ü", "a%3Ab%2F%C3%BC")])
def test_a_project_name_is_percent_encoded_in_source(project, shown):
    """The source is a URI-reference (CloudEvents): a space or "#" in a project's name made
    it none. `events -p NAME` reads the name back from it."""
    from ingestd.follow import project_of

    source = source_uri("inst", project)
    assert source == f"urn:ingestd:inst:project:{shown}"
    assert project_of(source) == project


@pytest.mark.parametrize("project, path", [
    ("acme", "/drop/acme/plain.txt"),
    ('qu"ote\\back', '/drop/"tab\there"\n\u00e9\u6f22\U0001f600\x01.txt'),
])
@pytest.mark.parametrize("kind, job_id", [("io.ingestd.job.completed", 42),
                                          ("io.ingestd.file.rejected", None),
                                          ("io.ingestd.daemon.started", None)])
def test_a_line_is_the_json_dump_of_its_envelope(project, path, kind, job_id):
    """to_line builds the line as a string (it runs for every event): it must say exactly what
    json.dumps of the envelope says, escapes included, attributes in the same order."""
    data = json.dumps({"path": path, "reason": "r"} if job_id is None else {"id": job_id},
                      ensure_ascii=False, separators=(",", ":"))
    row = EventRow(1234, kind, None if kind.endswith("started") else project, job_id,
                   1733320000.123456, data)
    envelope = {"specversion": "1.0", "id": f"inst\u00e9-{row.seq}-1733320000123456",
                "source": source_uri("inst\u00e9", row.project_id), "type": kind,
                "time": jobs.rfc3339(row.time), "datacontenttype": "application/json",
                "sequence": format_sequence(row.seq)}
    subject = str(job_id) if job_id is not None else (path if kind.endswith("rejected") else None)
    if subject is not None:
        envelope["subject"] = subject
    envelope["data"] = json.loads(data)
    line = to_line(row, "inst\u00e9")
    assert line == json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))
    assert json.loads(line) == envelope


def test_socket_mode_and_a_stale_socket_is_replaced(start, tmp_path):
    """A leftover socket file from a crashed run is replaced; the configured mode is applied."""
    state = tmp_path / "state"
    state.mkdir()
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(state / "events.sock"))
    leftover.close()  # the file stays, nobody listens: what a SIGKILLed daemon leaves
    start('socket_mode = "0640"')
    mode = stat.S_IMODE(os.stat(state / "events.sock").st_mode)
    assert mode == 0o640
    Subscriber(state / "events.sock", read=False)  # and it is live


def test_a_second_daemon_on_a_live_socket_is_refused(start, tmp_path):
    """Another daemon serving the same socket path: a clear error, exit 1, no traceback."""
    daemon = start()
    second = subprocess.run([sys.executable, "-m", "ingestd", "-c", str(daemon.config), "run"],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "another ingestd is serving this socket" in second.stderr
    assert "Traceback" not in second.stderr and daemon.alive


def test_systemd_socket_activation_is_used(tmp_path):
    """With LISTEN_FDS/LISTEN_PID (a socket unit), the daemon serves the socket it was given."""
    config = write_config(tmp_path, config_text(tmp_path))
    activated = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(activated))
    listener.listen(16)
    env = {k: v for k, v in os.environ.items() if k != "INGESTD_CONFIG"}
    env["LISTEN_FDS"] = "1"
    # systemd sets LISTEN_PID to the service's pid: `exec` keeps the shell's pid for Python.
    process = subprocess.Popen(
        ["sh", "-c", f'LISTEN_PID=$$ exec "{sys.executable}" -m ingestd -c "{config}" run'],
        close_fds=False, env=env, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.dup2(listener.fileno(), 3))  # the child's fd 3, as systemd does
    try:
        subscriber = Subscriber(activated)  # queued by the kernel until the daemon accepts it
        open_db(config)
        (tmp_path / "drop" / "a.txt").write_text("activated")
        wait_for(lambda: any(e["type"] == "io.ingestd.job.completed" for e in subscriber.lines),
                 message="events on the activated socket")
        assert not (tmp_path / "state" / "events.sock").exists()
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
        listener.close()
        db.close_store()


def log_lines(daemon: Daemon, event: str) -> list[dict]:
    """The daemon's structured log lines named ``event`` (a bare traceback is not one)."""
    found = []
    for line in daemon.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event:
            found.append(entry)
    return found


def streamed_all(subscriber: Subscriber) -> None:
    """The socket's client got every event committed so far from its first one on (it
    connected after the daemon's first events), in order, each once."""
    final = last_seq()
    wait_for(lambda: subscriber.sequences() and subscriber.sequences()[-1] >= final, timeout=30,
             message="the subscriber got every event")
    got = subscriber.sequences()
    assert got == list(range(got[0], got[-1] + 1))


def assert_caught_up_exactly_once(daemon: Daemon, event_log: Path, subscriber: Subscriber) -> None:
    """Every committed event once, in order, in the log and on the socket; no thread died."""
    final = last_seq()
    wait_for(lambda: log_sequences(event_log)[-1] >= final, timeout=30, message="log caught up")
    wait_for(lambda: subscriber.sequences() and subscriber.sequences()[-1] >= final, timeout=30,
             message="the subscriber caught up")
    logged = log_sequences(event_log)
    assert logged == list(range(1, logged[-1] + 1))
    assert event_log.read_bytes().endswith(b"\n")  # no line left half written
    got = subscriber.sequences()
    assert got == list(range(got[0], got[-1] + 1))
    assert not daemon.unclean_lines()  # the publisher thread (or any other) did not die


def test_a_directory_at_the_log_path_is_reported_and_then_every_event_logged_once(start, tmp_path):
    """The log cannot be opened: one line says why (not one per event or retry); the socket's
    clients get the events meanwhile (they got nothing until the log could be written); once
    the path is a file again, every event reaches the log, and the socket, exactly once."""
    daemon = start()
    event_log = daemon.root / "state" / "events.jsonl"
    subscriber = Subscriber(daemon.root / "state" / "events.sock")
    drop_files(tmp_path / "drop", 20, "a")
    wait_for(lambda: completed() == 20, timeout=60, message="20 completed")
    wait_for(lambda: log_sequences(event_log)[-1] == last_seq(), message="log caught up")
    aside = event_log.with_name("aside.jsonl")
    os.rename(event_log, aside)
    event_log.mkdir()
    drop_files(tmp_path / "drop", 40, "b")
    failures = wait_for(lambda: log_lines(daemon, "event_log_unwritable"),
                        message="the failure logged")
    assert failures[0]["path"] == str(event_log) and "Is a directory" in failures[0]["reason"]
    status = json.loads(run_cli("status", "--json", config=daemon.config).stdout)
    assert status["events"]["log_failure"]["reason"] == "Is a directory"
    assert "event log: NOT WRITABLE" in run_cli("status", config=daemon.config).stdout
    wait_for(lambda: completed() == 60, timeout=60, message="60 completed")
    assert log_sequences(aside)[-1] < last_seq()  # events wait for the log...
    streamed_all(subscriber)  # ...not for the socket
    event_log.rmdir()
    os.rename(aside, event_log)
    drop_files(tmp_path / "drop", 10, "c")
    wait_for(lambda: completed() == 70, timeout=60, message="70 completed")
    assert_caught_up_exactly_once(daemon, event_log, subscriber)
    # Said once the lines are written: a moment after the log has caught up.
    wait_for(lambda: log_lines(daemon, "event_log_writable_again"), message="the recovery said")
    assert len(log_lines(daemon, "event_log_unwritable")) == 1
    assert len(log_lines(daemon, "event_log_writable_again")) == 1
    status = json.loads(run_cli("status", "--json", config=daemon.config).stdout)
    assert status["events"]["log_failure"] is None


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KB tmpfs (root only), unmounted after the test."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                                            str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(directory: Path) -> Path:
    """A file taking every free byte of ``directory``'s file system."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        with pytest.raises(OSError, match="No space left"):
            while True:
                handle.write(b"\0" * 4096)
    return filler


def test_a_full_disk_under_the_log_is_reported_and_then_every_event_logged_once(
        small_tmpfs, start, tmp_path):
    """The log's file system fills up (a write can stop in the middle of a line), then space is
    freed: every event reaches the log and the socket exactly once, in order."""
    event_log = small_tmpfs / "events.jsonl"
    daemon = start(f'event_log = "{event_log}"')
    subscriber = Subscriber(daemon.root / "state" / "events.sock")
    filler = fill(small_tmpfs)
    drop_files(tmp_path / "drop", 40, "a")
    failures = wait_for(lambda: log_lines(daemon, "event_log_unwritable"),
                        message="the failure logged")
    assert failures[0]["path"] == str(event_log)
    assert "No space left" in failures[0]["reason"]
    wait_for(lambda: completed() == 40, timeout=60, message="40 completed")
    streamed_all(subscriber)
    filler.unlink()
    drop_files(tmp_path / "drop", 10, "b")
    wait_for(lambda: completed() == 50, timeout=60, message="50 completed")
    assert_caught_up_exactly_once(daemon, event_log, subscriber)
    assert len(log_lines(daemon, "event_log_unwritable")) == 1


@pytest.fixture
def immutable_dir(tmp_path):
    """An empty directory made immutable (chattr +i: no file can be created in it, not even by
    root); a callable makes it writable again; undone after the test in any case."""
    directory = tmp_path / "logs"
    directory.mkdir()
    chattr = shutil.which("chattr")
    made = chattr and subprocess.run([chattr, "+i", str(directory)], capture_output=True)
    if not made or made.returncode != 0:
        pytest.skip("chattr +i is unavailable here (no chattr, not root, or a file system "
                    f"without the immutable flag): {made.stderr.decode().strip() if made else ''}")

    def writable() -> None:
        subprocess.run([chattr, "-i", str(directory)], check=True)

    yield directory, writable
    writable()


def test_an_unwritable_log_at_start_is_reported_and_then_every_event_logged_once(
        immutable_dir, start, tmp_path):
    """The log cannot be created when the daemon starts: it starts anyway and works, says so in
    one line and in its status, sends the events to the socket and keeps them for the log, and
    logs every one of them once it can be written (as when the log fails while it runs)."""
    logs, make_writable = immutable_dir
    event_log = logs / "events.jsonl"
    daemon = start(f'event_log = "{event_log}"')
    subscriber = Subscriber(daemon.root / "state" / "events.sock")
    drop_files(tmp_path / "drop", 20, "a")
    wait_for(lambda: completed() == 20, timeout=60, message="20 completed")
    failures = log_lines(daemon, "event_log_unwritable")
    assert len(failures) == 1 and failures[0]["path"] == str(event_log)
    assert "Operation not permitted" in failures[0]["reason"]
    assert "event log: NOT WRITABLE" in run_cli("status", config=daemon.config).stdout
    assert not event_log.exists()  # the events wait in the database for the log...
    streamed_all(subscriber)  # ...not for the socket
    make_writable()
    drop_files(tmp_path / "drop", 10, "b")
    wait_for(lambda: completed() == 30, timeout=60, message="30 completed")
    wait_for(lambda: event_log.exists() and log_sequences(event_log),
             message="lines in the log (it is tried every second)")
    assert_caught_up_exactly_once(daemon, event_log, subscriber)
    assert log_sequences(event_log)[0] == 1
    # Said once the lines are written: a moment after the log has caught up.
    wait_for(lambda: log_lines(daemon, "event_log_writable_again"), message="the recovery said")
    assert len(log_lines(daemon, "event_log_unwritable")) == 1
    assert len(log_lines(daemon, "event_log_writable_again")) == 1


def emit_many(count: int) -> int:
    """``count`` events committed together; the last sequence."""
    with database.atomic(), jobs.events_at_end():
        for number in range(count):
            jobs.emit(jobs.DAEMON_RELOADED, {"number": number})
    return last_seq()


def test_a_reopen_asked_while_the_log_cannot_be_opened_keeps_to_the_retry_pace(store, tmp_path):
    """SIGUSR1 (logrotate's, daily) while the log could not be opened: the reopen it asked for
    stayed asked, and the publisher tried to open the log every 20 ms, reading and encoding the
    waiting events each time, until it could. It is one try, then one a RETRY_SECONDS."""
    event_log = tmp_path / "events.jsonl"
    event_log.mkdir()
    emit_many(5)
    publisher = Publisher(event_log, None, installation_id())
    tries = []
    opening = publisher._open
    publisher._open = lambda: (tries.append(time.monotonic()), opening())
    publisher.start()
    try:
        publisher.reopen()
        wait_for(lambda: tries, message="a try")
        time.sleep(2.0)  # the window the tries are counted in
        assert 1 <= len(tries) <= 4, len(tries)
    finally:
        publisher.stop()


def test_a_directory_at_the_log_path_at_start_is_reported_and_then_logged_to(store, tmp_path):
    """The real publisher started while its log cannot be opened: it starts, says why, and
    logs every waiting event once the path can be a file."""
    event_log = tmp_path / "events.jsonl"
    event_log.mkdir()
    final = emit_many(5)
    publisher = Publisher(event_log, None, installation_id())
    publisher.start()
    try:
        assert publisher.log_failure["reason"] == "Is a directory"
        event_log.rmdir()
        wait_for(lambda: event_log.is_file() and log_sequences(event_log)[-1:] == [final],
                 message="the waiting events logged")
        assert log_sequences(event_log) == list(range(1, final + 1))
        assert publisher.log_failure is None
    finally:
        publisher.stop()


def test_the_log_of_a_replaced_database_is_set_aside_and_a_new_log_begins(start, tmp_path):
    """The database is deleted (or replaced), the event log kept: its sequences are not the new
    database's. It is renamed to say so, with one warning, and the new database's events are
    published from its first, to a new log and to the socket."""
    daemon = start()
    state, drop = daemon.root / "state", tmp_path / "drop"
    event_log = state / "events.jsonl"
    drop_files(drop, 100)
    wait_for(lambda: completed() == 100, timeout=60, message="100 completed")
    assert daemon.stop() == 0
    old_log = event_log.read_bytes()
    db.close_store()
    for path in [*drop.iterdir(), *state.glob("ingestd.db*")]:
        path.unlink()
    daemon.start()
    open_db(daemon.config)
    subscriber = Subscriber(state / "events.sock")
    drop_files(drop, 10, "new")
    wait_for(lambda: completed() == 10, timeout=60, message="10 completed")
    assert last_seq() < int(json.loads(old_log.splitlines()[-1])["sequence"])
    assert_caught_up_exactly_once(daemon, event_log, subscriber)
    assert log_sequences(event_log)[0] == 1
    [aside] = state.glob("events.jsonl.other-database-*")
    assert aside.read_bytes() == old_log
    [warning] = log_lines(daemon, "event_log_of_another_database")
    assert warning["level"] == "warning" and warning["moved_to"] == str(aside)
    status = json.loads(run_cli("status", "--json", config=daemon.config).stdout)
    assert status["events"]["published"] >= last_seq()


@pytest.mark.parametrize("writer, last", [("another", 3), ("this", 50), ("this", 10)],
                         ids=["another installation", "past this database",
                              "this database's sequences for other events"])
def test_a_log_not_from_this_database_is_set_aside(store, tmp_path, writer, last):
    """Each way a log shows it is not this database's: another installation's ids (the new
    database has more events than that log); this installation's past the database's last
    sequence (restored from a backup); or its sequences with other events (restored, then
    as many new events as the log had: the ids' times differ). The real publisher sets it
    aside and starts a new log, whose ids are not the old log's."""
    final = emit_many(10)
    ours = installation_id()
    event_log = tmp_path / "events.jsonl"
    old_lines = "".join(
        to_line(EventRow(seq, jobs.DAEMON_RELOADED, None, None, 0.0, "{}"),
                ours if writer == "this" else "0123456789abcdef") + "\n"
        for seq in range(1, last + 1))
    event_log.write_text(old_lines)
    publisher = Publisher(event_log, None, ours)
    publisher.start()
    try:
        wait_for(lambda: log_sequences(event_log)[-1:] == [final], message="the new log")
        assert log_sequences(event_log) == list(range(1, final + 1))
        [aside] = tmp_path.glob("events.jsonl.other-database-*")
        assert aside.read_text() == old_lines
        old_ids = {json.loads(line)["id"] for line in old_lines.splitlines()}
        assert not old_ids & {json.loads(line)["id"]
                              for line in event_log.read_text().splitlines()}
    finally:
        publisher.stop()


def test_a_log_an_earlier_ingestd_wrote_is_continued(store, tmp_path):
    """Ids were <installation>-<seq> before they had the time: such a log of this database is
    continued after its last line, not set aside."""
    emit_many(5)
    event_log = tmp_path / "events.jsonl"
    ours = installation_id()
    event_log.write_text("".join(json.dumps({"id": f"{ours}-{seq}", "sequence": format_sequence(
        seq)}) + "\n" for seq in range(1, 4)))
    publisher = Publisher(event_log, None, ours)
    publisher.start()
    try:
        wait_for(lambda: log_sequences(event_log)[-1:] == [5], message="the log continued")
        assert log_sequences(event_log) == [1, 2, 3, 4, 5]
        assert not list(tmp_path.glob("events.jsonl.other-database-*"))
    finally:
        publisher.stop()


def test_a_log_set_aside_never_replaces_one_set_aside_before(store, tmp_path):
    """Two logs set aside within one second (two database replacements in quick succession)
    each keep their own file: the second gets a numbered name."""
    emit_many(3)
    event_log = tmp_path / "events.jsonl"
    old_lines = to_line(EventRow(1, jobs.DAEMON_RELOADED, None, None, 0.0, "{}"),
                        "0123456789abcdef") + "\n"
    event_log.write_text(old_lines)
    earlier = {}
    for ahead in range(3):  # this second's name, and the next ones' (the start may cross one)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() + ahead))
        earlier[stamp] = tmp_path / f"events.jsonl.other-database-{stamp}"
        earlier[stamp].write_text(f"set aside before, {stamp}\n")
    publisher = Publisher(event_log, None, installation_id())
    publisher.start()
    try:
        wait_for(lambda: log_sequences(event_log)[-1:] == [3], message="the new log")
    finally:
        publisher.stop()
    assert all(path.read_text() == f"set aside before, {stamp}\n"
               for stamp, path in earlier.items())
    [aside] = tmp_path.glob("events.jsonl.other-database-*-2")
    assert aside.read_text() == old_lines


def stored_cursor() -> int:
    """How far the event log got, as stored in the database (0 if never stored)."""
    row = database.execute_sql("SELECT MAX(last_seq) FROM ingest_publish_cursors").fetchone()
    return row[0] or 0


def test_rotation_then_sigkill_after_a_burst_logs_no_event_twice(start, tmp_path):
    """After a burst the stored cursor catches up (it was written at most once a second while
    publishing, and never when idle): the log rotated away and the daemon killed, the restart
    has only an empty new log and the stored cursor to resume from, and repeats nothing."""
    daemon = start()
    event_log = daemon.root / "state" / "events.jsonl"
    drop_files(tmp_path / "drop", 300, "a")
    wait_for(lambda: completed() == 300, timeout=60, message="300 completed")
    wait_for(lambda: log_sequences(event_log)[-1] == last_seq(), message="log caught up")
    wait_for(lambda: stored_cursor() == last_seq(), timeout=10,
             message="the stored cursor caught up with the log")
    rotated = event_log.with_name("events.jsonl.1")
    os.rename(event_log, rotated)
    daemon.kill(with_children=True)
    daemon.start()
    drop_files(tmp_path / "drop", 10, "b")
    wait_for(lambda: completed() == 310, timeout=60, message="310 completed")
    final = last_seq()
    wait_for(lambda: event_log.exists() and log_sequences(event_log)[-1:] == [final],
             message="new log caught up")
    assert log_sequences(rotated) + log_sequences(event_log) == list(range(1, final + 1))


@pytest.fixture
def publisher(store, tmp_path):
    """The real publisher on the test's SQLite database, logging to tmp_path/events.jsonl."""
    running = Publisher(tmp_path / "events.jsonl", None, installation_id())
    running.start()
    yield running
    running.stop()


def test_the_stored_cursor_catches_up_when_publishing_pauses(publisher):
    """Two batches in less than a second: the second is stored too, once nothing follows."""
    final = emit_many(publish.BATCH + 500)
    wait_for(lambda: publisher.cursor == final, message="published")
    wait_for(lambda: stored_cursor() == final, timeout=5, message="the cursor stored")


def test_the_cursor_is_stored_when_a_rotation_is_noticed(publisher, monkeypatch):
    """The log moved away, the next batch goes to a new, empty log: before it does, how far the
    old one got is stored (without it, a kill now would repeat the old log's last events)."""
    monkeypatch.setattr(publish, "CURSOR_SECONDS", 3600.0)  # no store but the first batch's
    emit_many(10)
    wait_for(lambda: publisher.cursor > 0, message="the first batch published")
    first = emit_many(10)  # published, not stored
    wait_for(lambda: log_sequences(publisher.log_path)[-1:] == [first], message="published")
    os.rename(publisher.log_path, publisher.log_path.with_name("events.jsonl.1"))
    final = emit_many(10)
    wait_for(lambda: publisher.log_path.exists() and log_sequences(publisher.log_path)[-1:]
             == [final], message="the new log has the next events")
    assert log_sequences(publisher.log_path)[0] == first + 1
    assert stored_cursor() == first


def test_out_of_file_descriptors_the_sockets_wait_then_serve_again(start, tmp_path):
    """Clients that take the daemon's last file descriptors: accepting fails (EMFILE). Each
    socket says so once and waits, serving the clients it has; once descriptors are free
    again, both answer. Accept failing spun the event socket's thread (thousands of
    tracebacks a second), and ended the control socket's for good (`ingestd status` timed out
    until a restart)."""
    import resource

    from ingestd.control import NotRunning, query

    daemon = start()
    state, pid = daemon.root / "state", daemon.process.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 3,
                                                   limits[1]))
    crowd = [Subscriber(state / "events.sock", read=False) for _ in range(8)]
    wait_for(lambda: "event_socket_accept_failed" in daemon.log(), timeout=10,
             message="the event socket's accept failing")
    with pytest.raises(NotRunning):
        query(state / "control.sock", timeout=2)
    wait_for(lambda: "control_socket_accept_failed" in daemon.log(), timeout=10,
             message="the control socket's accept failing")
    for client in crowd:
        client.sock.close()
    resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    wait_for(lambda: _answers(state / "control.sock"), timeout=10, message="status answering")

    subscriber = Subscriber(state / "events.sock")
    # Taken in (not waiting in the backlog while accepting still pauses): it gets what comes.
    wait_for(lambda: query(state / "control.sock", timeout=5)["events"]["subscribers"] == 1,
             timeout=10, message="the new subscriber accepted")
    (tmp_path / "drop" / "after.txt").write_text("after the crowd left")
    wait_for(lambda: any(event["type"] == "io.ingestd.job.completed"
                         for event in subscriber.lines), timeout=30,
             message="a new subscriber receiving events")
    log = daemon.log()
    assert "event_socket_error" not in log and "event_socket_accepting_again" in log, log[-3000:]
    assert log.count("event_socket_accept_failed") < 10, log[-3000:]  # one a second at most
    assert "control_socket_accepting_again" in log, log[-3000:]


def _answers(path: Path) -> bool:
    from ingestd.control import NotRunning, query

    try:
        return bool(query(path, timeout=1))
    except NotRunning:
        return False
