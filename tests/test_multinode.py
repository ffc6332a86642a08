"""Several daemons on one PostgreSQL database and one shared folder: the work is shared, nothing
is lost or doubled, a dead node's jobs are finished by the others, events are seen everywhere."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from ingestd import db, jobs
from ingestd.jobs import FileVersion
from ingestd.models import Document, Event, Job

from conftest import schema_of, wait_for
from tcpproxy import Proxy
from harness import Daemon, claim_race, events_of_type, finish_all, jobs_for, node_config, wait_job

@pytest.fixture
def cluster(tmp_path, pg_url):
    """Start nodes on one database and one shared folder; all stopped after the test."""
    shared = tmp_path / "shared"
    shared.mkdir()
    nodes: list[Daemon] = []

    def start(name: str, **options) -> Daemon:
        config = node_config(tmp_path, name, pg_url, shared, **options)
        node = Daemon(config.parent, config, log_level="debug").start()  # job_completed
        nodes.append(node)
        return node

    db.open_store(pg_url)
    yield start, shared
    finish_all(nodes)
    db.close_store()


def completed() -> int:
    return Job.select().where(Job.status == "completed").count()


class Subscriber:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with self.sock.makefile("r", encoding="utf-8") as stream:
            for line in stream:
                self.events.append(json.loads(line))


def test_three_daemons_share_3000_files_each_completed_once(cluster):
    """Three nodes on one folder (one polling): one job per file, all completed, work shared,
    and one node's socket carries every node's events without a gap."""
    start, shared = cluster
    first = start("n1")
    subscriber = Subscriber(first.root / "state" / "events.sock")
    later = [start("n2"), start("n3", extra="polling = true")]
    for i in range(3000):
        (shared / f"s{i:04d}.txt").write_text(f"shared file number {i}")
    wait_for(lambda: completed() == 3000, timeout=240, interval=0.5, message="3,000 completed")
    per_path = Counter(path for (path,) in Job.select(Job.source_path).tuples())
    assert len(per_path) == 3000 and set(per_path.values()) == {1}
    assert Document.select().count() == 3000
    last = Event.select(Event.seq).order_by(Event.seq.desc()).first().seq
    wait_for(lambda: subscriber.events and int(subscriber.events[-1]["sequence"]) >= last,
             timeout=30, message="node 1's subscriber caught up")
    sequences = [int(e["sequence"]) for e in subscriber.events]
    assert sequences == list(range(sequences[0], last + 1))
    started_pids = {e["data"]["pid"] for e in subscriber.events
                    if e["type"] == "io.ingestd.daemon.started"}
    assert {node.process.pid for node in later} <= started_pids  # other nodes' events, on n1
    finishers = Counter(node for node in ("n1", "n2", "n3")
                        for _ in range((first.root.parent / node / "daemon.log").read_text()
                                       .count('"job_completed"')))
    assert len(finishers) == 3, f"work was not shared: {finishers}"


def test_a_killed_nodes_job_is_finished_by_another_after_its_lease_expires(cluster, tmp_path):
    """SIGKILL the node holding a job: another node rescues it once the lease expires."""
    start, shared = cluster
    release = tmp_path / "never"
    script = tmp_path / "held_sink.py"
    script.write_text(f"import os, sys, time\nsys.stdin.read()\n"
                      f"while not os.path.exists({str(release)!r}): time.sleep(0.05)\nprint(7)\n")
    holder = start("n1", sink=f'[projects.acme.sink]\nkind = "command"\n'
                              f'command = ["{sys.executable}", "{script}"]')
    path = shared / "held.txt"
    path.write_text("held by the first node")
    wait_job(path, "running")
    start("n2")  # alive before n1 dies: only the lease can tell it n1 is gone
    holder.kill(with_children=True)
    job = wait_for(lambda: [j for j in jobs_for(path) if j.status == "completed"], timeout=60,
                   message="completed by n2")[0]
    assert job.attempts == 2 and job.canonical_document_id is not None
    rescued = [e for e in Event.select().where(Event.job_id == job.id, Event.type == jobs.JOB_REQUEUED)]
    assert len(rescued) == 1 and "stopped renewing its lease" in rescued[0].data


def test_eight_workers_racing_for_10000_jobs_never_claim_one_twice(pg_url):
    """SKIP LOCKED claims: 8 processes, 10,000 jobs, each claimed exactly once."""
    db.open_store(pg_url)
    try:
        with db.database.atomic():
            for i in range(10_000):
                jobs.create("acme", "/srv/acme", FileVersion(f"/srv/acme/{i}", f"{i}", 1, i, i,
                                                             "text/plain"), 3)
        claimed = claim_race(pg_url, processes=8, limit=4)
        everything = [job_id for mine in claimed for job_id in mine]
        assert len(everything) == 10_000 and len(set(everything)) == 10_000
        assert sum(1 for mine in claimed if mine) >= 4  # they really raced
        started = Counter(e.job_id for e in Event.select().where(Event.type == jobs.JOB_STARTED))
        assert len(started) == 10_000 and set(started.values()) == {1}
    finally:
        db.close_store()


ROUNDS = 5  # sets of files made at once by two nodes


def _create_in_order(url: str, folders: dict[str, str], order: int, rounds: int, barrier,
                     failures) -> None:
    """Make jobs as a daemon does for ``rounds`` sets of the same files another node sees, in
    ``order`` (1 or -1: the projects and their files the other way round)."""
    from ingestd import config as config_mod, intake

    db.open_store(url)
    cfg = config_mod.from_mapping(
        {"projects": {name: {"folders": [folder]} for name, folder in folders.items()}}, None)
    for round_ in range(rounds):
        ready = [intake.Ready(cfg.projects[name], str(path), intake.signature_of(os.lstat(path)),
                              Path(folder))
                 for name, folder in list(folders.items())[::order]
                 for path in sorted(Path(folder).glob(f"{round_}-*"))[::order]]
        barrier.wait(timeout=60)
        try:
            intake.create_jobs(ready)
        except Exception as exc:  # a deadlock the server broke, most likely
            failures.put(db.first_line(exc))


def test_nodes_making_jobs_for_the_same_files_in_other_orders_never_deadlock(tmp_path, pg_url):
    """Two nodes see a burst in two projects in different orders and make its jobs at once:
    each takes the locks in one order (projects by name, rows by key, the event counter
    last), so neither waits for the other in a circle. In the order seen, PostgreSQL broke a
    deadlock and one node's whole batch waited a second."""
    folders = {}
    for name in ("alpha", "beta"):
        folder = tmp_path / name
        folder.mkdir()
        for round_ in range(ROUNDS):
            for index in range(400):
                (folder / f"{round_}-{index:03d}.txt").write_text(f"{name} {round_} {index}")
        folders[name] = str(folder)
    context = multiprocessing.get_context("spawn")
    barrier, failures = context.Barrier(2), context.Queue()
    nodes = [context.Process(target=_create_in_order, args=(pg_url, folders, order, ROUNDS,
                                                             barrier, failures))
             for order in (1, -1)]
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            node.join(timeout=120)
        assert [node.exitcode for node in nodes] == [0, 0]
        assert failures.empty(), failures.get()
    finally:
        for node in nodes:
            node.terminate()
    db.open_store(pg_url)
    try:
        assert Job.select().count() == 2 * ROUNDS * 400  # one job per version, whoever made it
    finally:
        db.close_store()


def test_a_daemon_survives_losing_its_database_connections(cluster, pg_url):
    """Connections killed by the server mid-burst: the daemon reconnects, nothing lost or doubled."""
    import psycopg

    from conftest import PG_URL

    start, shared = cluster
    start("n1")
    for i in range(400):
        (shared / f"c{i:03d}.txt").write_text(f"connection test {i}")
    wait_for(lambda: completed() >= 50, timeout=60, message="some completed")
    schema = schema_of(pg_url)
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND datname = current_database() "
            "AND application_name = %s AND backend_type = 'client backend' "
            "AND query NOT LIKE %s", (schema, f"%{schema}%")).fetchone()[0]
    assert killed >= 1
    db.reset_connection()  # ours was among them
    wait_for(lambda: completed() == 400, timeout=120, interval=0.5, message="all 400 completed")
    per_path = Counter(path for (path,) in Job.select(Job.source_path).tuples())
    assert len(per_path) == 400 and set(per_path.values()) == {1}
    assert Document.select().count() == 400


def test_daemons_with_different_projects_run_only_their_own_jobs(tmp_path, pg_url):
    """Node a has project alpha, node b project beta, on one database: each claims only its
    own projects' jobs (a job of the other's project, claimed, failed as unknown here)."""
    nodes = []
    db.open_store(pg_url)
    try:
        for name, project in (("a", "alpha"), ("b", "beta")):
            folder = tmp_path / f"drop-{project}"
            folder.mkdir()
            config = node_config(tmp_path, name, pg_url, folder, project=project)
            nodes.append(Daemon(config.parent, config).start())
        for project in ("alpha", "beta"):
            for index in range(100):
                (tmp_path / f"drop-{project}" / f"{index}.txt").write_text(f"{project} {index}")
        wait_for(lambda: Job.select().where(Job.status.in_(["completed", "failed"])).count() == 200,
                 timeout=120, message="200 jobs ended")
        by_status = Counter((job.project_id, job.status) for job in Job.select())
        assert by_status == {("alpha", "completed"): 100, ("beta", "completed"): 100}
    finally:
        finish_all(nodes)
        db.close_store()


def test_a_follower_goes_on_after_its_database_connection_is_cut(tmp_path, pg_url):
    """`events -f` on a node without a daemon polls the database; the server cutting its
    connection (a restart, a failover) costs a reconnect, not the follower."""
    import subprocess

    import psycopg

    from conftest import PG_URL

    folder = tmp_path / "drop"
    folder.mkdir()
    config = node_config(tmp_path, "n1", pg_url, folder)
    db.open_store(pg_url)
    follower = subprocess.Popen(
        [sys.executable, "-m", "ingestd", "-c", str(config), "events", "-f", "--json",
         "--since", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    printed: list[int] = []
    threading.Thread(target=lambda: printed.extend(
        int(json.loads(line)["sequence"]) for line in follower.stdout), daemon=True).start()
    try:
        first = jobs.emit(jobs.DAEMON_STARTED, {"before": "the cut"})
        wait_for(lambda: first in printed, message="the first event followed")
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            cut = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> "
                "pg_backend_pid() AND datname = current_database() AND application_name = %s "
                "AND query ILIKE '%%ingest_events%%' AND query NOT ILIKE '%%pg_terminate%%'",
                (schema_of(pg_url),)).fetchall()
        assert cut, "the follower's connection was found and cut"
        db.reset_connection()  # this process's own connection may have been among them
        second = jobs.emit(jobs.DAEMON_STARTED, {"after": "the cut"})
        wait_for(lambda: second in printed or follower.poll() is not None,
                 message="the second event followed")
        assert follower.poll() is None and printed == [first, second]
    finally:
        follower.kill()
        follower.wait()
        db.close_store()


def test_a_stop_requeues_running_jobs_though_the_database_cut_the_connection_before(
        tmp_path, pg_url):
    """Connections the server cut while idle are found dead only at the stop: the release of
    the running job is retried on a new one, not left to the lease's expiry. So is the
    daemon's stopping event, which was left out ("stopping_event_not_written")."""
    import signal as signals

    import psycopg

    from conftest import PG_URL
    from test_daemon import blocking_sink

    folder = tmp_path / "drop"
    folder.mkdir()
    sink, release = blocking_sink(tmp_path)
    config = tmp_path / "ingestd.toml"
    config.write_text(f'[daemon]\nstate_dir = "state"\ndatabase = "{pg_url}"\n'
                      f'shutdown_grace_seconds = 0.2\nlease_seconds = 300\n'
                      f'[projects.acme]\nfolders = ["{folder}"]\nsettle_seconds = 0.2\n{sink}\n')
    db.open_store(pg_url)
    node = Daemon(tmp_path, config).start()
    try:
        (folder / "held.txt").write_text("held by its sink")
        wait_job(folder / "held.txt", "running")
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> "
                          "pg_backend_pid() AND datname = current_database() "
                          "AND application_name = %s", (schema_of(pg_url),))
        db.reset_connection()
        node.signal(signals.SIGTERM)
        assert node.process.wait(timeout=60) == 0, node.log()[-3000:]
        [job] = jobs_for(folder / "held.txt")
        assert (job.status, job.lease_owner) == ("queued", None), node.log()[-3000:]
        assert len(events_of_type("io.ingestd.daemon.stopping")) == 1, node.log()[-3000:]
    finally:
        release.touch()
        node.finish()
        db.close_store()


def test_sigterm_is_heard_while_a_lock_keeps_the_database_waiting(cluster, pg_url):
    """A session holds the job and event tables locked (a long migration, an operator's LOCK
    TABLE). A reload then, and the SIGTERM that follows, must not wait for it: the main loop
    touches no table (the reload's event is written on a scheduler thread), so the stop
    begins at once, and ends as soon as the lock is gone; the reload's event is written then."""
    import signal

    import psycopg

    start, _ = cluster
    node = start("a")
    with psycopg.connect(pg_url, connect_timeout=10) as locker:
        locker.execute("LOCK TABLE ingest_jobs, ingest_events IN ACCESS EXCLUSIVE MODE")
        node.signal(signal.SIGHUP)
        node.notify.wait_for(lambda m: "RELOADING=1" in m)
        node.signal(signal.SIGTERM)
        wait_for(lambda: "daemon_stopping" in node.log(), timeout=10,
                 message="the stop begun while the tables are locked")
        locker.rollback()
    assert node.process.wait(timeout=30) == 0
    assert Event.select().where(Event.type == "io.ingestd.daemon.reloaded").count() == 1


def test_add_wait_rides_out_a_server_restart(cluster, tmp_path, pg_url):
    """`ingestd add --wait` whose server goes away (its connection cut, new ones refused for a
    while: a restart, played by a proxy) says so once and waits on; a daemon started once the
    server is back completes the job. It exited 1 with only "database: terminating
    connection", though its job was queued and went on to complete."""
    start, shared = cluster
    source = tmp_path / "report.txt"
    source.write_text("added, then waited for")
    host, port = pg_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)
    proxy = Proxy((host, int(port)))
    config = node_config(tmp_path, "cli", proxy.url(pg_url), shared)
    adder = subprocess.Popen([sys.executable, "-m", "ingestd", "-c", str(config), "add", "-p",
                              "acme", str(source), "--wait"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: Job.select().count() == 1, message="the job to be queued")
        proxy.down()
        time.sleep(3)  # the outage's length: the test's input, not a wait for a condition
        proxy.up()
        start("node")
        out, err = adder.communicate(timeout=60)
    finally:
        adder.kill()
        proxy.close()
    assert adder.returncode == 0, err
    assert "completed" in out and "report.txt" in out
    assert "the jobs are queued: waiting for the database to be back" in err
