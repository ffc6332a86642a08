"""Daemon figures: how fast `ingestd run` turns dropped files into completed jobs.

    python bench/bench_daemon.py [FIGURE ...] [--dir DIR] [--keep] [--profile] [--lock-stats] [--json FILE]

FIGURE is any of floor, throughput, ratio, latency, startup, pdf, index-cost (default: all, in
that order).
Everything is written under --dir (default: a fresh temp dir, removed afterwards unless --keep);
nothing is deleted before the bench ends (see fresh()). ext4 creates files several times slower
for a few minutes after many were deleted (a previous bench, the test suite): every figure that
drops files is then slower, and its drop_seconds shows it.
Each daemon is a real subprocess (`python -m ingestd -c CONFIG run`, stderr in DIR/.../daemon.log),
ready once its `io.ingestd.daemon.started` event is in the database, stopped with SIGTERM. The
bench only reads the database (sqlite3, read-only), polling every 50 ms; every wait has a deadline.

floor       The smallest loop that does the same work, kept here as the floor: a child process runs a
            watchdog Observer on a folder; each FileClosedEvent -> read the file -> plain sqlite3
            insert (WAL, synchronous=NORMAL), committed every 500 rows or 50 ms. The bench writes
            N (--files, 10,000) unique 2 KB text files straight into the folder (open/write/close,
            as fast as it can); files/s from the first drop to the last row committed (median
            of --floor-runs runs, default 3: one run is short and noisy).
throughput  The same N files dropped into a running daemon (one project, workers = 2, after = keep,
            settle_seconds = 0.2); files/s from the first drop to the last job completed (max
            completed_at), and the ratio to the floor. Goal: >= 1,000 files/s and >= 0.5 x floor.
            Also jobs completed per second while jobs were still being created, and after: on
            2 cores creation and completion compete for the write lock and the CPU (1,200 and
            3,300 files/s in one run on the 2-core VM).
            --throughput-settle S... and --throughput-workers W... run every combination instead
            (e.g. --throughput-settle 0.2 1.0 --throughput-workers 1 2 4; goals apply to 2).
ratio       The throughput / floor goal again, from runs taken back to back: --ratio-rounds (3)
            rounds of one floor run and one throughput run (settle 0.2 s, 2 workers), the order
            swapped every round; the median of the rounds' ratios. A round whose floor spent
            more than half its time dropping (drop_bound) measured how fast files could be
            created, not the loop, and is left out (n/a if every round was). The floor and
            throughput figures above are minutes apart, and how fast ext4 creates files drifts
            by up to 2x in minutes: their ratio read 0.45-0.49 when a recent delete slowed the
            drops (the floor then waits for files), 0.31-0.40 when drops were fast.
latency     settle_seconds = 1.0; 500 files dropped at 50/s; for each, job created_at minus the
            time.time() taken right after its close. Goal: p99 <= settle_seconds + 50 ms.
startup     100,000 files of 200 bytes already in the folder when the daemon starts: seconds from
            process start until every one has a job row, and the peak RSS meanwhile of the
            daemon with its worker processes and their PDF extractors (sum of VmRSS). Goal: <= 30 s and < 300 MB. Also (informative) seconds until all completed.
pdf         100 PDFs (--pdfs) of 50 text pages (tests/corpus.make_pdf) dropped at once into a
            daemon with workers = 1, then workers = 2 (settle_seconds = 0.2), once one other PDF
            per worker has completed (warm-up, not counted); pages/s from the first drop to the
            last job completed, against bare pypdf in this process (PdfReader(f).pages[i]
            .extract_text() for every page: the "one worker" baseline) and bare pypdf split over
            2 processes at once (what the 2 cores give CPU-bound Python with no daemon at all).
            --pdf-rounds (3) rounds; each ratio is taken within a round (1 worker against the mean
            of bare runs just before and after it), the median is reported. A rate, so the run
            is long enough that the settle before the first job (a fixed 0.2 s: the latency
            figure's business) is a small part of it: with 40 PDFs it was 5% of the one-worker
            run and 8% of the two-worker one (pages/s from the first job's start on are reported
            too). Each round then runs the one-worker daemon once more with bare pypdf running
            alongside it in another process, over the same seconds (the daemon on one core, bare
            on the other): bare runs before and after the daemon have differed by up to 40%
            within one round (the machine's speed drifts), more than the 10% the goal allows,
            while the two sides of this one see the same moments. For the same reason the
            two-worker run is followed by a second one-worker run, and 2 workers are compared
            with the mean of the one-worker runs around them (the CPU seconds the same pages
            took have varied by 30% between runs a minute apart).
            Goals: 2 workers >= 1.7 x 1 worker; 1 worker within 10% of bare pypdf.

soak        (only when named) --soak-rate (400) files per second for --soak-seconds (300) into a
            running daemon that deletes each file once ingested: RSS of the daemon and of its
            process tree every 10 s, and their growth after the first minute. 264,000 files in
            11 minutes: daemon +2.0 MB, tree +7.0 MB (tracemalloc: no Python object piles up).
index-cost  Issue 5: the throughput run with the text sink and with the index sink, in
            --index-rounds (5) rounds, the order swapped every round; the median of the
            rounds' ratio of seconds per file. As the issue says, into a store that already
            holds --index-prefill (100,000) documents of 2 KB: each run starts on a copy of a
            store filled once per sink (documents, 274 MB; for the index also their chunks and
            full-text index, 606 MB). --index-prefill 0 starts from empty stores.
            Goal: <= 1.2 (indexing adds no more than 20% per small file).

--lock-stats times the database's write lock in every daemon process (bench/lockstats, put on the
daemon's PYTHONPATH: nothing in the package is changed) and adds "write_lock" to each daemon
figure: busy (seconds held / seconds of the run) and per holder (process role: thread) its
transactions and seconds waiting, holding, on a CPU while holding, and runnable but waiting for
a CPU while holding (the kernel's run queue, from /proc/thread-self/schedstat), and how often it
slept while holding (voluntary context switches). Taken with 2 workers and the index sink: busy
0.80-0.89, holders on a CPU for only 60-75% of the time they hold it, and in the run queue for
nearly all the rest (preempted by the daemon's other threads and processes: 2 cores, more
runnable threads). The exception is job creation in the daemon process (holder "daemon:
settler"): it sleeps for about 40% of its hold, 20-30 times per transaction, on its GIL (strace
shows 5 ms timed waits on the GIL's condition: after each SQLite call it must win the GIL back
from the watcher's threads). A 0.5 ms switch interval while holding the lock halved that
sleep, yet throughput / floor moved from 0.508 to 0.52 (median of 15 rounds each, alternated):
within the noise, so not kept.
--profile [threads|gil] attaches `py-spy record --threads` (pip install py-spy) to each daemon once
it is ready (threads: with --subprocesses; gil: with --gil, so only the thread holding the GIL is
sampled, which shows where the interpreter's one core goes) and writes
DIR/<run>/daemon.speedscope.json (open it at https://speedscope.app) plus a summary of the hottest
frames to stdout. Profiling slows the daemon: figures taken with --profile are not the figures.
Other processes on the machine skew every figure: each figure first waits (--quiet-wait, up to
120 s) for a quiet machine, and reports other_processes_cpu_cores (machine busy CPU minus the
daemon's and the bench's own); the summary flags figures taken at >= 0.2 such cores.
Every daemon run also reports its CPU seconds (utime+stime from /proc) while under load, in all
(extraction children included), by process role (the daemon, its worker processes, their
extraction processes) and per thread of the daemon process (named with `py-spy dump` when py-spy is installed).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import queue
import random
import shutil
import signal
import statistics
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # corpus (test PDFs) and proctree
from proctree import cpu_seconds, descendants  # noqa: E402
POLL_SECONDS = 0.05
READY_EVENT = "io.ingestd.daemon.started"
TERMINAL = ("completed", "failed", "cancelled")
FIGURES = ("floor", "throughput", "ratio", "latency", "startup", "pdf", "index-cost")
OPT_IN = ("soak",)  # run only when named
WORDS = ("ingest daemon folder settle worker queue lease sqlite event record extract page text "
         "scanner invoice contract report quarterly budget meeting summary archive customer "
         "delivery warehouse shipment payment balance account review policy schedule").split()


class Timeout(Exception):
    """A wait ran past its deadline."""


# --- small helpers ----------------------------------------------------------------------------

def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = POLL_SECONDS) -> Any:
    """Poll ``predicate`` until it returns something truthy; Timeout after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def text_payload(index: int, size: int) -> bytes:
    """``size`` bytes of unique, plain UTF-8 text (a header line with the index, then words)."""
    rng = random.Random(index)
    head = f"file {index:07d}\n".encode()
    body = bytearray(head)
    while len(body) < size:
        body += sentence(rng, 12).encode() + b"\n"
    return bytes(body[:size - 1]) + b"\n"


def drop(path: Path, data: bytes) -> float:
    """Write a file straight into a watched folder (open/write/close); time.time() after close."""
    with open(path, "wb") as handle:
        handle.write(data)
    return time.time()


def drop_many(folder: Path, payloads: list[bytes], suffix: str = ".txt") -> tuple[float, float]:
    """Drop every payload as fast as possible; (time of the first open, time of the last close)."""
    first = time.time()
    last = first
    for index, data in enumerate(payloads):
        last = drop(folder / f"f{index:07d}{suffix}", data)
    return first, last


# Where fresh() puts a previous run's leftovers until the bench ends (main sets it).
TRASH: list[Path] = []


def fresh(path: Path) -> Path:
    """An empty directory at ``path``; a previous run's leftovers there are moved aside, not
    deleted: right after thousands of files are deleted, ext4 creates files several times
    slower (its inode allocator skips and re-reads recently deleted inodes: perf shows
    recently_deleted() in ext4_create), so every drop after the first measured the kernel."""
    if path.exists():
        trash = TRASH[0] if TRASH else path.parent / ".trash"
        trash.mkdir(parents=True, exist_ok=True)
        path.rename(Path(tempfile.mkdtemp(prefix=f"{path.name}-", dir=trash)) / path.name)
    path.mkdir(parents=True)
    return path


def fmt_rate(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:,.0f} {unit}"


# --- reading the daemon's database -------------------------------------------------------------

class DbReader:
    """Read-only sqlite3 access to a database another process writes (None until it exists)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def rows(self, sql: str, params: tuple = ()) -> list[tuple] | None:
        if self._conn is None:
            if not self.path.exists():
                return None
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # no such table yet (migrations running), or busy
            return None

    def value(self, sql: str, params: tuple = ()) -> Any:
        rows = self.rows(sql, params)
        return rows[0][0] if rows else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def count_terminal(reader: DbReader) -> dict[str, int]:
    rows = reader.rows("SELECT status, count(*) FROM ingest_jobs GROUP BY status") or []
    return dict(rows)


# --- the daemon under test ---------------------------------------------------------------------

def machine_ticks() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over CPUs (/proc/stat)."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    busy = user + nice + system + irq + softirq + steal
    return busy / tick, (busy + idle + iowait) / tick


class LoadMeter:
    """CPU cores the rest of the machine used during a figure: all busy CPU minus the daemon's
    (or the floor's) and this process's own. Others share this 2-core machine (test suites):
    a figure taken while they ran is not comparable."""

    def __init__(self) -> None:
        self.busy, _ = machine_ticks()
        self.mine = sum(os.times()[:4])
        self.wall = time.monotonic()

    def others(self, measured_cpu: float) -> float:
        busy, _ = machine_ticks()
        mine = sum(os.times()[:4]) - self.mine
        wall = time.monotonic() - self.wall
        return round(max(0.0, busy - self.busy - mine - measured_cpu) / wall, 2)


def wait_until_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) for a 2 s window in which the machine is nearly idle; the
    busy cores seen in the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_ticks()[0]
        time.sleep(2.0)
        busy = (machine_ticks()[0] - before) / 2.0
        if busy <= threshold or time.monotonic() > deadline:
            return round(busy, 2)


def cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds so far of the daemon process itself, of its worker processes and of their
    PDF extraction processes (each process's own: its live children are counted in their role)."""
    roles = {"daemon process": cpu_seconds(pid, children=False)}
    for kid in descendants(pid):
        try:
            parent = int(Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            command = Path(f"/proc/{kid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        role = ("multiprocessing resource tracker" if b"resource_tracker" in command
                else "worker processes" if parent == pid else "extraction processes")
        roles[role] = roles.get(role, 0.0) + cpu_seconds(kid, children=False)
    return roles


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (utime + stime) of each live thread of ``pid``, by thread id."""
    found = {}
    for stat_file in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(stat_file.parent.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by thread id, from `py-spy dump` ({} when py-spy is not installed)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        return {}
    try:
        out = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for line in out.splitlines():
        if line.startswith("Thread "):
            tid, _, rest = line[len("Thread "):].partition(" ")
            if tid.isdigit():
                names[int(tid)] = rest.split(": ", 1)[-1].strip().strip('"')
    return names


def cpu_by_thread(pid: int, before: dict[int, float]) -> dict[str, float]:
    """CPU seconds each thread used since ``before`` (a :func:`thread_cpu` snapshot), busiest
    first; watchdog's unnamed threads are labelled by what they are in watchdog 6/7."""
    after, names = thread_cpu(pid), thread_names(pid)
    labels = {"Thread-1": "Thread-1 (watchdog inotify reader)",
              "Thread-2": "Thread-2 (watchdog observer dispatch)",
              "Thread-4": "Thread-4 (watchdog inotify emitter)"}
    used = {}
    for tid, seconds in after.items():
        name = names.get(tid, str(tid))
        used[labels.get(name, name)] = round(seconds - before.get(tid, 0.0), 2)
    return dict(sorted(((k, v) for k, v in used.items() if v > 0), key=lambda kv: -kv[1]))


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in kB (empty once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(rest.split()[0])
    return found


SINK = {"kind": "index"}  # set from --sink before any daemon starts
LOCK_STATS = {"on": False}  # set from --lock-stats


@dataclass
class Daemon:
    """One `ingestd run` in its own folder: config, state, drop folder, log."""

    home: Path
    settle_seconds: float
    workers: int
    profile: str | None = None  # None, "threads" or "gil" (see --profile)
    sink: str = "index"  # the project's sink kind (--sink)
    after: str = "keep"  # the project's `after` (what becomes of each original)
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    peak_rss_kb: int = 0
    peak_tree_rss_kb: int = 0
    _spy: subprocess.Popen | None = None
    _log: Any = None

    @property
    def folder(self) -> Path:
        return self.home / "drop"

    @property
    def db_path(self) -> Path:
        return self.home / "state" / "ingestd.db"

    @property
    def config_path(self) -> Path:
        return self.home / "ingestd.toml"

    def write_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.home / "state").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(textwrap.dedent(f"""\
            [daemon]
            state_dir = "{self.home / 'state'}"
            workers = {self.workers}

            [projects.bench]
            folders = ["{self.folder}"]
            settle_seconds = {self.settle_seconds}
            after = "{self.after}"

            [projects.bench.sink]
            kind = "{self.sink}"
            """))

    def start(self) -> None:
        """Start the process (the config must be written); ``started_at`` is time.time() before."""
        self._log = open(self.home / "daemon.log", "wb")
        env = dict(os.environ)
        if LOCK_STATS["on"]:
            self.lock_stats_dir.mkdir(exist_ok=True)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(ROOT / "bench" / "lockstats"), *filter(None, [env.get("PYTHONPATH")])])
            env["INGESTD_BENCH_LOCKSTATS"] = str(self.lock_stats_dir)
        self.started_at = time.time()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ingestd", "-c", str(self.config_path), "run"],
            stdout=self._log, stderr=self._log, cwd=self.home, env=env)

    @property
    def lock_stats_dir(self) -> Path:
        return self.home / "lockstats"

    def lock_counts(self) -> dict[str, collections.Counter]:
        """--lock-stats: the write lock's counters so far, by process role and thread."""
        totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for path in self.lock_stats_dir.glob("*.json"):
            role = "daemon" if path.stem == str(self.process.pid) else "worker processes"
            for thread, counts in json.loads(path.read_text()).items():
                totals[f"{role}: {thread}"].update(counts)
        return totals

    def wait_ready(self, reader: DbReader, timeout: float = 60.0) -> float:
        """Seconds from start until the daemon.started event is in the database."""
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}; see "
                                   f"{self.home / 'daemon.log'}")
            return bool(reader.value("SELECT count(*) FROM ingest_events WHERE type = ?",
                                     (READY_EVENT,)))
        wait_for(ready, timeout, "the daemon.started event")
        if self.profile:
            self._start_profiler()
        return time.time() - self.started_at

    def sample_rss(self) -> tuple[int, int]:
        """Sample the daemon's RSS and its process tree's (worker processes and their PDF
        extractors included: the tree's sum is the figure); both now, in KB."""
        status = proc_status(self.process.pid)
        self.peak_rss_kb = max(self.peak_rss_kb, status.get("VmHWM", 0), status.get("VmRSS", 0))
        tree = status.get("VmRSS", 0) + sum(proc_status(pid).get("VmRSS", 0)
                                            for pid in descendants(self.process.pid))
        self.peak_tree_rss_kb = max(self.peak_tree_rss_kb, tree)
        return status.get("VmRSS", 0), tree

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait (then SIGKILL at the deadline); the exit code."""
        if self.process is None:
            return None
        self._stop_profiler()
        if self.process.poll() is None:
            self.sample_rss()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  ! daemon did not stop within {timeout:g} s: killed", file=sys.stderr)
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode

    # --- profiling (optional) --------------------------------------------------------------------

    def _start_profiler(self) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = self.home / "daemon.speedscope.json"
        mode = ["--gil"] if self.profile == "gil" else ["--subprocesses"]
        self._spy = subprocess.Popen(
            [spy, "record", "--pid", str(self.process.pid), "--threads", *mode,
             "--rate", "200", "--format", "speedscope", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=open(self.home / "py-spy.log", "wb"))
        time.sleep(0.5)  # let it attach before the load starts

    def _stop_profiler(self) -> None:
        if self._spy is None:
            return
        self._spy.send_signal(signal.SIGINT)
        try:
            self._spy.wait(60)
        except subprocess.TimeoutExpired:
            self._spy.kill()
        self._spy = None
        summarize_speedscope(self.home / "daemon.speedscope.json")


def run_daemon(home: Path, settle: float, workers: int, profile: str | None,
               body: Callable[[Daemon, DbReader], dict[str, Any]],
               before_start: Callable[[Daemon], None] | None = None,
               ready_timeout: float = 60.0, after: str = "keep") -> dict[str, Any]:
    """Write the config, run ``before_start``, start the daemon, wait until ready, run ``body``,
    stop the daemon; ``body``'s result plus facts about the run."""
    daemon = Daemon(fresh(home), settle, workers, profile, SINK["kind"], after)
    daemon.write_config()
    if before_start is not None:
        before_start(daemon)
    reader = DbReader(daemon.db_path)
    daemon.start()
    try:
        ready = daemon.wait_ready(reader, ready_timeout)
        cpu_before, wall_before = cpu_seconds(daemon.process.pid), time.time()
        roles_before = cpu_by_role(daemon.process.pid)
        threads_before = thread_cpu(daemon.process.pid)
        load = LoadMeter()
        locks_before = daemon.lock_counts() if LOCK_STATS["on"] else None
        result = body(daemon, reader)
        if locks_before is not None:
            result["write_lock"] = lock_report(locks_before, daemon.lock_counts(),
                                               time.time() - wall_before)
        result["ready_seconds"] = round(ready, 3)
        cpu = cpu_seconds(daemon.process.pid) - cpu_before
        result["other_processes_cpu_cores"] = load.others(cpu)
        result["daemon_cpu_seconds"] = round(cpu, 2)
        result["daemon_cpu_cores"] = round(cpu / (time.time() - wall_before), 2)
        result["cpu_seconds_by_role"] = {
            role: round(seconds - roles_before.get(role, 0.0), 2)
            for role, seconds in cpu_by_role(daemon.process.pid).items()}
        result["cpu_seconds_by_thread"] = cpu_by_thread(daemon.process.pid, threads_before)
        result["rescans"] = reader.rows(
            "SELECT json_extract(data, '$.reason'), json_extract(data, '$.missed') "
            "FROM ingest_events WHERE type = 'io.ingestd.watch.rescanned' ORDER BY seq")
    finally:
        reader.close()
        code = daemon.stop()
    result["exit_code"] = code
    result["peak_rss_mb"] = round(daemon.peak_rss_kb / 1024, 1)
    result["peak_tree_rss_mb"] = round(daemon.peak_tree_rss_kb / 1024, 1)
    result["log"] = str(home / "daemon.log")
    return result


def lock_report(before: dict[str, collections.Counter], after: dict[str, collections.Counter],
                seconds: float) -> dict[str, Any]:
    """--lock-stats over a run: how busy the write lock was (seconds held / seconds of the
    run), and per holder its transactions, seconds waiting, holding, on a CPU while holding,
    and waiting for a CPU while holding (runnable, in the kernel's run queue), and how often it
    slept while holding. A holder that is neither (on a CPU nor in the run queue) sleeps while
    it holds: on its GIL or in I/O."""
    holders = {}
    for name, counts in sorted(after.items()):
        delta = {key: counts[key] - before.get(name, collections.Counter())[key]
                 for key in ("txns", "wait_s", "hold_s", "cpu_in_hold_s", "runq_in_hold_s",
                             "sleeps_in_hold")}
        if delta["txns"]:
            holders[name] = {key: round(value, 3) for key, value in delta.items()}
    held = sum(h["hold_s"] for h in holders.values())
    return {"busy": round(held / seconds, 2), "held_seconds": round(held, 2),
            "cpu_while_held_seconds": round(sum(h["cpu_in_hold_s"] for h in holders.values()), 2),
            "runq_while_held_seconds": round(sum(h["runq_in_hold_s"] for h in holders.values()), 2),
            "holders": holders}


def wait_all_ended(daemon: Daemon, reader: DbReader, total: int, timeout: float) -> dict[str, int]:
    """Wait until ``total`` jobs are in a terminal status; the counts by status."""
    counts: dict[str, int] = {}

    def done() -> bool:
        nonlocal counts
        if daemon.process.poll() is not None:
            raise RuntimeError(f"daemon died (exit {daemon.process.returncode})")
        daemon.sample_rss()
        counts = count_terminal(reader)
        return sum(counts.get(s, 0) for s in TERMINAL) >= total
    try:
        wait_for(done, timeout, f"{total} jobs to end")
    except Timeout as exc:
        raise Timeout(f"{exc} (got {counts})") from None
    return counts


def job_times(reader: DbReader, after_id: int = 0) -> dict[str, float]:
    """When the jobs (those after job ``after_id``) were created, started and completed."""
    row = reader.rows("SELECT min(created_at), max(created_at), min(started_at), "
                      "max(completed_at) FROM ingest_jobs WHERE id > ?", (after_id,))[0]
    return dict(zip(("first_created", "last_created", "first_started", "last_completed"), row))


def completion_rates(reader: DbReader, times: dict[str, float], total: int
                     ) -> dict[str, float | None]:
    """Jobs completed per second while job creation was still going on (from the first job
    created to the last) and after it, of ``total`` completed: the settler's creating
    transactions take the write lock and CPU the workers' groups then wait for, so the two
    rates show what that costs."""
    while_creating = reader.value(
        "SELECT count(*) FROM ingest_jobs WHERE status = 'completed' AND completed_at <= ?",
        (times["last_created"],)) or 0
    creating = times["last_created"] - times["first_created"]
    after = times["last_completed"] - times["last_created"]
    return {"completed_per_second_while_creating":
            round(while_creating / creating, 1) if creating > 0 else None,
            "completed_per_second_after_creating":
            round((total - while_creating) / after, 1) if after > 0 else None}


# --- profile summary ---------------------------------------------------------------------------

def summarize_speedscope(path: Path, top: int = 15) -> None:
    """Print, per profiled process, the samples per thread and the frames with the most
    inclusive (anywhere on the stack) and self (top of the stack) samples."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"  (no profile: {exc}; see {path.parent / 'py-spy.log'})")
        return
    frames = [f"{f['name']} ({Path(f.get('file', '?')).name}:{f.get('line', '?')})"
              for f in doc["shared"]["frames"]]
    print(f"  profile: {path}")
    combined = {"name": "all threads combined", "samples": [
        stack for profile in doc["profiles"] for stack in profile["samples"]]}
    for profile in [*doc["profiles"], combined]:
        samples = profile["samples"]
        if not samples:
            continue
        inclusive: collections.Counter[int] = collections.Counter()
        selfs: collections.Counter[int] = collections.Counter()
        for stack in samples:
            inclusive.update(set(stack))
            if stack:
                selfs[stack[-1]] += 1
        print(f"    {profile['name']}: {len(samples)} samples")
        for title, counter in (("inclusive", inclusive), ("self", selfs)):
            for index, hits in counter.most_common(top if title == "inclusive" else 8):
                print(f"      {title:<9} {100 * hits / len(samples):5.1f}%  {frames[index]}")


# --- floor ---------------------------------------------------------------------------------------

def floor_worker(folder: str, database: str, batch: int, interval: float) -> None:
    """The floor loop (run in a child process): Observer -> closed -> read -> batched insert.

    Like the daemon, it rescans the folder after an inotify queue overflow (watchdog only logs
    one), or the events lost in it would leave files never inserted."""
    import logging

    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    conn = sqlite3.connect(database, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, path TEXT, "
                 "size INTEGER, body TEXT, inserted_at REAL)")
    conn.execute("CREATE TABLE IF NOT EXISTS overflows (at REAL, rescanned INTEGER)")
    closed: queue.SimpleQueue[str] = queue.SimpleQueue()
    overflow = threading.Event()

    class Closed(FileSystemEventHandler):
        def on_closed(self, event) -> None:
            if not event.is_directory:
                closed.put(event.src_path)

    class Overflow(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "overflow" in record.getMessage().lower():
                overflow.set()

    for name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
        logging.getLogger(name).addHandler(Overflow(logging.WARNING))
    observer = Observer()
    observer.schedule(Closed(), folder, recursive=True)
    observer.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    _floor_loop(conn, folder, closed, overflow, stop, batch, interval)
    observer.stop()
    observer.join(10)


def _floor_loop(conn: sqlite3.Connection, folder: str, closed: queue.SimpleQueue,
                overflow: threading.Event, stop: threading.Event, batch: int,
                interval: float) -> None:
    rows: list[tuple] = []
    seen: set[str] = set()
    flushed = time.monotonic()
    while not stop.is_set():
        if overflow.is_set():
            overflow.clear()
            missed = [entry.path for entry in os.scandir(folder) if entry.path not in seen]
            for path in missed:
                closed.put(path)
            conn.execute("INSERT INTO overflows VALUES (?, ?)", (time.time(), len(missed)))
        try:
            path = closed.get(timeout=interval)
            if path not in seen:
                seen.add(path)
                with open(path, "rb") as handle:
                    data = handle.read()
                rows.append((path, len(data), data.decode("utf-8")))
        except queue.Empty:
            pass
        except OSError:
            continue
        if rows and (len(rows) >= batch or time.monotonic() - flushed >= interval):
            moment = time.time()
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO files (path, size, body, inserted_at) "
                             "VALUES (?, ?, ?, ?)", [(*row, moment) for row in rows])
            conn.execute("COMMIT")
            rows, flushed = [], time.monotonic()


def floor_once(home: Path, payloads: list[bytes], timeout: float) -> dict[str, Any]:
    """One floor run in a fresh ``home``: seconds from the first drop to the last row committed."""
    folder, database = fresh(home / "drop"), home / "floor.db"
    child = subprocess.Popen([sys.executable, __file__, "_floor-worker", str(folder),
                              str(database), "500", "0.05"], stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the floor worker did not start")
        cpu_before = cpu_seconds(child.pid)
        load = LoadMeter()
        first, last_close = drop_many(folder, payloads)
        reader = DbReader(database)
        wait_for(lambda: (reader.value("SELECT count(*) FROM files") or 0) >= len(payloads),
                 timeout, f"{len(payloads)} floor rows")
        last_row = reader.value("SELECT max(inserted_at) FROM files")
        overflows = reader.rows("SELECT count(*), coalesce(sum(rescanned), 0) FROM overflows")[0]
        cpu = cpu_seconds(child.pid) - cpu_before
        others = load.others(cpu)
        reader.close()
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:  # its loop's timed SimpleQueue.get, interrupted by
            child.kill()  # the signal, can wait for ever (CPython 3.11; see settle.py)
            child.wait()
    seconds = last_row - first
    return {"seconds": round(seconds, 3), "files_per_second": round(len(payloads) / seconds, 1),
            "drop_seconds": round(last_close - first, 3), "cpu_seconds": round(cpu, 2),
            "inotify_overflows": overflows[0], "files_found_by_rescan": overflows[1],
            "other_processes_cpu_cores": others}


def figure_floor(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The floor, ``--floor-runs`` times (it is short and noisy): the median run counts."""
    payloads = [text_payload(i, args.size) for i in range(args.files)]
    home = fresh(work / "floor")
    runs = [floor_once(home / f"run{n}", payloads, args.timeout) for n in range(args.floor_runs)]
    median = sorted(runs, key=lambda run: run["files_per_second"])[len(runs) // 2]
    return {"files": args.files, "bytes_each": args.size, **median,
            "runs": [{k: run[k] for k in ("files_per_second", "drop_seconds", "inotify_overflows",
                                          "other_processes_cpu_cores")}
                     for run in runs]}


# --- throughput -----------------------------------------------------------------------------------

def figure_throughput(work: Path, args: argparse.Namespace, settle: float,
                      workers: int = 2, store: Path | None = None) -> dict[str, Any]:
    """``store``: a database file the daemon starts on (a copy of it), instead of a new one."""
    payloads = [text_payload(i, args.size) for i in range(args.files)]

    def body(daemon: Daemon, reader: DbReader) -> dict[str, Any]:
        first, last_close = drop_many(daemon.folder, payloads)
        counts = wait_all_ended(daemon, reader, args.files, args.timeout)
        times = job_times(reader)
        seconds = times["last_completed"] - first
        return {"files": args.files, "settle_seconds": settle, "workers": workers,
                "seconds": round(seconds, 3),
                "files_per_second": round(counts.get("completed", 0) / seconds, 1),
                "drop_seconds": round(last_close - first, 3),
                "all_created_after": round(times["last_created"] - first, 3),
                **completion_rates(reader, times, counts.get("completed", 0)), "statuses": counts}

    def copy_store(daemon: Daemon) -> None:
        shutil.copyfile(store, daemon.db_path)

    return run_daemon(work / f"throughput-settle{settle:g}-workers{workers}", settle, workers,
                      args.profile, body, before_start=copy_store if store else None)


# A floor run whose drop took more than this share of its time measured the drop, not the loop:
# the loop took each file as it came, and the daemon would look faster against it than it is.
DROP_BOUND = 0.5


def figure_ratio(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Throughput / floor from runs taken back to back: --ratio-rounds rounds of one floor run
    and one throughput run (settle 0.2 s, 2 workers), the order swapped every round; the
    median of the ratios of the rounds whose floor was not drop-bound (see DROP_BOUND); None
    if every round was. Both drop files, and how fast this machine's ext4 creates them drifts
    by 2x within minutes (see fresh()): runs minutes apart measure that drift."""
    payloads = [text_payload(i, args.size) for i in range(args.files)]
    rounds = []
    for number in range(args.ratio_rounds):
        home = fresh(work / "ratio" / f"round{number}")
        runs: dict[str, dict[str, Any]] = {}
        for which in ("floor", "throughput") if number % 2 == 0 else ("throughput", "floor"):
            if args.quiet_wait:
                wait_until_quiet(args.quiet_wait)
            runs[which] = (floor_once(home / "floor", payloads, args.timeout) if which == "floor"
                           else figure_throughput(home, args, 0.2, 2))
        floor, daemon = runs["floor"], runs["throughput"]
        rounds.append({"floor_files_per_second": floor["files_per_second"],
                       "throughput_files_per_second": daemon["files_per_second"],
                       "ratio": round(daemon["files_per_second"] / floor["files_per_second"], 3),
                       "floor_drop_seconds": floor["drop_seconds"],
                       "throughput_drop_seconds": daemon["drop_seconds"],
                       "drop_bound": floor["drop_seconds"] > DROP_BOUND * floor["seconds"]})
    # With an even count the median is the mean of the middle two (the upper one alone, as
    # taken before, read 0.519 for rounds of 0.497 and 0.519).
    measured = [run["ratio"] for run in rounds if not run["drop_bound"]]
    return {"files": args.files, "rounds": rounds,
            "ratio": round(statistics.median(measured), 3) if measured else None}


def filled_store(work: Path, kind: str, documents: int) -> Path:
    """A store holding ``documents`` documents of 2 KB written by the ``kind`` sink of project
    bench (no jobs), made in this process through the sink itself, 1,000 per transaction."""
    from bench_index import project_in
    from ingestd import db
    from ingestd.sinks import Document, open_sink

    home = fresh(work / f"prefill-{kind}")
    project = project_in(home, kind)
    path = home / "ingestd.db"
    database = db.open_store(f"sqlite:///{path}")
    sink, began = open_sink(project), time.monotonic()
    for start in range(0, documents, 1000):
        batch = []
        for number in range(start, min(documents, start + 1000)):
            text = text_payload(documents + number, 2048).decode()
            document = Document("bench", number + 1, text, f"/prefill/{number}.txt",
                                f"{number}.txt", "text/plain", f"{number:064x}",
                                ((0, len(text)),))
            batch.append((document, sink.parts_of(document)))
        with database.atomic():
            sink.ingest_many(batch)
    db.close_store()
    print(f"  ({documents:,} documents through the {kind} sink in "
          f"{time.monotonic() - began:.0f} s: {path.stat().st_size / 1e6:,.0f} MB)", flush=True)
    return path


def figure_index_cost(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The throughput run with the plain text sink and with the built-in index, in
    --index-rounds rounds, the order swapped every round (the machine's speed drifts); per
    round, the index's seconds per file over the text sink's. The median of the rounds' ratios
    is the figure (issue 5: at most 1.2)."""
    rounds = []
    saved = SINK["kind"]
    stores = {kind: filled_store(work, kind, args.index_prefill) if args.index_prefill else None
              for kind in ("text", "index")}
    try:
        for number in range(args.index_rounds):
            runs = {}
            for kind in ("text", "index") if number % 2 == 0 else ("index", "text"):
                SINK["kind"] = kind
                if args.quiet_wait:
                    wait_until_quiet(args.quiet_wait)
                runs[kind] = figure_throughput(work, args, 0.2, store=stores[kind])
            rounds.append({"text_files_per_second": runs["text"]["files_per_second"],
                           "index_files_per_second": runs["index"]["files_per_second"],
                           "ratio": round(runs["index"]["seconds"] / runs["text"]["seconds"], 3),
                           **{f"{kind}_{key}": runs[kind][key] for kind in ("text", "index")
                              for key in ("drop_seconds", "cpu_seconds_by_role")}})
    finally:
        SINK["kind"] = saved
    return {"rounds": rounds, "files": args.files, "prefilled_documents": args.index_prefill,
            "median_ratio": round(statistics.median(r["ratio"] for r in rounds), 3)}


# --- latency --------------------------------------------------------------------------------------

def figure_soak(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A steady stream for a long while: does the daemon's memory stay put? RSS of the daemon
    and of its process tree every 10 s, and their growth after the first minute (caches and
    the allocator's arenas fill in that minute; growth after it would be a leak). Each file
    is deleted once ingested (after = "delete"), so the folder, and with it what a rescan
    holds at once, stays small: with "keep" the rescans (every 5 min) walk an ever larger
    folder, and the daemon keeps the memory the largest one took."""
    def body(daemon: Daemon, reader: DbReader) -> dict[str, Any]:
        samples: list[dict[str, float]] = []
        began = next_sample = time.time()
        dropped = 0
        while (now := time.time()) - began < args.soak_seconds:
            while dropped < int((now - began) * args.soak_rate):
                drop(daemon.folder / f"f{dropped:08d}.txt", text_payload(dropped, args.size))
                dropped += 1
            if now >= next_sample:
                own, tree = daemon.sample_rss()
                samples.append({"seconds": round(now - began), "dropped": dropped,
                                "daemon_rss_mb": round(own / 1024, 1),
                                "tree_rss_mb": round(tree / 1024, 1)})
                next_sample += 10
            time.sleep(0.01)
        counts = wait_all_ended(daemon, reader, dropped, args.timeout)
        settled = [sample for sample in samples if sample["seconds"] >= 60] or samples
        return {"files": dropped, "files_per_second": args.soak_rate, "statuses": counts,
                "daemon_rss_growth_mb": round(samples[-1]["daemon_rss_mb"]
                                              - settled[0]["daemon_rss_mb"], 1),
                "tree_rss_growth_mb": round(samples[-1]["tree_rss_mb"]
                                            - settled[0]["tree_rss_mb"], 1),
                "samples": samples}

    return run_daemon(work / "soak", 0.2, 2, args.profile, body, after="delete")


def figure_latency(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    settle, count, rate = 1.0, args.latency_files, args.latency_rate

    def body(daemon: Daemon, reader: DbReader) -> dict[str, Any]:
        closes: dict[str, float] = {}
        start = time.monotonic()
        for index in range(count):
            pause = start + index / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            path = daemon.folder / f"f{index:07d}.txt"
            closes[str(path)] = drop(path, text_payload(index, args.size))
        wait_for(lambda: (reader.value("SELECT count(*) FROM ingest_jobs") or 0) >= count,
                 settle + args.timeout, f"{count} job rows")
        created = dict(reader.rows("SELECT source_path, created_at FROM ingest_jobs"))
        waits = [created[path] - closed for path, closed in closes.items() if path in created]
        return {"files": count, "rate_per_second": rate, "settle_seconds": settle,
                "matched": len(waits),
                "p50_ms": round(1000 * percentile(waits, 50), 1),
                "p99_ms": round(1000 * percentile(waits, 99), 1),
                "max_ms": round(1000 * max(waits), 1),
                "min_ms": round(1000 * min(waits), 1)}

    return run_daemon(work / "latency", settle, 2, args.profile, body)


# --- startup --------------------------------------------------------------------------------------

def figure_startup(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    total, settle = args.startup_files, 1.0
    made: dict[str, float] = {}

    def before_start(daemon: Daemon) -> None:
        started = time.perf_counter()
        for index in range(total):
            with open(daemon.folder / f"f{index:07d}.txt", "wb") as handle:
                handle.write(text_payload(index, 200))
        made["seconds"] = time.perf_counter() - started
        time.sleep(settle + 0.1)  # all older than the settle window: no wait is owed

    def body(daemon: Daemon, reader: DbReader) -> dict[str, Any]:
        def all_rows() -> bool:
            daemon.sample_rss()
            return (reader.value("SELECT count(*) FROM ingest_jobs") or 0) >= total
        wait_for(all_rows, args.timeout, f"{total} job rows", interval=0.1)
        rows_after = time.time() - daemon.started_at
        result = {"files": total, "bytes_each": 200, "created_files_in": round(made["seconds"], 1),
                  "all_rows_seconds": round(rows_after, 2),
                  "peak_rss_mb_until_rows": round(daemon.peak_rss_kb / 1024, 1),
                  "peak_tree_rss_mb_until_rows": round(daemon.peak_tree_rss_kb / 1024, 1)}
        if args.startup_complete:
            counts = wait_all_ended(daemon, reader, total, args.startup_complete_timeout)
            result["all_ended_seconds"] = round(time.time() - daemon.started_at, 1)
            result["statuses"] = counts
        return result

    return run_daemon(work / "startup", settle, 2, args.profile, body, before_start,
                      ready_timeout=args.timeout)


# --- pdf ----------------------------------------------------------------------------------------------

def make_pdf_blobs(work: Path, count: int, pages: int) -> list[Path]:
    """``count`` PDFs of ``pages`` pages of words (about 2 KB of text a page), outside any drop folder."""
    from corpus import make_pdf

    source = fresh(work / "pdf-source")
    paths = []
    for index in range(count):
        rng = random.Random(index)
        texts = [f"Document {index} page {page + 1}\n" +
                 "\n".join(sentence(rng, 10) for _ in range(30)) for page in range(pages)]
        paths.append(Path(make_pdf(source / f"doc{index:03d}.pdf", texts)))
    return paths


def _extract_pages(paths: list[Path]) -> tuple[int, int]:
    """Bare pypdf over ``paths``: (pages, characters). Module level: it runs in a Pool too."""
    from pypdf import PdfReader

    pages = chars = 0
    for path in paths:
        reader = PdfReader(path)
        for index in range(len(reader.pages)):
            chars += len(reader.pages[index].extract_text() or "")
            pages += 1
    return pages, chars


def bare_pypdf(paths: list[Path], processes: int = 1) -> dict[str, Any]:
    """Bare pypdf pages/s: in this process, or split over ``processes`` processes at once (what
    the machine's cores give to CPU-bound Python, with no daemon at all)."""
    import multiprocessing

    load = LoadMeter()
    if processes == 1:
        started = time.perf_counter()
        pages, chars = _extract_pages(paths)
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pool.map(_extract_pages, [[]] * processes)  # interpreters up and pypdf imported
            started = time.perf_counter()
            parts = pool.map(_extract_pages, [paths[i::processes] for i in range(processes)])
        pages, chars = sum(p for p, _ in parts), sum(c for _, c in parts)
    seconds = time.perf_counter() - started
    return {"processes": processes, "pages": pages, "seconds": round(seconds, 3),
            "pages_per_second": round(pages / seconds, 1), "characters": chars,
            "other_processes_cpu_cores": load.others(0.0)}


def _bare_loop(paths: list[Path], samples: str) -> None:
    """Bare pypdf over ``paths``, round and round until killed, writing "time pages" to
    ``samples`` after each PDF (cumulative pages); the first line, "ready", once warm."""
    with open(samples, "w", buffering=1) as out:
        _extract_pages(paths[:1])  # pypdf imported and run once, as in the daemon's warm-up
        out.write("ready\n")
        pages = 0
        while True:
            for path in paths:
                pages += _extract_pages([path])[0]
                out.write(f"{time.time()} {pages}\n")


class BareAlongside:
    """Bare pypdf in a process of its own, running while the one-worker daemon runs: over the
    same seconds, on the other core, it meets whatever the machine's speed does meanwhile.
    This machine's speed drifts by tens of percent within a minute, so bare runs before and
    after the daemon can disagree by more than the 10% the goal allows; the two sides of this
    comparison see the same moments. The daemon's own other work (its worker process, its
    main process: about 0.06 of a core) shares the cores with both."""

    def __init__(self, paths: list[Path], samples: Path) -> None:
        import multiprocessing

        self._samples = samples
        self._process = multiprocessing.get_context("spawn").Process(
            target=_bare_loop, args=(paths, str(samples)), daemon=True)

    def start(self, timeout: float) -> None:
        self._process.start()
        wait_for(lambda: self._samples.exists() and self._samples.read_text().startswith("ready"),
                 timeout, "bare pypdf alongside to be ready")

    def stop(self) -> None:
        self._process.kill()
        self._process.join()

    def _read(self) -> list[tuple[float, float]]:
        lines = self._samples.read_text().split("\n")[1:-1]  # not "ready", not a partial line
        return [(float(moment), float(pages)) for moment, pages in map(str.split, lines)]

    def wait_past(self, moment: float, timeout: float) -> None:
        """Wait until it has counted a PDF finished after ``moment``."""
        wait_for(lambda: any(sample[0] > moment for sample in self._read()), timeout,
                 "bare pypdf alongside to pass the daemon's end")

    def pages_per_second(self, start: float, end: float) -> float:
        """Pages it extracted from ``start`` to ``end`` (its count after each PDF, interpolated
        in time between PDFs), per second."""
        samples = self._read()
        return (_pages_at(samples, end) - _pages_at(samples, start)) / (end - start)


def _pages_at(samples: list[tuple[float, float]], moment: float) -> float:
    """Cumulative pages at ``moment``, linear between the samples around it."""
    previous = (samples[0][0], 0.0) if moment < samples[0][0] else samples[0]
    for sample in samples:
        if sample[0] >= moment:
            span = sample[0] - previous[0]
            return previous[1] + (sample[1] - previous[1]) * (
                (moment - previous[0]) / span if span > 0 else 1.0)
        previous = sample
    raise RuntimeError("bare pypdf alongside stopped before the daemon's run ended")


MAX_PDF_WORKERS = 2  # the pdf figure runs 1 and 2 workers, each after a warm-up PDF per worker


def figure_pdf_daemon(work: Path, args: argparse.Namespace, blobs: list[bytes],
                      warmup: list[bytes], pages: int, workers: int,
                      alongside: list[Path] | None = None) -> dict[str, Any]:
    """The daemon with ``workers`` over ``blobs``; with ``alongside``, bare pypdf extracting
    those PDFs in another process meanwhile (see BareAlongside)."""
    settle = 0.2
    home = work / (f"pdf-workers{workers}" + ("-alongside" if alongside else ""))

    def body(daemon: Daemon, reader: DbReader) -> dict[str, Any]:
        # First one PDF per worker, not measured: each extraction process then has run pypdf
        # once (its lazy imports and caches, as in the bare run's warm process), and the
        # daemon is past its start (its pool waits until the files of the start scan settle).
        for index, data in enumerate(warmup[:workers]):
            drop(daemon.folder / f"warmup{index}.pdf", data)
        wait_all_ended(daemon, reader, workers, args.timeout)
        warmed = reader.value("SELECT max(id) FROM ingest_jobs")
        bare = BareAlongside(alongside, home.parent / f"{home.name}-bare.txt") if alongside else None
        if bare is not None:
            bare.start(args.timeout)
        try:
            first = time.time()
            for index, data in enumerate(blobs):
                drop(daemon.folder / f"doc{index:03d}.pdf", data)
            wait_all_ended(daemon, reader, workers + len(blobs), args.timeout)
            times = job_times(reader, after_id=warmed)
            if bare is not None:  # its count after the daemon's last page is due first
                bare.wait_past(times["last_completed"], args.timeout)
        finally:
            if bare is not None:
                bare.stop()
        counts = dict(reader.rows("SELECT status, count(*) FROM ingest_jobs WHERE id > ? "
                                  "GROUP BY status", (warmed,)))
        seconds = times["last_completed"] - first
        total = pages * counts.get("completed", 0)
        busy = times["last_completed"] - times["first_started"]
        result = {"workers": workers, "settle_seconds": settle, "pdfs": len(blobs),
                  "pages": total, "seconds": round(seconds, 3),
                  "pages_per_second": round(total / seconds, 1),
                  "pages_per_second_from_first_start": round(total / busy, 1),
                  "first_started_after": round(times["first_started"] - first, 3),
                  "statuses": counts}
        if bare is not None:
            result["bare_alongside_pages_per_second"] = round(
                bare.pages_per_second(first, times["last_completed"]), 1)
        return result

    return run_daemon(home, settle, workers, args.profile, body)


def figure_pdf(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """--pdf-rounds rounds of: bare pypdf, the daemon with 1 worker, bare pypdf again, the
    daemon with 2 workers, then 1 worker again, bare pypdf in 2 processes, 1 worker alongside
    bare pypdf. This machine's speed drifts by tens of percent from minute to minute (shared
    host), so the ratios are taken within each round (1 worker against the mean of the bare
    runs around it, 2 workers against the mean of the 1-worker runs around them) and their
    median is the figure."""
    paths = make_pdf_blobs(work, args.pdfs + MAX_PDF_WORKERS, args.pdf_pages)  # + warm-ups
    warmup = [path.read_bytes() for path in paths[args.pdfs:]]
    paths = paths[:args.pdfs]
    blobs = [path.read_bytes() for path in paths]
    quiet = (lambda: wait_until_quiet(args.quiet_wait)) if args.quiet_wait else (lambda: None)
    rounds = []
    for _ in range(args.pdf_rounds):
        # Bare pypdf right before and right after the one-worker daemon: their mean is what
        # the machine gave during it.
        quiet()
        before = bare_pypdf(paths)
        quiet()
        one = figure_pdf_daemon(work, args, blobs, warmup, args.pdf_pages, 1)
        after = bare_pypdf(paths)
        bare = {**after, "pages_per_second": round(
            (before["pages_per_second"] + after["pages_per_second"]) / 2, 1),
            "before": before["pages_per_second"], "after": after["pages_per_second"]}
        quiet()
        two = figure_pdf_daemon(work, args, blobs, warmup, args.pdf_pages, 2)
        # One worker again right after two: the mean of the one-worker runs around the
        # two-worker one is what one worker did on the machine of those minutes.
        one_after = figure_pdf_daemon(work, args, blobs, warmup, args.pdf_pages, 1)
        bare2 = bare_pypdf(paths, 2)
        quiet()
        beside = figure_pdf_daemon(work, args, blobs, warmup, args.pdf_pages, 1, alongside=paths)
        rounds.append({"bare_pypdf": bare, "bare_pypdf_2_processes": bare2, "workers1": one,
                       "workers2": two, "workers1_after": one_after,
                       "workers1_alongside": beside})

    def median_of(pick: Callable[[dict[str, Any]], float]) -> float:
        return round(statistics.median(pick(r) for r in rounds), 3)

    rate = lambda key: (lambda r: r[key]["pages_per_second"])  # noqa: E731
    return {"rounds": rounds,
            "bare_pages_per_second": median_of(rate("bare_pypdf")),
            "bare2_pages_per_second": median_of(rate("bare_pypdf_2_processes")),
            "workers1_pages_per_second": median_of(rate("workers1")),
            "workers2_pages_per_second": median_of(rate("workers2")),
            "bare_speedup_2_vs_1": median_of(lambda r: rate("bare_pypdf_2_processes")(r)
                                             / rate("bare_pypdf")(r)),
            "speedup_2_vs_1": median_of(lambda r: rate("workers2")(r) / statistics.mean(
                (rate("workers1")(r), rate("workers1_after")(r)))),
            "workers1_vs_bare": median_of(lambda r: rate("workers1")(r) / rate("bare_pypdf")(r)),
            "workers1_vs_bare_alongside": median_of(
                lambda r: rate("workers1_alongside")(r)
                / r["workers1_alongside"]["bare_alongside_pages_per_second"])}


# --- the summary ----------------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, measured, goal, verdict) for every figure that ran."""
    rows = []
    floor = results.get("floor", {}).get("files_per_second")
    if floor:
        rows.append(("floor (watchdog + sqlite3)", fmt_rate(floor, "files/s"), "-", "-"))
    for key, run in results.items():
        if not key.startswith("throughput"):
            continue
        rate = run["files_per_second"]
        ratio = rate / floor if floor else None
        label = f"throughput, settle {run['settle_seconds']:g} s, {run['workers']} workers"
        goal = run["workers"] == 2
        rows.append((label, fmt_rate(rate, "files/s"), ">= 1,000 files/s" if goal else "-",
                     verdict(rate >= 1000) if goal else "-"))
        rows.append((f"{label} / floor", "n/a" if ratio is None else f"{ratio:.2f} x",
                     ">= 0.5 x" if goal else "-",
                     verdict(None if ratio is None else ratio >= 0.5) if goal else "-"))
    if "rounds" in results.get("ratio", {}):
        ratio = results["ratio"]["ratio"]
        rows.append(("throughput / floor, back to back (median of rounds)",
                     "n/a (every floor drop-bound)" if ratio is None else f"{ratio:.2f} x",
                     ">= 0.5 x", verdict(None if ratio is None else ratio >= 0.5)))
    if "samples" in results.get("soak", {}):
        run = results["soak"]
        rows.append((f"soak, {run['files']:,} files: RSS growth after the first minute",
                     f"{run['daemon_rss_growth_mb']:+.1f} MB (tree {run['tree_rss_growth_mb']:+.1f})",
                     "-", "-"))
    if "latency" in results:
        run = results["latency"]
        goal = 1000 * run["settle_seconds"] + 50
        rows.append(("latency p50 (close -> job row)", f"{run['p50_ms']:.0f} ms", "-", "-"))
        rows.append(("latency p99 (close -> job row)", f"{run['p99_ms']:.0f} ms",
                     f"<= {goal:.0f} ms", verdict(run["p99_ms"] <= goal)))
    if "startup" in results:
        run = results["startup"]
        rows.append((f"startup: {run['files']:,} rows", f"{run['all_rows_seconds']:.1f} s",
                     "<= 30 s", verdict(run["all_rows_seconds"] <= 30)))
        rows.append(("startup: peak RSS, daemon + worker processes",
                     f"{run['peak_tree_rss_mb']:.0f} MB", "< 300 MB",
                     verdict(run["peak_tree_rss_mb"] < 300)))
        if "all_ended_seconds" in run:
            rows.append(("startup: all completed", f"{run['all_ended_seconds']:.0f} s", "-", "-"))
    if "index-cost" in results and "median_ratio" in results["index-cost"]:
        run = results["index-cost"]
        ratios = [r["ratio"] for r in run["rounds"]]  # their spread shows the noise
        rows.append((f"index sink / text sink, seconds per file, {run['prefilled_documents']:,} "
                     "documents in the store (median; rounds' range)",
                     f"{run['median_ratio']:.2f} x ({min(ratios):.2f}-{max(ratios):.2f})",
                     "<= 1.2 x", verdict(run["median_ratio"] <= 1.2)))
    if "pdf" in results:
        run = results["pdf"]
        rows.append(("pdf: bare pypdf, 1 process (median)",
                     fmt_rate(run["bare_pages_per_second"], "pages/s"), "-", "-"))
        rows.append(("pdf: bare pypdf, 2 processes / 1 (median)",
                     f"{run['bare_speedup_2_vs_1']:.2f} x", "-", "-"))
        rows.append(("pdf: daemon, 1 worker / bare before and after (median)",
                     f"{run['workers1_vs_bare']:.2f} x", ">= 0.9 x",
                     verdict(run["workers1_vs_bare"] >= 0.9)))
        rows.append(("pdf: daemon, 1 worker / bare alongside (median)",
                     f"{run['workers1_vs_bare_alongside']:.2f} x", ">= 0.9 x",
                     verdict(run["workers1_vs_bare_alongside"] >= 0.9)))
        rows.append(("pdf: daemon, 2 workers / 1 worker (median)",
                     f"{run['speedup_2_vs_1']:.2f} x", ">= 1.7 x",
                     verdict(run["speedup_2_vs_1"] >= 1.7)))
    return rows


def other_load(results: dict[str, Any]) -> list[str]:
    """Figures during which other processes used a noticeable share of the 2 cores."""
    noisy = []
    for name, run in results.items():
        for part, values in ([(name, run)] + [(f"{name}.{k}", v) for k, v in run.items()
                                              if isinstance(v, dict)]):
            cores = values.get("other_processes_cpu_cores") if isinstance(values, dict) else None
            if cores is not None and cores >= 0.2:
                noisy.append(f"{part}: {cores:.2f} cores")
    return noisy


def print_summary(results: dict[str, Any]) -> None:
    rows = [("figure", "measured", "goal", "")] + summary_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print("\n== summary (2-core machine: %d CPUs seen) ==" % os.cpu_count())
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    noisy = other_load(results)
    if noisy:
        print("  ! other processes were busy during: " + "; ".join(noisy)
              + " (figures skewed; run again on a quiet machine)")


# --- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figures", nargs="*", metavar="FIGURE",
                        help=f"any of {', '.join(FIGURES + OPT_IN)} (default: all but "
                             f"{', '.join(OPT_IN)})")
    parser.add_argument("--dir", type=Path, help="work here (kept) instead of a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--files", type=int, default=10_000, help="floor/throughput files")
    parser.add_argument("--size", type=int, default=2048, help="bytes per floor/throughput file")
    parser.add_argument("--floor-runs", type=int, default=3, help="floor runs (median counts)")
    parser.add_argument("--ratio-rounds", type=int, default=3,
                        help="ratio: rounds of a floor run and a throughput run (median counts)")
    parser.add_argument("--throughput-settle", type=float, nargs="+", default=[0.2],
                        metavar="S", help="settle_seconds of the throughput runs (default 0.2)")
    parser.add_argument("--throughput-workers", type=int, nargs="+", default=[2], metavar="W",
                        help="workers of the throughput runs (default 2; the goal is for 2)")
    parser.add_argument("--latency-files", type=int, default=500)
    parser.add_argument("--latency-rate", type=float, default=50.0, help="files per second")
    parser.add_argument("--startup-files", type=int, default=100_000)
    parser.add_argument("--no-startup-complete", dest="startup_complete", action="store_false",
                        help="stop the startup figure once every file has a job row")
    parser.add_argument("--startup-complete-timeout", type=float, default=1200.0)
    parser.add_argument("--pdfs", type=int, default=100)
    parser.add_argument("--pdf-pages", type=int, default=50)
    parser.add_argument("--index-rounds", type=int, default=5,
                        help="rounds of the index-cost figure (the ratios' median is the figure)")
    parser.add_argument("--index-prefill", type=int, default=100_000, metavar="N",
                        help="documents already in the store in the index-cost figure")
    parser.add_argument("--pdf-rounds", type=int, default=3,
                        help="rounds of the pdf figure (the ratios' median is the figure)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of each wait, s")
    parser.add_argument("--soak-rate", type=int, default=400, help="soak: files per second")
    parser.add_argument("--soak-seconds", type=int, default=300, help="soak: seconds of drops")
    parser.add_argument("--profile", nargs="?", const="threads", choices=("threads", "gil"),
                        help="attach py-spy to each daemon (slows it; see the docstring): "
                             "'threads' (default) samples every busy thread and the extraction "
                             "children, 'gil' only the thread holding the GIL")
    parser.add_argument("--lock-stats", action="store_true",
                        help="time the database's write lock in every daemon process "
                             "(bench/lockstats; slows the daemon a little): how busy it was, "
                             "and per holder the seconds waiting, holding and on a CPU")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--sink", default="index", choices=("index", "text"),
                        help="the project's sink (index: the default; text: no index)")
    parser.add_argument("--quiet-wait", type=float, default=120.0, metavar="S",
                        help="before each figure, wait up to S seconds for the machine to be "
                             "idle (others' test runs skew every figure; 0: do not wait)")
    args = parser.parse_args(argv)
    known = FIGURES + OPT_IN
    unknown = sorted(set(args.figures) - set(known))
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return args


def run_figures(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen figures in order; a figure that fails is reported and the rest still run."""
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for figure in args.figures or FIGURES:
        if figure == "throughput":
            steps += [(f"throughput-settle{s:g}-workers{w}",
                       lambda s=s, w=w: figure_throughput(work, args, s, w))
                      for s in args.throughput_settle for w in args.throughput_workers]
        else:
            steps.append((figure, lambda f=figure: FIGURE_FUNCS[f](work, args)))
    results: dict[str, Any] = {}
    for name, step in steps:
        print(f"-- {name} ...", flush=True)
        if args.quiet_wait:
            busy = wait_until_quiet(args.quiet_wait)
            print(f"  (machine busy before the run: {busy:.2f} cores)", flush=True)
        started = time.perf_counter()
        try:
            results[name] = step()
        except (Timeout, RuntimeError) as exc:
            print(f"  ! {name} failed: {exc}")
            results[name] = {"error": str(exc)}
            continue
        print(f"  ({time.perf_counter() - started:.0f} s) "
              + json.dumps(results[name], default=str), flush=True)
    return results


FIGURE_FUNCS = {"floor": figure_floor, "ratio": figure_ratio, "latency": figure_latency,
                "startup": figure_startup, "pdf": figure_pdf, "index-cost": figure_index_cost,
                "soak": figure_soak}


def code_version() -> str:
    """The package's commit, "-dirty" when the working tree has changes (others edit it live)."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main(argv: list[str]) -> int:
    if argv[:1] == ["_floor-worker"]:
        floor_worker(argv[1], argv[2], int(argv[3]), float(argv[4]))
        return 0
    args = parse_args(argv)
    SINK["kind"] = args.sink
    LOCK_STATS["on"] = args.lock_stats
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    TRASH[:] = [work / ".trash"]
    version = code_version()
    print(f"working in {work}; ingestd at {version}")
    try:
        results = run_figures(work, args)
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            shutil.rmtree(TRASH[0], ignore_errors=True)
    print_summary({k: v for k, v in results.items() if "error" not in v})
    if args.json:
        args.json.write_text(json.dumps({"code": version, **results}, indent=2, default=str))
    return 0 if all("error" not in v for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
