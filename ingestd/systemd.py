"""systemd's two small wire protocols, spoken directly: sd_notify and socket activation.

Both are a few lines of socket code, so we do not depend on libsystemd (a C library the daemon
would need on every machine, and which is absent outside systemd). Everything here is a no-op
when systemd is not our supervisor, so ``ingestd run`` behaves the same in a terminal.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import structlog

SD_LISTEN_FDS_START = 3
"""The first file descriptor systemd passes (sd_listen_fds(3)); the rest follow in order."""

SEND_TIMEOUT = 1.0
"""Seconds a notification may block: a stuck manager must not stall the watchdog thread."""

_ACTIVATION_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _logger() -> Any:
    # Looked up at use: a module-level proxy would be frozen by cache_logger_on_first_use.
    return structlog.get_logger(__name__)


def _unix_address(value: str) -> bytes | None:
    """Turn $NOTIFY_SOCKET into an AF_UNIX address; '@' names the abstract namespace."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # e.g. "vsock:..." (systemd >= 254 in VMs): not spoken here.


def _one_line(text: str) -> str:
    """A field value may not contain a newline: that would start a new (forged) field."""
    return " ".join(text.splitlines())


class StartExtender:
    """While a long step of the start runs (after :meth:`start`, until the block ends), keeps
    systemd's start timeout from running out: EXTEND_TIMEOUT_USEC= for ``seconds`` at once and
    again each third of that. It runs on a thread of its own, so it extends for as long as the
    step runs, however long; a process that stops running altogether (stopped, or frozen
    whole) times out ``seconds`` later."""

    def __init__(self, notifier: Notifier, seconds: float) -> None:
        self.notifier, self.seconds = notifier, seconds
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="start-extender", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self.notifier.notify(f"EXTEND_TIMEOUT_USEC={int(self.seconds * 1_000_000)}")
            if self._done.wait(self.seconds / 3):
                return

    def __enter__(self) -> StartExtender:
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()


class Notifier:
    """Tells the service manager how the daemon is doing (sd_notify(3)).

    Does nothing when $NOTIFY_SOCKET is unset. Sending never raises: losing a status line must
    not take down the daemon, and a failing watchdog shows up as a restart by systemd anyway.
    The first failure is logged once. Safe to call from any thread; one socket is kept open.
    """

    def __init__(self, notify_socket: str | None = None) -> None:
        value = os.environ.get("NOTIFY_SOCKET", "") if notify_socket is None else notify_socket
        self._raw = value
        self._address = _unix_address(value) if value else None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when there is a manager to talk to."""
        return bool(self._raw)

    def ready(self, status: str | None = None) -> None:
        """Start-up (or a reload) is complete: systemd starts dependants / ends the reload job."""
        fields = ["READY=1"] if status is None else ["READY=1", f"STATUS={_one_line(status)}"]
        self.notify(*fields)

    def reloading(self) -> None:
        """A reload began; MONOTONIC_USEC lets Type=notify-reload match it to its SIGHUP.

        Both fields go in one datagram: systemd ignores a RELOADING=1 without the timestamp.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Shutdown began, so systemd shows 'deactivating' rather than a hang."""
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        """A one-line state for `systemctl status`."""
        self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        """Proves liveness; send every watchdog_interval() or systemd kills and restarts us."""
        self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog() calls (half of WatchdogSec), or None if not watched."""
        return watchdog_interval()

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram; True if it was handed to the kernel."""
        if not self._raw:
            return False
        message = "\n".join(fields).encode()
        with self._lock:
            try:
                self._send(message)
            except (OSError, ValueError) as exc:
                self._warn_once(exc)
                return False
        return True

    def close(self) -> None:
        """Close the socket; a later notification reopens it."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _send(self, message: bytes) -> None:
        if self._address is None:
            raise ValueError(f"unsupported NOTIFY_SOCKET address {self._raw!r}")
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(SEND_TIMEOUT)
            self._sock = sock
        self._sock.sendto(message, self._address)

    def _warn_once(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            _logger().warning("sd_notify failed; further failures are not logged",
                              notify_socket=self._raw, error=str(exc))


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC in seconds (the margin sd_watchdog_enabled(3) advises), if it is
    meant for this process: a WATCHDOG_PID naming another process was inherited, not ours."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        value = int(usec) if usec is not None else 0
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


def listen_fds() -> list[socket.socket]:
    """The sockets systemd opened for us (socket activation), in unit-file order, else [].

    The variables are removed from os.environ in every case, as sd_listen_fds(1) does: a child
    (a sink command) must not take our sockets for its own. The descriptors are made
    close-on-exec for the same reason.
    """
    count = _activation_count()
    for name in _ACTIVATION_VARS:
        os.environ.pop(name, None)
    return [sock for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
            if (sock := _adopt(fd)) is not None]


def _activation_count() -> int:
    """$LISTEN_FDS if $LISTEN_PID is this process, else 0 (they were meant for a parent)."""
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return 0
        return max(int(os.environ.get("LISTEN_FDS", "")), 0)
    except ValueError:
        return 0


def _adopt(fd: int) -> socket.socket | None:
    """Wrap an inherited descriptor (family and type are read from the kernel)."""
    try:
        os.set_inheritable(fd, False)
        return socket.socket(fileno=fd)
    except OSError as exc:  # not open, or not a socket (ListenFIFO=, a misconfigured unit)
        _logger().warning("ignoring an inherited descriptor", fd=fd, error=str(exc))
        return None
