"""Configuration: lookup order, defaults, and one clear line per problem."""

from __future__ import annotations

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


def test_config_check_prints_the_effective_config(config_file):
    """`config check` exits 0 and shows every project with its inherited values."""
    result = run_cli("config", "check", config=config_file)
    assert result.returncode == 0, result.stderr
    assert "[projects.acme]" in result.stdout and "max_bytes = 1000000" in result.stdout
    as_json = run_cli("config", "check", "--json", config=config_file)
    import json
    assert json.loads(as_json.stdout)["projects"]["other"]["max_bytes"] == 1000000


def test_config_check_reports_errors_and_exits_1(tmp_path):
    """A missing file or a bad one: exit 1, the problem on stderr, nothing on stdout."""
    result = run_cli("config", "check", config=tmp_path / "missing.toml")
    assert result.returncode == 1
    assert "missing.toml: no such config file" in result.stderr
    assert "Traceback" not in result.stderr


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
