"""What the daemon's PDF extraction path costs per page against bare pypdf, with the machine's
drift taken out.

    python bench/bench_extract.py [--pdfs 5] [--pages 50] [--rounds 30]

bench_daemon.py's pdf figure compares the daemon with bare pypdf run before and after it; on
this shared machine bare pypdf alone has swung from 208 to 370 pages/s within a minute, more
than the 10% the goal allows. Here every round is short (``--pdfs`` PDFs of ``--pages`` pages,
about a second each way) and runs, back to back in one process, the same PDFs three ways:

- ``bare``: PdfReader(path).pages[i].extract_text() for every page (the figure's baseline);
- ``extract``: ingestd.extract.extract_pdf on the file's bytes, with a page callback (the guards,
  the muted pypdf logger, the text made storable);
- ``process``: the same through an ExtractorPool of one warm extraction process, as a worker
  slot uses it (the PDF sent over the pipe, page reports, the text sent back).

Each way's pages per CPU second (this process's CPU plus the extraction process's), the ratio
of each to bare within each round, and the median of the rounds' ratios. A ratio of 1.0 means
the path adds nothing per page; what the daemon adds around it (reading the file, indexing the
text while the extraction process idles) is bench_daemon.py's business.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from bench_daemon import make_pdf_blobs
from ingestd.extract import extract_pdf
from ingestd.procpool import ExtractorPool


def bare(paths: list[Path]) -> int:
    from pypdf import PdfReader

    pages = 0
    for path in paths:
        reader = PdfReader(path)
        for index in range(len(reader.pages)):
            reader.pages[index].extract_text()
            pages += 1
    return pages


def in_process(blobs: list[bytes]) -> int:
    return sum(len(extract_pdf(data, on_page=lambda done, total: None).pages) for data in blobs)


def through_pool(pool: ExtractorPool, blobs: list[bytes]) -> int:
    return sum(len(pool.extract_pdf(data, time.monotonic() + 600, lambda done, total: None,
                                    lambda: None).pages) for data in blobs)


def process_cpu(pid: int) -> float:
    """utime + stime of ``pid``, in seconds, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pages_per_cpu_second(run: Callable[[], int], child_pid: int) -> float:
    own, child = time.process_time(), process_cpu(child_pid)
    pages = run()
    return pages / (time.process_time() - own + process_cpu(child_pid) - child)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdfs", type=int, default=5)
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as work:
        paths = make_pdf_blobs(Path(work), args.pdfs, args.pages)
        print(json.dumps(measure(paths, args.rounds) | {"pdfs": args.pdfs, "pages": args.pages}))


def measure(paths: list[Path], rounds_wanted: int) -> dict:
    blobs = [path.read_bytes() for path in paths]
    pool = ExtractorPool(1)
    pool.warm()
    pool.wait_warm(60)
    through_pool(pool, blobs[:1])  # the process has run pypdf once, as bare has below
    bare(paths[:1])
    (child_pid,) = [worker.process.pid for worker in pool._all]
    ways = {"bare": lambda: bare(paths), "extract": lambda: in_process(blobs),
            "process": lambda: through_pool(pool, blobs)}
    rounds = []
    try:
        for _ in range(rounds_wanted):
            rounds.append({name: pages_per_cpu_second(run, child_pid)
                           for name, run in ways.items()})
    finally:
        pool.close()
    ratios = {name: [r[name] / r["bare"] for r in rounds] for name in ("extract", "process")}
    return {
        "rounds": rounds_wanted,
        "bare_pages_per_cpu_second": {"median": round(statistics.median(
            r["bare"] for r in rounds), 1), "min": round(min(r["bare"] for r in rounds), 1),
            "max": round(max(r["bare"] for r in rounds), 1)},
        **{f"{name}_vs_bare": {"median": round(statistics.median(values), 3),
                               "min": round(min(values), 3), "max": round(max(values), 3)}
           for name, values in ratios.items()}}


if __name__ == "__main__":
    main()
