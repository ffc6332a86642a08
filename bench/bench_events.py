"""Event publishing figures (issue 4).

    python bench/bench_events.py [--events 100000] [--subscribers 10] [--rate 500]

1. throughput: N events already committed in the outbox; the publisher (the daemon's own
   Publisher and EventStream, in this process) writes them to the JSON Lines log and to S socket
   subscribers (threads of a separate process). Reported: events per second until every
   subscriber has received the last one. Goal: >= 20,000/s.
2. latency: a writer process commits events at a steady rate (one transaction each, like a job
   transition) while the publisher runs; each event carries its commit time. Reported: p50/p99
   of (time a subscriber read it - commit time). Goal: p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from ingestd import db, events, jobs
from ingestd.publish import Publisher
from ingestd.stream import EventStream

JOB_LIKE = {"id": 1, "project_id": "bench", "source_id": 1, "source_path": "/srv/drop/bench/file.txt",
            "original_filename": "file.txt", "byte_size": 2048, "mime_type": "text/plain",
            "stage": "done", "status": "completed", "progress": 1.0, "message": "2048 characters",
            "error_message": None, "canonical_document_id": 1, "content_sha256": "ab" * 32,
            "attempts": 1, "created_at": "2026-11-28T12:00:00.000Z",
            "updated_at": "2026-11-28T12:00:00.100Z", "completed_at": "2026-11-28T12:00:00.100Z",
            "deleted_at": None}


def _subscribers(path: str, count: int, until_seq: int, parse: bool, results: mp.Queue) -> None:
    """In a separate process: ``count`` readers; each reports (lines, last read time, latencies).

    Without ``parse`` a reader only counts lines (json-decoding 10 x N lines in one process
    would measure the readers, not the publisher)."""

    def read(index: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        lines, latencies = 0, []
        if not parse:
            while lines < until_seq:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                lines += chunk.count(b"\n")
            results.put((index, lines, time.time(), latencies))
            return
        with sock.makefile("r", encoding="utf-8") as stream:
            for line in stream:
                now = time.time()
                event = json.loads(line)
                lines += 1
                latencies.append(now - event["data"]["committed"])
                if int(event["sequence"]) >= until_seq:
                    break
        results.put((index, lines, now, latencies))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _start_subscribers(path: Path, count: int, until_seq: int,
                       parse: bool) -> tuple[mp.Process, mp.Queue]:
    results: mp.Queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=_subscribers,
                                              args=(str(path), count, until_seq, parse, results))
    process.start()
    return process, results


def _wait_connected(stream: EventStream, count: int) -> None:
    deadline = time.monotonic() + 30
    while stream.subscribers < count:
        if time.monotonic() > deadline:
            raise RuntimeError("subscribers did not connect")
        time.sleep(0.01)


def throughput(directory: Path, total: int, subscribers: int) -> None:
    db.open_store(f"sqlite:///{directory / 'events.db'}")
    for start in range(0, total, 10_000):
        with db.database.atomic():
            for _ in range(min(10_000, total - start)):
                jobs.emit(jobs.JOB_COMPLETED, JOB_LIKE, project_id="bench", job_id=1)
    installation = events.installation_id()
    stream = EventStream(directory / "events.sock", 0o660, installation, 64 * 1024 * 1024)
    stream.start()
    process, results = _start_subscribers(directory / "events.sock", subscribers, total, False)
    _wait_connected(stream, subscribers)
    publisher = Publisher(directory / "events.jsonl", stream, installation)
    began = time.time()
    publisher.start()
    reports = [results.get(timeout=600) for _ in range(subscribers)]
    finished = max(report[2] for report in reports)
    process.join()
    publisher.stop()
    stream.stop()
    db.close_store()
    assert all(report[1] == total for report in reports), [r[1] for r in reports]
    print(f"throughput: {total:,} events to the log and {subscribers} subscribers in "
          f"{finished - began:.2f} s = {total / (finished - began):,.0f} events/s")


def _writer(url: str, count: int, rate: float) -> None:
    db.open_store(url)
    interval = 1.0 / rate
    next_at = time.monotonic()
    for _ in range(count):
        with db.database.atomic():
            jobs.emit(jobs.JOB_PROGRESS, {**JOB_LIKE, "committed": time.time()},
                      project_id="bench", job_id=1)
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


def latency(directory: Path, count: int, rate: float, subscribers: int) -> None:
    url = f"sqlite:///{directory / 'latency.db'}"
    db.open_store(url)
    installation = events.installation_id()
    stream = EventStream(directory / "latency.sock", 0o660, installation, 64 * 1024 * 1024)
    stream.start()
    publisher = Publisher(directory / "latency.jsonl", stream, installation)
    publisher.start()
    process, results = _start_subscribers(directory / "latency.sock", subscribers, count, True)
    _wait_connected(stream, subscribers)
    writer = mp.get_context("spawn").Process(target=_writer, args=(url, count, rate))
    writer.start()
    reports = [results.get(timeout=600) for _ in range(subscribers)]
    writer.join()
    process.join()
    publisher.stop()
    stream.stop()
    db.close_store()
    samples = sorted(ms * 1000 for report in reports for ms in report[3])
    print(f"latency: {len(samples):,} commit->read samples ({count} events at {rate:g}/s, "
          f"{subscribers} subscribers): p50 {statistics.median(samples):.1f} ms, "
          f"p99 {samples[int(len(samples) * 0.99)]:.1f} ms, max {samples[-1]:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--latency-events", type=int, default=5000)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="ingestd-bench-events-"))
    throughput(directory, args.events, args.subscribers)
    latency(directory, args.latency_events, args.rate, args.subscribers)


if __name__ == "__main__":
    main()
