"""Shared fixtures: real folders, real config files, a real SQLite store per test."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from ingestd import config as config_mod, db
from ingestd.procpool import ExtractorPool

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal gives it, whoever started the tests: a shell running them in the
    background ignores SIGINT, and its children (every ingestd the tests start) inherit that,
    so the tests of what Ctrl-C does would see nothing happen. A handler of our own is not
    inherited: the children start with the default, as from a terminal."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def write_config(directory: Path, body: str) -> Path:
    path = directory / "ingestd.toml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    """An empty drop folder of project ``acme``."""
    folder = tmp_path / "drop" / "acme"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def config_file(tmp_path: Path, drop: Path) -> Path:
    """A config with projects ``acme`` (the ``drop`` folder) and ``other``."""
    (tmp_path / "drop" / "other").mkdir()
    return write_config(tmp_path, f"""
        [daemon]
        state_dir = "state"
        workers = 2

        [defaults]
        max_bytes = 1000000

        [projects.acme]
        folders = ["{drop}"]

        [projects.other]
        folders = ["drop/other"]
    """)


@pytest.fixture
def cfg(config_file: Path) -> config_mod.Config:
    return config_mod.load(config_file)


@pytest.fixture
def store(cfg: config_mod.Config):
    """The models bound to a fresh SQLite file, migrated."""
    database = db.open_store(cfg.daemon.database)
    yield database
    db.close_store()


PG_URL = os.environ.get("INGESTD_TEST_PG_URL")
PG_SKIP = "PostgreSQL tests need INGESTD_TEST_PG_URL (set by .ci/run), e.g. postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_url() -> str:
    """A URL for a fresh, empty schema of the test PostgreSQL database, dropped afterwards. Its
    connections are named after the schema (application_name): a test that cuts or counts
    connections touches only its own, not those of a suite running beside it."""
    if not PG_URL:
        pytest.skip(PG_SKIP)
    import uuid

    import psycopg

    schema = f"ingestd_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{separator}application_name={schema}&options=-csearch_path%3D{schema}"
    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


def schema_of(url: str) -> str:
    """The schema of a :func:`pg_url` URL, which is also its connections' application_name."""
    return url.split("search_path%3D")[1]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, cfg: config_mod.Config) -> config_mod.Config:
    """The test's config on each database: its SQLite file, then a PostgreSQL schema."""
    if request.param == "sqlite":
        return cfg
    return config_mod.with_database(cfg, request.getfixturevalue("pg_url"))


@pytest.fixture
def any_store(backend: config_mod.Config):
    """The models bound to a fresh database of each kind, migrated (state machine tests)."""
    database = db.open_store(backend.daemon.database)
    yield database
    db.close_store()


def without_dac_override(why: str) -> list[str]:
    """A wrapper that runs a command as root without the capabilities that let root read and
    write any file: files' own modes apply. Skips the test (saying ``why`` it needs them)
    where there is no root or no setpriv."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip(f"needs root and setpriv {why}")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def run_cli(*args: str, config: Path | None = None, cwd: Path | None = None,
            stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m ingestd ARGS`` as a real subprocess."""
    env = dict(os.environ)
    env.pop("INGESTD_CONFIG", None)
    command = [sys.executable, "-m", "ingestd"]
    if config is not None:
        command += ["-c", str(config)]
    return subprocess.run(command + list(args), capture_output=True, text=True, env=env,
                          cwd=cwd, input=stdin, timeout=timeout)


def wait_for(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.02,
             message: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


HOLD = """
import mmap, os, sys
path, how = sys.argv[1], sys.argv[2]
if how == "mapped":  # a writable shared mapping outlives its descriptor
    fd = os.open(path, os.O_RDWR)
    held = mmap.mmap(fd, 1)
    os.close(fd)
else:
    held = open(path, how)
print("holding", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def held(path: Path, how: str) -> Iterator[None]:
    """Another process holds ``path`` (opened with mode ``how``, or ``mapped``) until the block
    ends; it has the file once it says so."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path), how],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "holding\n"
        yield
    finally:
        child.stdin.close()
        child.wait(timeout=10)


@pytest.fixture
def leases_allowed() -> Iterator[None]:
    """SIGIO ignored, as the daemon's main thread sets it."""
    before = signal.signal(signal.SIGIO, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGIO, before)


@pytest.fixture
def another_file_system(tmp_path) -> Iterator[Path]:
    """A folder on another file system than tmp_path's (/dev/shm), where a move is a copy."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system at /dev/shm")
    folder = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="ingestd-test-"))
    yield folder
    shutil.rmtree(folder)


@pytest.fixture(params=["same file system", "another file system"])
def move_to(request, tmp_path) -> Path:
    """A move_to folder on the drop folder's file system, or on another one, where a move is a
    copy and the quarantined copy has another inode."""
    if request.param == "same file system":
        return tmp_path / "moved"
    return request.getfixturevalue("another_file_system")


@pytest.fixture
def extractors() -> Iterator[ExtractorPool]:
    """One extraction process, for jobs run in the test's own process."""
    pool = ExtractorPool(1)
    yield pool
    pool.close()
