"""The shipped unit under a real systemd, installed by the README's own commands.

A throwaway container boots this machine's own system (systemd-nspawn over a private bind of
``/``, ``--volatile=overlay``: every write lands in a tmpfs and is gone when it stops, and the
host's services are not started in it, only ``basic.target``). In it the README's "Running
under systemd" block runs line by line, as root, with a plain PATH; then the daemon is driven
through systemd: files become completed jobs, the watchdog is fed, ``systemctl reload``
reloads, a SIGKILL is answered with a restart that loses nothing, ``systemctl stop`` ends it
cleanly. Needs root and systemd-nspawn (Debian: systemd-container; .ci/run installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, wait_for

PYTHON = Path("/usr/bin/python3")  # the container's python3: pyenv's under /root is hidden by ProtectHome
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SOURCE = "/usr/local/src/ingestd"  # where the container sees a copy of this checkout
CLI = ". /etc/profile.d/ingestd.sh && ingestd"  # what a login shell of the README's host runs


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (it boots a container)"
    if shutil.which("systemd-nspawn") is None:
        return "needs systemd-nspawn (Debian: apt-get install systemd-container)"
    if not Path("/lib/systemd/systemd").exists():
        return "needs systemd installed on this machine (the container boots it)"
    version = subprocess.run([str(PYTHON), "-c", "import sys; print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True) if PYTHON.exists() else None
    if version is None or version.stdout.strip() != "True":
        return f"needs Python 3.11+ as {PYTHON} (what the README's python3 is under systemd)"
    return None


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))


def readme_service_commands(systemd_version: int) -> list[str]:
    """The README's "Running under systemd" block: one command a line, comments dropped; the
    drop-in line that is commented out for systemd >= 253 is taken on older ones."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Running under systemd", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        older = re.match(r"#\s+(install .*older-systemd\.conf.*)$", line)
        if older and systemd_version < 253:
            commands.append(older.group(1))
        elif line.strip() and not line.startswith("#"):
            commands.append(line)
    return commands


class Container:
    """A booted container; ``run`` executes a command in it as root (all its namespaces)."""

    def __init__(self, workdir: Path) -> None:
        root = workdir / "root"
        root.mkdir()
        source = workdir / "source"  # a copy: pip builds in the source tree
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
        boot = (f'mount --bind / "$1" && exec systemd-nspawn -D "$1" --volatile=overlay '
                f'--register=no --keep-unit -q -M ingestd-test-{os.getpid()} '
                f'--bind={source}:{SOURCE} -b -- systemd.unit=basic.target')
        self.console = open(workdir / "console.log", "wb")
        # A mount namespace of its own: the bind of / is seen by nothing but the container.
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", boot, "sh", str(root)],
            stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT)
        self.leader: int | None = None
        try:
            self.leader = int(wait_for(self._init_pid, 30, 0.1, "the container's systemd"))
            wait_for(lambda: self.run("systemctl", "is-system-running", check=False).stdout
                     .strip() in ("running", "degraded"), 90, 0.2, "the container to boot")
        except BaseException:
            self.stop()
            raise

    def _init_pid(self) -> int | None:
        if self.process.poll() is not None:
            pytest.fail(f"systemd-nspawn exited with {self.process.returncode}: "
                        + Path(self.console.name).read_text(errors="replace")[-2000:])
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return int(pid)
        return None

    def run(self, *command: str, check: bool = True, shell: bool = False,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``command`` in the container; ``shell``: one bash line. Not a login shell: root's
        profile here puts pyenv's python3 (in /root, which ProtectHome hides) first on PATH."""
        argv = ["bash", "-c", command[0]] if shell else list(command)
        done = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}",
             "HOME=/root", "LANG=C.UTF-8", *argv],
            capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(argv)} exited with {done.returncode}:\n"
                        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{self.journal()}")
        return done

    def journal(self) -> str:
        """The service's last journal lines (what a failure needs)."""
        return self.run("journalctl -u ingestd -n 30 -o cat --no-pager", shell=True,
                        check=False).stdout

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", unit, "-p", prop, "--value").stdout.strip()

    def stop(self) -> None:
        if self.leader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, 9)  # the namespace's init: everything in it goes
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.console.close()


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    booted = Container(tmp_path)
    try:
        yield booted
    finally:
        booted.stop()


def _job(container: Container, project: str, name: str) -> dict | None:
    """The job of the file ``name`` in ``project``, as `ingestd jobs list --json` gives it."""
    listed = container.run(f"{CLI} jobs list -p {project} --json", shell=True, check=False)
    if listed.returncode != 0:  # the database is not there yet
        return None
    return next((job for job in json.loads(listed.stdout)["jobs"]
                 if job["original_filename"] == name), None)


def _completed(container: Container, project: str, name: str) -> bool:
    return (_job(container, project, name) or {}).get("status") == "completed"


def _wait_completed(container: Container, project: str, name: str, text: str) -> None:
    """Drop ``name`` into the project's folder (the README's /srv/drop/PROJECT); wait for its job."""
    container.run(f"printf '%s\\n' '{text}' > /srv/drop/{project}/{name}", shell=True)
    wait_for(lambda: _completed(container, project, name), 60, 0.3,
             f"{name} to be completed under systemd")


def test_the_readme_installs_a_service_that_systemd_runs_restarts_and_stops(
        container: Container) -> None:
    version = int(container.run("systemctl", "--version").stdout.split()[1])
    for command in readme_service_commands(version):
        container.run(f"cd {SOURCE} && {command}", shell=True)
    wait_for(lambda: container.show("ingestd", "ActiveState") == "active", 60, 0.2,
             "ingestd.service to be active")
    assert "queued" in container.show("ingestd", "StatusText")  # STATUS= reached systemd

    # Files become jobs; the CLI, with the README's profile.d line, finds the service's database.
    _wait_completed(container, "acme", "hello.txt", "hello from a service")
    found = container.run(f"{CLI} search -p acme hello", shell=True).stdout
    assert "/srv/drop/acme/hello.txt" in found
    _wait_completed(container, "scans", "scan.txt", "a polled folder")
    assert container.run("ls /var/lib/ingestd/projects/scans/processed", shell=True
                         ).stdout.split() == [f"{_job(container, 'scans', 'scan.txt')['id']}-scan.txt"]

    # The watchdog is fed: with WatchdogSec=2 systemd would kill a silent daemon after 2 s.
    container.run("mkdir -p /etc/systemd/system/ingestd.service.d && printf '[Service]\\n"
                  "WatchdogSec=2\\n' > /etc/systemd/system/ingestd.service.d/watchdog.conf "
                  "&& systemctl daemon-reload && systemctl restart ingestd", shell=True)
    pings: set[str] = set()

    def third_ping() -> bool:
        pings.add(container.show("ingestd", "WatchdogTimestampMonotonic"))
        return len(pings - {"0", ""}) >= 3

    wait_for(third_ping, 30, 0.2, "three watchdog pings")
    assert container.show("ingestd", "NRestarts") == "0"

    # systemctl reload: SIGHUP, and the daemon says it reloaded.
    container.run("systemctl", "reload", "ingestd")
    wait_for(lambda: "daemon_reloaded" in container.run(
        "journalctl", "-u", "ingestd", "-o", "cat", "--no-pager").stdout, 30, 0.3,
        "daemon_reloaded in the journal")
    assert container.show("ingestd", "ActiveState") == "active"

    # SIGKILL while a file settles: Restart=on-failure brings it back, and the file is not lost.
    killed = container.show("ingestd", "MainPID")
    container.run(f"echo 'in flight' > /srv/drop/acme/in-flight.txt && kill -9 {killed}", shell=True)
    wait_for(lambda: container.show("ingestd", "NRestarts") == "1"
             and container.show("ingestd", "ActiveState") == "active", 60, 0.2,
             "a restart after SIGKILL")
    assert container.show("ingestd", "MainPID") != killed
    _wait_completed(container, "acme", "after-kill.txt", "still here")
    wait_for(lambda: _completed(container, "acme", "in-flight.txt"), 60, 0.3,
             "the file dropped as the daemon was killed to be completed")

    # systemctl stop: SIGTERM, a clean exit 0, nothing left running.
    container.run("systemctl", "stop", "ingestd")
    assert container.show("ingestd", "Result") == "success"
    assert container.show("ingestd", "ExecMainStatus") == "0"
    assert container.run("pgrep -u ingestd", shell=True, check=False).stdout == ""

