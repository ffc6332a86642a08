"""Retrieval figures (issue 5).

    python bench/bench_index.py [--documents 100000] [--files 3000] [--keep]

1. search: N documents of about 2 KB (words drawn from a 20,000-word vocabulary with Zipf
   frequencies, as natural text has) indexed by the built-in index in one SQLite file; then
   400 queries (one word, two words, a phrase, a prefix; words of every frequency band) through
   ``search.search``: p50 and p95 latency. Goal: p50 under 20 ms.
2. indexing cost: F small files (2 KB) run through the real pipeline (claim, read, sniff,
   extract, sink, complete) with the plain ``text`` sink, then with the ``index`` sink; the
   median per-file time of each. Goal: the index adds no more than 20%.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ingestd import config as config_mod, db, intake, jobs, log, search
from ingestd.pipeline import Context, Control, run_job
from ingestd.procpool import ExtractorPool
from ingestd.sinks import Document, open_sink
from ingestd.sinks.index import IndexSink

VOCABULARY = 20_000
RNG = random.Random(42)
WORDS = [f"w{n}x" for n in range(VOCABULARY)]
WEIGHTS = [1 / (rank + 1) for rank in range(VOCABULARY)]


def text_of(size: int = 2000) -> str:
    words = RNG.choices(WORDS, WEIGHTS, k=size // 6)
    sentences = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, len(words), 12)]
    return " ".join(sentences)


def project_in(directory: Path, kind: str) -> config_mod.ProjectConfig:
    folder = directory / f"drop-{kind}"
    folder.mkdir(exist_ok=True)
    raw = {"daemon": {"state_dir": str(directory / "state")},
           "projects": {"bench": {"folders": [str(folder)], "sink": {"kind": kind}}}}
    return config_mod.from_mapping(raw, None, base=directory).projects["bench"]


def fill(directory: Path, count: int) -> None:
    db.open_store(f"sqlite:///{directory / 'index.db'}")
    sink = IndexSink(project_in(directory, "index"))
    began = time.perf_counter()
    for start in range(0, count, 1000):
        with db.database.atomic():
            for n in range(start, min(count, start + 1000)):
                text = text_of()
                sink.ingest(Document("bench", n, text, f"/srv/{n}.txt", f"{n}.txt", "text/plain",
                                     f"{n:064x}", ((0, len(text)),)))
    print(f"indexed {count:,} documents in {time.perf_counter() - began:.0f} s")


def queries() -> list[str]:
    bands = [(0, 50), (50, 500), (500, 5000), (5000, VOCABULARY)]
    made = []
    for low, high in bands:
        for _ in range(25):
            a, b = RNG.randrange(low, high), RNG.randrange(low, high)
            made += [WORDS[a], f"{WORDS[a]} {WORDS[b]}", f'"{WORDS[a]} {WORDS[b]}"',
                     WORDS[a][:-2] + "*"]
    return made


def bench_search() -> None:
    samples = []
    for query in queries():
        began = time.perf_counter()
        search.search("bench", query, limit=10)
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    print(f"search: {len(samples)} queries: p50 {statistics.median(samples):.2f} ms, "
          f"p95 {samples[int(len(samples) * 0.95)]:.2f} ms, max {samples[-1]:.2f} ms")


def per_file(directory: Path, kind: str, count: int, extractors: ExtractorPool) -> float:
    """Median seconds per file through the pipeline with the ``kind`` sink."""
    db.open_store(f"sqlite:///{directory / f'pipeline-{kind}.db'}")
    project = project_in(directory, kind)
    sink = open_sink(project)
    for n in range(count):
        path = project.folders[0] / f"f{n}.txt"
        path.write_text(text_of())
        folder, version = intake.inspect(project, path)
        jobs.create("bench", str(folder), version, 3)
    samples = []
    while claimed := jobs.claim("bench", limit=1):
        began = time.perf_counter()
        run_job(claimed[0], Context("bench", project, sink, extractors, Control(), 60.0))
        samples.append(time.perf_counter() - began)
    db.close_store()
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (600 MB at 100,000 documents)")
    args = parser.parse_args()
    log.configure("warning")  # as the daemon logs: no line per job timed here
    directory = Path(tempfile.mkdtemp(prefix="ingestd-bench-index-"))
    try:
        run(directory, args)
    finally:
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


def run(directory: Path, args: argparse.Namespace) -> None:
    fill(directory, args.documents)
    bench_search()
    db.close_store()
    extractors = ExtractorPool(1)
    try:
        text = per_file(directory, "text", args.files, extractors)
        index = per_file(directory, "index", args.files, extractors)
    finally:
        extractors.close()
    print(f"pipeline per small file: text sink {text * 1000:.3f} ms, index sink "
          f"{index * 1000:.3f} ms: the index adds {100 * (index / text - 1):.0f}%")


if __name__ == "__main__":
    main()
