"""Names and text shown on one terminal line.

A file name may hold what would split a line (a newline, U+2028), move the cursor or recolour
the terminal (an escape sequence), or reorder or hide what follows it (a bidi override such as
U+202E, a zero-width space). Every human output shows those escaped, as the JSON output and
the event log do; letters, marks and spaces of every script are shown as they are, and so are
the joiners some scripts and emoji need (U+200C, U+200D).
"""

from __future__ import annotations

import unicodedata

# Control characters, line and paragraph separators, lone surrogates (undecodable bytes).
_HIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
# Format characters that reorder or hide text: the bidi marks, embeddings, overrides and
# isolates, zero-width space, word joiner, byte order mark, Mongolian vowel separator.
_HIDDEN_FORMATS = frozenset("\u061c\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                            "\u2060\u2066\u2067\u2068\u2069\ufeff\u180e")


def hidden(ch: str) -> bool:
    """Whether ``ch`` is shown escaped."""
    return ch in _HIDDEN_FORMATS or unicodedata.category(ch) in _HIDDEN_CATEGORIES


def one_line(text: str) -> str:
    """``text`` with every :func:`hidden` character as its escape (``\\n``, ``\\x1b``,
    ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if hidden(ch) else ch
                   for ch in text)
