"""The event socket: every published event, as lines, to every connected client.

No handshake: a client connects and reads (``socat - UNIX-CONNECT:PATH`` works). One thread
with a selector serves all clients with non-blocking sockets, so hundreds are cheap. Publishing
only appends to per-client buffers and never waits: a client more than its bound behind when
new events come gets a final ``io.ingestd.stream.overflow`` line naming the last sequence it
received, and is disconnected. At a stop, clients get a moment to take what is queued; one that
does not is cut off on a whole line, after such a notice.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import structlog

from ingestd.events import READ_TOO_SLOWLY, STOPPING, overflow_line
from ingestd.systemd import listen_fds
from ingestd.unixsock import bind_unix

log = structlog.get_logger(__name__)
OVERFLOW_GRACE_SECONDS = 60.0  # a stuck client has this long to read its overflow line
DRAIN_SECONDS = 2.0  # at a stop, how long clients have to take what is queued for them
FINISH_SECONDS = 1.0  # then, to take the rest of the line being sent and the notice
ACCEPT_PAUSE_SECONDS = 1.0  # no new client for this long after accept failed (no fd left)
ERROR_PAUSE_SECONDS = 0.1  # after an unexpected error, so that a repeating one cannot spin


class _Client:
    """One subscriber: the lines not yet (fully) sent, bounded by ``limit`` bytes."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.limit = limit
        self.lines: deque[tuple[int | None, bytes]] = deque()
        self.head_sent = 0        # bytes of lines[0] already sent
        self.queued_bytes = 0
        self.sent_seq: int | None = None
        self.closing_at: float | None = None

    def queue(self, lines: list[tuple[int, bytes]], installation: str) -> None:
        """Add a batch, unless the client is more than ``limit`` bytes behind already: the
        batch itself may be larger (a backlog after a pause) and a client keeping up takes it."""
        if self.closing_at is not None:
            return
        if self.queued_bytes > self.limit:
            self._overflow(installation)
            return
        self.lines.extend(lines)
        self.queued_bytes += sum(len(data) for _, data in lines)

    def _overflow(self, installation: str, grace: float = OVERFLOW_GRACE_SECONDS,
                  at_stop: bool = False) -> None:
        """Drop what is queued, except a line already half sent, and say so in a last line."""
        kept = [self.lines[0]] if self.head_sent else []
        last = kept[0][0] if kept else self.sent_seq
        reason = STOPPING if at_stop else READ_TOO_SLOWLY
        notice = (overflow_line(installation, last, reason) + "\n").encode()
        self.lines = deque(kept + [(None, notice)])
        self.queued_bytes = sum(len(data) for _, data in self.lines)
        self.closing_at = time.monotonic() + grace
        log.warning("subscriber_overflow", last_sequence=last, at_stop=at_stop)

    def cut_short(self, installation: str) -> None:
        """At a stop: after the line being sent, only the notice of what was left unsent."""
        if self.closing_at is None and len(self.lines) > (1 if self.head_sent else 0):
            self._overflow(installation, FINISH_SECONDS, at_stop=True)

    def flush(self) -> bool:
        """Send what the socket takes now; False when the client should be closed."""
        if self.lines:
            try:
                sent = self.sock.send(self._chunk())
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return False
            self._advance(sent)
        if self.closing_at is not None:
            return bool(self.lines) and time.monotonic() < self.closing_at
        return True

    def _chunk(self, size: int = 1 << 18) -> bytes:
        parts, total = [], 0
        for index, (_, data) in enumerate(self.lines):
            part = data[self.head_sent:] if index == 0 else data
            parts.append(part)
            total += len(part)
            if total >= size:
                break
        return b"".join(parts)

    def _advance(self, sent: int) -> None:
        self.queued_bytes -= sent
        while sent and self.lines:
            seq, data = self.lines[0]
            left = len(data) - self.head_sent
            if sent < left:
                self.head_sent += sent
                return
            sent -= left
            self.lines.popleft()
            self.head_sent = 0
            if seq is not None:
                self.sent_seq = seq


class EventStream:
    """Serves the event socket from its own thread; :meth:`publish` is called by the publisher."""

    def __init__(self, path: Path, mode: int, installation: str, buffer_bytes: int) -> None:
        self.path, self.mode = path, mode
        self.installation = installation
        self.buffer_bytes = buffer_bytes
        self.dropped = 0
        self._clients: dict[int, _Client] = {}
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_paused_until: float | None = None  # accept failed: listener unregistered
        self._accept_failing = False  # logged, until a client is accepted again
        self._owns_path = False
        self._thread = threading.Thread(target=self._serve, name="event-socket", daemon=True)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._clients)

    def start(self) -> None:
        self._listener = self._listen()
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()

    def _listen(self) -> socket.socket:
        activated = listen_fds()
        if activated:  # systemd's socket unit owns the path and its mode
            log.info("event_socket_activated", fd=activated[0].fileno())
            return activated[0]
        listener = bind_unix(self.path, self.mode)
        self._owns_path = True
        return listener

    def publish(self, lines: list[tuple[int, str]]) -> None:
        """Queue ``(seq, line)`` for every client; never blocks on a client."""
        if not lines:
            return
        encoded = [(seq, (line + "\n").encode()) for seq, line in lines]
        with self._lock:
            for client in self._clients.values():
                client.queue(encoded, self.installation)
        self._wake()

    def _wait_while(self, counts: Callable[[_Client], bool], seconds: float) -> None:
        """Wait until no client that ``counts`` has lines queued, for at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while self._thread.is_alive() and time.monotonic() < deadline:
            with self._lock:
                if not any(client.lines and counts(client) for client in self._clients.values()):
                    return
            time.sleep(0.01)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # already awake

    def stop(self) -> None:
        """Give clients DRAIN_SECONDS to take what is queued (the stop's own events are the
        last); then FINISH_SECONDS to take the rest of the line being sent and a notice of
        what they did not get; then close."""
        self._wait_while(lambda client: client.closing_at is None, DRAIN_SECONDS)
        with self._lock:
            for client in self._clients.values():
                client.cut_short(self.installation)
        self._wake()
        self._wait_while(lambda client: True, FINISH_SECONDS)
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            for client in self._clients.values():
                client.sock.close()
            self._clients.clear()
        if self._listener is not None:
            self._listener.close()
        if self._owns_path:
            self.path.unlink(missing_ok=True)

    # --- the serving thread --------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self._resume_accepting()
                for key, events in self._selector.select(timeout=self._select_timeout()):
                    try:
                        self._handle(key, events)
                    except Exception:  # a bug: the other clients are still served
                        log.exception("event_socket_error")
                        self._stop.wait(ERROR_PAUSE_SECONDS)
                self._sync_interest()
            except Exception:
                log.exception("event_socket_error")
                self._stop.wait(ERROR_PAUSE_SECONDS)

    def _select_timeout(self) -> float:
        if self._accept_paused_until is None:
            return 1.0
        return min(1.0, max(0.0, self._accept_paused_until - time.monotonic()))

    def _handle(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data == "accept":
            self._accept()
        elif key.data == "wake":
            os.read(self._wake_r, 4096)
        elif events & selectors.EVENT_READ:
            self._read_or_close(key.fileobj)  # clients send nothing: data or EOF means "bye"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: no file descriptor for it now
                self._pause_accepting(exc)
                return
            if self._accept_failing:
                self._accept_failing = False
                log.info("event_socket_accepting_again")
            sock.setblocking(False)
            with self._lock:
                self._clients[sock.fileno()] = _Client(sock, self.buffer_bytes)
            self._selector.register(sock, selectors.EVENT_READ, "client")

    def _pause_accepting(self, exc: OSError) -> None:
        """Stop listening for new clients for a moment. The listener stays readable while the
        connection waits in its backlog: selecting on it would spin. Connected clients are
        served meanwhile, and those that leave give their descriptors back."""
        if not self._accept_failing:
            self._accept_failing = True
            log.warning("event_socket_accept_failed", reason=exc.strerror or str(exc),
                        retry_seconds=ACCEPT_PAUSE_SECONDS)
        self._selector.unregister(self._listener)
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS

    def _resume_accepting(self) -> None:
        if self._accept_paused_until is not None and time.monotonic() >= self._accept_paused_until:
            self._accept_paused_until = None
            self._selector.register(self._listener, selectors.EVENT_READ, "accept")

    def _read_or_close(self, sock: socket.socket) -> None:
        try:
            if sock.recv(4096):
                return  # ignore input
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(sock.fileno())

    def _sync_interest(self) -> None:
        """Write to every client with something queued; watch for writability where blocked."""
        with self._lock:
            clients = list(self._clients.items())
        for fd, client in clients:
            with self._lock:
                alive = client.flush()
                blocked = bool(client.lines)
            if not alive:
                if client.closing_at is not None:
                    self.dropped += 1
                self._close(fd)
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if blocked else 0)
            if self._selector.get_key(client.sock).events != events:
                self._selector.modify(client.sock, events, "client")

    def _close(self, fd: int) -> None:
        with self._lock:
            client = self._clients.pop(fd, None)
        if client is not None:
            self._selector.unregister(client.sock)
            client.sock.close()
