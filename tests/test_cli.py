"""Every CLI command as a real subprocess: output, JSON and the exit codes of the contract."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from ingestd import __version__

from conftest import run_cli, wait_for, without_dac_override


def submit(config, path, project="acme"):
    return run_cli("jobs", "submit", "-p", project, os.fsdecode(path), "--json", config=config)


def submitted_id(config, path) -> int:
    result = submit(config, path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["id"]


def test_version_and_module_entry_point():
    """`ingestd --version` and `python -m ingestd --version` print the version."""
    result = subprocess.run([sys.executable, "-m", "ingestd", "--version"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"ingestd {__version__}"


def test_ctrl_c_while_the_command_loads_is_quiet(config_file):
    """Ctrl-C while the command's modules still load (peewee and psycopg take a few tenths of
    a second) ends it with exit 130 and no traceback, as Ctrl-C later does. The signal is sent
    once _sqlite3 is mapped: the command line's imports have begun and peewee's are ahead."""
    command = subprocess.Popen([sys.executable, "-m", "ingestd", "-c", str(config_file),
                                "jobs", "list", "-p", "acme"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = f"/proc/{command.pid}/maps"
    try:
        wait_for(lambda: "_sqlite3" in pathlib.Path(maps).read_text(), timeout=30,
                 interval=0.001)
        command.send_signal(signal.SIGINT)
        _, stderr = command.communicate(timeout=30)
    finally:
        command.kill()
    assert command.returncode == 130 and "Traceback" not in stderr, stderr


def test_submit_list_show_cancel_retry_delete(config_file, drop):
    """The seed's flow end to end, with the documented exit codes at each refusal."""
    (drop / "a.txt").write_text("alpha")
    job_id = submitted_id(config_file, drop / "a.txt")

    listing = run_cli("jobs", "list", "-p", "acme", config=config_file)
    assert listing.returncode == 0 and "queued" in listing.stdout and "a.txt" in listing.stdout
    shown = json.loads(run_cli("jobs", "show", "-p", "acme", str(job_id), "--json",
                               config=config_file).stdout)
    assert shown["status"] == "queued" and shown["original_filename"] == "a.txt"

    assert run_cli("jobs", "retry", "-p", "acme", str(job_id), config=config_file).returncode == 4
    assert run_cli("jobs", "cancel", "-p", "acme", str(job_id), config=config_file).returncode == 0
    assert run_cli("jobs", "cancel", "-p", "acme", str(job_id), config=config_file).returncode == 4
    assert run_cli("jobs", "retry", "-p", "acme", str(job_id), config=config_file).returncode == 0
    deleted = run_cli("jobs", "delete", "-p", "acme", str(job_id), config=config_file)
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    gone = run_cli("jobs", "show", "-p", "acme", str(job_id), config=config_file)
    assert gone.returncode == 3 and f"job {job_id} not found" in gone.stderr


def test_a_project_removed_from_the_file_keeps_its_jobs_within_reach(config_file, drop):
    """A project taken out of the config leaves its jobs in the database, where no worker
    takes them: they can still be listed, shown and cancelled, with a note saying why; a
    project that never had a job is still unknown (exit 3)."""
    (drop / "a.txt").write_text("alpha")
    job_id = submitted_id(config_file, drop / "a.txt")
    text = config_file.read_text()
    config_file.write_text(text.replace("[projects.acme]", "[projects.renamed]", 1))
    listing = run_cli("jobs", "list", "-p", "acme", config=config_file)
    assert listing.returncode == 0 and "a.txt" in listing.stdout
    assert "not in the configuration" in listing.stderr
    shown = run_cli("jobs", "show", "-p", "acme", str(job_id), "--json", config=config_file)
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "queued"
    cancelled = run_cli("jobs", "cancel", "-p", "acme", str(job_id), "--json", config=config_file)
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
    unknown = run_cli("jobs", "list", "-p", "never", config=config_file)
    assert unknown.returncode == 3 and "unknown project 'never'" in unknown.stderr


def test_output_that_cannot_be_written_is_one_line_and_exit_1(config_file, drop):
    """stdout on a full disk: one line naming why, exit 1, no traceback (writing it failed in
    the table printer, or at exit); stdout closed (``>&-``), the same: it printed nothing and
    said all was well."""
    (drop / "a.txt").write_text("alpha")
    submitted_id(config_file, drop / "a.txt")
    command = [sys.executable, "-m", "ingestd", "-c", str(config_file), "jobs", "list", "-p",
               "acme"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True,
                                timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["ingestd: No space left on device"]
    closed = subprocess.run(["sh", "-c", '"$@" >&-', "sh", *command], capture_output=True,
                            text=True, timeout=60)
    assert (closed.returncode, closed.stderr) == (
        1, "ingestd: standard output is closed: nowhere to write the output\n")


def test_json_is_utf8_whatever_the_locale_says(config_file, drop):
    """Under an ASCII locale (PYTHONIOENCODING=ascii here), --json and piped events are still
    JSON: UTF-8, as RFC 8259 says. The replacement for what ASCII could not encode wrote
    Python's \\xe9 escape, which JSON has not, and the command said all was well."""
    (drop / "café.txt").write_text("au lait")
    submitted_id(config_file, drop / "café.txt")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    env.pop("INGESTD_CONFIG", None)
    base = [sys.executable, "-m", "ingestd", "-c", str(config_file)]
    listed = subprocess.run([*base, "jobs", "list", "-p", "acme", "--json"], env=env,
                            capture_output=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    [job] = json.loads(listed.stdout.decode("utf-8"))["jobs"]
    assert job["source_path"] == str(drop / "café.txt")
    replay = subprocess.run([*base, "events", "--since", "0"], env=env, capture_output=True,
                            timeout=60)
    assert replay.returncode == 0, replay.stderr
    [event] = [json.loads(line) for line in replay.stdout.decode("utf-8").splitlines()]
    assert event["data"]["original_filename"] == "café.txt"


def test_json_with_a_name_that_is_not_utf8_is_still_json(tmp_path):
    """Bytes that are no UTF-8 in a path (a folder named so) come out as JSON escapes: the
    UTF-8 that JSON output is written in must not turn them into a traceback."""
    home = tmp_path / os.fsdecode(b"dir\xff")
    (home / "drop").mkdir(parents=True)
    config = home / "c.toml"
    config.write_bytes(b'[daemon]\nstate_dir = "state"\n[projects.acme]\nfolders = ["drop"]\n')
    result = subprocess.run([sys.executable, "-m", "ingestd", "-c", str(config), "config",
                             "check", "--json"], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout.decode("utf-8"))
    assert "\udcff" in json.dumps(shown, ensure_ascii=False)


def test_an_error_with_stderr_closed_puts_nothing_into_stdout(config_file, tmp_path):
    """`... --json 2>&-`: the error line is lost, not written into the JSON output (Python
    prints to stdout what goes to a missing stderr); the exit code still says it."""
    assert run_cli("db", "migrate", config=config_file).returncode == 0
    result = subprocess.run(["sh", "-c", '"$@" 2>&-', "sh", sys.executable, "-m", "ingestd",
                             "-c", str(config_file), "jobs", "list", "-p", "nope", "--json"],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (3, "")


@pytest.mark.parametrize("command", [["jobs", "list"], ["jobs", "show"], ["jobs", "cancel"]])
def test_a_project_name_that_is_not_utf8_is_not_found(config_file, command):
    """Bytes that are no UTF-8 name no project: exit 3, one line (a database query with them
    raised out of the driver, a traceback of 66 lines)."""
    assert run_cli("db", "migrate", config=config_file).returncode == 0
    ids = ["1"] if command != ["jobs", "list"] else []
    result = subprocess.run([sys.executable, "-m", "ingestd", "-c", str(config_file), *command,
                             "-p", os.fsdecode(b"\xff"), *ids], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 3, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "unknown project" in result.stderr


def test_read_commands_work_while_a_project_folder_is_gone(config_file, drop, tmp_path):
    """A project's folder gone (the daemon reports it lost and watches it again once back):
    commands that only read or change the database still work, for every project."""
    (drop / "a.txt").write_text("alpha")
    job_id = submitted_id(config_file, drop / "a.txt")
    (tmp_path / "drop" / "other").rmdir()
    for command in (["jobs", "list", "-p", "acme"], ["jobs", "show", "-p", "acme", str(job_id)],
                    ["stats", "-p", "acme"], ["events"], ["search", "-p", "acme", "alpha"]):
        result = run_cli(*command, config=config_file)
        assert result.returncode == 0, (command, result.stderr)
    refused = run_cli("jobs", "submit", "-p", "acme", str(drop / "a.txt"), config=config_file)
    assert refused.returncode == 1 and "no such folder" in refused.stderr


@pytest.mark.parametrize("command", [["jobs", "list", "-p", "acme"], ["stats", "-p", "acme"],
                                     ["search", "-p", "acme", "hello"], ["events"]])
def test_a_reader_who_may_not_make_the_shm_file_is_told_why(config_file, command, tmp_path):
    """A user who may read the database but not write its folder (the ingestd group) can read
    only while another process has it open: with none, its -shm file is gone and SQLite must
    make it again. Such a read said "attempt to write a readonly database"; it says why."""
    no_dac = without_dac_override("to keep the state folder from the CLI")
    assert run_cli("db", "migrate", config=config_file).returncode == 0
    state = tmp_path / "state"
    assert not (state / "ingestd.db-shm").exists()  # the last to close removed it
    state.chmod(0o555)
    try:
        result = subprocess.run(
            [*no_dac, sys.executable, "-m",
             "ingestd", "-c", str(config_file), *command],
            capture_output=True, text=True, timeout=60)
    finally:
        state.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"ingestd: sqlite:///{state / 'ingestd.db'}: this user may read it only while another "
        f"process has it open (the daemon, or a command of a user who may write {state}): "
        "SQLite must make ingestd.db-shm there first\n")


def test_list_json_pages_with_a_cursor(config_file, drop):
    """--json gives one document with next_cursor; following it reaches every job."""
    for i in range(5):
        (drop / f"{i}.txt").write_text(str(i))
        submitted_id(config_file, drop / f"{i}.txt")
    seen, cursor = [], None
    for _ in range(10):  # 3 pages; a cursor that never ends must not hang the suite
        args = ["jobs", "list", "-p", "acme", "--limit", "2", "--json"]
        page = json.loads(run_cli(*args, *(["--cursor", cursor] if cursor else []),
                                  config=config_file).stdout)
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [5, 4, 3, 2, 1]


@pytest.mark.parametrize("args, code, text", [
    (["jobs", "list", "-p", "nope"], 3, "unknown project 'nope'"),
    (["jobs", "list", "-p", "acme", "--status", "done"], 2, "unknown status 'done'"),
    (["jobs", "list", "-p", "acme", "--cursor", "%%%"], 2, "invalid cursor"),
    (["jobs", "list", "-p", "acme", "--cursor", ""], 2, "invalid cursor ''"),
    (["jobs", "show", "-p", "acme", "abc"], 2, "invalid job id 'abc'"),
    (["jobs", "show", "-p", "acme", "42"], 3, "job 42 not found"),
    (["jobs", "cancel", "-p", "acme", "42"], 3, "job 42 not found"),
    (["jobs", "frobnicate"], 2, "invalid choice"),
])
def test_errors_have_their_exit_codes_and_one_line(config_file, store, args, code, text):
    """Usage 2, not found 3; one line on stderr, never a traceback."""
    result = run_cli(*args, config=config_file)
    assert result.returncode == code, result.stderr
    assert text in result.stderr and "Traceback" not in result.stderr


def cursor_for(value: str) -> str:
    """A cursor as ``jobs list`` encodes one, holding ``value`` as its job id."""
    return base64.urlsafe_b64encode(f"j:{value}".encode()).decode().rstrip("=")


HUGE = "99999999999999999999999"
TOO_BIG = str(2**63)  # one past SQLite's (and PostgreSQL's bigint) largest integer
LIST = ["jobs", "list", "-p", "acme"]


@pytest.mark.parametrize("args, text", [
    (["jobs", "show", "-p", "acme", HUGE], f"invalid job id '{HUGE}'"),
    (["jobs", "cancel", "-p", "acme", TOO_BIG], f"invalid job id '{TOO_BIG}'"),
    (["jobs", "retry", "-p", "acme", TOO_BIG], f"invalid job id '{TOO_BIG}'"),
    (["jobs", "delete", "-p", "acme", TOO_BIG], f"invalid job id '{TOO_BIG}'"),
    (["jobs", "show", "-p", "acme", "\u00b2"], "invalid job id '\u00b2'"),
    (["jobs", "show", "-p", "acme", "0"], "invalid job id '0'"),
    (["jobs", "show", "-p", "acme", "9" * 5000], "invalid job id '999"),
    ([*LIST, "--source", HUGE], f"invalid source id '{HUGE}'"),
    ([*LIST, "--source", "\u00b2"], "invalid source id '\u00b2'"),
    ([*LIST, "--cursor", cursor_for(HUGE)], f"invalid cursor '{cursor_for(HUGE)}'"),
    ([*LIST, "--cursor", cursor_for("\u00b2")], "invalid cursor"),
    ([*LIST, "--limit", "0"], "invalid --limit '0'"),
    ([*LIST, "--limit", HUGE], f"invalid --limit '{HUGE}'"),
    (["search", "-p", "acme", "alpha", "--limit", "0"], "invalid --limit '0'"),
    (["search", "-p", "acme", "alpha", "--limit", "-3"], "invalid --limit '-3'"),
    (["search", "-p", "acme", "alpha", "--limit", HUGE], f"invalid --limit '{HUGE}'"),
    (["events", "--since", HUGE], f"invalid --since '{HUGE}'"),
    (["events", "--since", "\u0661"], "invalid --since '\u0661'"),
])
def test_integers_out_of_range_or_not_ascii_are_usage_errors(config_file, store, args, text):
    """Ids, cursors, limits and sequences: exit 2 and one line naming the value, no traceback."""
    result = run_cli(*args, config=config_file)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


def test_a_unicode_digit_does_not_name_a_job(config_file, drop):
    """Job 1 exists, yet "\u0661" (Arabic-Indic one) is no job id, source id or cursor id."""
    (drop / "a.txt").write_text("alpha")
    assert submitted_id(config_file, drop / "a.txt") == 1
    runs = [run_cli("jobs", action, "-p", "acme", "\u0661", config=config_file)
            for action in ("show", "cancel", "retry", "delete")]
    runs += [run_cli(*LIST, option, value, config=config_file)
             for option, value in (("--source", "\u0661"), ("--cursor", cursor_for("\u0662")))]
    for result in runs:
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "queued" in run_cli("jobs", "show", "-p", "acme", "1", config=config_file).stdout


def test_the_largest_64_bit_id_is_merely_not_found(config_file, store):
    """2**63 - 1 fits the id column: an ordinary "not found" (exit 3), not a usage error."""
    largest = str(2**63 - 1)
    for action in ("show", "cancel", "retry", "delete"):
        result = run_cli("jobs", action, "-p", "acme", largest, config=config_file)
        assert result.returncode == 3 and f"job {largest} not found" in result.stderr
    assert run_cli(*LIST, "--source", largest, "--cursor", cursor_for(largest),
                   config=config_file).returncode == 0


def test_another_projects_job_is_not_found(config_file, drop):
    """A job of acme does not exist for project other."""
    (drop / "a.txt").write_text("alpha")
    job_id = submitted_id(config_file, drop / "a.txt")
    for action in ("show", "cancel", "delete", "retry"):
        assert run_cli("jobs", action, "-p", "other", str(job_id), config=config_file).returncode == 3


def test_delete_of_a_running_job_is_a_conflict(config_file, drop, cfg):
    """The seed's rule over the CLI: exit 4 while running."""
    from ingestd import db, jobs

    (drop / "a.txt").write_text("alpha")
    job_id = submitted_id(config_file, drop / "a.txt")
    db.open_store(cfg.daemon.database)
    jobs.claim("w1")
    db.close_store()
    result = run_cli("jobs", "delete", "-p", "acme", str(job_id), config=config_file)
    assert result.returncode == 4 and "running" in result.stderr
    cancel = run_cli("jobs", "cancel", "-p", "acme", str(job_id), config=config_file)
    assert cancel.returncode == 0 and "cancellation requested" in cancel.stdout


class TestSubmitRefusals:
    def refused(self, config_file, path, text):
        result = submit(config_file, path)
        assert result.returncode == 5, result.stderr
        assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1

    def test_missing_file(self, config_file, drop):
        """A path that does not exist."""
        self.refused(config_file, drop / "nope.txt", "no such file")

    def test_directory(self, config_file, drop):
        """A directory is not a regular file."""
        (drop / "sub").mkdir()
        self.refused(config_file, drop / "sub", "not a regular file (a directory)")

    def test_fifo(self, config_file, drop):
        """A FIFO is refused without opening it (which would block)."""
        os.mkfifo(drop / "pipe")
        self.refused(config_file, drop / "pipe", "not a regular file (a FIFO)")

    def test_device(self, config_file, drop):
        """A device node, reached through a symlink inside the folder, is outside the folder."""
        (drop / "null").symlink_to("/dev/null")
        self.refused(config_file, drop / "null", "outside the folders")

    def test_symlink_out_of_the_folder(self, config_file, drop, tmp_path):
        """A symlink inside the folder pointing outside is refused."""
        secret = tmp_path / "secret.txt"
        secret.write_text("secret")
        (drop / "link.txt").symlink_to(secret)
        self.refused(config_file, drop / "link.txt", "outside the folders of project 'acme'")

    def test_dot_dot_traversal(self, config_file, drop, tmp_path):
        """drop/../x resolves outside the folder."""
        (tmp_path / "x.txt").write_text("x")
        self.refused(config_file, f"{drop}/../../x.txt", "outside the folders")

    def test_too_large(self, config_file, drop):
        """Over max_bytes (1,000,000 in this config)."""
        (drop / "big.txt").write_bytes(b"a" * 1_000_001)
        self.refused(config_file, drop / "big.txt", "too large (1000001 bytes")

    def test_type_not_allowed(self, config_file, drop):
        """Binary content is refused whatever its name."""
        (drop / "junk.txt").write_bytes(bytes(range(256)) * 4)
        self.refused(config_file, drop / "junk.txt", "type application/octet-stream is not allowed")

    def test_an_empty_file_the_project_skips(self, config_file, drop):
        """What the watcher would reject as empty (empty_files = "skip", the default)."""
        (drop / "empty.txt").write_bytes(b"")
        self.refused(config_file, drop / "empty.txt", "empty file (the project skips empty files)")

    def test_empty_path(self, config_file):
        """An empty path says so."""
        self.refused(config_file, "", "empty path")


def test_a_non_utf8_file_name_is_recorded_faithfully(config_file, drop, cfg):
    """A name that is not UTF-8 is shown with escapes and its exact bytes are kept."""
    from ingestd import db
    from ingestd.models import Job

    raw = os.fsencode(drop) + b"/caf\xe9.txt"
    with open(raw, "wb") as handle:
        handle.write(b"latin-1 name")
    result = submit(config_file, raw)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["original_filename"] == "caf\\xe9.txt"
    db.open_store(cfg.daemon.database)
    assert Job.get_by_id(record["id"]).source_path_raw == raw
    db.close_store()


@pytest.mark.parametrize("args", [["nope"], ["jobs", "list"], ["search", "-p", "acme"],
                                  ["jobs", "list", "-p", "acme", "--status"],
                                  ["events", "--bogus"]])
def test_a_usage_error_is_one_line_naming_the_help_to_read(config_file, args):
    """What argparse refuses (an unknown command or option, a missing argument) is one line on
    stderr and exit 2, as every other error."""
    result = run_cli(*args, config=config_file)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("ingestd: ") and "--help)" in line


def test_submit_refuses_a_name_of_ingestd_own(config_file, drop):
    """`ingestd add`'s copy in flight (.ingestd-add-*.part) or an original being moved is not a
    project's file: submitted, its job raced add's own, or moved the file away under it."""
    in_flight = drop / ".ingestd-add-0123abcd.part"
    in_flight.write_text("being added")
    result = run_cli("jobs", "submit", "-p", "acme", str(in_flight), config=config_file)
    assert result.returncode == 5 and result.stdout == "", result
    assert result.stderr == (f"ingestd: {in_flight}: a name of ingestd's own (.ingestd-*), "
                             "never a project's file\n")


class TestControlCharactersInNames:
    """A name may hold a newline or a terminal escape: errors stay one line and table rows
    stay one row, with the characters shown escaped (as JSON and the event log show them)."""

    def test_an_error_naming_such_a_file_is_one_line(self, config_file, drop):
        result = run_cli("jobs", "submit", "-p", "acme", str(drop / "no\nsuch.txt"),
                         config=config_file)
        assert result.returncode == 5 and result.stdout == "", result
        assert result.stderr.splitlines() == [f"ingestd: {drop}/no\\nsuch.txt: no such file"]

    def test_list_show_and_submit_print_one_line_per_job(self, config_file, drop):
        path = drop / "new\nline\x1b[31m.txt"
        path.write_text("text")
        submitted = run_cli("jobs", "submit", "-p", "acme", str(path), config=config_file)
        assert submitted.stdout.splitlines() == [
            f"job 1 queued  {drop}/new\\nline\\x1b[31m.txt"], submitted
        listing = run_cli("jobs", "list", "-p", "acme", config=config_file).stdout.splitlines()
        assert len(listing) == 2 and listing[1].endswith(f"{drop}/new\\nline\\x1b[31m.txt")
        shown = run_cli("jobs", "show", "-p", "acme", "1", config=config_file).stdout
        assert f"source_path            {drop}/new\\nline\\x1b[31m.txt\n" in shown
        assert "\x1b" not in submitted.stdout + "\n".join(listing) + shown


    @pytest.mark.parametrize("name, shown", [
        # A right-to-left override turns the rest of a shown path around on a terminal, a
        # zero-width space hides, U+2028 breaks the line: shown escaped, as the events are.
        ("in\u202evoice\u200b\u2028.txt", "in\\u202evoice\\u200b\\u2028.txt"),
        # The path is the table's last column: its own trailing spaces are not cut as padding
        # is (`x.txt ` looked like `x.txt`, a file named one space like its folder).
        ("x.txt  ", "x.txt  ")])
    def test_a_listed_path_shows_what_hides_and_keeps_its_trailing_spaces(
            self, config_file, drop, name, shown):
        (drop / name).write_text("text")
        run_cli("jobs", "submit", "-p", "acme", str(drop / name), config=config_file)
        listing = run_cli("jobs", "list", "-p", "acme", config=config_file).stdout.splitlines()
        assert listing[1].endswith(f"{drop}/{shown}"), listing

    def test_a_file_named_with_spaces_only_can_be_submitted(self, config_file, drop):
        """A name of one space is a name: it was refused as "empty path"."""
        (drop / " ").write_text("text")
        result = run_cli("jobs", "submit", "-p", "acme", " ", config=config_file, cwd=drop)
        assert result.returncode == 0 and result.stdout.endswith(f"{drop}/ \n"), result


def test_a_wait_for_the_write_lock_is_said_on_stderr_not_in_the_json(config_file, drop,
                                                                      tmp_path):
    """A command waiting for the write lock (another process holds it) says so on stderr;
    stdout stays the one JSON document. The warning went to stdout, before the JSON."""
    path = drop / "waits.txt"
    path.write_text("waits for the lock")
    job_id = submitted_id(config_file, path)  # the database exists, with its lock file
    lock = config_file.parent / "state" / "ingestd.db.writelock"
    holder = subprocess.Popen(["flock", "--close", str(lock), "sleep", "60"])  # flock holds it
    # The CLI itself, reporting its wait after 0.3 s instead of 10 s.
    code = ("import sys, ingestd.lockwait as w; w.REPORT_SECONDS = 0.3; "
            "from ingestd.cli import main; sys.exit(main(sys.argv[1:]))")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    try:
        with out.open("w") as stdout, err.open("w") as stderr:
            cli = subprocess.Popen([sys.executable, "-c", code, "-c", str(config_file), "jobs",
                                    "cancel", "-p", "acme", str(job_id), "--json"],
                                   stdout=stdout, stderr=stderr)
        wait_for(lambda: "write_lock_waiting" in err.read_text(), timeout=30,
                 message="the command saying it waits")
    finally:
        holder.kill()
        holder.wait()
    assert cli.wait(timeout=30) == 0, err.read_text()
    assert json.loads(out.read_text())["status"] == "cancelled"
    assert f"pid {holder.pid}" in err.read_text()


def test_a_look_where_nothing_ran_leaves_nothing_behind(tmp_path):
    """The zero-config default in a folder where no daemon ran: the commands that only look at
    jobs say there is no database there (exit 1, one line naming its file) and make neither
    ./inbox nor ./.ingestd, instead of answering "no jobs" from a database they just made;
    `add` makes them and queues its file, and then they answer."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    database = here / ".ingestd" / "ingestd.db"
    for args in (["jobs", "list", "-p", "default"], ["jobs", "show", "-p", "default", "1"],
                 ["jobs", "cancel", "-p", "default", "1"], ["jobs", "retry", "-p", "default", "1"],
                 ["jobs", "delete", "-p", "default", "1"], ["search", "-p", "default", "x"],
                 ["stats"], ["events"]):
        result = run_cli(*args, cwd=here)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.splitlines() == [
            f"ingestd: {database}: no database there: nothing has run with this configuration "
            "yet (nothing was created)"], args
    assert list(here.iterdir()) == []
    (elsewhere / "a.txt").write_text("alpha")
    assert run_cli("add", "-p", "default", str(elsewhere / "a.txt"), cwd=here).returncode == 0
    listing = run_cli("jobs", "list", "-p", "default", cwd=here)
    assert listing.returncode == 0 and "queued" in listing.stdout, listing.stderr
    assert (here / "inbox" / "a.txt").read_text() == "alpha" and database.exists()
