"""The kernel says whether some process holds a file open for writing (a read lease probe)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ingestd import writers
from ingestd.writers import open_for_writing

from conftest import held


def test_a_file_held_open_for_writing_by_another_process_is_seen(tmp_path, leases_allowed):
    path = tmp_path / "scan.pdf"
    path.write_bytes(b"%PDF-1.7 partial")
    assert open_for_writing(str(path)) is False
    with held(path, "ab"):
        assert open_for_writing(str(path)) is True
    assert open_for_writing(str(path)) is False


def test_readers_do_not_count_and_a_writable_mapping_does(tmp_path, leases_allowed):
    path = tmp_path / "mapped.bin"
    path.write_bytes(b"x" * 4096)
    with held(path, "rb"):
        assert open_for_writing(str(path)) is False
    with held(path, "mapped"):
        assert open_for_writing(str(path)) is True


def test_no_answer_while_a_broken_lease_could_end_the_process(tmp_path):
    """With SIGIO at its default (end the process) no lease is taken at all."""
    path = tmp_path / "a.txt"
    path.write_text("x")
    assert signal.getsignal(signal.SIGIO) is signal.SIG_DFL
    assert open_for_writing(str(path)) is None


def test_no_answer_for_a_missing_file_or_a_fifo(tmp_path, leases_allowed):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert open_for_writing(str(tmp_path / "gone.txt")) is None
    assert open_for_writing(str(fifo)) is None  # opened without blocking; no lease on a FIFO


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_no_answer_for_another_users_file_without_cap_lease():
    """The kernel grants leases on one's own files only (or with CAP_LEASE, which the unit
    grants): another user's file, readable to us, gets None, and the settler waits for its
    close as before."""
    folder = Path(tempfile.mkdtemp(prefix="ingestd-writers-"))  # pytest's tmp is root's alone
    try:
        folder.chmod(0o755)
        path = folder / "theirs.txt"
        path.write_text("dropped by someone else")
        # The other user runs the module (stdlib only) from the shared folder and the real
        # interpreter: a checkout or venv under a private folder (mktemp -d) is not theirs.
        shutil.copy(writers.__file__, folder / "writers.py")
        probe = ("import signal, sys; signal.signal(signal.SIGIO, signal.SIG_IGN); "
                 "from writers import open_for_writing; "
                 "open(sys.argv[1]).close(); print(open_for_writing(sys.argv[1]))")
        env = {**os.environ, "PYTHONPATH": str(folder)}
        answer = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 os.path.realpath(sys.executable), "-c", probe, str(path)],
                                capture_output=True, text=True, env=env, timeout=30)
        assert answer.stdout.strip() == "None", answer.stderr
    finally:
        shutil.rmtree(folder)
