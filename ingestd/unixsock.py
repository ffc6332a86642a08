"""Listening Unix sockets for the daemon (events, control): a stale socket file from a crashed
run is replaced, a live one (another daemon on the same paths) is refused."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from ingestd.errors import IngestdError


class SocketInUse(IngestdError):
    """Another live process serves the socket path."""


def bind_unix(path: Path, mode: int, backlog: int = 128) -> socket.socket:
    """A listening socket at ``path`` with permissions ``mode``."""
    clear_stale(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, mode)
    listener.listen(backlog)
    return listener


def clear_stale(path: Path) -> None:
    """Remove a socket file left by a crashed run; refuse one a live process still serves."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketInUse(f"{path}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            path.unlink(missing_ok=True)  # nobody listens: a crashed run's leftover
            return
        raise SocketInUse(f"{path}: cannot check the existing socket: {exc.strerror}") from None
    finally:
        probe.close()
    raise SocketInUse(f"{path}: another ingestd is serving this socket (is a daemon already "
                      "running with this configuration?)")
