"""The processes below a process (the daemon's worker processes and their PDF extractors), for
the tests' harness and the benchmarks alike."""

from __future__ import annotations

import os
from pathlib import Path


def children(pid: int) -> list[int]:
    """The pids of a live process's children (those of every thread)."""
    kids = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(kid) for kid in listing.read_text().split()]
        except OSError:
            continue  # the thread or the process ended meanwhile
    return kids


def descendants(pid: int) -> list[int]:
    """The pids of a live process's children, their children, and so on."""
    found = []
    for kid in children(pid):
        found += [kid, *descendants(kid)]
    return found


def gone(pid: int) -> bool:
    """No such process, or only its zombie (it has run its last instruction)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def cpu_seconds(pid: int, children: bool = True) -> float:
    """utime + stime of ``pid`` and its reaped children, and (``children``) of its live
    descendants (worker processes, PDF extractors), in seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    if children:
        total += sum(cpu_seconds(kid, children=False) for kid in descendants(pid))
    return total

