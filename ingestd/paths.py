"""Which project a path belongs to, and whether the project wants it (include/exclude); which
file or folder a path names."""

from __future__ import annotations

import functools
import os
import re
from fnmatch import translate
from pathlib import Path
from typing import Callable, Iterable

from ingestd.config import ProjectConfig
from ingestd.names import OWN_PREFIX


class ProjectMap:
    """Maps a path to the project whose folder holds it (folders never overlap: config checks)."""

    def __init__(self, projects: Iterable[ProjectConfig]) -> None:
        self.projects = {project.name: project for project in projects}
        self._folders = sorted(((str(folder), folder, project)
                                for project in self.projects.values()
                                for folder in project.folders), key=lambda item: -len(item[0]))

    def locate(self, path: str) -> tuple[ProjectConfig, Path] | None:
        """``(project, folder)`` for ``path``, or None when no project folder holds it."""
        for text, folder, project in self._folders:
            if path.startswith(text) and (len(path) == len(text) or path[len(text)] == "/"):
                return project, folder
        return None

    def project_of(self, path: str) -> ProjectConfig | None:
        """The project that holds ``path`` and wants it by its patterns, else None."""
        found = self.wanted_in(path)
        return None if found is None else found[0]

    def wanted_in(self, path: str) -> tuple[ProjectConfig, Path] | None:
        """``(project, folder)`` if a project holds ``path`` and wants it by its patterns."""
        found = self.locate(path)
        if found is None:
            return None
        project, folder = found
        return found if is_wanted(project, folder, path) else None


def is_wanted(project: ProjectConfig, folder: Path, path: str) -> bool:
    """Include/exclude patterns apply to every path component below the folder (so a hidden
    directory's files are excluded too); the file name must match an include pattern and not
    be one of ingestd's own (``add``'s and ``after``'s temporary names)."""
    relative = path[len(str(folder)):].lstrip("/")
    parts = relative.split("/") if relative else []
    if not parts or (not project.recursive and len(parts) > 1):
        return False
    if parts[-1].startswith(OWN_PREFIX):  # whatever the project's patterns say
        return False
    excluded = _matcher(project.exclude)
    if any(excluded(part) for part in parts):
        return False
    return _matcher(project.include)(parts[-1]) is not None


def is_excluded_name(project: ProjectConfig, name: str) -> bool:
    """A file or directory name matching an exclude pattern (hidden and temp names by default)."""
    return _matcher(project.exclude)(name) is not None


@functools.lru_cache(maxsize=256)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], re.Match | None]:
    """One regular expression for a list of glob patterns, matched as fnmatchcase would match
    each (the settler asks this of every file it is told of: one match, not one per pattern)."""
    if not patterns:
        return lambda name: None
    return re.compile("|".join(map(translate, patterns))).match  # each is (?s:...)\Z


def file_identity(path: str | None) -> tuple[int, int] | None:
    """Which file or folder ``path`` names now (device, inode); None if none (or no path)."""
    if not path:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino
