"""The shipped systemd units say what the daemon relies on, and systemd accepts them."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICE = UNITS / "ingestd.service"
SOCKET = UNITS / "ingestd-events.socket"
TRUE = {"yes", "true", "on", "1"}


def parse(path: Path) -> configparser.ConfigParser:
    """A unit file as sections of keys; a repeated key keeps its last value, as in systemd."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # unit keys are case-sensitive
    parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return parser


@pytest.fixture(scope="module")
def service() -> configparser.SectionProxy:
    return parse(SERVICE)["Service"]


def test_service_speaks_notify_reload_with_a_watchdog(service: configparser.SectionProxy) -> None:
    """systemd waits for READY=1, reloads by SIGHUP + RELOADING=1, and watches WATCHDOG=1."""
    assert service["Type"] == "notify-reload"
    assert "ExecReload" not in service
    assert service["WatchdogSec"] == "30"
    assert service["ExecStart"].split()[1:] == ["run"]


def test_service_restarts_on_failure_and_outwaits_shutdown(service: configparser.SectionProxy) -> None:
    """A crash restarts the daemon; a stop gives it longer than its 20 s shutdown grace."""
    assert service["Restart"] == "on-failure"
    assert service["RestartSec"] == "2"
    assert int(service["TimeoutStopSec"]) > 20
    assert service["KillMode"] == "mixed"


def test_service_gets_its_own_directories_and_config(service: configparser.SectionProxy) -> None:
    """State, runtime, logs and config live in systemd-managed directories named ingestd."""
    for key in ("StateDirectory", "RuntimeDirectory", "LogsDirectory", "ConfigurationDirectory"):
        assert service[key] == "ingestd", key
    assert service["Environment"] == "INGESTD_CONFIG=/etc/ingestd/ingestd.toml"
    assert (service["User"], service["Group"]) == ("ingestd", "ingestd")


def test_service_is_hardened(service: configparser.SectionProxy) -> None:
    """The file system is read-only but for our directories and the drop folders, no privilege
    can be regained, and the one capability is CAP_LEASE (see ingestd/writers.py)."""
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] in TRUE
    assert service["CapabilityBoundingSet"] == service["AmbientCapabilities"] == "CAP_LEASE"
    assert service["MemoryDenyWriteExecute"] in TRUE
    assert "/srv/drop" in service["ReadWritePaths"]
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_event_socket_activates_the_service() -> None:
    """The socket unit listens where the daemon's event socket lives and hands it over."""
    socket_unit = parse(SOCKET)["Socket"]
    assert socket_unit["ListenStream"] == "/run/ingestd/events.sock"
    assert socket_unit["SocketMode"] == "0660"
    assert socket_unit["Service"] == SERVICE.name
    assert parse(SERVICE)["Service"]["Sockets"] == SOCKET.name


def known_gaps(version: int) -> list[re.Pattern[str]]:
    """Messages an older systemd prints about settings it predates (notify-reload: v253)."""
    return [re.compile(r"Failed to parse service type, ignoring: notify-reload")] if version < 253 else []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed, so the units cannot be verified")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing about our units (beyond what an older systemd
    cannot know), with ExecStart pointing at this environment's ingestd script."""
    script = Path(sys.executable).with_name("ingestd")
    if not script.exists():
        pytest.skip(f"no ingestd console script next to {sys.executable}; install the package")
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={script}", SERVICE.read_text(encoding="utf-8"))
    (tmp_path / SERVICE.name).write_text(text, encoding="utf-8")
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    version_line = subprocess.run(["systemd-analyze", "--version"], capture_output=True,
                                  text=True, check=True).stdout
    version = int(re.search(r"systemd (\d+)", version_line).group(1))
    result = subprocess.run(["systemd-analyze", "verify", SERVICE.name, SOCKET.name],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "ingestd" in line and not any(p.search(line) for p in known_gaps(version))]
    assert result.returncode == 0, result.stderr
    assert complaints == []


def test_a_drop_in_serves_systemd_older_than_253() -> None:
    """Without notify-reload, the unit still waits for READY=1 and reloads by SIGHUP."""
    drop_in = parse(UNITS / "ingestd.service.d" / "older-systemd.conf")["Service"]
    assert drop_in["Type"] == "notify"
    assert drop_in["ExecReload"].split()[1:] == ["-HUP", "$MAINPID"]
