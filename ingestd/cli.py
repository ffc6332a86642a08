"""The ``ingestd`` command: argument parsing and output only.

Read commands print a table by default and one JSON document with ``--json``. Exit codes:
0 ok, 1 failure, 2 usage, 3 not found, 4 conflict, 5 input refused. Expected errors are one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from typing import Any, Callable, NoReturn, Sequence

from ingestd import __version__, config as config_mod, db, intake, jobs, log, migrations
from ingestd.display import one_line
from ingestd.errors import EXIT_FAILURE, EXIT_OK, IngestdError, StoreError, UsageError

Handler = Callable[[argparse.Namespace], int]


# --- output helpers ------------------------------------------------------------------------------

def printable(text: Any) -> str:
    """``text`` on one terminal line (see display.py)."""
    return one_line(str(text))


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def _human_size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def _table(rows: list[list[str]], headers: list[str]) -> None:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(["{:<%d}" % w for w in widths[:-1]] + ["{}"])  # the last cell unpadded:
    print(line.format(*headers))  # a path's own trailing spaces are kept
    for row in rows:
        print(line.format(*row))


def _job_row(record: dict[str, Any]) -> list[str]:
    return [str(record["id"]), record["status"], record["stage"],
            f"{record['progress'] * 100:.0f}%", _human_size(record["byte_size"]),
            (record["created_at"] or "")[:19].replace("T", " "), record["source_path"]]


JOB_HEADERS = ["ID", "STATUS", "STAGE", "PROGRESS", "SIZE", "CREATED", "PATH"]


def _print_job(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(record)
        return
    width = max(len(k) for k in record)
    for key, value in record.items():
        print(f"{key:<{width}}  {'-' if value is None else printable(value)}")


def _say_job(verb: str, job: Any, as_json: bool) -> None:
    record = jobs.job_record(job)
    if as_json:
        _print_json(record)
    else:
        state = "" if verb == record["status"] else f" ({record['status']})"
        print(f"job {record['id']} {verb}{state}  {printable(record['source_path'])}")


def _say_jobs(verb: str | None, ended: Sequence[Any], as_json: bool) -> None:
    """What ``add`` did: one JSON document, {"jobs": [...]}, or a line per job (``verb``, else
    its status, and why a job failed or was cancelled: by whom, deleted...)."""
    if as_json:
        _print_json({"jobs": [jobs.job_record(job) for job in ended]})
        return
    for job in ended:
        _say_job(verb or job.status, job, False)
        why = job.error_message or (job.message if job.status == "cancelled" else None)
        if why:
            print(f"  {printable(why)}")


# --- context -----------------------------------------------------------------------------------

def _config(args: argparse.Namespace, folders_must_exist: bool = True) -> config_mod.Config:
    return config_mod.load(getattr(args, "config", None), folders_must_exist=folders_must_exist)


def _open(args: argparse.Namespace, folders_must_exist: bool = False,
          create: bool = False) -> config_mod.Config:
    """The config, with its database open (never migrated here: see migrations.check_current).
    Commands that only work on the database do not need the project folders: one that is gone
    (a watched folder the daemon reports lost) must not stop them for every project. Only the
    commands that queue jobs (or wait for events to come) ``create`` a SQLite database."""
    cfg = _config(args, folders_must_exist)
    db.open_store(cfg.daemon.database, migrate=False, create=create)
    return cfg


def _project_with_jobs(cfg: config_mod.Config, name: str) -> None:
    """Refuse (NotFound) a project that is neither configured nor has jobs in the database.
    One removed from the file keeps its jobs, which no worker takes any more: they can still
    be listed, shown and cancelled, and it is said why."""
    if name in cfg.projects:
        return
    if not _storable(name) or not jobs.project_has_jobs(name):
        cfg.project(name)  # raises, naming the projects configured
    print(f"ingestd: project {name!r} is not in the configuration; its jobs are still in the "
          "database, and no worker takes them", file=sys.stderr)


def _storable(text: str) -> bool:
    """Whether the database can hold ``text``: an argument with bytes that are not UTF-8
    (surrogates in Python) names nothing there."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _integer(what: str, minimum: int = 1) -> Callable[[str], int]:
    """The argparse ``type`` of every integer argument (ids, limits, sequences): see
    :func:`jobs.parse_integer`. Its UsageError is no ValueError, so argparse lets it through to
    main(): one line and exit 2 (argparse's own error would print the usage too)."""
    def parse(text: str) -> int:
        return jobs.parse_integer(text, what, minimum)
    return parse


# --- commands ----------------------------------------------------------------------------------

def cmd_jobs_list(args: argparse.Namespace) -> int:
    cfg = _open(args)
    _project_with_jobs(cfg, args.project)
    page = jobs.list_jobs(args.project, status=args.status, stage=args.stage,
                          source_id=args.source, limit=args.limit, cursor=args.cursor)
    records = [jobs.job_record(job) for job in page.jobs]
    if args.json:
        _print_json({"jobs": records, "next_cursor": page.next_cursor})
        return EXIT_OK
    _table([_job_row(r) for r in records], JOB_HEADERS)
    if page.next_cursor:
        print(f"next page: --cursor {page.next_cursor}")
    return EXIT_OK


def cmd_jobs_show(args: argparse.Namespace) -> int:
    cfg = _open(args)
    _project_with_jobs(cfg, args.project)
    _print_job(jobs.job_record(jobs.get(args.project, args.job)), args.json)
    return EXIT_OK


def cmd_jobs_submit(args: argparse.Namespace) -> int:
    cfg = _open(args, folders_must_exist=True, create=True)
    project = cfg.project(args.project)
    folder, version = intake.inspect(project, os.fsencode(args.path))
    intake.check_type(project, version)
    job, _ = jobs.create(project.name, str(folder), version, project.max_attempts, resubmit=True)
    _say_job("queued", job, args.json)
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    cfg = _open(args)
    _project_with_jobs(cfg, args.project)
    job = jobs.cancel(args.project, args.job)
    verb = "cancellation requested" if job.status == "running" else "cancelled"
    _say_job(verb, job, args.json)
    return EXIT_OK


def cmd_jobs_delete(args: argparse.Namespace) -> int:
    from ingestd import retire
    from ingestd.sinks import open_sink

    cfg = _open(args)
    project = cfg.project(args.project)
    deleted, note = retire.delete_job(project, args.job, open_sink(project))
    _say_job("deleted", deleted, args.json)
    if note is not None:
        print(f"ingestd: job {deleted.id} deleted; {note}", file=sys.stderr)
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    from ingestd import follow

    cfg = _open(args, create=args.follow)
    return follow.run_events(cfg, follow=args.follow, since=args.since, project=args.project,
                             types=args.type or [], as_json=True if args.json else None,
                             out=sys.stdout)


def cmd_search(args: argparse.Namespace) -> int:
    from ingestd import search

    cfg = _open(args)
    cfg.project(args.project)
    hits = search.search(args.project, args.query, args.limit)
    if args.json:
        _print_json([hit.__dict__ for hit in hits])
        return EXIT_OK
    for rank, hit in enumerate(hits, start=1):
        page = f" page {hit.page}" if hit.page else ""
        print(f"{rank}. {hit.score:.3g}  {printable(hit.source_path)}{page}  (job {hit.job_id})")
        print(f"   {printable(hit.snippet)}")
    if not hits:
        print("no match")
    return EXIT_OK


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    cfg = _open(args)
    cfg.project(args.project)
    _say_job("re-queued", jobs.retry(args.project, args.job), args.json)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from ingestd import daemon

    log.configure(args.log_level)
    code = daemon.run(getattr(args, "config", None), args.log_level)
    # A worker thread may still wait on a slow sink: its job was released (or will be rescued),
    # so do not let the interpreter wait for it at exit.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def cmd_add(args: argparse.Namespace) -> int:
    from ingestd import add

    cfg = _open(args, folders_must_exist=True, create=True)
    project = cfg.project(args.project)
    if args.files.count("-") > 1:
        raise UsageError("'-' (standard input) can be given once")
    if args.name is not None and len(args.files) > 1:
        raise UsageError(f"--name names one file; {len(args.files)} were given")
    if args.name is not None and ("/" in args.name or args.name in ("", ".", "..")):
        raise UsageError(f"--name takes a file name, not a path: {args.name!r}")
    db.check_writable(cfg.daemon.database)  # before a copy it could not make a job of
    for number in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: no copy left half-written
        signal.signal(number, lambda signum, _: sys.exit(128 + signum))
    created = add.add_files(project, args.files, args.name)
    if not args.wait:
        _say_jobs("queued", created, args.json)
        return EXIT_OK
    _say_if_no_daemon(cfg)
    show_progress = len(created) > 1 and sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show_progress:
            print(f"\r{done}/{total} done", end="", file=sys.stderr, flush=True)

    def lost(reason: str) -> None:
        print(f"ingestd add: {reason}; the jobs are queued: waiting for the database to be back "
              "(Ctrl-C stops waiting, the jobs stay queued)", file=sys.stderr, flush=True)

    try:
        ended = add.wait_for([job.id for job in created], progress, on_lost=lost)
    except db.ERRORS as exc:
        queued = ", ".join(str(job.id) for job in created)
        raise StoreError(f"{db.as_store_error(exc)} (while waiting; queued: job "
                         f"{queued})") from None
    if show_progress:
        print(file=sys.stderr)
    _say_jobs(None, ended, args.json)
    return EXIT_OK if all(job.status == "completed" for job in ended) else EXIT_FAILURE


def _say_if_no_daemon(cfg: config_mod.Config) -> None:
    """Waiting on jobs no daemon here will run looks like a hang: say so (another machine's
    daemon, or one started later, may still run them)."""
    from ingestd import control

    try:
        control.query(cfg.daemon.control_socket)
    except control.NotRunning as exc:
        print(f"ingestd add: {exc}; waiting for a daemon to run the jobs (Ctrl-C stops "
              "waiting, the jobs stay queued)", file=sys.stderr, flush=True)
    except IngestdError:
        pass  # it answers, but not with its state: it is there


def cmd_status(args: argparse.Namespace) -> int:
    from ingestd import control

    cfg = config_mod.load(getattr(args, "config", None), folders_must_exist=False)
    state = control.query(cfg.daemon.control_socket)
    if args.json:
        _print_json(state)
        return EXIT_OK
    workers, events = state["workers"], state["events"]
    print(f"ingestd {state['version']} running, pid {state['pid']}, up "
          f"{_human_duration(state['uptime_seconds'])}, node {state['node']}")
    print(f"config: {state['config'] or 'zero-config default'}; database: {state['database']}")
    if state.get("database_error"):
        print(f"database: NOT ANSWERING: {state['database_error']} (running jobs unknown)")
    for name, project in state["projects"].items():
        for folder in project["folders"]:
            print(f"project {name}: {printable(folder['folder'])} ({folder['observer']})")
        for folder in project.get("unwatched", []):
            print(f"project {name}: {printable(folder['folder'])} NOT WATCHED: {folder['reason']} "
                  "(watched again once it can be)")
    owed = state.get("sink_deletes") or {}
    if owed.get("owed"):
        print(f"sink deletes owed: {owed['owed']} (tried again by the daemon; the last "
              f"failure: {owed['last_error'] or 'none yet'})")
    print(f"workers: {workers['busy']}/{workers['total']} busy in processes "
          f"{', '.join(str(pid) for pid in workers['processes'])}; "
          f"{state['settling_files']} file(s) settling")
    death = workers.get("last_process_death")
    if death:
        print(f"worker processes died {workers['process_deaths']} time(s), the last at "
              f"{death['at']} (pid {death['pid']}, exit code {death['exit_code']}"
              f"{'' if death['had_started'] else ', before it was ready'}): see the daemon's log")
    for job in workers["running"]:
        print(f"  job {job['job_id']} {job['stage']} for {job['seconds']:.1f} s  "
              f"{printable(job['path'])}")
    scan = state["last_rescan"]
    if scan:
        print(f"last rescan: {scan['at']} ({scan['reason']}): {scan['files']} files, "
              f"{scan['missed']} missed by events")
    print(f"events: {events['published']} published (last sequence {events['last_sequence']}), "
          f"{events['subscribers']} subscriber(s), {events['subscriber_drops']} dropped")
    failure = events.get("log_failure")
    if failure:
        print(f"event log: NOT WRITABLE for {failure['seconds']:g} s: {failure['reason']} "
              f"({events['log']}; events wait in the database)")
    if state["metrics"]:
        print(f"metrics: http://{state['metrics']}/metrics")
    return EXIT_OK


def _human_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{seconds:02d}"


def cmd_stats(args: argparse.Namespace) -> int:
    from ingestd import stats

    cfg = _open(args)
    projects = [cfg.project(args.project).name] if args.project else sorted(cfg.projects)
    since = stats.parse_duration(args.since) if args.since else None
    result = stats.collect(projects, since)
    if args.json:
        _print_json(result)
    else:
        print(stats.render(result))
    return EXIT_OK


def cmd_db_migrate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    url = cfg.daemon.database
    database = db.connect(url)
    with db.translate_errors(url):
        applied = migrations.migrate(database, on_wait=lambda: print(
            f"{db.describe(url)}: another node is migrating it; waiting until it is done",
            file=sys.stderr, flush=True))
        version = migrations.current_version(database)
    database.close()
    if applied:
        print(f"{db.describe(url)}: applied migrations {', '.join(map(str, applied))}; "
              f"schema version {version}")
    else:
        print(f"{db.describe(url)}: up to date (schema version {version})")
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    from ingestd.sinks import check_all

    cfg = _config(args)
    check_all(cfg)
    effective = config_mod.as_dict(cfg)
    if args.json:
        _print_json(effective)
    else:
        print(f"# effective configuration from {effective['source'] or 'the zero-config default'}")
        _print_toml(effective)
    return EXIT_OK


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _print_toml(effective: dict[str, Any]) -> None:
    def value(v: Any) -> str:
        if v is None:
            return '""  # unset'
        return json.dumps(v, ensure_ascii=False)

    def key(name: str) -> str:  # a bare key, else a quoted one ("Team A #1")
        return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)

    def table(path: list[str], values: dict[str, Any]) -> None:
        print(f"\n[{'.'.join(map(key, path))}]")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        for name, v in values.items():
            if name not in nested:
                print(f"{key(name)} = {value(v)}")
        for name, v in nested.items():
            table([*path, name], v)

    table(["daemon"], effective["daemon"])
    for project, values in effective["projects"].items():
        table(["projects", project], values)


# --- parser ------------------------------------------------------------------------------------

def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS,
                        help="config file (default: $INGESTD_CONFIG, else zero-config)")
    return common


def _project_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--project", required=True, help="project name")


def _json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON document")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line on stderr and exit 2, like every other error
    (its own error() prints the whole usage first); its subcommands' parsers are of this class."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


LOG_LEVELS = ["debug", "info", "warning", "error"]


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="ingestd", parents=[common],
                                     description="Ingest files dropped into watched folders.")
    parser.add_argument("--version", action="version", version=f"ingestd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", parents=[common], help="the daemon, in the foreground")
    run.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    run.set_defaults(handler=cmd_run)
    add = commands.add_parser("add", parents=[common],
                              help="hand files to a project safely (- reads standard input)")
    _project_arg(add)
    add.add_argument("files", nargs="+", metavar="FILE")
    add.add_argument("--name", help="file name for standard input (or for a single file)")
    add.add_argument("--wait", action="store_true", help="wait for the jobs and report them")
    _json_arg(add)
    add.set_defaults(handler=cmd_add)
    _add_jobs(commands, common)
    events = commands.add_parser("events", parents=[common],
                                 help="recent events; --since replays, -f follows live")
    events.add_argument("-f", "--follow", action="store_true",
                        help="keep following live events (no gap, no duplicate)")
    events.add_argument("--since", type=_integer("--since", 0), metavar="SEQ",
                        help="replay every event after SEQ")
    events.add_argument("-p", "--project", help="only this project's events")
    events.add_argument("--type", action="append", metavar="PATTERN",
                        help="glob on the event type, e.g. 'io.ingestd.job.*' (repeatable)")
    events.add_argument("--json", action="store_true",
                        help="raw CloudEvents JSON lines (the default when piped)")
    events.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                        help="on stderr; info: when -f switches between the daemon's socket "
                             "and the database")
    events.set_defaults(handler=cmd_events)
    search = commands.add_parser("search", parents=[common],
                                 help='ranked passages: words, "phrases", prefix*, OR')
    _project_arg(search)
    search.add_argument("query")
    search.add_argument("--limit", type=_integer("--limit"), default=10, help="passages (max 100)")
    _json_arg(search)
    search.set_defaults(handler=cmd_search)
    status = commands.add_parser("status", parents=[common],
                                 help="the running daemon's live state (exit 3: not running)")
    _json_arg(status)
    status.set_defaults(handler=cmd_status)
    stats = commands.add_parser("stats", parents=[common],
                                help="counts, failure rate, durations, queue depth, index size")
    stats.add_argument("-p", "--project", help="one project (default: all)")
    stats.add_argument("--since", metavar="DURATION", help="window, e.g. 15m, 24h, 7d (default 24h)")
    _json_arg(stats)
    stats.set_defaults(handler=cmd_stats)
    _add_db(commands, common)
    _add_config(commands, common)
    return parser


def _add_jobs(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("jobs", parents=[common], help="list and manage jobs")
    sub = group.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = sub.add_parser("list", parents=[common], help="newest first, one page")
    _project_arg(listing)
    listing.add_argument("--status", help="queued, running, completed, failed or cancelled")
    listing.add_argument("--stage", help="initial, reading, extracting, indexing or done")
    listing.add_argument("--source", type=_integer("source id"), help="source id")
    listing.add_argument("--limit", type=_integer("--limit"), default=jobs.DEFAULT_LIST_LIMIT,
                         help=f"jobs per page (max {jobs.MAX_LIST_LIMIT})")
    listing.add_argument("--cursor", help="the next_cursor printed with the previous page")
    _json_arg(listing)
    listing.set_defaults(handler=cmd_jobs_list)

    for name, handler, text in (("show", cmd_jobs_show, "one job"),
                                ("cancel", cmd_jobs_cancel, "cancel a queued or running job"),
                                ("delete", cmd_jobs_delete, "soft-delete a job (not while running)"),
                                ("retry", cmd_jobs_retry, "re-queue a failed or cancelled job")):
        action = sub.add_parser(name, parents=[common], help=text)
        _project_arg(action)
        action.add_argument("job", type=_integer("job id"), help="job id")
        _json_arg(action)
        action.set_defaults(handler=handler)

    submit = sub.add_parser("submit", parents=[common],
                            help="queue a job for a file already inside the project's folders")
    _project_arg(submit)
    submit.add_argument("path")
    _json_arg(submit)
    submit.set_defaults(handler=cmd_jobs_submit)


def _add_db(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("db", parents=[common], help="database maintenance")
    sub = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("migrate", parents=[common], help="bring the schema up to date"
                   ).set_defaults(handler=cmd_db_migrate)


def _add_config(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("config", parents=[common], help="configuration")
    sub = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser("check", parents=[common], help="validate and print the effective config")
    _json_arg(check)
    check.set_defaults(handler=cmd_config_check)


def _fail(exc: IngestdError, every_problem: bool = False) -> int:
    """One line on stderr; with ``every_problem`` (config check) one per problem of a config."""
    lines = [printable(line) for line in getattr(exc, "problems", None) or [str(exc)]]
    if not every_problem and len(lines) > 1:
        lines = [f"{lines[0]} (and {len(lines) - 1} more: see ingestd config check)"]
    for line in lines:
        print(f"ingestd: {line or type(exc).__name__}", file=sys.stderr)
    return exc.exit_code


def _discard_stdout() -> None:
    if sys.stdout is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _open_streams(args: argparse.Namespace) -> None:
    """A stdout the command was started without (``>&-``: None in Python, where print() writes
    nothing, and print(file=sys.stderr) to stdout when stderr is the one closed: main() gives
    that one /dev/null); and JSON's encoding, UTF-8 whatever the locale says (RFC 8259: under
    an ASCII locale, backslashreplace wrote Python's \\xe9, which is no JSON escape)."""
    if sys.stdout is None:
        if args.handler is not cmd_run:  # the daemon writes nothing there
            raise IngestdError("standard output is closed: nowhere to write the output")
        sys.stdout = open(os.devnull, "w")
    if getattr(args, "json", False) or (args.handler is cmd_events and not sys.stdout.isatty()):
        sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")  # else strict


def main(argv: Sequence[str] | None = None) -> int:
    if sys.stderr is None:  # started with it closed: see _open_streams
        sys.stderr = open(os.devnull, "w")
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.reconfigure(errors="backslashreplace")
    args = None
    try:
        args = build_parser().parse_args(argv)
        _open_streams(args)
        if args.handler is not cmd_run:  # which configures the daemon's logging itself
            log.configure_command(getattr(args, "log_level", "warning"))
        code = args.handler(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, where its failure is one line, not at exit
        return code
    except db.ERRORS as exc:
        return _fail(db.as_store_error(exc))
    except IngestdError as exc:
        return _fail(exc, every_problem=getattr(args, "handler", None) is cmd_config_check)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `ingestd ... | head`: stop quietly, and keep Python from complaining at exit.
        _discard_stdout()
        return EXIT_FAILURE
    except OSError as exc:  # a folder we may not write to, our output on a full disk...
        _discard_stdout()  # what could not be written would fail again at exit
        where = f": {printable(os.fsdecode(exc.filename))}" if exc.filename else ""
        return _fail(IngestdError(f"{exc.strerror or exc}{where}"))
    finally:
        db.close_store()
