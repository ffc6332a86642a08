"""One job through the pipeline, in process: real files, a real store, real extraction."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import PG_URL, wait_for, without_dac_override
import corpus
from corpus import make_pdf
from harness import Daemon, events_of_type, finish_all, jobs_for, open_db, wait_job, write_config
from ingestd import config as config_mod, db, intake, jobs
from ingestd.config import SinkConfig
from ingestd.models import Document, database
from ingestd.pipeline import READ_CHUNK, Context, Control, read_version, run_job
from ingestd.procpool import PAGE_REPORT_SECONDS, ExtractorPool
from ingestd.sinks import open_sink
from proctree import descendants, gone
from tcpproxy import Proxy


def queue_file(cfg, path: Path, project: str = "acme", max_attempts: int = 3):
    folder, version = intake.inspect(cfg.projects[project], path)
    return jobs.create(project, str(folder), version, max_attempts)[0]


def run_next(cfg, extractors, project=None):
    """Claim the next job and run it as a worker would; the job as it ended."""
    project = project or cfg.projects["acme"]
    [job] = jobs.claim("w1")
    context = Context(owner="w1", project=project, sink=open_sink(project),
                      extractors=extractors, control=Control(), progress_interval=0.25)
    return run_job(job, context)


def test_a_vanished_file_is_retried_and_completes_when_it_is_back(cfg, store, drop, extractors):
    """A transient failure goes back to the queue with backoff; the next attempt succeeds."""
    path = drop / "flaky.txt"
    path.write_text("now you see me")
    job = queue_file(cfg, path)
    hidden = drop.parent / "hidden.txt"
    os.rename(path, hidden)
    requeued = run_next(cfg, extractors)
    assert requeued.status == "queued" and "vanished" in requeued.error_message
    assert requeued.not_before > requeued.updated_at  # backoff: not due at once
    os.rename(hidden, path)
    jobs.Job.update(not_before=0).where(jobs.Job.id == job.id).execute()  # skip the wait
    done = run_next(cfg, extractors)
    assert (done.status, done.attempts, done.error_message) == ("completed", 2, None)
    assert Document.get_by_id(done.canonical_document_id).text == "now you see me"


def test_damaged_utf8_text_is_indexed_with_its_words_and_the_job_says_so(cfg, store, drop,
                                                                        extractors):
    """Two UTF-8 files joined by a stray byte pair: the job completes with its words intact
    (findable) and its message counts the sequences read as U+FFFD."""
    path = drop / "joined.txt"
    path.write_bytes("déjà vu in the café".encode() + b"\xff\xfe" + " naïve".encode())
    queue_file(cfg, path)
    done = run_next(cfg, extractors)
    assert done.status == "completed"
    assert done.message.endswith("; 2 invalid UTF-8 sequence(s) read as U+FFFD")
    assert Document.get_by_id(done.canonical_document_id).text == \
        "déjà vu in the café\ufffd\ufffd naïve"


@pytest.mark.parametrize("prefix", [b"\n", b"\xef\xbb\xbf", b"Content-Type: application/pdf\r\n\r\n"],
                         ids=["newline", "bom", "header line"])
def test_a_pdf_with_bytes_before_its_header_is_extracted_as_a_pdf(cfg, store, drop, extractors,
                                                                  prefix):
    """A few bytes before "%PDF-" (within the first 1024, as the PDF spec allows): a PDF, its
    text extracted, not its source indexed as text."""
    path = Path(corpus.make_prefixed_pdf(drop / "late-header.pdf", prefix, ["page one text"]))
    assert queue_file(cfg, path).mime_type == "application/pdf"
    done = run_next(cfg, extractors)
    assert (done.status, done.mime_type) == ("completed", "application/pdf")
    assert Document.get_by_id(done.canonical_document_id).text == "page one text"


def test_a_file_that_changed_after_its_job_was_made_is_superseded(cfg, store, drop, extractors):
    """The job reads only the version it was made for; a newer version gets its own job."""
    path = drop / "moving.txt"
    path.write_text("old")
    queue_file(cfg, path)
    path.write_text("new and longer")
    ended = run_next(cfg, extractors)
    assert ended.status == "cancelled" and ended.message.startswith("superseded")
    assert Document.select().count() == 0


def test_after_delete_removes_the_original_only_after_completion(cfg, store, drop, extractors):
    """after = "delete": the original is gone once the job completed."""
    project = dataclasses.replace(cfg.projects["acme"], after="delete")
    path = drop / "temp.txt"
    path.write_text("delete me after")
    queue_file(cfg, path)
    assert run_next(cfg, extractors, project).status == "completed"
    assert not path.exists()


def test_after_move_a_name_at_the_length_limit_is_moved_shortened(cfg, store, drop, extractors):
    """A name of 255 bytes cannot take the job id in front: it is cut (keeping its suffix) to
    fit, and the file still leaves the drop folder."""
    project = dataclasses.replace(cfg.projects["acme"], after="move")
    path = drop / ("é" * 125 + "x.txt")  # 255 bytes in UTF-8
    path.write_text("a long name")
    job = queue_file(cfg, path)
    assert run_next(cfg, extractors, project).status == "completed"
    [moved] = (project.move_to / "processed").iterdir()
    assert moved.name.startswith(f"{job.id}-éé") and moved.name.endswith(".txt")
    assert len(os.fsencode(moved.name)) <= 255 and moved.read_text() == "a long name"
    assert list(drop.iterdir()) == []


def test_transient_failures_give_up_after_max_attempts(cfg, store, drop, extractors):
    """A file that never comes back fails after max_attempts with the last reason."""
    path = drop / "gone.txt"
    path.write_text("bye")
    job = queue_file(cfg, path)
    path.unlink()
    for _ in range(3):
        jobs.Job.update(not_before=0).where(jobs.Job.id == job.id).execute()
        ended = run_next(cfg, extractors)
    assert ended.status == "failed" and "vanished" in ended.error_message
    assert "gave up after 3 attempts" in ended.error_message


def test_an_extraction_process_reports_pages_throttled_and_always_the_last(tmp_path, extractors):
    """A PDF's pages are reported from the extraction process at most every
    PAGE_REPORT_SECONDS (a message per page would cost more than a short page), in order,
    ending with (total, total)."""
    data = Path(make_pdf(tmp_path / "long.pdf", [f"page {n} " + "word " * 300
                                                  for n in range(300)])).read_bytes()
    reports: list[tuple[float, int, int]] = []
    started = time.monotonic()
    extracted = extractors.extract_pdf(
        data, started + 120, lambda done, total: reports.append((time.monotonic(), done, total)),
        lambda: None)
    elapsed = time.monotonic() - started
    assert len(extracted.pages) == 300
    assert reports[-1][1:] == (300, 300)
    assert [done for _, done, _ in reports] == sorted({done for _, done, _ in reports})
    assert len(reports) <= elapsed / PAGE_REPORT_SECONDS + 2
    assert len(reports) < 300


def test_a_warmed_pool_is_up_before_its_first_pdf_and_starts_no_more(tmp_path):
    """warm() starts the extraction processes in the background; wait_warm() returns once
    each has imported pypdf; a PDF asked for meanwhile waits for them rather than starting
    one more process than the pool's size."""
    pool = ExtractorPool(2)
    try:
        pool.warm()
        data = Path(make_pdf(tmp_path / "one.pdf", ["the only page"])).read_bytes()
        extracted = pool.extract_pdf(data, time.monotonic() + 60, lambda *_: None, lambda: None)
        assert pool.wait_warm(60)
        assert "the only page" in extracted.text
        assert len(pool._all) == 2
    finally:
        pool.close()


# --- originals of failed jobs, and retries ----------------------------------------------------

def outage_project(cfg, tmp_path: Path, after: str, move_to: Path | None = None):
    """Project acme with a command sink that exits 75 (try later) while ``tmp_path/outage``
    exists, and otherwise stores the text in ``tmp_path/stored``."""
    program = tmp_path / "sink.py"
    program.write_text(
        "import json, os, sys\n"
        "message = json.load(sys.stdin)\n"
        f"if os.path.exists({str(tmp_path / 'outage')!r}):\n"
        "    print('index is down', file=sys.stderr); sys.exit(75)\n"
        f"open({str(tmp_path / 'stored')!r}, 'w').write(message['text'])\n"
        "print(message['job_id'])\n")
    (tmp_path / "outage").touch()
    sink = SinkConfig(kind="command", options={"command": [sys.executable, str(program)]})
    project = cfg.projects["acme"]
    return dataclasses.replace(project, after=after, sink=sink,
                               move_to=move_to or project.move_to)


def test_a_completion_cut_off_by_a_lost_connection_is_tried_again_not_the_sink(
        cfg, pg_url, drop, tmp_path, extractors):
    """A PostgreSQL restart while an external sink works: the worker's connection is found
    dead only by the completing transaction, which is tried once more on a new connection;
    the job completes with the document the sink stored. It was re-queued and run again: the
    sink got the same version twice, and the first document was never deleted."""
    backend = config_mod.with_database(cfg, pg_url)
    db.open_store(backend.daemon.database)
    try:
        worker_backend = database.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
        program = tmp_path / "sink.py"
        program.write_text(
            "import sys, psycopg\n"
            "sys.stdin.read()\n"
            f"open({str(tmp_path / 'calls')!r}, 'a').write('ingest\\n')\n"
            f"with psycopg.connect({PG_URL!r}, autocommit=True) as admin:  # as a restart would\n"
            f"    admin.execute('SELECT pg_terminate_backend({worker_backend})')\n"
            "print(41)\n")
        sink = SinkConfig(kind="command", options={"command": [sys.executable, str(program)]})
        project = dataclasses.replace(backend.projects["acme"], sink=sink)
        queue_file(backend, drop_file(drop, "a.txt", "stored once"))
        ended = run_next(backend, extractors, project)
        assert (ended.status, ended.canonical_document_id, ended.attempts) == ("completed", 41, 1)
        assert (tmp_path / "calls").read_text() == "ingest\n"
    finally:
        db.close_store()


def test_a_completion_waits_out_a_server_restart(cfg, pg_url, drop, tmp_path, extractors):
    """The server goes away while an external sink works and refuses connections for a few
    seconds (a restart, played by a proxy): the completing transaction is tried again with
    backoff until it is back, and the sink is called once. A single try right after the
    failure met the server still down, and the job ran again."""
    import threading

    host, port = pg_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)
    proxy = Proxy((host, int(port)))
    backend = config_mod.with_database(cfg, proxy.url(pg_url))
    db.open_store(backend.daemon.database)
    try:
        program = tmp_path / "sink.py"
        program.write_text(
            "import os, sys, time\n"
            "sys.stdin.read()\n"
            f"open({str(tmp_path / 'calls')!r}, 'a').write('ingest\\n')\n"
            f"while not os.path.exists({str(tmp_path / 'go')!r}):\n"
            "    time.sleep(0.02)\n"
            "print(41)\n")
        sink = SinkConfig(kind="command", options={"command": [sys.executable, str(program)]})
        project = dataclasses.replace(backend.projects["acme"], sink=sink)
        queue_file(backend, drop_file(drop, "a.txt", "stored once"))
        ended = []
        worker = threading.Thread(target=lambda: ended.append(
            run_next(backend, extractors, project)))
        worker.start()
        wait_for(lambda: (tmp_path / "calls").exists(), message="the sink to be called")
        proxy.down()
        (tmp_path / "go").touch()
        time.sleep(2)  # the outage's length: the test's input, not a wait for a condition
        proxy.up()
        worker.join(timeout=60)
        [job] = ended
        assert (job.status, job.canonical_document_id, job.attempts) == ("completed", 41, 1)
        assert (tmp_path / "calls").read_text() == "ingest\n"
    finally:
        proxy.close()
        db.close_store()


def drop_file(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def run_until_ended(cfg, extractors, project, job_id: int):
    """Run the job's attempts back to back (backoff skipped) until it ends."""
    while True:
        jobs.Job.update(not_before=0).where(jobs.Job.id == job_id).execute()
        ended = run_next(cfg, extractors, project)
        if ended.status != "queued":
            return ended


def failed_in_an_outage(cfg, tmp_path: Path, drop: Path, extractors, after: str, text: str,
                        max_attempts: int = 2):
    """``drop/report.txt`` holding ``text``, its job run until it failed in a sink outage
    (``outage_project``, whose outage goes on); ``(project, path, job)``."""
    project = outage_project(cfg, tmp_path, after)
    path = drop / "report.txt"
    path.write_text(text)
    job = queue_file(cfg, path, max_attempts=max_attempts)
    assert run_until_ended(cfg, extractors, project, job.id).status == "failed"
    return project, path, job


def test_a_retry_after_a_sink_outage_reads_the_quarantined_original(cfg, store, drop, tmp_path,
                                                                    extractors, move_to):
    """after = "move": a job that failed during a sink outage has its original in failed/;
    retried, it fails again there (the copy stays put), and once the sink is back it completes
    from that copy, which goes to processed/. Nothing goes back into the drop folder."""
    project = outage_project(cfg, tmp_path, "move", move_to)
    path = drop / "report.txt"
    path.write_text("written during the outage")
    job = queue_file(cfg, path, max_attempts=2)
    quarantined = move_to / "failed" / f"{job.id}-report.txt"
    failed = run_until_ended(cfg, extractors, project, job.id)
    assert failed.status == "failed" and failed.error_message.startswith("sink: index is down")
    assert quarantined.read_text() == "written during the outage" and not path.exists()
    jobs.retry("acme", job.id)
    again = run_until_ended(cfg, extractors, project, job.id)
    assert again.status == "failed" and again.error_message.startswith("sink: index is down")
    assert quarantined.exists()
    (tmp_path / "outage").unlink()
    jobs.retry("acme", job.id)
    done = run_until_ended(cfg, extractors, project, job.id)
    assert (done.status, done.attempts, done.canonical_document_id) == ("completed", 1, job.id)
    assert (tmp_path / "stored").read_text() == "written during the outage"
    assert (move_to / "processed" / f"{job.id}-report.txt").read_text() == (
        "written during the outage")
    assert not quarantined.exists() and list(drop.iterdir()) == []


def test_a_quarantined_copy_whose_path_has_a_newer_job_is_not_read(cfg, store, drop, tmp_path,
                                                                   extractors):
    """The file was dropped again after its job failed: retried, the old job must not put its
    quarantined version in the index beside the new one's. It ends naming the newer job."""
    project, path, job = failed_in_an_outage(cfg, tmp_path, drop, extractors, "move",
                                             "the first version", max_attempts=1)
    path.write_text("the second version")
    newer = queue_file(cfg, path)
    path.unlink()  # as its own job's move to processed/ does: only the quarantined copy is left
    (tmp_path / "outage").unlink()
    jobs.retry("acme", job.id)
    ended = run_until_ended(cfg, extractors, project, job.id)
    assert ended.status != "completed"
    assert f"a newer version of the file has job {newer.id}" in (ended.message or "") + (
        ended.error_message or "")


def test_a_quarantined_copy_with_other_content_is_not_read(cfg, store, drop, tmp_path,
                                                          extractors):
    """The copy in failed/ is read only if it is still the job's version (size and mtime)."""
    project, path, job = failed_in_an_outage(cfg, tmp_path, drop, extractors, "move",
                                             "the original", max_attempts=1)
    quarantined = project.move_to / "failed" / f"{job.id}-report.txt"
    quarantined.write_text("edited in quarantine")
    (tmp_path / "outage").unlink()
    jobs.retry("acme", job.id)
    ended = run_until_ended(cfg, extractors, project, job.id)
    assert ended.status == "failed" and "vanished" in ended.error_message
    assert quarantined.read_text() == "edited in quarantine"


def test_a_retried_old_version_is_superseded_by_a_newer_job_for_its_path(cfg, store, drop,
                                                                        tmp_path, extractors):
    """A quarantined version whose path has a newer job since is not ingested again (it would
    sit beside the newer version's document): the retry ends cancelled, superseded."""
    project = outage_project(cfg, tmp_path, "move")
    path = drop / "report.txt"
    path.write_text("version one")
    old = queue_file(cfg, path, max_attempts=1)
    assert run_until_ended(cfg, extractors, project, old.id).status == "failed"
    (tmp_path / "outage").unlink()
    path.write_text("version two, newer")
    new = queue_file(cfg, path)
    assert run_until_ended(cfg, extractors, project, new.id).status == "completed"
    jobs.retry("acme", old.id)
    ended = run_until_ended(cfg, extractors, project, old.id)
    assert ended.status == "cancelled" and ended.message.startswith("superseded")
    assert (project.move_to / "failed" / f"{old.id}-report.txt").read_text() == "version one"
    assert (tmp_path / "stored").read_text() == "version two, newer"


def test_after_delete_a_failed_job_is_quarantined_and_its_retry_reads_it(
        cfg, store, drop, tmp_path, extractors):
    """after = "delete" deletes completed originals only: a failed job's file goes to failed/
    (nothing is lost), its retry reads it there, and once completed it is deleted."""
    project, path, job = failed_in_an_outage(cfg, tmp_path, drop, extractors, "delete",
                                             "failed, then retried")
    quarantined = project.move_to / "failed" / f"{job.id}-report.txt"
    assert quarantined.read_text() == "failed, then retried" and not path.exists()
    (tmp_path / "outage").unlink()
    jobs.retry("acme", job.id)
    assert run_until_ended(cfg, extractors, project, job.id).status == "completed"
    assert not quarantined.exists() and list(drop.iterdir()) == []
    assert not (project.move_to / "processed").exists()


def test_a_long_read_checks_the_type_first_and_the_job_between_reads(cfg, store, drop):
    """A file longer than one read has its type checked on the first read, and the job (its
    deadline, a cancel) between reads: neither waits for the whole file. One read checks
    nothing more."""
    project = dataclasses.replace(cfg.projects["acme"], max_bytes=10 * READ_CHUNK)

    class Stop(Exception):
        pass

    def check() -> None:
        calls.append("job")
        raise Stop

    def job_for(path: Path, size: int):
        path.write_bytes(b"a" * size)
        folder, version = intake.inspect(project, path)
        return jobs.create("acme", str(folder), version, 3)[0]

    calls: list = []
    with pytest.raises(Stop):
        read_version(job_for(drop / "long.txt", 3 * READ_CHUNK), project, check,
                     lambda head: calls.append(len(head)))
    assert calls == [READ_CHUNK, "job"]
    calls.clear()
    data, _ = read_version(job_for(drop / "short.txt", 100), project, check, calls.append)
    assert data == b"a" * 100 and calls == []


# --- the daemon as a subprocess ------------------------------------------------------------------

@pytest.fixture
def make_daemon(tmp_path: Path):
    """Start a daemon on one project, ``acme`` (with extra keys), its database bound in this
    process; ``(daemon, drop folder)``. Stopped after the test."""
    started: list[Daemon] = []
    folder = tmp_path / "drop" / "acme"
    folder.mkdir(parents=True)

    def make(grace: float = 5, acme_extra: str = "", **options) -> tuple[Daemon, Path]:
        config = write_config(tmp_path, f"""
            [daemon]
            state_dir = "state"
            workers = 1
            shutdown_grace_seconds = {grace}

            [defaults]
            settle_seconds = 0.3
            max_bytes = 100000000

            [projects.acme]
            folders = ["{folder}"]
            {acme_extra}
        """)
        running = Daemon(tmp_path, config, **options).start()
        started.append(running)
        open_db(config)
        return running, folder

    yield make
    finish_all(started)
    db.close_store()


@pytest.mark.parametrize("kind", ["text", "pdf"])
def test_a_job_that_succeeds_on_a_retry_keeps_no_error_and_gets_its_sniffed_type(make_daemon,
                                                                                  kind):
    """A file the daemon could not read (nor so sniff) at first is retried; once readable it
    completes, and the completed job and its event carry no stale error and the type the
    worker sniffed. (The daemon runs without the capabilities that let root read any file.)"""
    no_dac = without_dac_override("to make a file unreadable to the daemon")
    running, folder = make_daemon(acme_extra="max_attempts = 3", wrapper=no_dac)
    staging = folder.parent / f"locked.{kind}"
    if kind == "pdf":
        make_pdf(staging, ["locked at first"])
    else:
        staging.write_text("locked at first, then not")
    staging.chmod(0)
    path = folder / staging.name
    staging.rename(path)  # appears unreadable: the job is made without a type
    [retrying] = wait_for(lambda: [job for job in jobs_for(path) if job.status == "queued"
                                   and job.error_message], message="the job retrying")
    assert (retrying.error_message, retrying.mime_type) == ("cannot open: Permission denied", None)
    path.chmod(0o644)
    done = wait_job(path, timeout=60)
    mime = "application/pdf" if kind == "pdf" else "text/plain"
    assert (done.attempts, done.error_message, done.mime_type) == (
        retrying.attempts + 1, None, mime)
    [event] = [json.loads(e.data) for e in events_of_type("io.ingestd.job.completed")
               if e.job_id == done.id]
    assert (event["error_message"], event["mime_type"]) == (None, mime)


def test_a_second_sigterm_during_a_pdf_leaves_one_json_object_per_log_line(make_daemon):
    """SIGTERM twice while a PDF is extracting: the daemon exits at once, and its extraction
    process, its parent's pipe gone, exits quietly (no traceback in the daemon's log)."""
    running, folder = make_daemon(grace=30)
    path = folder / "long.pdf"
    make_pdf(path, [f"page {i} lorem ipsum dolor sit amet" for i in range(12_000)])
    wait_for(lambda: any(job.stage == "extracting" for job in jobs_for(path)), timeout=60,
             message="the PDF extracting")
    below = descendants(running.process.pid)
    running.signal(signal.SIGTERM)
    running.notify.wait_for(lambda m: m == "STOPPING=1")
    running.signal(signal.SIGTERM)
    assert running.process.wait(timeout=10) == 1
    running.stop(expect=1)  # exited: this checks its log has no traceback, and tidies up
    wait_for(lambda: all(gone(pid) for pid in below), timeout=30,
             message="the worker and extraction processes gone")
    lines = running.log_path.read_text(errors="replace").splitlines()
    not_json = [line for line in lines if not _is_json_object(line)]
    assert not not_json, "\n".join(not_json[:40])


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
