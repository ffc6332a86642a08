"""Include and exclude patterns: which files a project takes."""

from __future__ import annotations

import dataclasses
import fnmatch

import pytest

from ingestd import config as config_mod
from ingestd.paths import ProjectMap, is_excluded_name

PATTERN_SETS = (config_mod.DEFAULT_EXCLUDE, ("*",), ("*.txt", "*.[mM][dD]", "report-??.csv"),
                ("[!a-c]*", "*[*]*", "a[", "x$y*", "(*)", "*.tx?"), ())
NAMES = (".hidden", "x.part", "a.tmp", "z.crdownload", "~$doc.docx", ".~lock.f#", "f.swp",
         "plain.txt", "README.MD", "notes.md", "report-01.csv", "report-1.csv", "b", "d",
         "star*name", "a[", "x$yz", "(p)", "q.txt\n", "multi\nline.txt", "e\u0301t\u00e9.tx\u00e9",
         "", "f.part.txt")


@pytest.mark.parametrize("patterns", PATTERN_SETS)
def test_include_and_exclude_match_as_fnmatchcase_does(tmp_path, patterns):
    """A project's patterns are matched with one regular expression (the settler asks for every
    file): a name is excluded, or included, exactly when fnmatchcase says a pattern matches."""
    excluding = config_mod.ProjectConfig(name="p", folders=(tmp_path,), exclude=patterns)
    including = dataclasses.replace(excluding, include=patterns, exclude=())
    for name in NAMES:
        expected = any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        assert is_excluded_name(excluding, name) == expected, name
        if name:
            found = ProjectMap([including]).wanted_in(str(tmp_path / name))
            assert found == ((including, tmp_path) if expected else None), name
