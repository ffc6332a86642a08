"""A TCP proxy in front of the test PostgreSQL server that can play a server starting late or
restarting: every connection cut at once, new ones refused until it is up (its port stays)."""

from __future__ import annotations

import socket
import threading


class Proxy:
    def __init__(self, target: tuple[str, int], port: int = 0, up: bool = True) -> None:
        """On ``port`` (0: a free one); ``up=False``: nothing listens until :meth:`up`."""
        self.target = target
        self._lock = threading.Lock()
        self._pairs: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.port = port
        if up:
            self.up()

    def url(self, url: str) -> str:
        """``url`` (a postgresql:// URL on the target) through the proxy."""
        return url.replace(f"{self.target[0]}:{self.target[1]}", f"127.0.0.1:{self.port}", 1)

    def down(self) -> None:
        """Cut every connection and refuse new ones (nothing listens on the port)."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is None:
            return  # down already
        _close(listener)  # shut down first: closed alone, it goes on accepting in accept()
        for sock in pairs:
            _close(sock)

    def up(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        self._serve(listener)

    def close(self) -> None:
        self.down()

    def _serve(self, listener: socket.socket) -> None:
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if listener is not self._listener:  # accepted as down() began: cut too
                    _close(client)
                    _close(server)
                    continue
                self._pairs += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
