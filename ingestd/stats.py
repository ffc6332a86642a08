"""``ingestd stats``: per project figures read from the database (the daemon up or down).

Everything comes from a few aggregate queries per project that the partial job indexes serve
(``(project_id, status, id) WHERE deleted_at IS NULL``). Percentiles are taken in the database
by nearest rank (``ROW_NUMBER() OVER``), so only the rows at the wanted ranks come back.
Per-stage times come from the outbox: a slow job's progress events carry its stage, a fast one
writes none, so its run time is only counted as ``running``. The SQL is the same on SQLite and
PostgreSQL except for two functions: a text's byte length and a JSON field.

The window queries read every completed/failed job of the project (no index has
``completed_at``), so they cost in proportion to the project's history, not to the window.

Counts are of live jobs (a soft-deleted job is left out, as ``jobs list`` leaves it out); the
window holds the jobs whose end (``completed_at``) is at or after ``now - since``.
"""

from __future__ import annotations

import re
import textwrap
import time
from collections import defaultdict
from typing import Any, Iterable, Sequence

from ingestd.db import execute, is_postgres
from ingestd.errors import UsageError
from ingestd.jobs import JOB_PROGRESS, rfc3339
from ingestd.models import JobStatus, Stage

DEFAULT_SINCE_SECONDS = 24 * 3600.0
TOP_FAILURES = 5
PERCENTILES = (50, 95, 99)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")

NOTES = {
    "window": "completed, failed, failure_rate, top_failures, durations, bytes and pages count "
              "the live jobs that ended (completed_at) inside the window",
    "stage_seconds": "queued = started_at - created_at (a retried job's earlier attempts and "
                     "backoff included); running = completed_at - started_at of the last "
                     "attempt; reading/extracting/indexing split the running time of jobs that "
                     "wrote progress events, a stage counted from the first event showing it "
                     "(events are throttled: a stage no event showed is counted in the one "
                     "before it)",
    "index_bytes": "the size of the chunks' text (UTF-8), not of the full-text index structures",
}


# --- parsing -------------------------------------------------------------------------------------

def parse_duration(text: str) -> float:
    """``"90s"``, ``"15m"``, ``"24h"``, ``"7d"``, ``"2w"`` (a number and one unit) in seconds."""
    match = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    seconds = float(match.group(1)) * UNITS[match.group(2)] if match else 0.0
    if seconds <= 0:
        raise UsageError(f"bad duration {text!r}: use a positive number and a unit s, m, h, d "
                         "or w (e.g. 90s, 15m, 24h, 7d, 2w)")
    return seconds


def format_duration(seconds: float) -> str:
    """A window length the way parse_duration reads it: the largest unit dividing it exactly
    (weeks and days from two of them on, so a day reads 24h)."""
    for unit, least in (("w", 2), ("d", 2), ("h", 1), ("m", 1)):
        if seconds % UNITS[unit] == 0 and seconds >= least * UNITS[unit]:
            return f"{seconds / UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


# --- collecting ----------------------------------------------------------------------------------

def _rows(sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    return execute(sql, params).fetchall()


def _byte_length(column: str) -> str:
    return f"OCTET_LENGTH({column})" if is_postgres() else f"LENGTH(CAST({column} AS BLOB))"


def percentiles(values: Iterable[float]) -> dict[str, Any]:
    """``{"count", "p50", "p95", "p99"}`` by nearest rank (None when there are no values)."""
    ordered = sorted(values)
    result: dict[str, Any] = {"count": len(ordered)}
    for p in PERCENTILES:
        rank = max(1, (p * len(ordered) + 99) // 100)  # ceil(p/100 * n), at least 1
        result[f"p{p}"] = round(ordered[rank - 1], 3) if ordered else None
    return result


def collect(project_ids: list[str], since_seconds: float | None,
            now: float | None = None) -> dict[str, Any]:
    """The figures of each project, JSON-ready: ``{"window", "projects": {name: {...}}, "notes"}``.

    ``since_seconds`` None is the default window (24 h); ``now`` defaults to the clock."""
    now = time.time() if now is None else now
    since = DEFAULT_SINCE_SECONDS if since_seconds is None else float(since_seconds)
    start = max(0.0, now - since)  # a window longer than the epoch is all of it
    # No transaction: on SQLite one would take the write lock (IMMEDIATE) and hold up workers.
    projects = {name: _project(name, start, now) for name in project_ids}
    return {"window": {"since_seconds": since, "start": rfc3339(start), "end": rfc3339(now)},
            "projects": projects, "notes": dict(NOTES)}


def _project(project_id: str, start: float, now: float) -> dict[str, Any]:
    stats: dict[str, Any] = {"jobs_by_status": _by_status(project_id)}
    stats.update(_queue(project_id, now))
    window, earliest_start = _window(project_id, start)
    stats.update(window)
    stats["top_failures"] = _top_failures(project_id, start)
    stats.update(_durations(project_id, start, earliest_start))
    stats.update(_index(project_id))
    return stats


def _by_status(project_id: str) -> dict[str, int]:
    counts = {status.value: 0 for status in JobStatus}
    for status, count in _rows("SELECT status, COUNT(*) FROM ingest_jobs WHERE project_id = ? "
                               "AND deleted_at IS NULL GROUP BY status", (project_id,)):
        counts[status] = int(count)
    return counts


def _queue(project_id: str, now: float) -> dict[str, Any]:
    """Queued jobs, due or not (backoff), and how long ago the oldest of them was created."""
    depth, oldest = _rows("SELECT COUNT(*), MIN(created_at) FROM ingest_jobs WHERE project_id = ? "
                          "AND status = 'queued' AND deleted_at IS NULL", (project_id,))[0]
    age = None if oldest is None else round(max(0.0, now - float(oldest)), 3)
    return {"queue_depth": int(depth), "oldest_queued_age_seconds": age}


def _window(project_id: str, start: float) -> tuple[dict[str, Any], float | None]:
    """Completed and failed counts, bytes read and pages of the documents the jobs created (a
    duplicate points at another job's document, so its pages are not counted again); and the
    earliest start among the completed jobs (where their progress events begin)."""
    found = {status: (int(count), int(size or 0), int(pages or 0), first)
             for status, count, size, pages, first in _rows(
                 "SELECT j.status, COUNT(*), SUM(j.byte_size), SUM(d.page_count), "
                 "MIN(j.started_at) FROM ingest_jobs j LEFT JOIN documents d "
                 "ON d.id = j.canonical_document_id AND d.job_id = j.id "
                 "WHERE j.project_id = ? AND j.status IN ('completed', 'failed') "
                 "AND j.deleted_at IS NULL AND j.completed_at >= ? GROUP BY j.status",
                 (project_id, start))}
    completed, size, pages, first = found.get("completed", (0, 0, 0, None))
    failed = found.get("failed", (0, 0, 0, None))[0]
    ended = completed + failed
    return {"completed": completed, "failed": failed,
            "failure_rate": round(failed / ended, 4) if ended else None,
            "bytes_ingested": size, "pages_ingested": pages}, first


def _top_failures(project_id: str, start: float) -> list[dict[str, Any]]:
    rows = _rows("SELECT error_message, COUNT(*) AS n FROM ingest_jobs WHERE project_id = ? "
                 "AND status = 'failed' AND deleted_at IS NULL AND completed_at >= ? "
                 f"GROUP BY error_message ORDER BY n DESC, error_message LIMIT {TOP_FAILURES}",
                 (project_id, start))
    return [{"reason": reason or "(no reason recorded)", "count": int(count)}
            for reason, count in rows]


# Nearest-rank percentiles in the database: each series is numbered in order and only the rows
# at the wanted ranks come back, so a window of a million jobs costs a sort, not a transfer.
_RANKED = """
WITH w AS MATERIALIZED (
    SELECT created_at, started_at, completed_at FROM ingest_jobs
    WHERE project_id = ? AND status = 'completed' AND deleted_at IS NULL
    AND completed_at >= ? AND started_at IS NOT NULL),
series AS (
    SELECT 'total' AS k, completed_at - created_at AS v FROM w
    UNION ALL SELECT 'queued' AS k, started_at - created_at AS v FROM w
    UNION ALL SELECT 'running' AS k, completed_at - started_at AS v FROM w),
ranked AS (
    SELECT k, v, ROW_NUMBER() OVER (PARTITION BY k ORDER BY v) AS rn,
           COUNT(*) OVER (PARTITION BY k) AS n FROM series)
SELECT k, n, rn, v FROM ranked
WHERE rn IN ((50 * n + 99) / 100, (95 * n + 99) / 100, (99 * n + 99) / 100)
"""


def _durations(project_id: str, start: float, earliest_start: float | None) -> dict[str, Any]:
    """Created-to-completed percentiles, and per stage (see NOTES["stage_seconds"])."""
    found: dict[str, tuple[int, dict[int, float]]] = {}
    for series, count, rank, value in _rows(_RANKED, (project_id, start)):
        found.setdefault(series, (int(count), {}))[1][int(rank)] = float(value)
    entries = {series: _at_ranks(*found.get(series, (0, {})))
               for series in ("total", "queued", "running")}
    runs = _stage_marks(project_id, start, earliest_start)
    split: dict[str, list[float]] = defaultdict(list)
    for started, completed, marks in runs.values():
        for stage, seconds in stage_spans(started, completed, marks).items():
            split[stage].append(seconds)
    order = [s.value for s in Stage]
    for stage in sorted(split, key=lambda s: order.index(s) if s in order else len(order)):
        entries[stage] = percentiles(split[stage])
    note = (f"{len(runs)} of {entries['total']['count']} completed jobs wrote progress events: "
            "only their run time is split by stage; the others' run time is counted in running "
            "only")
    return {"duration_seconds": entries.pop("total"), "stage_seconds": entries,
            "stage_note": note}


def _at_ranks(count: int, by_rank: dict[int, float]) -> dict[str, Any]:
    result: dict[str, Any] = {"count": count}
    for p in PERCENTILES:
        value = by_rank.get(max(1, (p * count + 99) // 100))
        result[f"p{p}"] = None if value is None else round(value, 3)
    return result


def _stage_sql() -> str:
    """The stage recorded in a progress event's data (the job record, as JSON text)."""
    return "CAST(e.data AS json) ->> 'stage'" if is_postgres() else "json_extract(e.data, '$.stage')"


def _stage_marks(project_id: str, start: float, earliest_start: float | None,
                 ) -> dict[int, tuple[float, float, list[tuple[float, str]]]]:
    """``{job_id: (started, completed, [(time the stage was first shown, stage), ...])}`` for the
    completed jobs of the window whose last attempt wrote progress events.

    A range read of the outbox by its time index (from the earliest start of those jobs), joined
    to the jobs by id; only the first event of each stage of each job comes back. CROSS JOIN
    keeps SQLite to that order: starting from the jobs, it read the outbox's whole range once
    per job (a minute for 30,000 jobs)."""
    if earliest_start is None:
        return {}
    stage = _stage_sql()
    runs: dict[int, tuple[float, float, list[tuple[float, str]]]] = {}
    for job_id, stage_name, first, started, completed in _rows(
            f"SELECT e.job_id, {stage}, MIN(e.time), MIN(j.started_at), MIN(j.completed_at) "
            "FROM ingest_events e CROSS JOIN ingest_jobs j "
            "WHERE j.id = e.job_id AND e.time >= ? AND e.type = ? AND e.project_id = ? "
            "AND j.project_id = ? AND j.status = 'completed' AND j.deleted_at IS NULL "
            "AND j.completed_at >= ? AND e.time >= j.started_at AND e.time <= j.completed_at "
            f"GROUP BY e.job_id, {stage}",
            (earliest_start, JOB_PROGRESS, project_id, project_id, start)):
        if stage_name:
            run = runs.setdefault(job_id, (float(started), float(completed), []))
            run[2].append((float(first), stage_name))
    for _started, _completed, marks in runs.values():
        marks.sort()
    return runs


def stage_spans(started: float, completed: float,
                marks: Sequence[tuple[float, str]]) -> dict[str, float]:
    """Seconds per stage of one run: reading from ``started`` (the pipeline's first stage) until
    the first mark showing another stage, and so on; the last stage shown ends at ``completed``."""
    spans: dict[str, float] = {}
    current, since = Stage.READING.value, started
    for moment, stage in marks:
        if stage != current:
            spans[current] = spans.get(current, 0.0) + (moment - since)
            current, since = stage, moment
    spans[current] = spans.get(current, 0.0) + (completed - since)
    return spans


def _index(project_id: str) -> dict[str, int]:
    """Live documents of the project, their chunks and the chunks' text size (chunk_texts: on
    SQLite a chunk's text is mostly read from its document)."""
    documents, chunks, size = _rows(
        f"SELECT COUNT(DISTINCT d.id), COUNT(c.id), SUM({_byte_length('c.text')}) "
        "FROM documents d LEFT JOIN chunk_texts c ON c.document_id = d.id "
        "WHERE d.project_id = ? AND d.deleted_at IS NULL", (project_id,))[0]
    return {"documents": int(documents), "chunks": int(chunks), "index_bytes": int(size or 0)}


# --- rendering -----------------------------------------------------------------------------------

def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _table(rows: list[list[str]], indent: str, left: int = 0) -> list[str]:
    """Aligned columns; column ``left`` is left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(cell.ljust(w) if i == left else cell.rjust(w)
                                for i, (cell, w) in enumerate(zip(row, widths)))).rstrip()
            for row in rows]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def render(stats: dict[str, Any]) -> str:
    """The readable form: one block per project, then the notes (no final newline: print it)."""
    window = stats["window"]
    header = (f"window: last {format_duration(window['since_seconds'])} "
              f"({window['start']} .. {window['end']})")
    blocks = [header] + [_render_project(name, project)
                         for name, project in stats["projects"].items()]
    if not stats["projects"]:
        blocks.append("no projects")
    notes = [textwrap.fill(f"{key}: {text}", 100, initial_indent="  ", subsequent_indent="    ")
             for key, text in stats.get("notes", {}).items()]
    return "\n\n".join(blocks + (["notes:\n" + "\n".join(notes)] if notes else []))


def _render_project(name: str, p: dict[str, Any]) -> str:
    by_status = "  ".join(f"{status} {count}" for status, count in p["jobs_by_status"].items())
    oldest = p["oldest_queued_age_seconds"]
    rate = "-" if p["failure_rate"] is None else f"{p['failure_rate'] * 100:.1f}%"
    lines = [f"project {name}",
             f"  jobs        {by_status}",
             f"  queue       {p['queue_depth']} queued"
             + (f", oldest created {human_seconds(oldest)} ago" if oldest is not None else ""),
             f"  in window   completed {p['completed']}  failed {p['failed']}  "
             f"failure rate {rate}",
             f"  ingested    {human_bytes(p['bytes_ingested'])} ({p['bytes_ingested']} bytes), "
             f"{_plural(p['pages_ingested'], 'page')}",
             f"  index       {_plural(p['documents'], 'document')}, "
             f"{_plural(p['chunks'], 'chunk')}, {human_bytes(p['index_bytes'])} of chunk text"]
    if p["top_failures"]:
        lines.append("  top failures")
        lines += _table([[str(f["count"]), f["reason"]] for f in p["top_failures"]], "    ",
                        left=1)
    timing = [["duration", "jobs", "p50", "p95", "p99"],
              _timing_row("created->completed", p["duration_seconds"])]
    timing += [_timing_row(stage, entry) for stage, entry in p["stage_seconds"].items()]
    lines.append("  durations")
    lines += _table(timing, "    ")
    lines.append(textwrap.fill(f"({p['stage_note']})", 100, initial_indent="    ",
                               subsequent_indent="     "))
    return "\n".join(lines)


def _timing_row(label: str, entry: dict[str, Any]) -> list[str]:
    return [label, str(entry["count"]),
            *(human_seconds(entry[f"p{p}"]) for p in PERCENTILES)]
