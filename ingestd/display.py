"""Names and text shown on one terminal line.

A file name may hold what would split a line (a newline, U+2028), move the cursor or recolour
the terminal (an escape sequence), or reorder or hide what follows it (a bidi override such as
U+202E, a zero-width space). Every human output shows those escaped, as the JSON output and
the event log do; letters, marks and spaces of every script are shown as they are, and so are
the joiners some scripts and emoji need (U+200C, U+200D) and the format characters that show
(Arabic and Syriac number signs).
"""

from __future__ import annotations

import unicodedata

# Control and format characters (bidi controls, zero-width and tag characters, invisible
# operators, soft hyphens...), line and paragraph separators, lone surrogates (undecodable bytes).
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# Format characters that are part of words or show: the joiners, Arabic, Syriac and Kaithi
# number signs.
_SHOWN_FORMATS = frozenset("\u200c\u200d\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f"
                           "\u0890\u0891\u08e2\U000110bd\U000110cd")


def hidden(ch: str) -> bool:
    """Whether ``ch`` is shown escaped."""
    return unicodedata.category(ch) in _HIDDEN_CATEGORIES and ch not in _SHOWN_FORMATS


def one_line(text: str) -> str:
    """``text`` with every :func:`hidden` character as its escape (``\\n``, ``\\x1b``,
    ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if hidden(ch) else ch
                   for ch in text)
