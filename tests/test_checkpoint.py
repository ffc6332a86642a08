"""The background WAL checkpointer, on real SQLite files written by another connection."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from conftest import wait_for
from ingestd.checkpoint import WalCheckpointer

PAGE = 4096


def wal_writer(path: Path) -> sqlite3.Connection:
    """A connection that never checkpoints: whatever reaches the database file, the
    checkpointer copied there."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute(f"PRAGMA page_size = {PAGE}")
    connection.execute("PRAGMA journal_mode = wal")
    connection.execute("PRAGMA wal_autocheckpoint = 0")
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
    return connection


def write(connection: sqlite3.Connection, rows: int) -> int:
    """Commit ``rows`` rows, 50 a transaction; the database's size in pages then."""
    for _ in range(rows // 50):
        connection.execute("BEGIN")
        connection.executemany("INSERT INTO t (body) VALUES (?)", [(os.urandom(3000),)] * 50)
        connection.execute("COMMIT")
    return connection.execute("PRAGMA page_count").fetchone()[0]


def pages_in_file(path: Path) -> int:
    return path.stat().st_size // PAGE


@pytest.fixture
def checkpointer():
    started: list[WalCheckpointer] = []

    def start(path: Path) -> WalCheckpointer:
        started.append(WalCheckpointer(str(path), interval=0.01))
        started[-1].start()
        return started[-1]

    yield start
    for each in started:
        each.stop()


def test_it_copies_committed_pages_into_the_database_file(tmp_path, checkpointer):
    path = tmp_path / "store.db"
    writer = wal_writer(path)
    page_count = write(writer, 500)
    assert pages_in_file(path) < page_count / 10  # all of it still in the WAL
    checkpointer(path)
    wait_for(lambda: pages_in_file(path) == page_count, timeout=30,
             message="every page in the database file")
    writer.close()


def test_it_keeps_up_when_the_log_starts_over(tmp_path, checkpointer):
    """Once every frame is copied back, the next writer writes the WAL from its start again:
    the same file, the same size; those frames must be copied too."""
    path = tmp_path / "store.db"
    writer = wal_writer(path)
    checkpointer(path)
    for round_ in range(3):
        page_count = write(writer, 200)
        wait_for(lambda: pages_in_file(path) == page_count, timeout=30,
                 message=f"round {round_}'s pages in the database file")
    writer.close()


def test_a_database_switched_to_wal_after_it_was_first_opened_is_checkpointed(
        tmp_path, checkpointer):
    """A database file made but not yet in WAL mode (its maker sets that next) checkpoints
    as nothing; a connection that found it so would never see the switch, and never copy a
    page."""
    path = tmp_path / "store.db"
    maker = sqlite3.connect(path, isolation_level=None)
    running = checkpointer(path)
    wait_for(lambda: running.tries >= 2, timeout=30, message="tries before the switch")
    maker.close()
    writer = wal_writer(path)
    page_count = write(writer, 100)
    wait_for(lambda: pages_in_file(path) == page_count, timeout=30,
             message="the pages in the database file")
    writer.close()


def test_a_failing_checkpoint_is_logged_once_and_tried_again(tmp_path, checkpointer):
    path = tmp_path / "store.db"
    path.write_bytes(b"not a database at all " * 300)
    Path(f"{path}-wal").write_bytes(b"nor a log")
    with capture_logs() as logs:
        running = checkpointer(path)
        wait_for(lambda: running.tries >= 5, timeout=30, message="five tries")  # none fatal
        assert running.checkpoints == 0
        path.unlink(missing_ok=True)
        Path(f"{path}-wal").unlink(missing_ok=True)
        writer = wal_writer(path)  # a real database there now
        page_count = write(writer, 100)
        wait_for(lambda: pages_in_file(path) == page_count, timeout=30,
                 message="the new database's pages in its file")
        writer.close()
    said = [entry["event"] for entry in logs if entry["event"].startswith("wal_checkpoint")]
    assert said == ["wal_checkpoint_failed", "wal_checkpoint_works_again"]
    failed = next(entry for entry in logs if entry["event"] == "wal_checkpoint_failed")
    assert failed["path"] == str(path) and "not a database" in failed["reason"]
