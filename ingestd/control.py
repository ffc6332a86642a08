"""The control socket: a client connects and reads one JSON document, the daemon's live state
(what the database cannot know: pid, uptime, watched folders, busy workers, subscribers).

No request is needed (``socat - UNIX-CONNECT:PATH`` prints it). Same permission model as the
event socket: a Unix socket with ``socket_mode``.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any, Callable

import structlog

from ingestd.errors import IngestdError
from ingestd.unixsock import bind_unix

log = structlog.get_logger(__name__)
CLIENT_TIMEOUT_SECONDS = 5.0
ACCEPT_PAUSE_SECONDS = 1.0  # before accepting again after accept failed (no fd left)


class NotRunning(IngestdError):
    """No daemon answers on the control socket (``systemctl status``'s exit code)."""

    exit_code = 3


class ControlServer:
    def __init__(self, path: Path, mode: int, state: Callable[[], dict[str, Any]]) -> None:
        self.path, self.mode = path, mode
        self._state = state
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        self._listener = bind_unix(self.path, self.mode, backlog=16)
        self._listener.settimeout(1.0)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        failing = False
        while (listener := self._listener) is not None:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return  # closed by stop()
                if not failing:  # EMFILE, ENFILE, ENOBUFS: no file descriptor for it now
                    log.warning("control_socket_accept_failed", reason=exc.strerror or str(exc),
                                retry_seconds=ACCEPT_PAUSE_SECONDS)
                failing = True
                self._stopping.wait(ACCEPT_PAUSE_SECONDS)
                continue
            if failing:
                failing = False
                log.info("control_socket_accepting_again")
            with client:
                try:
                    client.settimeout(CLIENT_TIMEOUT_SECONDS)
                    client.sendall(json.dumps(self._state(), default=str).encode() + b"\n")
                except Exception as exc:  # a client that vanished, or a bug: keep serving
                    log.warning("status_not_sent", reason=str(exc))


def query(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """The running daemon's state; NotRunning when nothing answers at ``path``."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect(str(path))
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(f"ingestd is not running (nothing answers at {path})") from None
    except PermissionError:  # it may well be running: exit 3 would tell a monitor it is not
        raise IngestdError(f"{path}: permission denied: this user may not ask the daemon "
                           "(the socket's mode is socket_mode, its group the daemon's)") from None
    except OSError as exc:
        raise NotRunning(f"ingestd is not answering at {path}: {exc}") from None
    finally:
        client.close()
    try:
        return json.loads(b"".join(chunks))
    except ValueError:  # it failed to make its state: its log says why
        raise IngestdError(f"ingestd at {path} sent no state (see its log)") from None
