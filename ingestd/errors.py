"""Errors a user can meet, each carrying the exit code of the contract in DESIGN.md."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_REFUSED = 5


class IngestdError(Exception):
    """An expected failure: printed as one line, never as a traceback."""

    exit_code = EXIT_FAILURE


class UsageError(IngestdError):
    exit_code = EXIT_USAGE


class NotFound(IngestdError):
    exit_code = EXIT_NOT_FOUND


class Conflict(IngestdError):
    """The job's current state forbids the operation (or another writer won a race)."""

    exit_code = EXIT_CONFLICT


class InputRefused(IngestdError):
    """A path or file the project will not take: outside its folders, too large, not a file."""

    exit_code = EXIT_REFUSED


class ConfigError(IngestdError):
    """One or several problems of a config file, one line each."""

    exit_code = EXIT_FAILURE

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class StoreError(IngestdError):
    """The database cannot be used: corrupt, locked, or of a newer schema."""

    exit_code = EXIT_FAILURE


class StoreUnreachable(StoreError):
    """A PostgreSQL server that cannot be reached, or does not take connections yet: it may
    be starting or restarting; or a SQLite file whose file system is full, which may be given
    room. A daemon waits for it (a command fails as for StoreError)."""
