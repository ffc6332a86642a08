"""Open the store from a database URL: SQLite (WAL, busy timeout, foreign keys) or PostgreSQL."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import peewee as pw
import structlog

from ingestd.errors import StoreError
from ingestd.models import database

T = TypeVar("T")
BUSY_TIMEOUT_SECONDS = 10.0
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "synchronous": "normal",  # with WAL: durable across process crashes, one fsync per checkpoint
    "busy_timeout": int(BUSY_TIMEOUT_SECONDS * 1000),
}


def is_postgres(db: pw.Database | None = None) -> bool:
    db = db or database.obj
    return isinstance(db, pw.PostgresqlDatabase)


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':')[0]}@{host}"
    return url


def connect(url: str) -> pw.Database:
    """A peewee database for ``url`` (not yet bound to the models)."""
    if url.startswith("sqlite:"):
        return _sqlite(url)
    if url.startswith(("postgres://", "postgresql://")):
        from playhouse.db_url import connect as connect_url

        try:
            return connect_url(url)
        except pw.ImproperlyConfigured as exc:
            raise StoreError(f"{describe(url)}: {exc} (install ingestd[postgres])") from None
    raise StoreError(f"{describe(url)}: unsupported database URL "
                     "(use sqlite:///PATH or postgresql://USER@HOST/DB)")


def _sqlite(url: str) -> pw.SqliteDatabase:
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url[len("sqlite:"):]
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # IMMEDIATE: a write transaction takes the write lock at BEGIN, so two writers queue on the
    # busy timeout instead of one failing when it upgrades a read lock.
    # RETURNING (SQLite 3.35+) lets claim() be one statement, as on PostgreSQL.
    return pw.SqliteDatabase(path, pragmas=SQLITE_PRAGMAS, timeout=BUSY_TIMEOUT_SECONDS,
                             lock_type="IMMEDIATE", returning_clause=True)


def open_store(url: str, migrate: bool = True) -> pw.Database:
    """Bind the models to ``url``'s database, check it is usable and bring its schema up to date."""
    from ingestd import migrations

    db = connect(url)
    database.initialize(db)
    with translate_errors(url):
        db.connect(reuse_if_open=True)
        if migrate:
            migrations.migrate(db)
        else:
            migrations.check_not_newer(db)
    return db


def reset_connection() -> None:
    """Drop this thread's connection after a database error; the next query opens a new one
    (how a lost PostgreSQL connection is survived)."""
    try:
        database.obj.close()
    except Exception:
        pass  # it was broken already


def guarded(name: str, task: Callable[..., T]) -> Callable[..., T | None]:
    """``task`` for a background thread: a database error is logged in one line and the
    thread's connection reset, so the next run reconnects; the thread never dies of it."""

    def run(*args: object) -> T | None:
        try:
            return task(*args)
        except (pw.PeeweeException, sqlite3.Error) as exc:
            structlog.get_logger(__name__).warning(f"{name}_failed", reason=str(as_store_error(exc)))
            reset_connection()
            return None

    return run


def close_store() -> None:
    if database.obj is not None and not database.obj.is_closed():
        database.obj.close()


@contextlib.contextmanager
def translate_errors(url: str | None = None) -> Iterator[None]:
    """Turn the database's own errors into one-line :class:`StoreError` messages."""
    try:
        yield
    except StoreError:
        raise
    except (pw.PeeweeException, sqlite3.Error) as exc:
        raise as_store_error(exc, url) from None


def as_store_error(exc: BaseException, url: str | None = None) -> StoreError:
    """A one-line StoreError for a database error (``url`` defaults to the bound database)."""
    if url is None:
        obj = database.obj
        url = f"sqlite:///{obj.database}" if isinstance(obj, pw.SqliteDatabase) else "database"
    where = describe(url)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "locked" in text or "busy" in text:
        return StoreError(f"{where}: database is locked by another process "
                          f"(waited {BUSY_TIMEOUT_SECONDS:g}s)")
    if isinstance(exc, (pw.OperationalError, sqlite3.OperationalError, pw.InterfaceError)):
        return StoreError(f"{where}: {text}")
    return StoreError(f"{where}: not a usable database: {text}")
