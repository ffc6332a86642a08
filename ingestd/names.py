"""File names that must fit the file system: ``ingestd add``'s numbered copies in a drop
folder, the job-id-prefixed originals in processed/ and failed/; ingestd's own names."""

from __future__ import annotations

import os
from pathlib import Path

NAME_MAX = 255  # bytes in a file name, on every file system Linux mounts for data
OWN_PREFIX = ".ingestd-"  # ingestd's own temporary names beside users' files: no project takes them
ADD_PARTIAL_SUFFIX = ".part"  # ingestd add's copy in flight: .ingestd-add-<random>.part


def is_add_partial(name: str) -> bool:
    """A copy ``ingestd add`` is writing, or one a killed ``add`` left behind."""
    return name.startswith(f"{OWN_PREFIX}add-") and name.endswith(ADD_PARTIAL_SUFFIX)


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, that ``folder``'s file system takes."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX
    return limit if limit > 0 else NAME_MAX


def fitting(name: str, before: str = "", after_stem: str = "", limit: int = NAME_MAX) -> str:
    """``before + stem + after_stem + suffix`` of ``name``, its stem cut by whole characters so
    that the whole fits ``limit`` bytes (a name near the limit would not take the additions)."""
    stem, suffix = os.path.splitext(name)
    if len(os.fsencode(suffix)) > limit // 2:  # a "suffix" that long is part of the name
        stem, suffix = name, ""
    room = limit - len(os.fsencode(before + after_stem + suffix))
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return before + stem + after_stem + suffix
