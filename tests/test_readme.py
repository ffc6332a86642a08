"""The README is the front door: its two set-up commands exist and CI runs the test one."""

from __future__ import annotations

import re

from conftest import REPO


def setup_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    python3 -m venv")]


def test_readme_gives_exactly_two_setup_commands():
    """One runs the daemon, one runs the tests."""
    commands = setup_commands()
    assert len(commands) == 2
    assert commands[0].endswith("ingestd run") and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run executes the very command the README gives for the tests."""
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"(?m)^" + re.escape(setup_commands()[1]) + r"$", ci)
