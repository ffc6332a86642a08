"""`ingestd add` as a real subprocess: what it refuses and the names it picks in the drop folder.

(The add tests that need a running daemon, `--wait` end to end, live in test_daemon.py.)
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from conftest import run_cli, wait_for, without_dac_override, write_config

NAME_MAX = 255


def refused_in_one_line(result, text: str) -> None:
    """Exit 5 and exactly one stderr line, containing ``text``, without a traceback."""
    assert result.returncode == 5, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in result.stderr, lines


def empty_files_config(tmp_path: Path, drop: Path, policy: str) -> Path:
    return write_config(tmp_path, f"""
        [daemon]
        state_dir = "state"

        [projects.acme]
        folders = ["{drop}"]
        empty_files = "{policy}"
    """)


class TestEmptyFiles:
    """`add` takes an empty file exactly when the watcher would: per the project's empty_files."""

    def test_an_empty_file_is_refused_when_the_project_skips_them(self, config_file, drop, tmp_path):
        """empty_files = "skip" (the default): exit 5 naming the file, and nothing is copied."""
        empty = tmp_path / "empty.txt"
        empty.write_bytes(b"")
        result = run_cli("add", "-p", "acme", str(empty), config=config_file)
        refused_in_one_line(result, f"{empty}: empty file (the project skips empty files)")
        assert list(drop.iterdir()) == []

    def test_empty_stdin_is_refused_when_the_project_skips_them(self, config_file, drop):
        """An empty standard input is named by --name and leaves no file (nor temp file) behind."""
        result = run_cli("add", "-p", "acme", "-", "--name", "empty.txt", config=config_file,
                         stdin="")
        refused_in_one_line(result, "empty.txt: empty file (the project skips empty files)")
        assert list(drop.iterdir()) == []

    def test_an_empty_file_is_queued_when_the_project_ingests_them(self, tmp_path, drop):
        """empty_files = "ingest": the empty file is delivered and its job queued."""
        config = empty_files_config(tmp_path, drop, "ingest")
        result = run_cli("add", "-p", "acme", "-", "--name", "empty.txt", config=config, stdin="")
        assert result.returncode == 0, result.stderr
        assert "queued" in result.stdout and (drop / "empty.txt").read_bytes() == b""


class TestRefusedType:
    def test_stdin_of_a_refused_type_never_shows_in_the_drop_folder(self, config_file, drop):
        """Standard input is sniffed once it is written: refused (exit 5), it must never have
        had its name in the drop folder, not even for a moment, or a daemon's watcher could
        have made it a job. A real observer on the folder sees every name that appears."""
        appeared: list[str] = []

        class Names(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if not event.is_directory:
                    appeared.append(os.path.basename(event.dest_path or event.src_path))

        observer = Observer()
        observer.schedule(Names(), str(drop))
        observer.start()
        try:
            result = run_cli("add", "-p", "acme", "-", "--name", "blob.dat",
                             config=config_file, stdin="\x00\x01binary\x02")
            (drop / "marker.txt").write_text("m")  # its events come after any of the add's
            wait_for(lambda: "marker.txt" in appeared, 10, message="the marker's event")
        finally:
            observer.stop()
            observer.join()
        refused_in_one_line(result, "blob.dat: type application/octet-stream is not allowed")
        assert {name for name in appeared if not name.startswith(".ingestd-")} == {"marker.txt"}
        assert [path.name for path in drop.iterdir()] == ["marker.txt"]


class TestLongNames:
    """A name that does not fit the file system is shortened or refused, never a traceback."""

    def test_a_name_of_name_max_bytes_added_twice_gets_a_shortened_sibling(self, config_file,
                                                                           drop, tmp_path):
        """The second copy keeps the suffix and the counter within NAME_MAX bytes."""
        source = tmp_path / ("é" * 121 + "abcdefghi.txt")  # two-byte characters: cut whole ones
        assert len(os.fsencode(source.name)) == NAME_MAX
        source.write_text("long name")
        for _ in range(2):
            result = run_cli("add", "-p", "acme", str(source), config=config_file)
            assert result.returncode == 0 and result.stderr == "", result.stderr
        names = sorted(path.name for path in drop.iterdir())
        assert len(names) == 2 and source.name in names
        sibling = next(name for name in names if name != source.name)
        assert sibling.endswith(" (1).txt") and len(os.fsencode(sibling)) <= NAME_MAX
        assert (drop / sibling).read_text() == "long name"

    def test_a_name_too_long_for_the_file_system_is_refused(self, config_file, drop):
        """A --name of 300 characters: exit 5 in one line, and nothing is copied."""
        result = run_cli("add", "-p", "acme", "-", "--name", "n" * 300 + ".txt",
                         config=config_file, stdin="text")
        refused_in_one_line(result, "file name too long")
        assert list(drop.iterdir()) == []


class TestNamesTheProjectRefuses:
    """A name the daemon would not take from the drop folder is refused before anything is
    copied: added anyway, its file would lie there unwatched, a job no rescan knows."""

    @pytest.mark.parametrize("name", [".hidden.txt", "notes.tmp", "report.part"])
    def test_an_excluded_name_is_refused_in_one_line(self, config_file, drop, tmp_path, name):
        source = tmp_path / name
        source.write_text("text under a name the project excludes")
        for args in ([str(source)], ["-", "--name", name]):
            result = run_cli("add", "-p", "acme", *args, config=config_file,
                             stdin="text under a name the project excludes")
            refused_in_one_line(result, f"{name}: project 'acme' does not take this name")
        assert list(drop.iterdir()) == []

    def test_a_name_that_is_not_utf8_is_shown_with_its_bytes(self, config_file, drop):
        """Refusals show a name's undecodable bytes as \\xNN, as every other message does:
        they said `x\\udcff.part`."""
        excluded = run_cli("add", "-p", "acme", "-", "--name", "x\udcff.part", config=config_file,
                           stdin="text")
        refused_in_one_line(excluded, "x\\xff.part: project 'acme' does not take this name")
        empty = run_cli("add", "-p", "acme", "-", "--name", "e\udcff.txt", config=config_file,
                        stdin="")
        refused_in_one_line(empty, "e\\xff.txt: empty file (the project skips empty files)")
        assert list(drop.iterdir()) == []

    @pytest.mark.parametrize("name", ["sub/x.txt", "../x.txt", ".."])
    def test_a_path_as_name_is_a_usage_error(self, config_file, drop, name):
        """--name sub/x.txt used to become x.txt silently."""
        result = run_cli("add", "-p", "acme", "-", "--name", name, config=config_file,
                         stdin="text")
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert result.stderr.splitlines() == [
            f"ingestd: --name takes a file name, not a path: {name!r}"]
        assert list(drop.iterdir()) == []


class TestUnreadable:
    def test_a_file_add_cannot_read_is_refused_in_one_line(self, config_file, drop, tmp_path):
        """A file the caller may not read: exit 5 naming it, no traceback, nothing copied. (Run
        without the capabilities that let root read any file.)"""
        no_dac = without_dac_override("to make a file unreadable to the CLI")
        secret = tmp_path / "secret.txt"
        secret.write_text("not yours")
        secret.chmod(0)
        result = subprocess.run(
            [*no_dac, sys.executable, "-m",
             "ingestd", "-c", str(config_file), "add", "-p", "acme", str(secret)],
            capture_output=True, text=True, timeout=60)
        refused_in_one_line(result, f"{secret}: cannot read: Permission denied")
        assert list(drop.iterdir()) == []

    def test_a_database_add_may_not_write_is_said_before_anything_is_copied(
            self, config_file, drop, tmp_path):
        """A user who may write the drop folder but not the database: add copied the file in,
        then failed making its job (exit 1); the watcher made the job later anyway, and running
        add again put the file in twice. Now nothing is copied and it says why."""
        no_dac = without_dac_override("to keep the database from the CLI")
        assert run_cli("db", "migrate", config=config_file).returncode == 0
        database = tmp_path / "state" / "ingestd.db"
        database.chmod(0o444)
        source = tmp_path / "report.txt"
        source.write_text("for the archive")
        result = subprocess.run(
            [*no_dac, sys.executable, "-m",
             "ingestd", "-c", str(config_file), "add", "-p", "acme", str(source)],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(f"ingestd: sqlite:///{database}: this process (uid 0) "
                                        "may not write it (the file is uid 0's, mode 0444;")
        assert len(result.stderr.splitlines()) == 1
        assert list(drop.iterdir()) == []

    def test_a_name_that_is_not_utf8_is_shown_with_escapes(self, config_file, drop, tmp_path):
        """Error messages show undecodable bytes as \\xNN, as every other output does."""
        missing = os.fsencode(tmp_path) + b"/missing\xff.txt"
        result = run_cli("add", "-p", "acme", os.fsdecode(missing), config=config_file)
        refused_in_one_line(result, f"{tmp_path}/missing\\xff.txt: no such file or directory")


def test_json_output_is_one_document_for_several_files(config_file, drop, tmp_path):
    """`add --json` of two files prints one JSON document listing both jobs."""
    sources = [tmp_path / "one.txt", tmp_path / "two.txt"]
    for source in sources:
        source.write_text(f"the text of {source.name}")
    result = run_cli("add", "-p", "acme", *map(str, sources), "--json", config=config_file)
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)["jobs"]
    assert [(job["original_filename"], job["status"]) for job in listed] == [
        ("one.txt", "queued"), ("two.txt", "queued")]


def test_a_file_whose_stat_says_0_bytes_but_holds_text_is_added(config_file, drop):
    """/proc files report a size of 0 and have content: what counts is what reading gives."""
    result = run_cli("add", "-p", "acme", "/proc/version", config=config_file)
    assert result.returncode == 0, result.stderr
    assert (drop / "version").read_text().startswith("Linux version")


def test_name_with_several_files_is_a_usage_error(config_file, drop, tmp_path):
    """--name can name one file only: with two it would silently be ignored, so it is refused
    (exit 2, one line) and nothing is copied."""
    sources = [tmp_path / "one.txt", tmp_path / "two.txt"]
    for source in sources:
        source.write_text(f"the text of {source.name}")
    result = run_cli("add", "-p", "acme", *map(str, sources), "--name", "x.txt",
                     config=config_file)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == ["ingestd: --name names one file; 2 were given"]
    assert list(drop.iterdir()) == []


def add_and_wait(config_file: Path, source: Path) -> tuple[subprocess.Popen, queue.Queue]:
    """`ingestd add -p acme SOURCE --wait` running, and its stderr's lines as they come."""
    waiting = subprocess.Popen(
        [sys.executable, "-m", "ingestd", "-c", str(config_file), "add", "-p", "acme",
         str(source), "--wait"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    said: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [said.put(line) for line in waiting.stderr],
                     daemon=True).start()
    return waiting, said


def test_wait_without_a_daemon_says_so_and_ctrl_c_leaves_the_job_queued(config_file, drop,
                                                                         tmp_path):
    """`add --wait` with no daemon running would look hung: it says on stderr what it waits
    for; Ctrl-C stops the waiting (exit 130) and the job stays queued for a later daemon."""
    source = tmp_path / "wait.txt"
    source.write_text("nobody runs me yet")
    waiting, said = add_and_wait(config_file, source)
    try:
        line = said.get(timeout=30)
        assert "is not running" in line and "waiting for a daemon to run the jobs" in line, line
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=30) == 130
    finally:
        waiting.kill()
        waiting.communicate()
    listed = run_cli("jobs", "list", "-p", "acme", "--json", config=config_file)
    assert [job["status"] for job in json.loads(listed.stdout)["jobs"]] == ["queued"]


def test_wait_for_a_job_deleted_meanwhile_says_why_it_ended(config_file, drop, tmp_path):
    """A job deleted (or cancelled) by someone else while `add --wait` waits: it exits 1 and
    says the job's message under its status, as it says a failed job's reason. It said only
    "job N cancelled", not that the job was deleted."""
    source = tmp_path / "gone.txt"
    source.write_text("deleted before any daemon ran it")
    waiting, said = add_and_wait(config_file, source)
    try:
        assert "waiting for a daemon" in said.get(timeout=30)
        listed = run_cli("jobs", "list", "-p", "acme", "--json", config=config_file)
        [job] = json.loads(listed.stdout)["jobs"]
        assert run_cli("jobs", "delete", "-p", "acme", str(job["id"]),
                       config=config_file).returncode == 0
        out, _ = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
    assert waiting.returncode == 1
    assert out.splitlines()[-2:] == [f"job {job['id']} cancelled  {drop / 'gone.txt'}",
                                     "  cancelled before it ran (deleted)"], out


class TestAnInterruptedCopy:
    """`add -` copies into an ignored temporary name; whatever stops it, no partial copy stays."""

    def start_copy(self, config_file: Path, drop: Path) -> subprocess.Popen:
        """``add -`` with a pipe left open on stdin, once its partial copy exists."""
        adding = subprocess.Popen([sys.executable, "-m", "ingestd", "-c", str(config_file),
                                   "add", "-p", "acme", "--name", "big.txt", "-"],
                                  stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        adding.stdin.write(b"a" * 500_000)  # under max_bytes, and more may come
        adding.stdin.flush()
        wait_for(lambda: partials(drop), timeout=30, message="the partial copy")
        return adding

    @pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP])
    def test_a_signal_removes_the_partial_copy(self, config_file, drop, number):
        """`timeout`, a closed terminal: the partial copy goes, exit 128 + the signal."""
        adding = self.start_copy(config_file, drop)
        adding.send_signal(number)
        assert adding.wait(timeout=30) == 128 + number
        assert list(drop.iterdir()) == []
        assert b"Traceback" not in adding.stderr.read()

    def test_a_scan_removes_a_killed_adds_copy_and_leaves_a_live_ones(self, config_file, drop,
                                                                        cfg, store):
        """SIGKILL leaves the copy: a scan removes it once nobody holds it and it is a minute
        old; a copy whose add still runs (a slow pipe) stays, however old."""
        live = self.start_copy(config_file, drop)
        [alive] = partials(drop)
        killed = self.start_copy(config_file, drop)
        [dead] = [path for path in partials(drop) if path != alive]
        killed.kill()
        killed.wait(timeout=30)
        for path in (alive, dead):
            os.utime(path, (1, 1))  # long unchanged
        scan_once(cfg)
        assert partials(drop) == [alive]
        live.stdin.close()  # the end of its input: it completes
        assert live.wait(timeout=30) == 0
        assert [path.name for path in drop.iterdir()] == ["big.txt"]

    def test_a_fresh_copy_is_left_to_its_add(self, config_file, drop, cfg, store):
        """Just made, not yet locked by its add: a scan does not take it for abandoned."""
        fresh = drop / ".ingestd-add-0123456789abcdef0123456789abcdef.part"
        fresh.write_text("being written")
        scan_once(cfg)
        assert fresh.exists()


def scan_once(cfg) -> None:
    """A timer's scan of project acme (the settler left out: nothing is noted)."""
    from ingestd import scan

    scan.scan([cfg.projects["acme"]], lambda path, what: None, is_pending=lambda path: False,
              reason="timer")


def partials(drop: Path) -> list[Path]:
    return sorted(path for path in drop.iterdir() if path.name.startswith(".ingestd-add-"))


def test_stdin_closed_is_refused_in_one_line(config_file, drop):
    """`ingestd add -p acme - <&-`: exit 5, saying so; nothing copied."""
    result = subprocess.run(
        [sys.executable, "-m", "ingestd", "-c", str(config_file), "add", "-p", "acme", "-"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: os.close(0))
    refused_in_one_line(result, "-: standard input is closed")
    assert list(drop.iterdir()) == []
