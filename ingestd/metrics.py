"""Prometheus metrics, on a localhost HTTP port when ``metrics_address`` is set (off by default).

prometheus-client renders the exposition format and serves it; we only count. Labels are
bounded: ``project`` (from the config), ``status``, ``stage``, ``reason`` of a rescan; never a
path or a job id. Gauges that the database knows (queue depth, oldest queued job) are read from
it at scrape time, so they are right even for jobs created by other processes or nodes.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ingestd.models import database

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

registry = CollectorRegistry()
ProcessCollector(registry=registry)  # RSS, CPU seconds, open fds of the daemon

files_seen = Counter("ingestd_files_seen", "Settled files handed to job creation.",
                     ["project"], registry=registry)
jobs_created = Counter("ingestd_jobs_created", "Jobs created by this daemon's watcher.",
                       ["project"], registry=registry)
jobs_finished = Counter("ingestd_jobs_finished", "Jobs this daemon ran to an end, by final status.",
                        ["project", "status"], registry=registry)
job_duration = Histogram("ingestd_job_duration_seconds", "From job creation to completion.",
                         ["project"], buckets=DURATION_BUCKETS, registry=registry)
stage_duration = Histogram("ingestd_stage_duration_seconds", "Time a job spent in each stage.",
                           ["stage"], buckets=DURATION_BUCKETS, registry=registry)
rescans = Counter("ingestd_rescans", "Full scans of the drop folders, by what caused them.",
                  ["reason"], registry=registry)
rescan_found = Counter("ingestd_rescan_missed_files", "Files a scan found that no event had "
                       "reported.", ["reason"], registry=registry)
inotify_overflows = Counter("ingestd_inotify_overflows", "Kernel event queue overflows.",
                            registry=registry)


_children: dict[tuple, Any] = {}


def child(metric: Any, *labels: object) -> Any:
    """``metric.labels(*labels)``, looked up once: the daemon counts every file and every job
    end with it, in the interpreter that watches and settles (labels() costs about 3 us, this
    0.2). Labels are projects, statuses, stages and reasons: a handful."""
    key = (metric, *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


class LiveCollector(Collector):
    """Values read at scrape time: from the database, and from the running daemon's parts."""

    def __init__(self, projects: Callable[[], Iterable[str]],
                 live: Callable[[], dict[str, float]]) -> None:
        self._projects = projects
        self._live = live

    def collect(self) -> Iterable:
        depth = GaugeMetricFamily("ingestd_queue_depth", "Queued jobs (due or not).",
                                  labels=["project"])
        age = GaugeMetricFamily("ingestd_oldest_queued_age_seconds",
                                "Age of the oldest queued job.", labels=["project"])
        found = {project: (count, oldest) for project, count, oldest in _queue_by_project()}
        now = time.time()
        for project in self._projects():
            count, oldest = found.get(project, (0, None))
            depth.add_metric([project], count)
            age.add_metric([project], now - oldest if oldest else 0.0)
        yield depth
        yield age
        live = self._live()
        yield from _live_families(live)


def _queue_by_project() -> list[tuple[str, int, float | None]]:
    return database.execute_sql(
        "SELECT project_id, COUNT(*), MIN(created_at) FROM ingest_jobs "
        "WHERE status = 'queued' AND deleted_at IS NULL GROUP BY project_id").fetchall()


_LIVE = {
    "workers_busy": ("gauge", "Workers running a job now."),
    "workers": ("gauge", "Workers of this daemon."),
    "subscribers": ("gauge", "Clients connected to the event socket."),
    "subscriber_drops": ("counter", "Subscribers disconnected for reading too slowly."),
    "events_published": ("counter", "Events written to the event log and socket."),
    "settling_files": ("gauge", "Files waiting to settle."),
}


def _live_families(values: dict[str, float]) -> Iterable:
    for key, (kind, text) in _LIVE.items():
        family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
            f"ingestd_{key}", text)
        family.add_metric([], values.get(key, 0))
        yield family


def serve(address: str, collector: LiveCollector) -> Callable[[], None]:
    """Serve ``registry`` on ``host:port``; returns the function that stops it."""
    host, _, port = address.rpartition(":")
    registry.register(collector)
    server, thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                                       registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        registry.unregister(collector)

    return stop
