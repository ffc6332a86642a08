"""TOML configuration -> frozen dataclasses.

Lookup order: ``-c/--config FILE``, else ``$INGESTD_CONFIG``, else the zero-config default
(project ``default`` watching ``./inbox``, state under ``./.ingestd``). Relative paths in a file
are relative to that file's folder. Every problem is reported as one line naming the file, the
key and what is wrong; all problems of a file are reported at once.
"""

from __future__ import annotations

import math
import os
import stat
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from ingestd.display import one_line
from ingestd.errors import ConfigError

CONFIG_ENV = "INGESTD_CONFIG"
DEFAULT_PROJECT = "default"
DEFAULT_EXCLUDE = (".*", "*.part", "*.tmp", "*.crdownload", "~$*", ".~lock.*", "*.swp")
DEFAULT_ALLOWED_TYPES = ("text/*", "application/pdf", "application/json", "application/xml")
AFTER_CHOICES = ("keep", "move", "delete")
EMPTY_FILE_CHOICES = ("skip", "ingest")
SINK_ERROR_CHOICES = ("fail", "warn")
# Upper bounds: far above what any real setup needs, and within what the daemon's arithmetic
# (timedelta, APScheduler intervals, thread waits, SQLite integers) handles.
MAX_SECONDS = 365 * 24 * 3600  # one year, for every *_seconds key
MIN_LEASE_SECONDS = 1.0
MAX_RETENTION_DAYS = 36500  # a hundred years
MAX_WORKERS = 256
MAX_ATTEMPTS = 1000


@dataclass(frozen=True)
class SinkConfig:
    """Where a project's extracted text goes; ``options`` are the kind's own keys."""

    kind: str = "index"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProjectConfig:
    """One project: its drop folders and how files in them are treated."""

    name: str
    folders: tuple[Path, ...]
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    settle_seconds: float = 1.0
    max_bytes: int = 100 * 1024 * 1024
    allowed_types: tuple[str, ...] = DEFAULT_ALLOWED_TYPES
    empty_files: str = "skip"
    after: str = "keep"
    move_to: Path | None = None
    max_attempts: int = 3
    job_timeout_seconds: float = 300.0
    recursive: bool = True
    polling: bool = False
    sink_errors: str = "fail"
    sink: SinkConfig = SinkConfig()

    def folder_of(self, path: Path) -> Path | None:
        """The project folder that contains ``path`` (already resolved), if any."""
        for folder in self.folders:
            if path == folder or folder in path.parents:
                return folder
        return None


@dataclass(frozen=True)
class DaemonConfig:
    """Settings of the daemon process and its database."""

    state_dir: Path
    database: str
    workers: int
    event_log: Path
    event_socket: Path
    socket_mode: int = 0o660
    rescan_seconds: float = 300.0
    event_retention_days: float = 30.0
    lease_seconds: float = 30.0
    shutdown_grace_seconds: float = 20.0
    progress_events_per_second: float = 4.0
    subscriber_buffer_bytes: int = 4 * 1024 * 1024
    control_socket: Path | None = None
    metrics_address: str = ""


# Taken once, at start: a reload cannot change them (the database, the worker processes, the
# files and sockets opened then).
RESTART_ONLY = ("state_dir", "database", "workers", "event_log", "event_socket", "socket_mode",
                "subscriber_buffer_bytes", "control_socket", "metrics_address")


@dataclass(frozen=True)
class Config:
    """The effective configuration; ``source`` is the file it came from (None: zero-config)."""

    source: Path | None
    daemon: DaemonConfig
    projects: Mapping[str, ProjectConfig]

    def project(self, name: str) -> ProjectConfig:
        from ingestd.errors import NotFound

        try:
            return self.projects[name]
        except KeyError:
            known = ", ".join(sorted(self.projects)) or "none"
            raise NotFound(f"unknown project {name!r} (configured: {known})") from None


def keep_restart_only(running: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the running values of the :data:`RESTART_ONLY` settings it changes, and
    the names of those settings: a reload applies the rest and says which wait for a restart."""
    changed = [name for name in RESTART_ONLY
               if getattr(new.daemon, name) != getattr(running.daemon, name)]
    kept = replace(new.daemon, **{name: getattr(running.daemon, name) for name in changed})
    return replace(new, daemon=kept), changed


# --- key specifications --------------------------------------------------------------------

Check = Callable[[Any], str | None]  # returns what is wrong, or None


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value: Any) -> str | None:
    return None if value >= 0 else "must not be negative"


def _finite(value: Any) -> str | None:
    """TOML has inf and nan; an integer is finite however large (math.isfinite would overflow)."""
    return None if isinstance(value, int) or math.isfinite(value) else "must be a finite number"


def _at_most(limit: int, meaning: str = "") -> Check:
    return lambda value: None if value <= limit else f"must be at most {limit}{meaning}"


def _at_least(limit: float) -> Check:
    return lambda value: None if value >= limit else f"must be at least {limit:g}"


def _not_blank(value: str) -> str | None:
    """A path key given as "" would name the config file's own folder."""
    return None if value.strip() else "must not be empty"


def _all(*checks: Check) -> Check:
    """The first thing ``checks`` (in order) find wrong."""

    def check_all(value: Any) -> str | None:
        for check in checks:
            wrong = check(value)
            if wrong:
                return wrong
        return None

    return check_all


_DURATION = _all(_finite, _positive, _at_most(MAX_SECONDS, " (one year)"))
_DURATION_OR_ZERO = _all(_finite, _not_negative, _at_most(MAX_SECONDS, " (one year)"))


def _name_patterns(value: list[str]) -> str | None:
    """Patterns are matched against names (a file's, and each folder's on its way): one with a
    "/" never matches anything, and would take or leave files silently."""
    for pattern in value:
        if "/" in pattern:
            return (f"{pattern!r} holds a '/': patterns match names (\"*.tmp\", \"archive\"), "
                    "not paths")
    return None


def _not_empty(why: str) -> Check:
    return lambda value: None if value else f"must not be empty: {why}"


def _one_of(choices: tuple[str, ...]) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _octal_mode(value: Any) -> str | None:
    try:
        mode = int(value, 8)
    except ValueError:
        return "must be an octal mode such as \"0660\""
    return None if 0 <= mode <= 0o777 else "must be an octal mode between 0000 and 0777"


def _host_port(value: Any) -> str | None:
    if value == "":
        return None
    host, _, port = value.rpartition(":")
    return None if host and port.isdigit() and 0 < int(port) < 65536 else \
        "must be HOST:PORT, e.g. \"127.0.0.1:9464\" (or \"\" for off)"


# key -> (accepted python types, type name for messages, extra check)
_NUMBER = ((int, float), "a number")
_INT = ((int,), "an integer")
_STR = ((str,), "a string")
_BOOL = ((bool,), "true or false")
_STR_LIST = ((list,), "a list of strings")

PROJECT_KEYS: dict[str, tuple[tuple[type, ...], str, Check | None]] = {
    "folders": (*_STR_LIST, None),
    "include": (*_STR_LIST, _all(_not_empty("the project would take no file"), _name_patterns)),
    "exclude": (*_STR_LIST, _name_patterns),
    "settle_seconds": (*_NUMBER, _DURATION_OR_ZERO),
    "max_bytes": (*_INT, _positive),
    "allowed_types": (*_STR_LIST, _not_empty("every file would fail as a type not allowed")),
    "empty_files": (*_STR, _one_of(EMPTY_FILE_CHOICES)),
    "after": (*_STR, _one_of(AFTER_CHOICES)),
    "move_to": (*_STR, _not_blank),
    "max_attempts": (*_INT, _all(_positive, _at_most(MAX_ATTEMPTS))),
    "job_timeout_seconds": (*_NUMBER, _DURATION),
    "recursive": (*_BOOL, None),
    "polling": (*_BOOL, None),
    "sink_errors": (*_STR, _one_of(SINK_ERROR_CHOICES)),
    "sink": ((dict,), "a table", None),
}

DAEMON_KEYS: dict[str, tuple[tuple[type, ...], str, Check | None]] = {
    "state_dir": (*_STR, _not_blank),
    "database": (*_STR, None),
    "workers": (*_INT, _all(_positive, _at_most(MAX_WORKERS))),
    "event_log": (*_STR, _not_blank),
    "event_socket": (*_STR, _not_blank),
    "socket_mode": (*_STR, _octal_mode),
    "rescan_seconds": (*_NUMBER, _DURATION),
    "event_retention_days": (*_NUMBER, _all(_finite, _positive,
                                            _at_most(MAX_RETENTION_DAYS, " (a hundred years)"))),
    # A worker renews its leases every lease_seconds / 3, a database write each time: under a
    # second the renewals fall behind, and live jobs are rescued as if their worker had died.
    "lease_seconds": (*_NUMBER, _all(_DURATION, _at_least(MIN_LEASE_SECONDS))),
    "shutdown_grace_seconds": (*_NUMBER, _DURATION_OR_ZERO),
    "progress_events_per_second": (*_NUMBER, _all(_finite, _positive)),
    "subscriber_buffer_bytes": (*_INT, _positive),
    "control_socket": (*_STR, _not_blank),
    "metrics_address": (*_STR, _host_port),
}

PATH_KEYS = {"state_dir", "event_log", "event_socket", "control_socket", "move_to"}
TUPLE_KEYS = {"include", "exclude", "allowed_types"}


class _Problems:
    """Collects one-line problems for a file; raises them together."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.lines: list[str] = []

    def add(self, key: str, what: str) -> None:
        self.lines.append(f"{self.where}: {key}: {what}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(*self.lines)


def _check_table(table: Mapping[str, Any], spec: Mapping, prefix: str,
                 problems: _Problems) -> dict[str, Any]:
    """Type-check ``table`` against ``spec``; return only the valid entries."""
    valid: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if key not in spec:
            problems.add(name, f"unknown key (known: {', '.join(sorted(spec))})")
            continue
        types, type_name, check = spec[key]
        if isinstance(value, bool) and bool not in types:
            problems.add(name, f"must be {type_name}, not a boolean")
            continue
        if not isinstance(value, types):
            problems.add(name, f"must be {type_name}, not {type(value).__name__}")
            continue
        if type_name == "a list of strings" and not all(isinstance(v, str) for v in value):
            problems.add(name, "must be a list of strings")
            continue
        wrong = check(value) if check else None
        if wrong:
            problems.add(name, wrong)
            continue
        valid[key] = value
    return valid


def _first_env_dir(name: str) -> Path | None:
    """systemd's *_DIRECTORY variables may hold several colon-separated paths: take the first."""
    value = os.environ.get(name, "")
    return Path(value.split(":")[0]) if value else None


def _resolve(base: Path, value: str) -> Path:
    """``value`` (``~`` expanded) against ``base``; ValueError saying what is wrong if it has
    no meaning here: a NUL character, a ``~user`` without a home directory, a symlink loop."""
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    try:
        path = (base / Path(value).expanduser()).absolute()
        path.resolve()  # what the checks do later: it must work now
    except RuntimeError as exc:  # pathlib's error for both of the last two
        if value.startswith("~") and "home directory" in str(exc):
            user = value[1:].split("/", 1)[0]
            raise ValueError(f"cannot expand ~{user}: "
                             f"{'no such user' if user else 'no home directory'}") from None
        raise ValueError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    return path


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be a drop folder (missing, a file, not reachable), or None."""
    try:
        info = folder.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "no such folder"
    except OSError as exc:  # a parent this user may not search, a symlink loop, a dead mount
        return f"cannot be reached ({exc.strerror or exc})"
    return None if stat.S_ISDIR(info.st_mode) else "not a folder"


def _path(base: Path, value: str, key: str, problems: _Problems) -> Path | None:
    """``value`` resolved against ``base``, or None with a one-line problem for ``key``."""
    try:
        return _resolve(base, value)
    except ValueError as exc:
        problems.add(key, f"{value!r}: {exc}")
        return None


def _real(path: Path) -> Path:
    """``path`` with its symlinks resolved, as far as they can be (the folders are resolved)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return path


# --- loading ---------------------------------------------------------------------------------

def load(path: str | os.PathLike | None = None, folders_must_exist: bool = True) -> Config:
    """Load the configuration from ``path``, ``$INGESTD_CONFIG`` or the zero-config default.
    ``folders_must_exist=False`` is for asking a running daemon (``status``): a folder gone
    since it started is what it may have to say; the zero-config default then does not make
    its ``./inbox`` either."""
    chosen = path if path is not None else os.environ.get(CONFIG_ENV) or None
    if chosen is None:
        return zero_config(Path.cwd(), create=folders_must_exist)
    if not os.fspath(chosen):
        raise ConfigError("config file: an empty path (-c or $INGESTD_CONFIG): name a file")
    try:
        file = _resolve(Path(), os.fspath(chosen))
    except ValueError as exc:
        raise ConfigError(f"{os.fspath(chosen)!r}: {exc}") from None
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{file}: a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return from_mapping(raw, file, folders_must_exist=folders_must_exist)


def zero_config(cwd: Path, create: bool = True) -> Config:
    """Project ``default`` watching ``./inbox`` (made when ``create``: a command that only looks
    must leave nothing behind where it was run), state under ``./.ingestd``."""
    inbox = cwd / "inbox"
    if create:
        inbox.mkdir(parents=True, exist_ok=True)
    return from_mapping({"projects": {DEFAULT_PROJECT: {"folders": [str(inbox)]}}},
                        None, base=cwd, folders_must_exist=create)


def from_mapping(raw: Mapping[str, Any], file: Path | None, base: Path | None = None,
                 folders_must_exist: bool = True) -> Config:
    """Validate a parsed TOML document and build the effective :class:`Config`."""
    base = base if base is not None else (file.parent if file else Path.cwd())
    problems = _Problems(str(file) if file else "<zero-config>")
    for key in raw:
        if key not in ("daemon", "defaults", "projects"):
            problems.add(key, "unknown section (known: daemon, defaults, projects)")
    daemon = _daemon(_table(raw, "daemon", problems), base, problems, folders_must_exist)
    defaults = _check_table(_table(raw, "defaults", problems), PROJECT_KEYS, "defaults.",
                            problems)
    if defaults.pop("folders", None) is not None:
        problems.add("defaults.folders", "folders belong to a project, not to defaults")
    projects = {}
    for name, table in _table(raw, "projects", problems).items():
        if not isinstance(table, dict):
            problems.add(f"projects.{name}", "must be a table")
            continue
        project = _project(name, {**defaults, **table}, base, daemon, problems,
                           folders_must_exist)
        if project:
            projects[name] = project
    if not projects and not problems.lines:
        problems.add("projects", "no project is configured (add a [projects.NAME] table)")
    _check_folders(projects, daemon, problems)
    problems.raise_if_any()
    return Config(source=file, daemon=daemon, projects=projects)


def _table(raw: Mapping[str, Any], key: str, problems: _Problems) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        problems.add(key, "must be a table")
        return {}
    return value


def _daemon(table: Mapping[str, Any], base: Path, problems: _Problems,
            for_a_start: bool = True) -> DaemonConfig:
    """``for_a_start``: also refuse what would stop a daemon at its start (see _check_kinds).
    Not for a look at a running one: its event log's path may be a folder now, which it
    reports (`status`)."""
    values = _check_table(table, DAEMON_KEYS, "daemon.", problems)
    for key in PATH_KEYS & values.keys():
        path = _path(base, values.pop(key), f"daemon.{key}", problems)
        if path is not None:
            values[key] = path
    state_dir = values.pop("state_dir", None) or (_first_env_dir("STATE_DIRECTORY")
                                                   or base / ".ingestd")
    logs_dir = _first_env_dir("LOGS_DIRECTORY") or state_dir
    runtime_dir = _first_env_dir("RUNTIME_DIRECTORY") or state_dir
    database = _database(values.pop("database", None), state_dir, base, problems)
    if "socket_mode" in values:
        values["socket_mode"] = int(values["socket_mode"], 8)
    values.setdefault("event_log", logs_dir / "events.jsonl")
    values.setdefault("event_socket", runtime_dir / "events.sock")
    values.setdefault("control_socket", runtime_dir / "control.sock")
    values.setdefault("workers", min(os.cpu_count() or 1, MAX_WORKERS))
    values.update(state_dir=state_dir, database=database)
    if for_a_start:
        _check_kinds(values, problems)
    return DaemonConfig(**values)


def _check_kinds(values: Mapping[str, Any], problems: _Problems) -> None:
    """The daemon makes its files and sockets itself: a folder already there under one of
    their names (or a file under the state folder's) would stop it at start, with a message
    naming neither the key nor this file."""
    files = {key: values[key] for key in ("event_log", "event_socket", "control_socket")}
    if (database := _sqlite_file(values["database"])) is not None:
        files["database"] = database
    for key, path in files.items():
        if _kind(path) == stat.S_IFDIR:
            problems.add(f"daemon.{key}", f"{path}: is a folder (name a file in it)")
    state_dir = values["state_dir"]
    if _kind(state_dir) not in (None, stat.S_IFDIR):
        problems.add("daemon.state_dir", f"{state_dir}: not a folder")


def _kind(path: Path) -> int | None:
    """The file type of ``path`` (stat.S_IF*), None if it is not there or cannot be looked at
    (a folder this user may not search: the daemon, maybe another user, says so itself)."""
    try:
        return stat.S_IFMT(path.stat().st_mode)
    except (OSError, ValueError):
        return None


def _database(url: str | None, state_dir: Path, base: Path, problems: _Problems) -> str:
    """The database URL, a SQLite one as ``sqlite:///ABSOLUTE-PATH`` (a relative path is
    relative to the config file's folder in every form: ``sqlite:///PATH``, ``sqlite:PATH``),
    or ``:memory:``. What db.connect would not understand is a problem here."""
    key, forms = "daemon.database", "use sqlite:///PATH or postgresql://USER@HOST/DB"
    if not url:
        return f"sqlite:///{state_dir / 'ingestd.db'}"
    if url.startswith(("postgres://", "postgresql://")):
        return url
    if not url.startswith("sqlite:"):
        scheme, colon, _ = url.partition(":")  # never the rest: it may hold a password
        what = f"unsupported database URL scheme {scheme!r}" if colon else "not a database URL"
        problems.add(key, f"{what} ({forms})")
        return url
    rest = url[len("sqlite:"):]
    if rest.startswith("//") and not rest.startswith("///"):
        problems.add(key, f"{url}: sqlite://HOST/... is not understood (a SQLite database has "
                          "no host): use sqlite:///RELATIVE/PATH or sqlite:////ABSOLUTE/PATH")
        return url
    path = rest[len("///"):] if rest.startswith("///") else rest
    if path == ":memory:":
        return url
    if not path:
        problems.add(key, f"{url}: names no database file ({forms})")
        return url
    resolved = _path(base, path, key, problems)
    return f"sqlite:///{resolved}" if resolved is not None else url


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL as :func:`_database` leaves it, else None."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def _project(name: str, table: Mapping[str, Any], base: Path, daemon: DaemonConfig,
             problems: _Problems, folders_must_exist: bool = True) -> ProjectConfig | None:
    prefix = f"projects.{name}."
    values = _check_table(table, PROJECT_KEYS, prefix, problems)
    if not name or "/" in name or name.strip() != name or one_line(name) != name:
        problems.add(f"projects.{name}", "a project name must be non-empty and printable (no "
                     "control or hiding characters), without '/' or surrounding spaces")
        return None
    folders = values.pop("folders", None)
    if not folders:
        if "folders" not in table:
            problems.add(f"{prefix}folders", "missing: every project needs at least one folder")
        elif isinstance(table["folders"], list):
            problems.add(f"{prefix}folders", "must name at least one folder")
        return None
    resolved = []
    for value in folders:
        folder = _path(base, value, f"{prefix}folders", problems)
        if folder is None:
            continue
        problem = _folder_problem(folder) if folders_must_exist else None
        if problem is not None:
            problems.add(f"{prefix}folders", f"{folder}: {problem}")
            continue
        resolved.append(folder.resolve())
    sink = _sink(values.pop("sink", {}), prefix, problems)
    for key in TUPLE_KEYS & values.keys():
        values[key] = tuple(values[key])
    if "move_to" in values:
        values["move_to"] = _path(base, values["move_to"], f"{prefix}move_to", problems)
        if values["move_to"] is None:
            del values["move_to"]
    values.setdefault("move_to", daemon.state_dir / "projects" / name)
    if "settle_seconds" in values:
        values["settle_seconds"] = float(values["settle_seconds"])
    if "job_timeout_seconds" in values:
        values["job_timeout_seconds"] = float(values["job_timeout_seconds"])
    return ProjectConfig(name=name, folders=tuple(resolved), sink=sink, **values)


def _sink(table: Mapping[str, Any], prefix: str, problems: _Problems) -> SinkConfig:
    kind = table.get("kind", "index")
    if not isinstance(kind, str) or not kind:
        problems.add(f"{prefix}sink.kind", "must be a non-empty string")
        return SinkConfig()
    return SinkConfig(kind=kind, options={k: v for k, v in table.items() if k != "kind"})


def _check_folders(projects: Mapping[str, ProjectConfig], daemon: DaemonConfig,
                   problems: _Problems) -> None:
    """No folder may be watched twice or nested in another, and nothing the daemon writes may
    be inside one: its files would be ingested again, and again."""
    seen: list[tuple[Path, str]] = []
    for name, project in projects.items():
        for folder in project.folders:
            for other, owner in seen:
                key = f"projects.{name}.folders"
                if folder == other:
                    problems.add(key, f"{folder}: already a folder of project {owner!r}")
                elif other in folder.parents or folder in other.parents:
                    problems.add(key, f"{folder}: overlaps {other} of project {owner!r}")
            seen.append((folder, name))
    state_dir = _real(daemon.state_dir)
    for key, path, what in _written_paths(projects, daemon):
        real = _real(path)
        if key != "daemon.state_dir" and (real == state_dir or state_dir in real.parents) \
                and _watched_by(state_dir, seen):
            continue  # in the state directory: its own line says it all
        found = _watched_by(real, seen)
        if found:
            folder, owner = found
            problems.add(key, f"{path}: inside the watched folder {folder} of project "
                              f"{owner!r}; a folder that holds {what} would ingest the "
                              "daemon's own files again and again")
        elif key.endswith(".move_to"):
            for folder, owner in seen:
                if real in _real(folder).parents:
                    problems.add(key, f"{path}: holds the watched folder {folder} of project "
                                      f"{owner!r}; moved originals would be ingested again")


def _written_paths(projects: Mapping[str, ProjectConfig],
                   daemon: DaemonConfig) -> list[tuple[str, Path, str]]:
    """(key, path, what it is) of every path the daemon writes."""
    written = [("daemon.state_dir", daemon.state_dir, "the state directory"),
               ("daemon.event_log", daemon.event_log, "the event log"),
               ("daemon.event_socket", daemon.event_socket, "the event socket")]
    if daemon.control_socket is not None:
        written.append(("daemon.control_socket", daemon.control_socket, "the control socket"))
    database = _sqlite_file(daemon.database)
    if database is not None:
        written.append(("daemon.database", database, "the database"))
    for name, project in projects.items():
        if project.after != "keep" and project.move_to is not None:  # failed/ for both
            written.append((f"projects.{name}.move_to", project.move_to, "moved originals"))
    return written


def _watched_by(path: Path, folders: list[tuple[Path, str]]) -> tuple[Path, str] | None:
    """The (folder, project) of ``folders`` that ``path`` (resolved) is in, if any."""
    for folder, owner in folders:
        if path == folder or folder in path.parents:
            return folder, owner
    return None


# --- presentation ----------------------------------------------------------------------------

def as_dict(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data (for ``config check`` and ``--json``)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, SinkConfig):  # header values may hold credentials
            options = {k: ({h: "***" for h in v} if k == "headers" and isinstance(v, dict) else v)
                       for k, v in value.options.items()}
            return {"kind": value.kind, **options}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    daemon = {f.name: plain(getattr(config.daemon, f.name)) for f in fields(DaemonConfig)}
    daemon["socket_mode"] = f"{config.daemon.socket_mode:04o}"
    projects = {name: {f.name: plain(getattr(p, f.name)) for f in fields(ProjectConfig)
                       if f.name != "name"}
                for name, p in config.projects.items()}
    return {"source": str(config.source) if config.source else None,
            "daemon": daemon, "projects": projects}


def with_database(config: Config, database: str) -> Config:
    """A copy of ``config`` using another database URL (tests and tools)."""
    return replace(config, daemon=replace(config.daemon, database=database))
