"""Open the store from a database URL: SQLite (WAL, busy timeout, foreign keys) or PostgreSQL."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import peewee as pw
import structlog

from ingestd import lockwait
from ingestd.errors import StoreError, StoreUnreachable
from ingestd.models import database

T = TypeVar("T")
log = structlog.get_logger(__name__)
# What a database call raises when the database or its driver fails: peewee wraps the driver's
# errors, and sqlite3 raises some of its own (a connection made outside peewee, the checkpointer).
ERRORS = (pw.PeeweeException, sqlite3.Error)
BUSY_TIMEOUT_SECONDS = 10.0
# Prepared statements each SQLite connection keeps (Python's default: 128). A batch's INSERT or
# UPDATE of N rows is a statement of its own for each N, some compiled for hundreds of rows:
# at 128 the daemon grew from 62 to 88 MB over 55,000 small files, still growing; at 32 it
# stayed at 67-71 MB, with no more CPU per file under the write lock (bench_lock.py).
CACHED_STATEMENTS = 32
CONNECT_TIMEOUT_SECONDS = 10  # PostgreSQL: give up a connection attempt after this long
FULL_BELOW_BYTES = 1024 * 1024  # a file system with less room than this is full, for SQLite
SQLITE_PRAGMAS = {
    # Only a new file takes it (before WAL is on); an existing one keeps its page size. A 2 KB
    # text is one row of ``documents``: 4 KB pages hold one such row, 8 KB pages three, so a
    # group of small files writes fewer pages while it holds the write lock (about 5% more
    # files per second in bench_daemon.py's throughput figure).
    "page_size": 8192,
    "journal_mode": "wal",
    "foreign_keys": 1,
    "synchronous": "normal",  # with WAL: durable across process crashes, one fsync per checkpoint
    # A long read (a big `ingestd stats`) keeps checkpoints from restarting the WAL, which then
    # grows; without a limit the file kept that size for good (862 MB in a soak run).
    "journal_size_limit": 64 << 20,
    "busy_timeout": int(BUSY_TIMEOUT_SECONDS * 1000),
}


def is_postgres(db: pw.Database | None = None) -> bool:
    db = db or database.obj
    return isinstance(db, pw.PostgresqlDatabase)


def sqlite_file() -> str | None:
    """The path of the open store when it is an SQLite file (with a WAL), else None."""
    obj = database.obj
    return obj.database if isinstance(obj, QueuedWriterSqlite) else None


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
            database = connect_url(url)
        except pw.ImproperlyConfigured as exc:
            raise StoreError(f"{describe(url)}: {exc} (install ingestd[postgres])") from None
        # libpq waits as long as the system's TCP timeout (minutes) for a host that does not
        # answer, and a stop signal waits with it; the URL's own connect_timeout wins.
        database.connect_params.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
        return database
    raise StoreError(f"{describe(url)}: unsupported database URL "
                     "(use sqlite:///PATH or postgresql://USER@HOST/DB)")


def _sqlite_path(url: str) -> str:
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else url[len("sqlite:"):]


def _sqlite(url: str) -> pw.SqliteDatabase:
    path = _sqlite_path(url)
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # IMMEDIATE: a write transaction takes the write lock at BEGIN, so two writers queue on the
    # busy timeout instead of one failing when it upgrades a read lock.
    # RETURNING (SQLite 3.35+) lets claim() be one statement, as on PostgreSQL.
    cls = pw.SqliteDatabase if path == ":memory:" else QueuedWriterSqlite
    return cls(path, pragmas=SQLITE_PRAGMAS, timeout=BUSY_TIMEOUT_SECONDS,
               lock_type="IMMEDIATE", returning_clause=True,
               cached_statements=CACHED_STATEMENTS)


_NOT_OPENED = -1  # this thread has not tried to open the lock file yet


_lock_file_said: set[str] = set()


def _lock_file_unusable(path: str, exc: OSError) -> None:
    """Said once per process and file: without the queue, writers wait on SQLite's busy
    timeout (a long wait may fail) and a long wait is no longer reported."""
    if path not in _lock_file_said:
        _lock_file_said.add(path)
        log.warning("write_lock_file_unusable", path=path, reason=exc.strerror or str(exc),
                    then="writers wait on SQLite's busy timeout instead of queueing")


class QueuedWriterSqlite(pw.SqliteDatabase):
    """SQLite whose write transactions queue on a lock file (``flock``) before BEGIN.

    SQLite's own busy handler sleeps and polls (1, 2, 5, 10... ms): the daemon's worker
    processes and its job creation, all writing small transactions, would spend most of their
    time asleep waiting for a lock that was free long before. The kernel hands a ``flock`` to
    the next waiter the moment it is released. Every thread's connection has its own lock
    file descriptor; the kernel releases the lock of a process that dies. Writers that do not
    take it (the sqlite3 shell) are still kept out by SQLite's lock and its busy timeout.
    """

    def __init__(self, database: str, *args, **kwargs) -> None:
        super().__init__(database, *args, **kwargs)
        self._lock_path = f"{database}.writelock"
        self._lock_fds = threading.local()

    def _lock_fd(self) -> int | None:
        """This thread's descriptor of the lock file (flock needs only read access, so an
        operator whose group may read the state directory queues too); None if it cannot be
        opened: then SQLite's own lock and busy timeout are all there is."""
        fd = getattr(self._lock_fds, "fd", _NOT_OPENED)
        if fd == _NOT_OPENED:
            try:
                fd = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o660)
            except OSError as exc:
                fd = None
                _lock_file_unusable(self._lock_path, exc)
            self._lock_fds.fd = fd
        return fd

    def _unlock(self) -> None:
        fd = getattr(self._lock_fds, "fd", None)
        if fd not in (None, _NOT_OPENED):
            fcntl.flock(fd, fcntl.LOCK_UN)

    def begin(self, lock_type: str | None = None) -> None:
        fd = self._lock_fd()
        if fd is not None:
            lockwait.lock(fd, self.database)
        try:
            super().begin(lock_type)
        except BaseException:
            self._unlock()
            raise

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._unlock()

    def rollback(self) -> None:
        try:
            # SQLite rolls back by itself on some errors (the disk full): a ROLLBACK then fails,
            # "no transaction is active", and that error would replace the one that said why.
            conn = self._state.conn
            if conn is None or conn.in_transaction:
                super().rollback()
        finally:
            self._unlock()

    def close(self) -> bool:
        try:
            return super().close()
        finally:
            self._unlock()


def open_store(url: str, migrate: bool = True,
               on_migration: Callable[[int, str], None] | None = None,
               on_migration_wait: Callable[[], None] | None = None,
               create: bool = True) -> pw.Database:
    """Bind the models to ``url``'s database, check it is usable, and bring its schema up to date
    (``migrate``; ``on_migration(version, name)`` as each migration begins, ``on_migration_wait()``
    before waiting for another node's) or check that it is this ingestd's (see
    migrations.check_current). ``create=False`` refuses a SQLite file that does not exist
    instead of making one (and its folder)."""
    from ingestd import migrations

    if not create:
        _must_exist(url)
    db = connect(url)
    database.initialize(db)
    try:
        with translate_errors(url):
            _connect(db, url)
            if migrate:
                migrations.migrate(db, on_migration, on_migration_wait)
            else:
                migrations.check_current(db)
    except StoreUnreachable:
        raise
    except StoreError as exc:
        # A full disk: SQLite cannot make the file beside the database that WAL needs ("disk
        # I/O error"), or write. Room may be made: a daemon waits, as for a server.
        if isinstance(db, pw.SqliteDatabase) and file_system_full(db.database):
            with contextlib.suppress(*ERRORS):
                db.close()
            raise StoreUnreachable(f"{exc} (its file system is full)") from None
        raise
    return db


def check_writable(url: str) -> None:
    """StoreError unless this process may write the bound database: SQLite opens a file it may
    only read without a word (another user's: restored by root with `cp`, or made by root's
    `ingestd db migrate`), and every write then fails; so does a PostgreSQL standby's. Any
    other failure says nothing of that (a write lock held past the busy timeout, a connection
    cut): the daemon copes with those as it runs, as with any write."""
    try:
        with database.atomic():
            database.execute_sql("DELETE FROM schema_migrations WHERE 1 = 0")  # writes nothing
    except ERRORS as exc:
        path = sqlite_file()
        if path is not None and "readonly" in str(exc):
            raise StoreError(f"{describe(url)}: this process (uid {os.geteuid()}) may not write "
                             f"it ({_owner(path)})") from None
        if getattr(getattr(exc, "orig", exc), "sqlstate", None) == "25006":  # read-only txn
            raise StoreError(f"{describe(url)}: the server takes no writes here: "
                             f"{first_line(exc)}") from None
        reset_connection()


def _owner(path: str) -> str:
    """Who may write the SQLite file and its folder (where SQLite makes its -wal and -shm)."""
    said = []
    for what, where in (("the file", path), ("its folder", _folder_of(path))):
        try:
            info = os.stat(where)
        except OSError as exc:
            said.append(f"{what}: {exc.strerror}")
            continue
        said.append(f"{what} is uid {info.st_uid}'s, mode {stat.S_IMODE(info.st_mode):04o}")
    return "; ".join(said)


def _must_exist(url: str) -> None:
    """A command that only looks at jobs, run where no daemon ever ran (the zero-config default
    in another folder), must not leave a database behind and answer "no jobs"."""
    if url.startswith("sqlite:") and (path := _sqlite_path(url)) != ":memory:" \
            and not os.path.exists(path):
        raise StoreError(f"{path}: no database there: nothing has run with this configuration "
                         "yet (nothing was created)")


def file_system_full(path: str) -> bool:
    """Whether the file system of the file at ``path`` has less than FULL_BELOW_BYTES free."""
    try:
        room = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return room.f_bavail * room.f_frsize < FULL_BELOW_BYTES


# What a PostgreSQL server says while it will soon take connections. Any other refusal it sends
# (a login it refuses, a database or role that does not exist) is the operator's to fix.
_SERVER_NOT_YET = ("starting up", "shutting down", "in recovery", "not yet accepting",
                   "too many clients", "connection slots")


def _connect(db: pw.Database, url: str) -> None:
    """Connect; StoreUnreachable if a PostgreSQL server could not be reached (nothing answered:
    refused, timed out, an unknown host name) or is not taking connections yet."""
    try:
        db.connect(reuse_if_open=True)
    except ERRORS as exc:
        said = str(exc)
        if is_postgres(db) and ("FATAL" not in said or any(s in said for s in _SERVER_NOT_YET)):
            raise StoreUnreachable(str(as_store_error(exc, url))) from None
        raise


def reset_connection() -> None:
    """Drop this thread's connection after a database error; the next query opens a new one
    (how a lost PostgreSQL connection is survived)."""
    try:
        database.obj.close()
    except Exception:
        pass  # it was broken already


def connection_lost(exc: BaseException) -> bool:
    """Whether a database error is the connection to the server lost or not to be had yet
    (the server restarted or restarts, its backend terminated, the network cut): a new
    connection may do, now or soon. A login the server refuses is not that."""
    if isinstance(exc, pw.InterfaceError):
        return True
    orig = getattr(exc, "orig", None)
    while isinstance(orig, pw.PeeweeException):  # a failed reconnect is wrapped twice
        orig = getattr(orig, "orig", None)
    if orig is None or not type(orig).__module__.startswith("psycopg"):
        return False  # SQLite has no connection to lose: "locked" is not that
    state = getattr(orig, "sqlstate", None) or ""
    if state:  # connection exception, operator intervention, idle in transaction too long
        return state.startswith(("08", "57P", "25P03"))
    if type(orig).__name__ not in ("OperationalError", "InterfaceError"):
        return False  # the client refusing what it was given (a NUL in a text): a bug, not lost
    said = str(orig)  # the client's own: refused, closed, or what the server said at login
    return "FATAL" not in said or any(reason in said for reason in _SERVER_NOT_YET)


def again_if_lost(task: Callable[[], T]) -> T:
    """``task``, and once more on a new connection if the old one was lost: a connection the
    server cut long before (it restarted) is only found dead when used."""
    try:
        return task()
    except ERRORS as exc:
        if not connection_lost(exc):
            raise
        reset_connection()
        return task()


def guarded(name: str, task: Callable[..., T]) -> Callable[..., T | None]:
    """``task`` for a background thread: a database error is logged in one line and the
    thread's connection reset, so the next run reconnects; the thread never dies of it."""

    def run(*args: object) -> T | None:
        try:
            return task(*args)
        except ERRORS as exc:
            log.warning(f"{name}_failed", reason=str(as_store_error(exc)))
            reset_connection()
            return None

    return run


def execute(statement: str, params: Sequence[Any] = ()) -> Any:
    """Run ``statement``, its ``?`` placeholders put in the bound database's style; the cursor."""
    param = database.obj.param
    return database.execute_sql(statement if param == "?" else statement.replace("?", param),
                                tuple(params))


def executemany(statement: str, rows: Sequence[Sequence[Any]],
                on: pw.Database | None = None) -> None:
    """One prepared statement for every row (``on`` the bound database by default), its
    driver's errors turned into peewee's as execute_sql turns them: a raw psycopg error would
    pass for a bug in the caller, not for what the database said."""
    cursor = (on or database).cursor()
    with pw.__exception_wrapper__:
        cursor.executemany(statement, rows)


def transaction() -> contextlib.AbstractContextManager:
    """A transaction, or nothing when already inside one: the outer transaction (or the
    caller's savepoint) undoes the work on an error, and a savepoint would cost two statements."""
    return contextlib.nullcontext() if database.in_transaction() else database.atomic()


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
    except ERRORS as exc:
        raise as_store_error(exc, url) from None


def refused(exc: BaseException) -> bool:
    """Whether a database error is the database refusing the data written (a constraint, a
    value it cannot hold), which a new try repeats, rather than the database or its connection
    failing (locked, busy, lost), which a new try may not. PostgreSQL's program limits (class
    54: a chunk too big for a tsvector) reach peewee as OperationalError; its SQLSTATE tells."""
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    return sqlstate.startswith("54") or isinstance(
        exc, (pw.IntegrityError, pw.DataError, sqlite3.IntegrityError, sqlite3.DataError))


def _bound_database() -> str:
    """The bound database as a URL without its password (PostgreSQL's as it was opened)."""
    obj = database.obj
    if isinstance(obj, pw.SqliteDatabase):
        return f"sqlite:///{obj.database}"
    if obj is None:
        return "database"
    params = obj.connect_params
    where = f"{params.get('host', '')}:{params['port']}" if "port" in params else params.get(
        "host", "")
    user = f"{params['user']}@" if params.get("user") else ""
    return f"postgresql://{user}{where}/{obj.database}"


def as_store_error(exc: BaseException, url: str | None = None) -> StoreError:
    """A one-line StoreError for a database error (``url`` defaults to the bound database)."""
    where = describe(url) if url is not None else _bound_database()
    text = first_line(exc)
    if "locked" in text or "busy" in text:
        return StoreError(f"{where}: database is locked by another process "
                          f"(waited {BUSY_TIMEOUT_SECONDS:g}s)")
    if "readonly database" in text and (hint := _shared_memory_missing()):
        return StoreError(f"{where}: {hint}")
    if isinstance(exc, (pw.OperationalError, sqlite3.OperationalError, pw.InterfaceError)):
        return StoreError(f"{where}: {text}")
    return StoreError(f"{where}: not a usable database: {text}")


def first_line(exc: BaseException) -> str:
    """What an error says, in one line (its type's name if it says nothing)."""
    said = str(exc).strip()
    return said.splitlines()[0] if said else type(exc).__name__


def _shared_memory_missing() -> str | None:
    """Why a user who may read a SQLite database cannot, if that is the reason: with no process
    holding it open, its -shm file is gone (the last one to close removes it), and SQLite must
    make it again beside the database, in a folder this user may not write."""
    path = sqlite_file()
    if path is None or os.path.exists(f"{path}-shm"):
        return None
    folder = _folder_of(path)
    if os.access(folder, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        return None
    return (f"this user may read it only while another process has it open (the daemon, "
            f"or a command of a user who may write {folder}): SQLite must make "
            f"{os.path.basename(path)}-shm there first")


def _folder_of(path: str) -> str:
    return os.path.dirname(path) or "."
