"""The processes below a process (the daemon's worker processes and their PDF extractors), for
the tests' harness and the benchmarks alike."""

from __future__ import annotations

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
