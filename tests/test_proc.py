"""ingestd.proc and command.programs_of against real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from ingestd import proc
from ingestd.sinks import command


def waiting(argv: list[str], **options) -> subprocess.Popen:
    """A process that waits on its stdin until the test closes it."""
    return subprocess.Popen(argv + ["-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE, **options)


def end(*processes: subprocess.Popen) -> None:
    for process in processes:
        process.kill()
        process.wait()


def test_a_name_with_spaces_and_parentheses_does_not_shift_the_fields(tmp_path):
    """The name comes in parentheses before the fields and may hold anything, ") S 1 1 (" too."""
    odd = tmp_path / "x) S 1 1 (y"
    odd.symlink_to(sys.executable)
    child = waiting([str(odd)], start_new_session=True)
    try:
        info = proc.stat(child.pid)
        assert info is not None and (info.ppid, info.session) == (os.getpid(), child.pid)
    finally:
        end(child)
    assert proc.stat(child.pid) is None  # reaped: gone


def test_only_children_leading_a_session_are_sink_programs():
    """A worker's extraction processes share its session: they are not the programs killed."""
    program = waiting([sys.executable], start_new_session=True)
    helper = waiting([sys.executable])
    try:
        found = command.programs_of([os.getpid()])
        assert program.pid in found and helper.pid not in found
        assert command.programs_of([helper.pid]) == []
    finally:
        end(program, helper)


def test_a_stopped_process_is_seen_stopped_and_a_running_one_is_not():
    child = waiting([sys.executable])
    try:
        assert proc.wait_stopped([child.pid], 0.05) is False  # waiting on stdin, not stopped
        os.kill(child.pid, signal.SIGSTOP)
        assert proc.wait_stopped([child.pid], 10) is True
        assert proc.stat(child.pid).state == b"T"
    finally:
        end(child)
    assert proc.wait_stopped([child.pid], 0.05) is True  # gone
