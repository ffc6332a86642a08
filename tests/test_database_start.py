"""A daemon whose PostgreSQL server cannot be reached at start (a boot where ingestd starts
first, a server restarting), or whose SQLite file system is full, waits for it instead of
exiting; a refused login still fails at once, and so does a SQLite file the daemon may not write.
The server is the real one, reached through a TCP proxy the test opens only when it wants the
server to "come up"."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import pytest

from ingestd import db
from ingestd.errors import StoreError, StoreUnreachable

from conftest import PG_URL, run_cli, wait_for, without_dac_override, write_config
from harness import Daemon, node_config, wait_job
from tcpproxy import Proxy

pytest.importorskip("psycopg", reason="PostgreSQL support is the postgres extra")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node(root: Path, url: str) -> Daemon:
    """A daemon (not started yet) on ``url``, watching root/drop."""
    (root / "drop").mkdir(exist_ok=True)
    config = node_config(root, "node", url, root / "drop")
    return Daemon(config.parent, config)


def server_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def via_port(url: str, port: int) -> str:
    """``url`` (the test's PostgreSQL URL, with its schema) through 127.0.0.1:``port``."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}").geturl()


@contextlib.contextmanager
def another_node_migrating() -> Iterator[Callable[[], None]]:
    """The migration lock held as another node holds it while it migrates the database; what
    it yields ends that migration."""
    import psycopg

    from ingestd.migrations import ADVISORY_LOCK_KEY

    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as other_node:
        other_node.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        yield lambda: other_node.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))


def test_a_daemon_waits_for_its_database_to_come_up_then_works(tmp_path, pg_url):
    port = free_port()
    relay = Proxy(server_of(PG_URL), port, up=False)
    daemon = node(tmp_path, via_port(pg_url, port))
    daemon.start(wait_ready=False)
    try:
        daemon.notify.wait_for(lambda m: "STATUS=waiting for the database" in m,
                               alive=lambda: daemon.alive)
        daemon.notify.wait_for(lambda m: m.startswith("EXTEND_TIMEOUT_USEC="),
                               alive=lambda: daemon.alive)
        wait_for(lambda: daemon.log().count('"database_unreachable"') >= 2, timeout=30,
                 message="two tries logged")
        assert daemon.alive and not any("READY=1" in m for m in daemon.notify.messages)
        assert "Connection refused" in daemon.log()

        relay.up()  # the server "comes up"
        daemon.notify.wait_for(lambda m: "READY=1" in m, timeout=60, alive=lambda: daemon.alive)
        (tmp_path / "drop" / "a.txt").write_text("ingested once the database was there")
        db.open_store(pg_url)
        assert wait_job(tmp_path / "drop" / "a.txt", timeout=60).status == "completed"
        assert daemon.stop() == 0
    finally:
        if daemon.alive:
            daemon.kill(with_children=True)
        relay.close()
        db.close_store()


def test_a_worker_process_started_while_the_server_is_down_waits_for_it(tmp_path, pg_url):
    """A worker process that dies as the server restarts is started again: that one waits for
    the server and then works. It died in its turn, with a traceback on stderr, every second
    until the server was back."""
    relay = Proxy(server_of(PG_URL), free_port())
    daemon = node(tmp_path, via_port(pg_url, relay.port))
    daemon.start()
    db.open_store(pg_url)
    try:
        started = lambda: [json.loads(line)["pid"] for line in daemon.log().splitlines()  # noqa: E731
                           if '"worker_process_started"' in line]
        workers = started()  # one per core, up to workers = 2
        relay.down()
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: len(started()) == len(workers) + 1, message="its replacement started")
        wait_for(lambda: daemon.log().count('"database_unreachable"') >= 2, timeout=30,
                 message="the replacement waiting, saying so")
        relay.up()
        wait_for(lambda: daemon.log().count('"worker_process_ready"') == len(workers) + 1,
                 timeout=30,
                 message="the replacement ready")
        (tmp_path / "drop" / "a.txt").write_text("ingested by two workers again")
        assert wait_job(tmp_path / "drop" / "a.txt", timeout=60).status == "completed"
        assert daemon.log().count('"worker_process_died"') == 1  # the one killed
        assert daemon.stop() == 0  # its log holds no traceback
    finally:
        if daemon.alive:
            daemon.kill(with_children=True)
        relay.close()
        db.close_store()


def test_a_daemon_waiting_for_another_nodes_migration_says_so_and_extends_its_start_timeout(
        tmp_path, pg_url):
    """While another node migrates the shared database (it holds the migration lock), a node
    starting on it waits as long: it says so in its log and in systemd's STATUS=, and extends
    systemd's start timeout meanwhile (a migration can take minutes). Then it starts."""
    daemon = node(tmp_path, pg_url)
    alive = lambda: daemon.alive  # noqa: E731
    with another_node_migrating() as migrated:
        try:
            daemon.start(wait_ready=False)
            waiting = "STATUS=waiting for another node to migrate the database"
            daemon.notify.wait_for(lambda m: m == waiting, alive=alive)
            daemon.notify.wait_for(lambda m: m.startswith("EXTEND_TIMEOUT_USEC=30000000"),
                                   alive=alive)
            assert not any("READY=1" in m for m in daemon.notify.messages)
            assert '"event": "waiting_for_migration"' in daemon.log()
            migrated()
            daemon.notify.wait_for(lambda m: "READY=1" in m, timeout=60, alive=alive)
            assert daemon.stop() == 0
        finally:
            if daemon.alive:
                daemon.kill(with_children=True)


def test_a_stop_while_waiting_for_another_nodes_migration_starts_nothing(tmp_path, pg_url):
    """SIGTERM while the database is being opened (another node's migration; a long one of
    its own is the same): once it is open the daemon stops, exit 0, without starting first
    (no worker processes, no scan, no READY=1, no started event)."""
    from ingestd.models import Event

    daemon = node(tmp_path, pg_url)
    alive = lambda: daemon.alive  # noqa: E731
    with another_node_migrating() as migrated:
        daemon.start(wait_ready=False)
        waiting = "STATUS=waiting for another node to migrate the database"
        daemon.notify.wait_for(lambda m: m == waiting, alive=alive)
        daemon.signal(signal.SIGTERM)  # heard once the lock's wait returns (a C call)
        migrated()
        daemon.notify.wait_for(lambda m: m == "STOPPING=1", timeout=60)  # and all before it
        assert daemon.process.wait(timeout=60) == 0
        daemon.stop()  # exited: this checks its log, and tidies up
    assert not any("READY=1" in m for m in daemon.notify.messages), daemon.notify.messages
    assert "worker_process_started" not in daemon.log() and '"rescanned"' not in daemon.log()
    db.open_store(pg_url)
    try:
        assert Event.select().where(Event.type == "io.ingestd.daemon.started").count() == 0
    finally:
        db.close_store()


def test_db_migrate_waiting_for_another_nodes_migration_says_so_then_migrates(tmp_path, pg_url):
    """`ingestd db migrate` on a database another node is migrating says it waits (a big
    migration takes minutes), and migrates once the other node is done."""
    import subprocess
    import sys

    from ingestd.migrations import LATEST

    (tmp_path / "drop").mkdir()
    config = node_config(tmp_path, "node", pg_url, tmp_path / "drop")
    stderr = tmp_path / "stderr"
    with another_node_migrating() as migrated:
        with stderr.open("w") as err:
            command = subprocess.Popen(
                [sys.executable, "-m", "ingestd", "-c", str(config), "db", "migrate"],
                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            wait_for(lambda: "another node is migrating it; waiting" in stderr.read_text(),
                     timeout=30, message="the command says it waits")
            assert command.poll() is None and len(stderr.read_text().splitlines()) == 1
            migrated()
            out, _ = command.communicate(timeout=60)
        finally:
            if command.poll() is None:
                command.kill()
    assert command.returncode == 0
    assert f"schema version {LATEST}" in out and "applied migrations" in out


def test_a_stop_signal_ends_the_wait_for_the_database(tmp_path):
    daemon = node(tmp_path, f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    daemon.start(wait_ready=False)
    daemon.notify.wait_for(lambda m: "STATUS=waiting for the database" in m,
                           alive=lambda: daemon.alive)
    daemon.signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=10) == 0
    daemon.notify.wait_for(lambda m: "STOPPING=1" in m, timeout=5)
    assert '"daemon_stopping"' in daemon.log()
    assert daemon.stop() == 0  # it has exited: this checks its log is clean, and tidies up


def test_a_login_the_server_refuses_fails_at_once(tmp_path, pg_url):
    unknown_role = pg_url.replace("://postgres@", "://ingestd_no_such_role@")
    assert unknown_role != pg_url
    daemon = node(tmp_path, unknown_role)
    daemon.start(wait_ready=False)
    assert daemon.process.wait(timeout=30) == 1
    daemon.stop(expect=1)  # it has exited: closes the test's notify socket
    log = daemon.log()
    assert 'role "ingestd_no_such_role" does not exist' in log
    assert "database_unreachable" not in log


def test_a_server_that_never_answers_is_given_up_on_after_the_connect_timeout():
    """A host that takes the connection and then says nothing (hung, or a firewall eating the
    packets) holds libpq for the system's TCP timeout, minutes, unless a timeout is set: the
    URL's connect_timeout, else ingestd's default. Then it is unreachable, and waited for."""
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes the handshake
    url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/test"
    outcome: list[BaseException] = []

    def try_to_open() -> None:
        try:
            db.open_store(url)
        except BaseException as exc:
            outcome.append(exc)

    began = time.monotonic()
    opener = threading.Thread(target=try_to_open, daemon=True)
    opener.start()
    opener.join(db.CONNECT_TIMEOUT_SECONDS + 20)
    silent.close()
    assert not opener.is_alive(), "open_store still waiting on a server that never answers"
    assert time.monotonic() - began >= db.CONNECT_TIMEOUT_SECONDS - 1
    assert len(outcome) == 1 and isinstance(outcome[0], StoreUnreachable), outcome
    assert "timeout" in str(outcome[0])


@pytest.fixture
def small_file_system(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (needs root, and a kernel that lets the test mount one)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_daemon_whose_sqlite_file_system_is_full_at_start_waits_for_room(tmp_path,
                                                                         small_file_system):
    """A SQLite database on a full file system at start, without the -shm file WAL needs
    beside it (an operator's `sqlite3` removed it on closing): the daemon waits, saying why,
    and starts once there is room. It exited 1 with "disk I/O error" (under systemd, a
    restart loop up to the start limit, and a dead unit when room came back)."""
    from harness import write_config

    state = small_file_system / "state"
    drop = tmp_path / "drop"
    drop.mkdir()
    config = write_config(tmp_path, f"""
        [daemon]
        state_dir = "{state}"
        workers = 1
        [defaults]
        settle_seconds = 0.1
        [projects.acme]
        folders = ["{drop}"]
    """)
    url = f"sqlite:///{state / 'ingestd.db'}"
    state.mkdir()
    db.open_store(url)  # created and migrated
    db.close_store()
    assert not (state / "ingestd.db-shm").exists()
    filler = small_file_system / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as out:  # until ENOSPC
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    daemon = Daemon(tmp_path, config)
    daemon.start(wait_ready=False)
    try:
        wait_for(lambda: daemon.log().count('"database_unreachable"') >= 2, timeout=30,
                 message="two tries logged")
        assert daemon.alive and "its file system is full" in daemon.log(), daemon.log()[-2000:]
        filler.unlink()
        daemon.notify.wait_for(lambda m: "READY=1" in m, timeout=60, alive=lambda: daemon.alive)
        (drop / "a.txt").write_text("ingested once there was room")
        db.open_store(url)
        assert wait_job(drop / "a.txt", timeout=60).status == "completed"
        db.close_store()
        assert daemon.stop() == 0
    finally:
        if daemon.alive:
            daemon.kill(with_children=True)
        db.close_store()


def sqlite_node(tmp_path: Path) -> tuple[Path, Path]:
    """A config on a SQLite file that root's `ingestd db migrate` made; the file's path."""
    (tmp_path / "drop").mkdir()
    config = write_config(tmp_path, f"""
        [daemon]
        state_dir = "state"
        workers = 1
        shutdown_grace_seconds = 5

        [projects.acme]
        folders = ["{tmp_path / 'drop'}"]
        settle_seconds = 0.2
    """)
    assert run_cli("db", "migrate", config=config).returncode == 0
    return config, tmp_path / "state" / "ingestd.db"


def test_a_sqlite_file_the_daemon_may_not_write_is_refused_at_start(tmp_path):
    """SQLite opens a file it may only read without a word (one root made or restored with
    `cp`): the daemon ran 'started', failing every write twice a second, and made no job. It
    now exits 1 at once, saying whose the file is."""
    config, database = sqlite_node(tmp_path)
    database.chmod(0o444)
    daemon = Daemon(tmp_path, config, wrapper=without_dac_override("to keep a file from the daemon"))
    daemon.start(wait_ready=False)
    assert daemon.process.wait(timeout=30) == 1
    daemon.stop(expect=1)
    said = [line for line in daemon.log().splitlines() if line.startswith("ingestd: ")]
    assert said == [f"ingestd: sqlite:///{database}: this process (uid 0) may not write it "
                    f"(the file is uid 0's, mode 0444; its folder is uid 0's, mode "
                    f"{stat.S_IMODE(database.parent.stat().st_mode):04o})"]
    assert "daemon_started" not in daemon.log() and "READY=1" not in daemon.notify.messages


def test_a_write_lock_file_the_daemon_may_not_open_is_said_once_per_process(tmp_path):
    """Writers queue on the lock file beside the database; one that cannot be opened (root's,
    mode 0600 or 0640) turned the queue off without a word. Each process says so once, and
    writes on."""
    config, database = sqlite_node(tmp_path)
    lock = Path(f"{database}.writelock")
    lock.chmod(0)
    daemon = Daemon(tmp_path, config, wrapper=without_dac_override("to keep a file from the daemon")).start()
    (tmp_path / "drop" / "a.txt").write_text("written without the queue")
    db.open_store(f"sqlite:///{database}", migrate=False)
    try:
        wait_job(tmp_path / "drop" / "a.txt")
    finally:
        db.close_store()
    daemon.stop()
    said = [json.loads(line) for line in daemon.log().splitlines()
            if "write_lock_file_unusable" in line]
    assert len(said) == 2  # the daemon's process and its one worker process
    assert {(line["path"], line["reason"]) for line in said} == {(str(lock), "Permission denied")}


def test_a_postgresql_server_that_takes_no_writes_is_refused_with_its_reason(pg_url):
    """A standby, or a database set read-only: the daemon's start says so, in one line (it was
    "not a usable database: ..."), instead of running with every write failing."""
    db.open_store(pg_url)
    db.close_store()
    read_only = pg_url + "%20-cdefault_transaction_read_only%3Don"  # appended to its options
    db.open_store(read_only, migrate=False)
    try:
        with pytest.raises(StoreError) as caught:
            db.check_writable(read_only)
    finally:
        db.close_store()
    assert str(caught.value) == (f"{db.describe(read_only)}: the server takes no writes here: "
                                 "cannot execute DELETE in a read-only transaction")
