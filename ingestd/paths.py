"""Which project a path belongs to, and whether the project wants it (include/exclude)."""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable

from ingestd.config import ProjectConfig


class ProjectMap:
    """Maps a path to the project whose folder holds it (folders never overlap: config checks)."""

    def __init__(self, projects: Iterable[ProjectConfig]) -> None:
        self.projects = {project.name: project for project in projects}
        self._folders = sorted(((str(folder), project) for project in self.projects.values()
                                for folder in project.folders), key=lambda item: -len(item[0]))

    def locate(self, path: str) -> tuple[ProjectConfig, Path] | None:
        """``(project, folder)`` for ``path``, or None when no project folder holds it."""
        for folder, project in self._folders:
            if path.startswith(folder) and (len(path) == len(folder) or path[len(folder)] == "/"):
                return project, Path(folder)
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
    directory's files are excluded too); the file name must match an include pattern."""
    relative = path[len(str(folder)):].lstrip("/")
    parts = relative.split("/") if relative else []
    if not parts or (not project.recursive and len(parts) > 1):
        return False
    if any(is_excluded_name(project, part) for part in parts):
        return False
    return any(fnmatchcase(parts[-1], pattern) for pattern in project.include)


def is_excluded_name(project: ProjectConfig, name: str) -> bool:
    """A file or directory name matching an exclude pattern (hidden and temp names by default)."""
    return any(fnmatchcase(name, pattern) for pattern in project.exclude)
