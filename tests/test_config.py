"""Configuration: lookup order, defaults, and one clear line per problem."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from ingestd import config as config_mod
from ingestd.errors import ConfigError

from conftest import REPO, run_cli, write_config


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        config_mod.load(path)
    return str(caught.value)


def test_zero_config_watches_inbox_and_keeps_state_in_dot_ingestd(tmp_path, monkeypatch):
    """Without a file, project 'default' watches ./inbox (created) and state lives in ./.ingestd."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INGESTD_CONFIG", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    cfg = config_mod.load(None)
    assert cfg.source is None
    assert list(cfg.projects) == ["default"]
    assert cfg.projects["default"].folders == ((tmp_path / "inbox").resolve(),)
    assert (tmp_path / "inbox").is_dir()
    assert cfg.daemon.state_dir == tmp_path / ".ingestd"
    assert cfg.daemon.database == f"sqlite:///{tmp_path / '.ingestd' / 'ingestd.db'}"


def test_zero_config_for_a_look_makes_no_inbox(tmp_path, monkeypatch):
    """A command that only looks (folders_must_exist=False) leaves no ./inbox behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INGESTD_CONFIG", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    cfg = config_mod.load(None, folders_must_exist=False)
    assert cfg.projects["default"].folders == (tmp_path / "inbox",)
    assert list(tmp_path.iterdir()) == []


def test_env_var_names_the_file(config_file, monkeypatch):
    """$INGESTD_CONFIG is used when no -c is given."""
    monkeypatch.setenv("INGESTD_CONFIG", str(config_file))
    assert config_mod.load(None).source == config_file


def test_relative_paths_are_relative_to_the_file(cfg, config_file):
    """state_dir and folders given relatively resolve against the config file's folder."""
    assert cfg.daemon.state_dir == config_file.parent / "state"
    assert cfg.projects["other"].folders == ((config_file.parent / "drop" / "other").resolve(),)


def test_defaults_are_inherited_and_overridable(tmp_path, drop):
    """A project inherits [defaults] and may override any of them."""
    path = write_config(tmp_path, f"""
        [defaults]
        settle_seconds = 2
        after = "move"
        [projects.acme]
        folders = ["{drop}"]
        after = "delete"
    """)
    project = config_mod.load(path).projects["acme"]
    assert project.settle_seconds == 2.0 and project.after == "delete"
    assert project.exclude == config_mod.DEFAULT_EXCLUDE


def test_shipped_example_is_valid(tmp_path, monkeypatch):
    """config/ingestd.toml loads once its folders exist."""
    text = (REPO / "config" / "ingestd.toml").read_text()
    for folder in ("/srv/drop/acme", "/srv/drop/scans"):
        text = text.replace(folder, str(tmp_path / folder.strip("/")))
        (tmp_path / folder.strip("/")).mkdir(parents=True)
    text = text.replace("/var/lib/ingestd", str(tmp_path / "state"))
    path = tmp_path / "example.toml"
    path.write_text(text)
    cfg = config_mod.load(path)
    assert set(cfg.projects) == {"acme", "scans"}


@pytest.mark.parametrize("body, expected", [
    ('[projects.acme]\nfolders = ["{drop}"]\ncolour = "red"', "projects.acme.colour: unknown key"),
    ('[daemon]\nworkers = "two"\n[projects.acme]\nfolders = ["{drop}"]',
     "daemon.workers: must be an integer, not str"),
    ('[daemon]\nworkers = true\n[projects.acme]\nfolders = ["{drop}"]',
     "daemon.workers: must be an integer, not a boolean"),
    ('[projects.acme]\nfolders = ["{drop}"]\nafter = "shred"',
     "projects.acme.after: must be one of keep, move, delete"),
    ('[projects.acme]\nfolders = ["{drop}/nope"]', "projects.acme.folders: {drop}/nope: no such folder"),
    ('[projects.acme]\nfolders = ["{drop}/file"]', "projects.acme.folders: {drop}/file: not a folder"),
    ('[projects.acme]\nfolders = ["{drop}/' + "n" * 300 + '"]',
     "projects.acme.folders: {drop}/" + "n" * 300 + ": cannot be reached (File name too long)"),
    ('[projects.acme]\nsettle_seconds = 1', "projects.acme.folders: missing"),
    ('[projects.acme]\nfolders = ["{drop}"]\n[projects.b]\nfolders = ["{drop}"]',
     "projects.b.folders: {drop}: already a folder of project 'acme'"),
    ('[projects.acme]\nfolders = ["{drop}"]\n[projects.b]\nfolders = ["{drop}/sub"]',
     "projects.b.folders: {drop}/sub: overlaps {drop} of project 'acme'"),
    ('[daemon]\nsocket_mode = "999"\n[projects.acme]\nfolders = ["{drop}"]',
     "daemon.socket_mode: must be an octal mode"),
    ('[projects.acme]\nfolders = ["{drop}"]\nmax_bytes = 0', "projects.acme.max_bytes: must be greater than 0"),
    ('[projects.acme\nfolders = 1', "not valid TOML"),
    ('[daemon]\nstate_dir = "{drop}/state"\n[projects.acme]\nfolders = ["{drop}"]',
     "holds the state directory"),
])
def test_a_bad_file_names_the_file_and_the_key(tmp_path, drop, body, expected):
    """Each mistake is one line: the file, the key and what is wrong."""
    (drop / "sub").mkdir()
    (drop / "file").touch()
    path = write_config(tmp_path, body.replace("{drop}", str(drop)))
    message = load_error(path)
    expected = expected.replace("{drop}", str(drop))
    line = next((line for line in message.splitlines() if expected in line), None)
    assert line is not None, message
    assert line.startswith(f"{path}:")


def test_all_problems_are_reported_at_once(tmp_path, drop):
    """Two mistakes give two lines."""
    path = write_config(tmp_path, f'[daemon]\nworkers = 0\n[projects.acme]\nfolders = ["{drop}"]\nx = 1')
    assert len(load_error(path).splitlines()) == 2


def test_several_problems_are_one_line_except_in_config_check(tmp_path, drop):
    """Every command but `config check` names the first problem and how to see the rest, in
    one line; `config check` lists each problem on its own line."""
    path = write_config(tmp_path, f'[daemon]\nworkers = 0\n[projects.acme]\nfolders = ["{drop}"]\nx = 1')
    listing = run_cli("jobs", "list", "-p", "acme", config=path)
    assert listing.returncode == 1 and len(listing.stderr.splitlines()) == 1, listing.stderr
    assert "workers" in listing.stderr and "(and 1 more: see ingestd config check)" in listing.stderr
    check = run_cli("config", "check", config=path)
    assert check.returncode == 1 and len(check.stderr.splitlines()) == 2, check.stderr


def test_config_check_prints_the_effective_config(config_file):
    """`config check` exits 0 and shows every project with its inherited values."""
    result = run_cli("config", "check", config=config_file)
    assert result.returncode == 0, result.stderr
    assert "[projects.acme]" in result.stdout and "max_bytes = 1000000" in result.stdout
    as_json = run_cli("config", "check", "--json", config=config_file)
    assert json.loads(as_json.stdout)["projects"]["other"]["max_bytes"] == 1000000


def test_config_check_prints_toml_that_reads_back(tmp_path, drop):
    """A project name that is no bare TOML key ("Team A #1", as the README shows) is printed
    quoted: the output reads back as the same config. It was `[projects.Team A #1]`."""
    path = write_config(tmp_path, f'[projects."Team A #1"]\nfolders = ["{drop}"]\n'
                                  f'[projects."Team A #1".sink]\nkind = "text"\n')
    result = run_cli("config", "check", config=path)
    assert result.returncode == 0, result.stderr
    assert '[projects."Team A #1"]' in result.stdout
    printed = tomllib.loads(result.stdout)
    assert printed["projects"]["Team A #1"]["folders"] == [str(drop)]
    assert printed["projects"]["Team A #1"]["sink"]["kind"] == "text"


def test_a_project_name_with_a_joiner_is_taken(tmp_path, drop):
    """Persian and Indic words need U+200C (and emoji sequences U+200D): not hidden text."""
    path = write_config(tmp_path, f'[projects."می\u200cروم"]\nfolders = ["{drop}"]\n')
    assert list(config_mod.load(path).projects) == ["می\u200cروم"]


@pytest.mark.parametrize("name", ["two\nlines", "bell\x07", "rtl\u202eoverride", "zero\u200bwidth",
                                  "acme\U000e0041"])
def test_a_project_name_with_control_or_format_characters_is_refused(tmp_path, drop, name):
    """Such a name split `status` lines and the printed config, or reordered them on a
    terminal: refused with the other naming rules."""
    path = write_config(tmp_path, f'[projects.{json.dumps(name, ensure_ascii=False)}]\nfolders = ["{drop}"]\n')
    assert "a project name must be non-empty and printable" in load_error(path)


def test_config_check_reports_errors_and_exits_1(tmp_path):
    """A missing file or a bad one: exit 1, the problem on stderr, nothing on stdout."""
    result = run_cli("config", "check", config=tmp_path / "missing.toml")
    assert result.returncode == 1
    assert "missing.toml: no such config file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("given, said", [
    ("", "config file: an empty path (-c or $INGESTD_CONFIG): name a file"),
    (".", "a directory, not a config file"),
])
def test_a_config_path_that_names_no_file_says_why_in_one_line(tmp_path, given, said):
    """`-c ""` said the current directory could not be read, with errno's raw text."""
    result = run_cli("config", "check", config=given, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and said in result.stderr, result.stderr


def test_config_check_reports_every_bad_sink_naming_the_file(tmp_path, drop):
    """Sinks are checked together: each bad one is a line naming the file and its key."""
    (tmp_path / "b").mkdir()
    path = write_config(tmp_path, f"""
        [projects.a]
        folders = ["{drop}"]
        [projects.a.sink]
        kind = "http"
        url = "ftp://example.org/ingest"
        [projects.b]
        folders = ["{tmp_path / 'b'}"]
        [projects.b.sink]
        kind = "command"
    """)
    result = run_cli("config", "check", config=path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 2, result.stderr
    assert f"{path}: projects.a.sink.url:" in lines[0]
    assert f"{path}: projects.b.sink.command:" in lines[1]


NO_HOME = "~ingestd-no-such-user/x"  # a ~user path that cannot be expanded


@pytest.mark.parametrize("body, key, expected", [
    ('[daemon]\nevent_socket = ""', "daemon.event_socket", "must not be empty"),
    ('[daemon]\nstate_dir = " "', "daemon.state_dir", "must not be empty"),
    ('[projects.acme]\nafter = "move"\nmove_to = ""', "projects.acme.move_to",
     "must not be empty"),
    ('[daemon]\ncontrol_socket = "made"', "daemon.control_socket",
     "made: is a folder (name a file in it)"),
    ('[daemon]\nevent_log = "made"', "daemon.event_log", "made: is a folder"),
    ('[daemon]\ndatabase = "sqlite:///made"', "daemon.database", "made: is a folder"),
    ('[daemon]\nstate_dir = "file.txt"', "daemon.state_dir", "file.txt: not a folder"),
], ids=["empty-socket", "blank-state-dir", "empty-move-to", "socket-folder", "log-folder",
        "database-folder", "state-dir-file"])
def test_config_check_refuses_what_would_stop_the_daemon_at_start(tmp_path, drop, body, key,
                                                                  expected):
    """An empty path (it named the config's own folder), a folder where the daemon makes a file
    or socket, a file where it keeps its state: `config check` passed them, and `run` then
    failed at start with a message naming neither the key nor the file."""
    (tmp_path / "made").mkdir()
    (tmp_path / "file.txt").write_text("not a folder")
    assert_one_problem(tmp_path, drop, body, key, expected)


@pytest.mark.parametrize("overlap, refused", [(500, False), (501, True)])
def test_a_chunk_overlap_over_half_the_chunk_size_is_refused(tmp_path, drop, overlap, refused):
    """It was cut to half the size silently, while `config check` showed the value given."""
    path = write_config(tmp_path, f"""
        [projects.acme]
        folders = ["{drop}"]
        [projects.acme.sink]
        chunk_size = 1000
        chunk_overlap = {overlap}
    """)
    result = run_cli("config", "check", config=path)
    if refused:
        assert result.returncode == 1 and result.stderr.splitlines() == [
            f"ingestd: {path}: projects.acme.sink.chunk_overlap: must be at most half of "
            "chunk_size (500)"], result.stderr
    else:
        assert result.returncode == 0 and "chunk_overlap = 500" in result.stdout, result.stderr


@pytest.mark.parametrize("body, key, expected", [
    (f'[daemon]\ncontrol_socket = "{NO_HOME}"', "daemon.control_socket",
     "cannot expand ~ingestd-no-such-user"),
    (f'[daemon]\nevent_log = "{NO_HOME}"', "daemon.event_log", "cannot expand"),
    (f'[daemon]\ndatabase = "sqlite:///{NO_HOME}"', "daemon.database", "cannot expand"),
    ('[daemon]\nstate_dir = "state\\u0000x"', "daemon.state_dir", "NUL"),
    (f'[projects.acme]\nafter = "move"\nmove_to = "{NO_HOME}"', "projects.acme.move_to",
     "cannot expand"),
    (f'[projects.acme]\nfolders = ["{NO_HOME}"]', "projects.acme.folders", "cannot expand"),
], ids=["control_socket", "event_log", "database", "nul", "move_to", "folders"])
def test_config_check_reports_a_path_that_cannot_be_resolved(tmp_path, drop, body, key, expected):
    """A ~user without a home or a NUL byte in any path key: exit 1, one line naming the file
    and the key, no traceback."""
    assert_one_problem(tmp_path, drop, body, key, expected)


@pytest.mark.parametrize("body, key, expected", [
    ('[projects.acme]\nexclude = [".*", "archive/*"]', "projects.acme.exclude",
     "'archive/*' holds a '/': patterns match names"),
    ('[defaults]\ninclude = ["**/*.txt"]', "defaults.include", "'**/*.txt' holds a '/'"),
    ("[projects.acme]\ninclude = []", "projects.acme.include",
     "must not be empty: the project would take no file"),
    ("[projects.acme]\nallowed_types = []", "projects.acme.allowed_types",
     "must not be empty: every file would fail as a type not allowed"),
], ids=["exclude-path", "include-path", "include-empty", "allowed-types-empty"])
def test_config_check_refuses_patterns_that_never_match(tmp_path, drop, body, key, expected):
    """Patterns match names, so one with a "/" never matches: "archive/*" excluded nothing,
    "**/*.txt" took nothing, and an empty include took no file, all silently."""
    assert_one_problem(tmp_path, drop, body, key, expected)


@pytest.mark.parametrize("body, key, expected", [
    ("[daemon]\nrescan_seconds = inf", "daemon.rescan_seconds", "must be a finite number"),
    ("[daemon]\nrescan_seconds = 1e308", "daemon.rescan_seconds", "must be at most 31536000"),
    ("[daemon]\nlease_seconds = inf", "daemon.lease_seconds", "must be a finite number"),
    ("[daemon]\nlease_seconds = 1e10", "daemon.lease_seconds", "must be at most 31536000"),
    ("[daemon]\nlease_seconds = 0.001", "daemon.lease_seconds", "must be at least 1"),
    ("[daemon]\nshutdown_grace_seconds = nan", "daemon.shutdown_grace_seconds", "finite"),
    ("[daemon]\nevent_retention_days = inf", "daemon.event_retention_days", "finite"),
    ("[daemon]\nevent_retention_days = 1e9", "daemon.event_retention_days",
     "must be at most 36500"),
    ("[daemon]\nprogress_events_per_second = inf", "daemon.progress_events_per_second", "finite"),
    ("[daemon]\nworkers = 100000", "daemon.workers", "must be at most 256"),
    ("[projects.acme]\nsettle_seconds = inf", "projects.acme.settle_seconds", "finite"),
    ("[projects.acme]\nsettle_seconds = 1e308", "projects.acme.settle_seconds",
     "must be at most 31536000"),
    ("[projects.acme]\njob_timeout_seconds = -inf", "projects.acme.job_timeout_seconds",
     "finite"),
    ("[projects.acme]\njob_timeout_seconds = 99999999999999999999999",
     "projects.acme.job_timeout_seconds", "must be at most 31536000"),
    ("[projects.acme]\nmax_attempts = 9223372036854775808", "projects.acme.max_attempts",
     "must be at most 1000"),
], ids=lambda value: value.split("\n")[-1] if "\n" in str(value) else None)
def test_config_check_refuses_numbers_out_of_bounds(tmp_path, drop, body, key, expected):
    """Every number is finite and every count and duration has an upper bound, said in the
    one line naming the file and the key."""
    assert_one_problem(tmp_path, drop, body, key, expected)


@pytest.mark.parametrize("body, key, expected", [
    ('[daemon]\nevent_log = "{drop}/events.jsonl"', "daemon.event_log",
     "inside the watched folder {drop} of project 'acme'"),
    ('[daemon]\nevent_socket = "{drop}/events.sock"', "daemon.event_socket", "inside"),
    ('[daemon]\ncontrol_socket = "{drop}/sub/control.sock"', "daemon.control_socket", "inside"),
    ('[daemon]\nstate_dir = "{drop}/state"', "daemon.state_dir", "holds the state directory"),
    ('[daemon]\ndatabase = "sqlite:///{drop}/ingestd.db"', "daemon.database", "inside"),
    ('[projects.other]\nfolders = ["{other}"]\nafter = "move"\nmove_to = "{drop}/moved"',
     "projects.other.move_to", "inside the watched folder {drop} of project 'acme'"),
    ('[projects.acme]\nfolders = ["{other}"]\nafter = "move"\nmove_to = "{other}/.."',
     "projects.acme.move_to", "holds the watched folder"),
], ids=["event_log", "event_socket", "control_socket", "state_dir", "database", "move_to",
        "move_to holding a folder"])
def test_config_check_refuses_written_paths_inside_a_watched_folder(tmp_path, drop, body, key,
                                                                     expected):
    """What the daemon writes (state, log, sockets, database, moved originals of any project)
    must not be in any project's folder, or it would be ingested again and again."""
    assert_one_problem(tmp_path, drop, body, key, expected)


def test_a_move_to_of_a_project_that_keeps_its_files_may_be_anywhere(tmp_path, drop):
    """move_to is only written with after = "move" or "delete"."""
    path = write_config(tmp_path, f'[projects.acme]\nfolders = ["{drop}"]\n'
                                  f'move_to = "{drop}/moved"\n')
    assert config_mod.load(path).projects["acme"].move_to == drop / "moved"


@pytest.mark.parametrize("body, expected", [
    ('database = "sqlite://rel.db"', "sqlite://HOST/... is not understood"),
    ('database = "sqlite://"', "sqlite://HOST/... is not understood"),
    ('database = "sqlite:///"', "names no database file"),
    ('database = "mysql://user:secret@db.example/ingestd"',
     "unsupported database URL scheme 'mysql'"),
], ids=["host", "no-path", "empty", "mysql"])
def test_config_check_refuses_database_urls_the_store_cannot_open(tmp_path, drop, body, expected):
    """A SQLite URL with a host, or no file, and an unsupported scheme: one line naming the
    key (and never the URL's password)."""
    result = assert_one_problem(tmp_path, drop, f"[daemon]\n{body}", "daemon.database", expected)
    assert "secret" not in result.stderr


@pytest.mark.parametrize("url, expected", [
    ("sqlite:///rel.db", "sqlite:///{base}/rel.db"),
    ("sqlite:rel.db", "sqlite:///{base}/rel.db"),
    ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
    ("sqlite:/abs/x.db", "sqlite:////abs/x.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("sqlite::memory:", "sqlite::memory:"),
    ("postgresql://ingestd@db.example/ingestd", "postgresql://ingestd@db.example/ingestd"),
])
def test_a_relative_sqlite_path_is_relative_to_the_config_file(tmp_path, drop, monkeypatch, url,
                                                               expected):
    """Every SQLite URL form with a relative path resolves against the file's folder, not the
    working directory, and comes out as sqlite:///ABSOLUTE-PATH."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_config(tmp_path, f'[daemon]\ndatabase = "{url}"\n[projects.acme]\nfolders = ["{drop}"]\n')
    assert config_mod.load(path).daemon.database == expected.replace("{base}", str(tmp_path))


def test_db_migrate_creates_a_relative_sqlite_file_next_to_the_config(tmp_path, drop):
    """`sqlite:rel.db`, used from another working directory, is the file beside the config."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = write_config(tmp_path, f'[daemon]\ndatabase = "sqlite:rel.db"\n'
                                  f'[projects.acme]\nfolders = ["{drop}"]\n')
    result = run_cli("db", "migrate", config=path, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rel.db").is_file() and not (elsewhere / "rel.db").exists()


def test_the_bounds_themselves_are_accepted(tmp_path, drop):
    """The upper bounds are inclusive: a config at every limit is valid."""
    path = write_config(tmp_path, f"""
        [daemon]
        workers = 256
        rescan_seconds = 31536000
        lease_seconds = 31536000
        shutdown_grace_seconds = 31536000
        event_retention_days = 36500
        [projects.acme]
        folders = ["{drop}"]
        settle_seconds = 31536000
        job_timeout_seconds = 31536000
        max_attempts = 1000
    """)
    cfg = config_mod.load(path)
    assert cfg.daemon.workers == 256 and cfg.projects["acme"].max_attempts == 1000


def assert_one_problem(tmp_path: Path, drop: Path, body: str, key: str, expected: str):
    """`config check` of ``body`` (with project acme on ``drop`` unless it has its own
    [projects.acme]) exits 1 with exactly one line: the file, ``key``, ``expected``."""
    other = tmp_path / "drop" / "other"
    other.mkdir(exist_ok=True)
    if "[projects.acme]" not in body:
        body += "\n[projects.acme]\n"
    if "folders" not in body.split("[projects.acme]", 1)[1]:
        body = body.replace("[projects.acme]", '[projects.acme]\nfolders = ["{drop}"]', 1)
    path = write_config(tmp_path, body.replace("{drop}", str(drop)).replace("{other}", str(other)))
    result = run_cli("config", "check", config=path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ingestd: {path}: {key}: "), lines[0]
    assert expected.replace("{drop}", str(drop)) in lines[0], lines[0]
    return result
