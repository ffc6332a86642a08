"""sd_notify and socket activation, against real sockets and a real child process."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import socket
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from structlog.testing import capture_logs

from ingestd.systemd import Notifier, listen_fds, watchdog_interval

DEADLINE = 10.0


class Manager:
    """A stand-in for systemd's notification socket that records what it receives."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(DEADLINE)

    def receive(self) -> str:
        """The next datagram, waiting at most DEADLINE seconds."""
        return self.sock.recv(65536).decode()


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    """A manager on a path socket, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    fake = Manager(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield fake
    fake.sock.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No systemd variables inherited from whatever runs the tests."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                 "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- sd_notify --------------------------------------------------------------------------------

@pytest.mark.parametrize(("call", "expected"), [
    (lambda n: n.ready(), "READY=1"),
    (lambda n: n.ready("watching 3 folders"), "READY=1\nSTATUS=watching 3 folders"),
    (lambda n: n.stopping(), "STOPPING=1"),
    (lambda n: n.status("2 jobs queued"), "STATUS=2 jobs queued"),
    (lambda n: n.watchdog(), "WATCHDOG=1"),
])
def test_each_method_sends_its_exact_message(manager: Manager, call, expected: str) -> None:
    """Each notification arrives as exactly the fields sd_notify(3) defines."""
    call(Notifier())
    assert manager.receive() == expected


def test_status_cannot_forge_fields(manager: Manager) -> None:
    """A newline inside a status text cannot start a field of its own."""
    Notifier().status("line one\nREADY=1")
    assert manager.receive() == "STATUS=line one READY=1"


def test_reloading_sends_monotonic_time_in_the_same_datagram(manager: Manager) -> None:
    """RELOADING=1 and MONOTONIC_USEC (now, in µs of CLOCK_MONOTONIC) travel in one datagram."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", manager.receive())
    assert match is not None
    assert before <= int(match.group(1)) <= after


def test_abstract_namespace_socket(clean_env: pytest.MonkeyPatch) -> None:
    """A $NOTIFY_SOCKET starting with '@' names a socket in the abstract namespace."""
    name = f"ingestd-test-{uuid.uuid4().hex}"
    fake = Manager(b"\0" + name.encode())
    clean_env.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        Notifier().ready()
        assert fake.receive() == "READY=1"
    finally:
        fake.sock.close()


def test_without_notify_socket_nothing_is_sent(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With $NOTIFY_SOCKET unset every method is a silent no-op and opens no socket."""
    notifier = Notifier()
    fds = len(os.listdir("/proc/self/fd"))
    notifier.ready("x")
    notifier.reloading()
    notifier.stopping()
    notifier.status("x")
    notifier.watchdog()
    assert notifier.enabled is False
    assert notifier.notify("READY=1") is False
    assert len(os.listdir("/proc/self/fd")) == fds


def test_unreachable_socket_never_raises_and_warns_once(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A $NOTIFY_SOCKET pointing nowhere costs one warning, never an exception."""
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    notifier = Notifier()
    with capture_logs() as logs:
        for _ in range(3):
            notifier.ready("x")
            notifier.reloading()
            notifier.stopping()
            notifier.status("x")
            notifier.watchdog()
    assert notifier.notify("WATCHDOG=1") is False
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["notify_socket"] == str(tmp_path / "nobody-listens")


@pytest.mark.parametrize("address", ["vsock:2:1234", "relative/path", "/" + "x" * 200])
def test_unusable_addresses_never_raise(clean_env: pytest.MonkeyPatch, address: str) -> None:
    """Addresses we cannot speak to (vsock, relative, too long) are reported, not raised."""
    clean_env.setenv("NOTIFY_SOCKET", address)
    with capture_logs():
        assert Notifier().notify("READY=1") is False


def open_sockets() -> set[str]:
    """This process's sockets, by kernel identity ("socket:[inode]")."""
    links = (os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
             if os.path.exists(f"/proc/self/fd/{fd}"))
    return {link for link in links if link.startswith("socket:")}


def test_concurrent_senders_share_one_socket(manager: Manager) -> None:
    """Many threads notifying at once deliver every message intact over the same one socket."""
    notifier = Notifier()
    notifier.status("warm-up")
    assert manager.receive() == "STATUS=warm-up"
    sockets = open_sockets()
    threads, per_thread = 8, 25
    workers = [threading.Thread(target=lambda i=i: [notifier.status(f"t{i} m{j}")
                                                    for j in range(per_thread)])
               for i in range(threads)]
    for worker in workers:
        worker.start()
    received = [manager.receive() for _ in range(threads * per_thread)]
    for worker in workers:
        worker.join(DEADLINE)
    assert sorted(received) == sorted(f"STATUS=t{i} m{j}"
                                      for i in range(threads) for j in range(per_thread))
    assert open_sockets() == sockets


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),
    (None, None, None),
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_interval(clean_env: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    """The interval is half of WATCHDOG_USEC, and only when WATCHDOG_PID is absent or ours."""
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        clean_env.setenv("WATCHDOG_PID", str(os.getpid() if pid == "self" else os.getppid()))
    assert Notifier().watchdog_interval() == expected
    assert watchdog_interval() == expected


# --- socket activation ------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, os, socket
    os.environ["LISTEN_PID"] = str(os.getpid())   # what systemd sets after fork, before exec
    from ingestd.systemd import listen_fds
    socks = listen_fds()
    print(json.dumps({
        "count": len(socks),
        "fds": [s.fileno() for s in socks],
        "unix_stream": [s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM for s in socks],
        "cloexec": [not os.get_inheritable(s.fileno()) for s in socks],
        "left_in_env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }), flush=True)
    socks[0].settimeout(10)
    conn, _ = socks[0].accept()
    conn.sendall(b"accepted by " + str(os.getpid()).encode())
    conn.close()
""")


def spawn_with_fd3(code: str, fd: int, env: dict[str, str]) -> tuple[int, int]:
    """Start ``python -c code`` with ``fd`` as its descriptor 3, as systemd does; returns the
    pid and the read end of its stdout."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)  # dup2(3, 3) would keep close-on-exec
    out_r, out_w = os.pipe()
    try:
        pid = os.posix_spawn(sys.executable, [sys.executable, "-c", code], env, file_actions=[
            (os.POSIX_SPAWN_DUP2, high, 3),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
        ])
    finally:
        os.close(high)
        os.close(out_w)
    return pid, out_r


def read_line(fd: int) -> str:
    """One line from ``fd``, waiting at most DEADLINE seconds in all."""
    data, end = b"", time.monotonic() + DEADLINE
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(end - time.monotonic(), 0))
        chunk = os.read(fd, 4096) if ready else b""
        assert chunk, f"child said nothing in time (got {data!r})"
        data += chunk
    return data.decode()


def reap(pid: int) -> int:
    """The child's exit code, waiting at most DEADLINE seconds before killing it."""
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], DEADLINE)[0]:
            os.kill(pid, 9)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        os.close(pidfd)


def test_activated_child_accepts_on_inherited_socket(tmp_path: Path) -> None:
    """A process given a listening socket as fd 3 gets it from listen_fds(), close-on-exec and
    usable, and its own children no longer see the LISTEN_* variables."""
    path = str(tmp_path / "events.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env.update(LISTEN_FDS="1", LISTEN_FDNAMES="events")
    pid, out = spawn_with_fd3(CHILD, listener.fileno(), env)
    listener.close()  # the child's copy must be the one that answers
    try:
        report = json.loads(read_line(out))
        assert report == {"count": 1, "fds": [3], "unix_stream": [True], "cloexec": [True],
                          "left_in_env": []}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(DEADLINE)
            client.connect(path)
            assert client.recv(100) == f"accepted by {pid}".encode()
    finally:
        os.close(out)
        assert reap(pid) == 0


def test_sockets_meant_for_another_process_are_not_taken(clean_env: pytest.MonkeyPatch) -> None:
    """With LISTEN_PID naming another process, nothing is adopted, and the variables go."""
    clean_env.setenv("LISTEN_PID", str(os.getppid()))
    clean_env.setenv("LISTEN_FDS", "1")
    clean_env.setenv("LISTEN_FDNAMES", "events")
    assert listen_fds() == []
    assert not [k for k in os.environ if k.startswith("LISTEN_")]


@pytest.mark.parametrize("count", [None, "0", "-1", "many"])
def test_no_or_bad_listen_fds_means_no_sockets(clean_env: pytest.MonkeyPatch, count: str | None) -> None:
    """Without a valid positive LISTEN_FDS there are no activation sockets."""
    clean_env.setenv("LISTEN_PID", str(os.getpid()))
    if count is not None:
        clean_env.setenv("LISTEN_FDS", count)
    assert listen_fds() == []


def test_nothing_to_adopt_without_systemd(clean_env: pytest.MonkeyPatch) -> None:
    """Started by hand (no LISTEN_* at all), listen_fds() returns []."""
    assert listen_fds() == []
