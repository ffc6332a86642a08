"""Is it up, is it keeping up, what fails and why: status, Prometheus metrics, and logs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingestd import db
from ingestd.control import ControlServer

import corpus
from conftest import run_cli, wait_for, without_dac_override
from harness import Daemon, open_db, wait_ended, wait_job, write_config

ALLOWED_LABELS = {"project", "status", "stage", "reason", "le"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def observed(tmp_path: Path):
    """A daemon with metrics on a free localhost port; (daemon, drop folder, metrics URL)."""
    drop = tmp_path / "drop"
    drop.mkdir()
    port = free_port()
    config = write_config(tmp_path, f"""
        [daemon]
        state_dir = "state"
        workers = 2
        metrics_address = "127.0.0.1:{port}"

        [defaults]
        settle_seconds = 0.2

        [projects.acme]
        folders = ["{drop}"]
    """)
    daemon = Daemon(tmp_path, config).start()
    open_db(config)
    yield daemon, drop, f"http://127.0.0.1:{port}/metrics"
    daemon.finish()
    db.close_store()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, parsed by prometheus-client's own parser."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_status_of_a_running_daemon(observed):
    """`ingestd status` reports pid, folders with their observer, workers and events; exit 0."""
    daemon, drop, _ = observed
    result = run_cli("status", "--json", config=daemon.config)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["pid"] == daemon.process.pid and state["uptime_seconds"] >= 0
    assert state["projects"]["acme"]["folders"][0] == {
        "project": "acme", "folder": str(drop), "observer": "inotify"}
    assert state["workers"]["total"] == 2 and state["last_rescan"]["reason"] == "start"
    readable = run_cli("status", config=daemon.config)
    assert readable.returncode == 0 and f"pid {daemon.process.pid}" in readable.stdout


def test_status_without_a_daemon_exits_3(tmp_path):
    """Like systemctl: exit 3 when nothing runs, with a one-line reason."""
    (tmp_path / "drop").mkdir()
    config = write_config(tmp_path, f'[projects.acme]\nfolders = ["{tmp_path / "drop"}"]\n')
    result = run_cli("status", config=config)
    assert result.returncode == 3 and "not running" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_daemon_that_fails_to_make_its_state_gets_a_one_line_error(tmp_path):
    """A daemon whose status fails (a bug; it logs why) closes the connection with nothing
    sent: `ingestd status` says so in one line, exit 1, not a JSON traceback."""
    (tmp_path / "drop").mkdir()
    sock = tmp_path / "control.sock"
    config = write_config(tmp_path, f'[daemon]\ncontrol_socket = "{sock}"\n'
                                    f'[projects.acme]\nfolders = ["{tmp_path / "drop"}"]\n')
    server = ControlServer(sock, 0o600, lambda: {"broken": 1 / 0})
    server.start()
    try:
        result = run_cli("status", config=config)
    finally:
        server.stop()
    assert result.returncode == 1 and "sent no state" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_refused_by_the_sockets_permissions_exits_1_not_3(tmp_path):
    """A user who may not connect to the control socket is not told that no daemon runs (exit
    3, as systemctl's "inactive"): a monitoring check run as such a user reported a running
    daemon as down. Exit 1, saying why."""
    no_dac = without_dac_override("to keep a socket from the command")
    (tmp_path / "drop").mkdir()
    sock = tmp_path / "control.sock"
    config = write_config(tmp_path, f'[daemon]\ncontrol_socket = "{sock}"\n'
                                    f'[projects.acme]\nfolders = ["{tmp_path / "drop"}"]\n')
    server = ControlServer(sock, 0o000, lambda: {"pid": 1})
    server.start()
    try:
        result = subprocess.run(
            [*no_dac, sys.executable, "-m",
             "ingestd", "-c", str(config), "status"], capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"ingestd: {sock}: permission denied: this user may not ask the "
                             "daemon (the socket's mode is socket_mode, its group the "
                             "daemon's)\n")


def test_metrics_parse_and_move_as_files_are_processed(observed):
    """The scrape parses with prometheus-client's parser and its counters follow the work."""
    daemon, drop, url = observed
    before = scrape(url)
    for i in range(5):
        (drop / f"m{i}.txt").write_text(f"metric file {i}")
    corpus.make_truncated_pdf(drop / "broken.pdf")
    for i in range(5):
        wait_job(drop / f"m{i}.txt")
    wait_ended(drop / "broken.pdf")
    # Each worker process reports the jobs it ended on its own (every 0.25 s): wait until
    # all six ends are counted, not just the failure.
    finished = lambda s, status: value(  # noqa: E731
        s, "ingestd_jobs_finished_total", project="acme", status=status)
    after = wait_for(lambda: (s := scrape(url)) and finished(s, "failed") >= 1
                     and finished(s, "completed") >= 5 and s, message="all six ends counted")
    assert value(after, "ingestd_jobs_finished_total", project="acme", status="completed") == 5
    assert value(after, "ingestd_files_seen_total", project="acme") - value(
        before, "ingestd_files_seen_total", project="acme") == 6
    assert value(after, "ingestd_job_duration_seconds_count", project="acme") == 5
    assert value(after, "ingestd_queue_depth", project="acme") == 0
    assert value(after, "ingestd_events_published_total") > value(before, "ingestd_events_published_total")
    assert value(after, "ingestd_rescans_total", reason="start") == 1
    assert value(after, "ingestd_workers") == 2


def test_no_metric_has_an_unbounded_label(observed):
    """Labels are project, status, stage, reason (and le): never a path or a job id."""
    daemon, drop, url = observed
    (drop / "label.txt").write_text("labels")
    wait_job(drop / "label.txt")
    for name, labels in scrape(url):
        if name.startswith("ingestd_"):
            assert {key for key, _ in labels} <= ALLOWED_LABELS, (name, labels)


def test_every_log_line_is_json_and_a_failure_is_logged_once(observed):
    """One JSON object per line, job lines carry job id, project and path; no traceback."""
    daemon, drop, _ = observed
    corpus.make_truncated_pdf(drop / "bad.pdf")
    job = wait_ended(drop / "bad.pdf")
    (drop / "good.txt").write_text("fine")
    wait_job(drop / "good.txt")
    # Logged after the failure is committed (what wait_ended saw).
    wait_for(lambda: '"job_failed"' in daemon.log(), message="the failure logged")
    lines = [json.loads(line) for line in daemon.log().splitlines()]
    failures = [line for line in lines if line["event"] == "job_failed"]
    assert len(failures) == 1
    assert failures[0]["job_id"] == job.id and failures[0]["project"] == "acme"
    assert failures[0]["path"] == str(drop / "bad.pdf") and "malformed" in failures[0]["reason"]
    assert all("exception" not in line for line in lines)
