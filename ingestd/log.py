"""Logging: every line is one JSON object on stderr (journald keeps it), from structlog and from
the libraries that log through the standard library (watchdog, APScheduler, pypdf). The other
commands than ``run`` log their warnings as readable lines on stderr (see
:func:`configure_command`)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(level: str = "info", stream: TextIO | None = None, readable: bool = False) -> None:
    """Route structlog and stdlib logging to one JSON renderer on ``stream`` (default stderr).

    Tracebacks appear only where a log call passes ``exc_info`` (bugs); expected failures are
    logged with their one-line reason.
    """
    structlog.configure(
        # filter_by_level first: a debug line costs nothing unless debug is on.
        processors=[structlog.stdlib.filter_by_level, *_SHARED,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.dev.ConsoleRenderer(colors=False) if readable
                    else structlog.processors.JSONRenderer(ensure_ascii=False)],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    # The operator's level is enforced here too, not only on the root logger: a library
    # logger opened lower for a listener of its own (watch.py's overflow spotter needs
    # watchdog's warnings) must still print nothing below it.
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # APScheduler reports every job run at INFO; that is one line per file.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def configure_command(level: str = "warning") -> None:
    """For a command other than ``run``: warnings (a wait for the write lock) as readable
    lines on stderr. Unconfigured, structlog prints to stdout, into the command's output (the
    one JSON document of ``--json``)."""
    configure(level, readable=True)
