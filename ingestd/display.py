"""Names and text shown on one terminal line.

A file name may hold what would split a line (a newline, U+2028), move the cursor or recolour
the terminal (an escape sequence), or reorder or hide what follows it (U+202E, U+200B). Every
human output shows those escaped, as the JSON output and the event log do; letters, marks and
spaces of every script are shown as they are.
"""

from __future__ import annotations

import unicodedata

# Control, format (bidi overrides, zero-width), line/paragraph separators, lone surrogates.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def one_line(text: str) -> str:
    """``text`` with every character of :data:`_HIDDEN_CATEGORIES` as its escape (``\\n``,
    ``\\x1b``, ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch) in _HIDDEN_CATEGORIES else ch for ch in text)
