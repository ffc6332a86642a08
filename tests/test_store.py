"""The store: migrations, refusal of newer schemas, clear errors on bad or locked files."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from ingestd import db, jobs, lockwait, migrations
from ingestd.errors import StoreError
from ingestd.models import Event

from conftest import run_cli, write_config


def url_of(tmp_path, name="s.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def migrate_sqlite_to(path, version: int) -> None:
    """A SQLite file at schema ``version``, as the ingestd of that version left it."""
    database = db.connect(f"sqlite:///{path}")
    migrations._ensure_history(database)
    for number, name, step in migrations.MIGRATIONS[:version]:
        step(database, migrations.DIALECTS["sqlite"])
        database.execute_sql("INSERT INTO schema_migrations VALUES (?, ?, 0)", (number, name))
    database.close()


def test_migrate_from_an_empty_file_then_rerun_is_a_no_op(tmp_path):
    """A new file gets every migration once; running again applies nothing."""
    database = db.connect(url_of(tmp_path))
    assert migrations.migrate(database) == [m[0] for m in migrations.MIGRATIONS]
    assert migrations.migrate(database) == []
    assert migrations.current_version(database) == migrations.LATEST
    rows = database.execute_sql("SELECT version FROM schema_migrations").fetchall()
    assert [r[0] for r in rows] == [m[0] for m in migrations.MIGRATIONS]
    database.close()


def test_sqlite_is_opened_with_wal_busy_timeout_and_foreign_keys(tmp_path):
    """The pragmas that make SQLite a safe multi-process store are on."""
    database = db.open_store(url_of(tmp_path))
    pragma = lambda name: database.execute_sql(f"PRAGMA {name}").fetchone()[0]
    assert pragma("journal_mode") == "wal"
    assert pragma("foreign_keys") == 1
    assert pragma("busy_timeout") == db.BUSY_TIMEOUT_SECONDS * 1000
    assert pragma("journal_size_limit") == 64 << 20  # a WAL grown by a long read shrinks back
    db.close_store()


def test_a_new_file_gets_8k_pages_and_an_existing_file_keeps_its_own(tmp_path):
    """New stores get 8 KB pages (more 2 KB documents per page written); a store made with
    4 KB pages is opened, written and read as it is."""
    database = db.open_store(url_of(tmp_path, "new.db"))
    assert database.execute_sql("PRAGMA page_size").fetchone()[0] == 8192
    db.close_store()
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as raw:
        raw.execute("PRAGMA page_size = 4096")
        raw.execute("PRAGMA journal_mode = wal")
        raw.execute("CREATE TABLE before_us (x)")
    raw.close()
    database = db.open_store(url_of(tmp_path, "old.db"))
    assert database.execute_sql("PRAGMA page_size").fetchone()[0] == 4096
    source = jobs.ensure_source("p", "/srv/p")
    assert database.execute_sql("SELECT id FROM ingest_sources").fetchone()[0] == source
    db.close_store()


def test_a_newer_schema_is_refused_and_not_touched(tmp_path):
    """A database migrated by a newer ingestd is refused with a clear error, unchanged."""
    path = tmp_path / "s.db"
    database = db.connect(url_of(tmp_path))
    migrations.migrate(database)
    database.execute_sql("INSERT INTO schema_migrations VALUES (999, 'future', 0)")
    database.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="version 999, newer than this ingestd"):
        db.open_store(url_of(tmp_path))
    db.close_store()
    assert path.read_bytes() == before


def test_commands_refuse_an_older_schema_and_leave_it_to_db_migrate(tmp_path, drop):
    """A CLI command does not migrate: an older daemon may still be writing to the database
    (the v6 change would leave its chunks out of the full-text index). It says what to do,
    in one line; `ingestd db migrate` then migrates."""
    path = tmp_path / "state" / "ingestd.db"
    path.parent.mkdir()
    migrate_sqlite_to(path, migrations.LATEST - 1)  # as the ingestd before the last
    config = write_config(tmp_path, f'[daemon]\nstate_dir = "state"\n'
                                    f'[projects.acme]\nfolders = ["{drop}"]\n')
    for command in (["jobs", "list", "-p", "acme"], ["search", "-p", "acme", "word"],
                    ["stats"], ["events"]):
        result = run_cli(*command, config=config)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert (f"database schema is version {migrations.LATEST - 1}, older than this "
                "ingestd's") in result.stderr and "ingestd db migrate" in result.stderr
    assert migrations.current_version(db.connect(f"sqlite:///{path}")) == migrations.LATEST - 1
    assert run_cli("db", "migrate", config=config).returncode == 0
    assert run_cli("jobs", "list", "-p", "acme", config=config).returncode == 0


def test_a_corrupt_file_is_a_clear_error(tmp_path):
    """A file that is not a database gives one line naming it."""
    (tmp_path / "s.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="s.db: not a usable database"):
        db.open_store(url_of(tmp_path))
    db.close_store()


def test_a_locked_database_is_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    """A write lock held by someone else ends a write in a clear error after the busy timeout."""
    monkeypatch.setitem(db.SQLITE_PRAGMAS, "busy_timeout", 300)
    db.open_store(url_of(tmp_path))
    holder = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    try:
        with pytest.raises(StoreError, match="database is locked"):
            with db.translate_errors():
                jobs.emit(jobs.DAEMON_STARTED, {})
    finally:
        holder.execute("ROLLBACK")
        db.close_store()
    assert time.monotonic() - started < 5


def test_a_full_database_says_so_and_takes_writes_again_once_there_is_room(tmp_path):
    """SQLite rolls the transaction back by itself when the disk is full (here: the file may
    not grow past max_page_count). The error says so, not what the ROLLBACK after it said
    ("no transaction is active"), and the write lock is free again: once there is room, a
    write from another thread (its own connection and lock file descriptor) commits."""
    database = db.open_store(url_of(tmp_path))
    try:
        pages = database.execute_sql("PRAGMA page_count").fetchone()[0]
        database.execute_sql(f"PRAGMA max_page_count = {pages + 2}")
        with pytest.raises(StoreError, match="database or disk is full"):
            with db.translate_errors():
                jobs.emit(jobs.DAEMON_STARTED, {"padding": "x" * 100_000})
        database.execute_sql("PRAGMA max_page_count = 1073741823")
        other = threading.Thread(target=lambda: jobs.emit(jobs.DAEMON_STARTED, {}))
        other.start()
        other.join(10)
        assert not other.is_alive()
        assert [event.data for event in Event.select()] == ["{}"]
    finally:
        db.close_store()


def test_cli_reports_a_corrupt_database_in_one_line(tmp_path, config_file):
    """The CLI prints one line and exits 1 for an unusable database."""
    state = config_file.parent / "state"
    state.mkdir()
    (state / "ingestd.db").write_bytes(b"\0garbage" * 512)
    result = run_cli("jobs", "list", "-p", "acme", config=config_file)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "not a usable database" in result.stderr


def test_db_migrate_command(config_file):
    """`db migrate` applies, then reports up to date."""
    first = run_cli("db", "migrate", config=config_file)
    assert first.returncode == 0 and "applied migrations 1" in first.stdout
    second = run_cli("db", "migrate", config=config_file)
    assert second.returncode == 0 and "up to date" in second.stdout


def test_a_wait_names_the_process_holding_sqlites_lock_outside_the_queue(tmp_path):
    """A sqlite3 shell never queues on the lock file: it holds SQLite's write lock while the
    head of ingestd's queue (holding the lock file) waits in SQLite's busy handler. A wait
    behind that head names the shell, not the head, which only waits too."""
    path = tmp_path / "a.db"
    queued = db.connect(f"sqlite:///{path}")
    with queued.atomic():  # WAL mode, and the lock file, exist
        queued.execute_sql("CREATE TABLE t (a INTEGER)")
    shell = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('BEGIN IMMEDIATE'); print('held', flush=True); time.sleep(60)"), str(path)],
        stdout=subprocess.PIPE, text=True)
    head = os.open(f"{path}.writelock", os.O_RDONLY)
    behind = os.open(f"{path}.writelock", os.O_RDONLY)
    try:
        assert shell.stdout.readline() == "held\n"
        fcntl.flock(head, fcntl.LOCK_EX)  # the queue's head, now waiting on the shell
        said = lockwait.holder(behind, str(path))
        assert said.startswith(f"pid {shell.pid} (") and "outside ingestd's queue" in said, said
        shell.kill()
        shell.wait()
        assert lockwait.holder(behind, str(path)).startswith(f"pid {os.getpid()} (")
    finally:
        shell.kill()
        shell.wait()
        os.close(head)
        os.close(behind)
        queued.close()


def test_writes_queue_on_a_lock_file_and_go_on_without_one(tmp_path):
    """Write transactions take the lock file beside the database; where it cannot be opened
    (here: a dangling symlink), SQLite's own lock is enough and writes still commit."""
    queued = db.connect(f"sqlite:///{tmp_path / 'a.db'}")
    with queued.atomic():
        queued.execute_sql("CREATE TABLE t (a INTEGER)")
    assert (tmp_path / "a.db.writelock").is_file()
    (tmp_path / "b.db.writelock").symlink_to(tmp_path / "missing" / "lock")
    unqueued = db.connect(f"sqlite:///{tmp_path / 'b.db'}")
    with unqueued.atomic():
        unqueued.execute_sql("CREATE TABLE t (a INTEGER)")
        unqueued.execute_sql("INSERT INTO t VALUES (1)")
    assert unqueued.execute_sql("SELECT count(*) FROM t").fetchone()[0] == 1
    queued.close()
    unqueued.close()


@pytest.fixture(params=["sqlite", "postgres"])
def bare_url(request, tmp_path) -> str:
    """An empty database of each kind, not migrated."""
    if request.param == "sqlite":
        return url_of(tmp_path)
    return request.getfixturevalue("pg_url")


def _index_definitions(database, table: str = "ingest_jobs") -> dict[str, str]:
    if db.is_postgres():
        rows = database.execute_sql("SELECT indexname, indexdef FROM pg_indexes WHERE "
                                    "tablename = %s AND schemaname = current_schema()",
                                    (table,)).fetchall()
    else:
        rows = database.execute_sql("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                                    "AND tbl_name = ? AND sql IS NOT NULL", (table,)).fetchall()
    return {name: " ".join(definition.split()) for name, definition in rows}


def test_migration_7_repairs_what_older_schemas_left_behind(bare_url, tmp_path):
    """A database brought to schema 6 by older code: a document of schema 2-3 with no chunks,
    chunks an older daemon wrote after migration 6 (never full-text indexed on SQLite), and
    the claim index of migration 5's first form. Migration 7 makes both documents searchable
    and the indexes those of a new database."""
    from ingestd import search
    from ingestd.jobs import FileVersion
    from ingestd.models import database

    db.open_store(bare_url)
    fresh = _index_definitions(database)
    for index, text in enumerate(["an old zebrafish document, never chunked",
                                  "a quokka whose chunk missed the full-text index",
                                  "a text sink's wombat, which no index may show"]):
        version = FileVersion(f"/drop/{index}.txt", f"{index}.txt", len(text), index, index,
                              "text/plain")
        jobs.create("acme", "/drop", version, 3)
        [claimed] = jobs.claim("w1")
        written = 0 if index == 0 else time.time()  # before migration 4, or after
        document_id = database.execute_sql(
            "INSERT INTO documents (project_id, content_sha256, source_path, text, created_at) "
            f"VALUES ('acme', 'sha{index}', {database.param}, {database.param}, "
            f"{database.param}) RETURNING id", (version.path, text, written)).fetchone()[0]
        jobs.complete(claimed.id, "w1", canonical_document_id=document_id,
                      content_sha256=f"sha{index}")
        if index == 1:  # as a schema-4 daemon wrote after migration 6: no full-text entry
            database.execute_sql(
                "INSERT INTO chunks (document_id, project_id, seq, start_offset, end_offset, "
                f"text) VALUES ({document_id}, 'acme', 0, 0, {len(text)}, {database.param})",
                (text,))
    database.execute_sql("DROP INDEX ix_jobs_claim")
    database.execute_sql("DROP INDEX ix_jobs_ended")
    database.execute_sql("CREATE INDEX ix_jobs_claimable ON ingest_jobs (id) "
                         "WHERE status = 'queued'")
    database.execute_sql("CREATE INDEX ix_jobs_ended ON ingest_jobs "
                         "(project_id, status, completed_at) WHERE deleted_at IS NULL")
    database.execute_sql("DELETE FROM schema_migrations WHERE version >= 7")  # back to 6
    assert search.search("acme", "zebrafish") == []  # the damage, before the repair
    if not db.is_postgres():  # a generated tsvector column cannot miss a chunk
        assert search.search("acme", "quokka") == []
    db.close_store()
    db.open_store(bare_url)  # applies 7 (and what follows) to the damaged database
    assert [hit.document_id for hit in search.search("acme", "zebrafish")] == [1]
    assert [hit.document_id for hit in search.search("acme", "quokka")] == [2]
    assert search.search("acme", "wombat") == []
    assert _index_definitions(database) == fresh
    db.close_store()


def test_migration_8_makes_the_full_text_index_merge_16_segments_at_a_time(tmp_path):
    """A new database and one of schema 7 alike: FTS5 keeps the settings in its config table."""
    def merging(path) -> dict[str, int]:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            return dict(connection.execute(
                "SELECT k, v FROM chunks_fts_config WHERE k IN ('automerge', 'crisismerge')"))

    migrate_sqlite_to(tmp_path / "older.db", 7)
    assert merging(tmp_path / "older.db") == {}  # FTS5's defaults: 4 and 16
    for name in ("older.db", "new.db"):
        db.open_store(url_of(tmp_path, name))
        db.close_store()
        assert merging(tmp_path / name) == {"automerge": 16, "crisismerge": 64}


def test_migration_9_rekeys_versions_in_file_order_and_drops_the_documents_sha_index(bare_url):
    """Jobs made by older code (keys of the hash alone, the documents' content index) are
    re-keyed as new code keys them: their files, found again, get no second job."""
    from ingestd.jobs import FileVersion
    from ingestd.models import Job, database

    versions = [FileVersion("/drop/a.txt", "a.txt", 5, 1_700_000_000_123_456_789, 11, "text/plain"),
                FileVersion("/drop/b.txt", "b.txt", 6, None, None, "text/plain")]
    db.open_store(bare_url)
    for version in versions:
        jobs.create("acme", "/drop", version, 3)
    # As code of schema 8 left them: the hash alone, and the index on documents.
    database.execute_sql("UPDATE ingest_jobs SET version_key = substr(version_key, 22)")
    database.execute_sql("CREATE INDEX ix_documents_sha ON documents (project_id, content_sha256)")
    database.execute_sql("DELETE FROM schema_migrations WHERE version >= 9")
    assert all(len(job.version_key) == 64 for job in Job.select())
    db.close_store()
    db.open_store(bare_url)  # applies 9
    keys = [row[0] for row in database.execute_sql(
        "SELECT version_key FROM ingest_jobs ORDER BY id").fetchall()]
    assert keys == [version.key("acme") for version in versions]
    assert keys[0].startswith("01700000000123456789.") and keys[1].startswith("0" * 20 + ".")
    assert [jobs.create("acme", "/drop", version, 3)[1] for version in versions] == [False, False]
    assert "ix_documents_sha" not in _index_definitions(database, "documents")
    v9 = dict((number, step) for number, _, step in migrations.MIGRATIONS)[9]
    v9(database.obj, migrations.DIALECTS[migrations.dialect_name(database.obj)])
    assert [row[0] for row in database.execute_sql(  # run again, it changes nothing
        "SELECT version_key FROM ingest_jobs ORDER BY id").fetchall()] == keys
    db.close_store()


def test_migration_10_reads_new_chunks_text_from_their_documents_and_keeps_the_old(tmp_path):
    """A SQLite file of schema 9 with chunks as its code wrote them (their text stored, offsets
    that took in the space around it): after migration 10 they are found as before, a new
    chunk stores no text and is found through its document, and the full-text index agrees
    with both, also after deletes. FTS5's merge settings survive its new table."""
    from ingestd import search
    from ingestd.config import ProjectConfig
    from ingestd.sinks import Document
    from ingestd.sinks.index import IndexSink
    from test_index import assert_full_text_index_consistent

    path = tmp_path / "nine.db"
    migrate_sqlite_to(path, 9)
    old_text = "  an old capybara passage  "
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("INSERT INTO documents (id, project_id, content_sha256, source_path, "
                           "text, created_at) VALUES (7, 'acme', 'sha', '/drop/old.txt', ?, 0)",
                           (old_text,))
        connection.execute("INSERT INTO chunks (id, document_id, project_id, seq, start_offset, "
                           "end_offset, text) VALUES (41, 7, 'acme', 0, 0, ?, ?)",
                           (len(old_text), old_text.strip()))
        connection.execute("INSERT INTO chunks_fts (rowid, text) SELECT id, text FROM chunks")
    db.open_store(url_of(tmp_path, "nine.db"))  # applies 10
    try:
        database = db.database
        assert [(hit.document_id, hit.snippet) for hit in search.search("acme", "capybara")] == [
            (7, "an old [capybara] passage")]
        nullable = {row[1]: not row[3] for row in database.execute_sql("PRAGMA table_info(chunks)")}
        assert nullable["text"] and not nullable["start_offset"]
        sink = IndexSink(ProjectConfig(name="acme", folders=()))
        new_text = "a new tapir passage"
        document = Document("acme", 1, new_text, "/drop/new.txt", "new.txt", "text/plain",
                            "0" * 64, ((0, len(new_text)),))
        with database.atomic():
            [new_id] = sink.ingest_many([(document, sink.parts_of(document))])
        assert database.execute_sql("SELECT id, text FROM chunks WHERE document_id = ?",
                                    (new_id,)).fetchall() == [(42, None)]
        assert [hit.snippet for hit in search.search("acme", "tapir")] == ["a new [tapir] passage"]
        assert_full_text_index_consistent()
        sink.delete(7)
        sink.delete(new_id)
        assert search.search("acme", "capybara OR tapir") == []
        assert_full_text_index_consistent()
        assert dict(database.execute_sql(
            "SELECT k, v FROM chunks_fts_config WHERE k IN ('automerge', 'crisismerge')")) == {
            "automerge": 16, "crisismerge": 64}
    finally:
        db.close_store()


def test_migration_14_drops_the_text_older_code_kept_of_deleted_documents(bare_url):
    """Older code marked a deleted document and kept its text for good: migration 14 drops
    that text (and any chunk left of it, out of the full-text index too) and keeps the live
    documents searchable."""
    from ingestd import search
    from ingestd.config import ProjectConfig
    from ingestd.models import database
    from ingestd.sinks import Document
    from ingestd.sinks.index import IndexSink
    from test_index import assert_full_text_index_consistent

    db.open_store(bare_url)
    sink = IndexSink(ProjectConfig(name="acme", folders=()))
    texts = ["a live okapi passage", "a secret walrus passage"]
    with database.atomic():
        live, gone = sink.ingest_many([(document, sink.parts_of(document)) for document in (
            Document("acme", job_id, text, f"/drop/{job_id}.txt", f"{job_id}.txt",
                     "text/plain", str(job_id) * 64, ((0, len(text)),))
            for job_id, text in enumerate(texts, start=1))])
    # As code of schema 13 left a deleted document: marked, its text kept (its chunk left too).
    database.execute_sql(f"UPDATE documents SET deleted_at = 1 WHERE id = {gone}")
    database.execute_sql("DELETE FROM schema_migrations WHERE version >= 14")
    db.close_store()
    db.open_store(bare_url)  # applies 14
    try:
        assert database.execute_sql("SELECT id, text FROM documents ORDER BY id").fetchall() == [
            (live, texts[0]), (gone, "")]
        assert database.execute_sql("SELECT count(*) FROM chunks").fetchone() == (1,)
        assert [hit.document_id for hit in search.search("acme", "passage")] == [live]
        assert_full_text_index_consistent()
    finally:
        db.close_store()


def test_a_daemon_on_a_new_database_says_it_makes_one_not_ten_migrations(tmp_path):
    """A new database gets the whole schema: one `migrating` line for it, not one per
    migration, named after upgrades and repairs that never happened."""
    from harness import Daemon, node_config

    (tmp_path / "drop").mkdir()
    config = node_config(tmp_path, "node", url_of(tmp_path, "new.db"), tmp_path / "drop")
    daemon = Daemon(config.parent, config)
    daemon.start()
    try:
        lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
        migrating = [(line["version"], line["name"]) for line in lines
                     if line["event"] == "migrating"]
        assert migrating == [(migrations.LATEST, "a new database")]
        assert f"STATUS=migrating the database to schema {migrations.LATEST}: a new database" in (
            daemon.notify.messages)
    finally:
        assert daemon.stop() == 0


def test_a_daemon_that_migrates_at_start_says_so_and_extends_its_start_timeout(tmp_path):
    """A migration can take minutes (10 reindexes every chunk on SQLite): the daemon logs it,
    shows it in systemd's STATUS=, and extends systemd's start timeout before it is ready."""
    from harness import Daemon, node_config

    (tmp_path / "drop").mkdir()
    migrate_sqlite_to(tmp_path / "nine.db", 9)
    config = node_config(tmp_path, "node", url_of(tmp_path, "nine.db"), tmp_path / "drop")
    daemon = Daemon(config.parent, config)
    daemon.start()
    try:
        messages = daemon.notify.messages
        ready = next(index for index, m in enumerate(messages) if "READY=1" in m)
        migrating = next(index for index, m in enumerate(messages) if m.startswith(
            "STATUS=migrating the database to schema 10: "))
        extended = next(index for index, m in enumerate(messages) if m.startswith(
            "EXTEND_TIMEOUT_USEC=30000000"))
        assert migrating < ready and extended < ready
        assert '"version": 10' in daemon.log() and '"event": "migrating"' in daemon.log()
    finally:
        assert daemon.stop() == 0


def test_the_start_extender_extends_until_its_step_ends(tmp_path, monkeypatch):
    """Once started, it extends systemd's start timeout at once and every third of the
    extension; when the step ends it stops."""
    import socket

    from ingestd.systemd import Notifier, StartExtender

    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = Notifier()
    with StartExtender(notifier, 0.3) as extender:
        receiver.settimeout(0.2)
        with pytest.raises(TimeoutError):
            receiver.recv(100)  # nothing before it is started
        receiver.settimeout(10)
        extender.start()
        got = [receiver.recv(100) for _ in range(3)]  # at once, then every 0.1 s
    assert got == [b"EXTEND_TIMEOUT_USEC=300000"] * 3
    receiver.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:  # sent before the block ended (a datagram is queued as it is sent)
            receiver.recv(100)
    receiver.settimeout(0.3)  # three of its intervals: nothing more comes
    with pytest.raises(TimeoutError):
        receiver.recv(100)
    receiver.close()
