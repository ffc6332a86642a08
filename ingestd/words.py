"""What a word is, for the full-text index and for queries, on both databases.

SQLite's FTS5 index (tokenizer ``unicode61 remove_diacritics 2``) is the reference. PostgreSQL's
index is written by ingestd from the words defined here, and queries are split into words here
for both, so one corpus and one query give the same hits on either database, whatever the
database's locale, and without extensions.

A word is a run of characters at which FTS5 does not separate words. FTS5 takes its separators
from its own Unicode tables (Unicode 6.1, unchanged for years): letters, digits and private-use
characters are word characters, and so is every character those tables do not know (newer
emoji, newer scripts); punctuation, symbols, spaces, "_" and combining marks separate words,
except 25 combining accents (U+0300 to U+0331), which continue a word they follow and are left
out of it ("nai\u0308ve" is "naive"). A word is then folded as FTS5 folds it: to lower case by
simple case folding ("Σ" and "ς" both become "σ"), and without the diacritics of Latin letters
("é" becomes "e"; Greek "ά" keeps its accent). tests/test_words.py checks all this against the
SQLite in use, for every code point.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from typing import Callable

# FTS5's separators (SQLite 3.40 measured, code point by code point), as hexadecimal ranges.
_SEPARATORS = (
    "0-2F 3A-40 5B-60 7B-A9 AB-B1 B4 B6-B8 BB BF D7 F7 2C2-2C5 2D2-2DF 2E5-2EB 2ED 2EF-36F "
    "375 37E 384-385 387 3F6 482-489 55A-55F 589-58A 58F 591-5C7 5F3-5F4 600-604 606-61B "
    "61E-61F 64B-65F 66A-66D 670 6D4 6D6-6E4 6E7-6ED 6FD-6FE 700-70D 70F 711 730-74A "
    "7A6-7B0 7EB-7F3 7F6-7F9 816-819 81B-823 825-827 829-82D 830-83E 859-85B 85E 8E4-8FE "
    "900-903 93A-93C 93E-94F 951-957 962-965 970 981-983 9BC 9BE-9C4 9C7-9C8 9CB-9CD 9D7 "
    "9E2-9E3 9F2-9F3 9FA-9FB A01-A03 A3C A3E-A42 A47-A48 A4B-A4D A51 A70-A71 A75 A81-A83 "
    "ABC ABE-AC5 AC7-AC9 ACB-ACD AE2-AE3 AF0-AF1 B01-B03 B3C B3E-B44 B47-B48 B4B-B4D "
    "B56-B57 B62-B63 B70 B82 BBE-BC2 BC6-BC8 BCA-BCD BD7 BF3-BFA C01-C03 C3E-C44 C46-C48 "
    "C4A-C4D C55-C56 C62-C63 C7F C82-C83 CBC CBE-CC4 CC6-CC8 CCA-CCD CD5-CD6 CE2-CE3 "
    "D02-D03 D3E-D44 D46-D48 D4A-D4D D57 D62-D63 D79 D82-D83 DCA DCF-DD4 DD6 DD8-DDF "
    "DF2-DF4 E31 E34-E3A E3F E47-E4F E5A-E5B EB1 EB4-EB9 EBB-EBC EC8-ECD F01-F1F F34-F3F "
    "F71-F87 F8D-F97 F99-FBC FBE-FCC FCE-FDA 102B-103E 104A-104F 1056-1059 105E-1060 "
    "1062-1064 1067-106D 1071-1074 1082-108D 108F 109A-109F 10FB 135D-1368 1390-1399 1400 "
    "166D-166E 1680 169B-169C 16EB-16ED 1712-1714 1732-1736 1752-1753 1772-1773 17B4-17D6 "
    "17D8-17DB 17DD 1800-180E 18A9 1920-192B 1930-193B 1940 1944-1945 19B0-19C0 19C8-19C9 "
    "19DE-19FF 1A17-1A1B 1A1E-1A1F 1A55-1A5E 1A60-1A7C 1A7F 1AA0-1AA6 1AA8-1AAD 1B00-1B04 "
    "1B34-1B44 1B5A-1B7C 1B80-1B82 1BA1-1BAD 1BE6-1BF3 1BFC-1BFF 1C24-1C37 1C3B-1C3F "
    "1C7E-1C7F 1CC0-1CC7 1CD0-1CE8 1CED 1CF2-1CF4 1DC0-1DE6 1DFC-1DFF 1FBD 1FBF-1FC1 "
    "1FCD-1FCF 1FDD-1FDF 1FED-1FEF 1FFD-1FFE 2000-2064 206A-206F 207A-207E 208A-208E "
    "20A0-20B9 20D0-20F0 2100-2101 2103-2106 2108-2109 2114 2116-2118 211E-2123 2125 2127 "
    "2129 212E 213A-213B 2140-2144 214A-214D 214F 2190-23F3 2400-2426 2440-244A 249C-24E9 "
    "2500-26FF 2701-2775 2794-2B4C 2B50-2B59 2CE5-2CEA 2CEF-2CF1 2CF9-2CFC 2CFE-2CFF 2D70 "
    "2D7F 2DE0-2E2E 2E30-2E3B 2E80-2E99 2E9B-2EF3 2F00-2FD5 2FF0-2FFB 3000-3004 3008-3020 "
    "302A-3030 3036-3037 303D-303F 3099-309C 30A0 30FB 3190-3191 3196-319F 31C0-31E3 "
    "3200-321E 322A-3247 3250 3260-327F 328A-32B0 32C0-32FE 3300-33FF 4DC0-4DFF A490-A4C6 "
    "A4FE-A4FF A60D-A60F A66F-A67E A69F A6F0-A6F7 A700-A716 A720-A721 A789-A78A A802 A806 "
    "A80B A823-A82B A836-A839 A874-A877 A880-A881 A8B4-A8C4 A8CE-A8CF A8E0-A8F1 A8F8-A8FA "
    "A926-A92F A947-A953 A95F A980-A983 A9B3-A9CD A9DE-A9DF AA29-AA36 AA43 AA4C-AA4D "
    "AA5C-AA5F AA77-AA79 AA7B AAB0 AAB2-AAB4 AAB7-AAB8 AABE-AABF AAC1 AADE-AADF AAEB-AAF1 "
    "AAF5-AAF6 ABE3-ABED D800-DFFF FB1E FB29 FBB2-FBC1 FD3E-FD3F FDFC-FDFD FE00-FE19 "
    "FE20-FE26 FE30-FE52 FE54-FE66 FE68-FE6B FEFF FF01-FF0F FF1A-FF20 FF3B-FF40 FF5B-FF65 "
    "FFE0-FFE6 FFE8-FFEE FFF9-FFFF 10100-10102 10137-1013F 10179-10189 10190-1019B "
    "101D0-101FD 1039F 103D0 10857 1091F 1093F 10A01-10A03 10A05-10A06 10A0C-10A0F "
    "10A38-10A3A 10A3F 10A50-10A58 10A7F 10B39-10B3F 11000-11002 11038-1104D 11080-11082 "
    "110B0-110C1 11100-11102 11127-11134 11140-11143 11180-11182 111B3-111C0 111C5-111C8 "
    "116AB-116B7 12470-12473 16F51-16F7E 16F8F-16F92 1D000-1D0F5 1D100-1D126 1D129-1D1DD "
    "1D200-1D245 1D300-1D356 1D6C1 1D6DB 1D6FB 1D715 1D735 1D74F 1D76F 1D789 1D7A9 1D7C3 "
    "1EEF0-1EEF1 1F000-1F02B 1F030-1F093 1F0A0-1F0AE 1F0B1-1F0BE 1F0C1-1F0CF 1F0D1-1F0DF "
    "1F110-1F12E 1F130-1F16B 1F170-1F19A 1F1E6-1F202 1F210-1F23A 1F240-1F248 1F250-1F251 "
    "1F300-1F320 1F330-1F335 1F337-1F37C 1F380-1F393 1F3A0-1F3C4 1F3C6-1F3CA 1F3E0-1F3F0 "
    "1F400-1F43E 1F440 1F442-1F4F7 1F4F9-1F4FC 1F500-1F53D 1F540-1F543 1F550-1F567 "
    "1F5FB-1F640 1F645-1F64F 1F680-1F6C5 1F700-1F773 E0001 E0020-E007F E0100-E01EF "
)
# Combining accents that continue a word (FTS5's sqlite3Fts5UnicodeIsdiacritic), left out of it.
_DIACRITICS = "300-304 306-30C 30F 311 31B 323-328 32D-32E 330-331"
# Letters Python folds and FTS5 does not: Unicode gave them their case pairs after FTS5's tables
# were made. Above U+FFFF, FTS5 folds Deseret only.
_UNFOLDED = (
    "1E1 37F 528 52A 52C 52E 13F8-13FD 1C80-1C88 1C90-1CBA 1CBD-1CBF 2C2F A698 A69A A796 A798 "
    "A79A A79C A79E A7AB-A7AE A7B0-A7B4 A7B6 A7B8 A7BA A7BC A7BE A7C0 A7C2 A7C4-A7C7 A7C9 A7D0 "
    "A7D6 A7D8 A7F5 AB70-ABBF 10000-103FF 10428-10FFFF"
)
_FOLD_EXCEPTIONS = {"\u0130": "i",            # İ: Python makes it "i" and a combining dot
                    "\u01e0": "\u01e1"}       # Ǡ: FTS5 keeps the dot and macron of ǡ

MAX_LEXEME_BYTES = 2047  # PostgreSQL's limit for a lexeme
MAX_POSITION, MAX_POSITIONS = 16383, 256  # what a tsvector keeps: a word's place, a word's places
POSITIONS_CUT = "#positions-cut"  # no word is this ("#" and "-" separate words)
# A longer word (FTS5 takes any length) is indexed on PostgreSQL as its first 2000 bytes, a
# space (no word has one) and a digest of the whole word: the same word in a query gives the
# same lexeme, so it matches where SQLite matches it, and never more than the one word.
LONG_WORD_HEAD_BYTES = 2000


def _ranges(spec: str) -> list[tuple[int, int]]:
    """``2F 3A-40 ...`` as (first, last) code points."""
    ranges = []
    for item in spec.split():
        first, _, last = item.partition("-")
        ranges.append((int(first, 16), int(last or first, 16)))
    return ranges


def _class(ranges: list[tuple[int, int]]) -> str:
    """The body of a regular expression class matching ``ranges``."""
    return "".join(re.escape(chr(first)) + ("-" + re.escape(chr(last)) if last > first else "")
                   for first, last in ranges)


def _words_between(low: int, high: int) -> list[tuple[int, int]]:
    """The code points from ``low`` to ``high`` that are no separators, as ranges."""
    ranges, next_ = [], low
    for first, last in _ranges(_SEPARATORS):
        if last < low or first > high:
            continue
        if first > next_:
            ranges.append((next_, first - 1))
        next_ = max(next_, last + 1)
    if next_ <= high:
        ranges.append((next_, high))
    return ranges


# A class of code points up to U+FFFF only is a bitmap to Python's re, fast; one reaching
# beyond is a list of ranges searched one by one (8 times slower over plain text). So the
# word pattern has both, and text without characters beyond U+FFFF takes the first only.
_BMP, _ASTRAL = _class(_words_between(0, 0xFFFF)), _class(_words_between(0x10000, 0x10FFFF))
_ACCENT = _class(_ranges(_DIACRITICS))
_BMP_WORD = re.compile(f"[{_BMP}][{_BMP}{_ACCENT}]*")
WORD = re.compile(f"(?:[{_BMP}]|[{_ASTRAL}])(?:[{_BMP}{_ACCENT}]|[{_ASTRAL}])*")
_IS_WORD = re.compile(f"(?:[{_BMP}]|[{_ASTRAL}])+$")
# One character between words (an accent continues the word before it).
SEPARATOR = re.compile(f"[^{_BMP}{_ASTRAL}{_ACCENT}]")
_IS_ACCENT = re.compile(f"[{_ACCENT}]")
_IS_UNFOLDED = re.compile(f"[{_class(_ranges(_UNFOLDED))}]")


def _fold_character(character: str) -> str:
    """One character as FTS5 folds it; a separator stays as it is."""
    if character in _FOLD_EXCEPTIONS:
        return _FOLD_EXCEPTIONS[character]
    if _IS_UNFOLDED.match(character) or not _IS_WORD.match(character):
        return character
    folded = character.casefold()
    if len(folded) != 1:  # full case folding ("ß" -> "ss"): FTS5 folds one character to one
        folded = character.lower()
        if len(folded) != 1:
            folded = character
    # A Latin letter with diacritics: its letter (remove_diacritics 2 takes off several).
    decomposed = unicodedata.normalize("NFD", folded)
    if (len(decomposed) > 1 and decomposed[0].isascii()
            and all(unicodedata.combining(mark) for mark in decomposed[1:])):
        return decomposed[0]
    return folded


class _Folds(dict):
    """str.translate's table: each character's fold, worked out the first time it is seen."""

    def __missing__(self, code: int) -> str:
        folded = self[code] = _fold_character(chr(code))
        return folded


_FOLDS = _Folds()


def fold(text: str) -> str:
    """``text`` with each word character folded as FTS5 folds it, one character for one (so
    offsets hold), a word character to a word character, separators (and accents) unchanged."""
    return text.lower() if text.isascii() else text.translate(_FOLDS)


# The Latin typographic ligatures, spelled out. PDF producers write "ﬁ" (U+FB01) for the glyph
# of f and i; FTS5 takes it for a letter of its own, and "office" would not find "oﬃce". NFKC
# spells them out too, but also changes characters that mean something (superscripts,
# full-width forms).
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi",
                            "\ufb04": "ffl", "\ufb05": "st", "\ufb06": "st"})
_LIGATURE_CHARS = "".join(map(chr, _LIGATURES))


def composed(text: str, check: Callable[[], None] = lambda: None) -> str:
    """``text`` in Unicode's composed form (NFC) with its ligatures spelled out, as extracted
    text is stored and queries are read. An accent comes as one character with its letter
    ("é") or as a combining mark after it ("e\u0301": macOS file names, some PDF producers),
    and FTS5 tells the two apart outside Latin: a decomposed Russian "й" would be indexed as
    "и", a Greek "ό" as "ο". ``check()`` is called between pieces (see :func:`_nfc`): it
    raises to stop."""
    if text.isascii():
        return text
    text = _nfc(text, check)
    # translate() maps character by character in Python's own loop (5 s for 90 MB): only
    # where there is a ligature to spell out.
    return text.translate(_LIGATURES) if any(map(text.__contains__, _LIGATURE_CHARS)) else text


NFC_PIECE = 1024  # characters normalized at a time
_ASCII = re.compile(r"[\x00-\x7f]")


def _nfc(text: str, check: Callable[[], None]) -> str:
    """NFC a piece at a time. Reordering a run of combining marks takes time quadratic in its
    length, in C holding the GIL: a worker froze for minutes on a file of 1 MB of marks, its
    heartbeat starved, its lease lost. A piece ends before a character that nothing before it
    composes with or reorders across (see :func:`_cut`), so the text comes out as NFC of the
    whole gives it; only a run of more than NFC_PIECE marks is cut anywhere."""
    if len(text) <= 2 * NFC_PIECE:
        return unicodedata.normalize("NFC", text)
    if unicodedata.is_normalized("NFC", text):  # linear: most text, CJK without a space too
        return text
    pieces, start, size = [], 0, len(text)
    while start < size:
        end = _cut(text, start + NFC_PIECE) if start + NFC_PIECE < size else size
        pieces.append(unicodedata.normalize("NFC", text[start:end]))
        start = end
        check()
    return "".join(pieces)


def _cut(text: str, at: int) -> int:
    """Where a piece may end, from ``at`` on: before an ASCII character (no composition has
    one second), else before a starter that is no composition's second either (a decomposed
    Japanese or Korean paragraph has no ASCII for thousands of characters)."""
    found = _ASCII.search(text, at, at + NFC_PIECE)
    if found:
        return found.start()
    seconds = _composing_starters()
    for index in range(at, min(at + NFC_PIECE, len(text))):
        if not unicodedata.combining(text[index]) and text[index] not in seconds:
            return index
    return at  # marks by the thousand: no text composes so, nothing is lost but their order


@functools.cache
def _composing_starters() -> frozenset[str]:
    """Starters (combining class 0) that NFC joins to the character before them: the second
    of a two-character canonical decomposition (some Indic vowel signs, kana voicing marks
    are not starters), and Hangul's vowel and final jamo."""
    found = {chr(code) for code in (*range(0x1161, 0x1176), *range(0x11A8, 0x11C3))}
    for code in range(0x110000):
        parts = unicodedata.decomposition(chr(code)).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            second = chr(int(parts[1], 16))
            if not unicodedata.combining(second):
                found.add(second)
    return frozenset(found)


def _pattern(text: str) -> re.Pattern:
    return _BMP_WORD if text.isascii() or max(text) <= "\uffff" else WORD


def words(text: str) -> list[str]:
    """The folded words of ``text``, in order."""
    found = _pattern(text).findall(fold(text))
    if not text.isascii() and _IS_ACCENT.search(text):
        return [_IS_ACCENT.sub("", word) for word in found]
    return found


def spans(text: str) -> list[tuple[int, int, str]]:
    """Each word of ``text`` as ``(start, end, folded word)``, offsets in characters (of the
    word with the combining accents it holds)."""
    found = [(match.start(), match.end(), match.group())
             for match in _pattern(text).finditer(fold(text))]
    if not text.isascii() and _IS_ACCENT.search(text):
        return [(start, end, _IS_ACCENT.sub("", word)) for start, end, word in found]
    return found


def lexeme(word: str) -> str:
    """PostgreSQL's lexeme for a folded word."""
    if len(word) <= MAX_LEXEME_BYTES // 4:  # 4 bytes a character at most: short enough
        return word
    encoded = word.encode()
    if len(encoded) <= MAX_LEXEME_BYTES:
        return word
    return f"{_head(encoded)} {hashlib.blake2b(encoded, digest_size=16).hexdigest()}"


def prefix_lexeme(prefix: str) -> str:
    """PostgreSQL's lexeme for a folded prefix (followed by ``:*``). A prefix longer than a
    long word's head is cut to that length: past it, a long word's lexeme is its digest."""
    encoded = prefix.encode()
    return prefix if len(encoded) <= LONG_WORD_HEAD_BYTES else _head(encoded)


def _head(encoded: bytes) -> str:
    return encoded[:LONG_WORD_HEAD_BYTES].decode("utf-8", "ignore")  # no cut character


def quoted(lexeme: str) -> str:
    """A lexeme as tsvector and tsquery input take it. A word has no quote or backslash (both
    separate words) and a long word's lexeme adds a space and hexadecimal digits only, so
    quotes around it are enough."""
    return f"'{lexeme}'"


def tsvector(text: str) -> str:
    """``text``'s words as PostgreSQL's tsvector input (for ``CAST(%s AS tsvector)``), with
    their positions as FTS5 counts them (from 1 here), so phrases match as on SQLite.
    PostgreSQL takes positions up to 16383 (a later word counts as 16383) and 256 of one word:
    a text past either limit also gets the lexeme :data:`POSITIONS_CUT`, so that a phrase
    search takes it by its words alone and checks the phrase in its text (search.py)."""
    positions: dict[str, list[int]] = {}
    count = 0
    for count, word in enumerate(words(text), start=1):
        seen = positions.get(word)
        if seen is None:
            positions[word] = [count]
        else:
            seen.append(count)
    cut = count > MAX_POSITION or any(len(seen) > MAX_POSITIONS for seen in positions.values())
    entries = [f"'{lexeme(word)}':{','.join(map(str, seen)) if len(seen) > 1 else seen[0]}"
               for word, seen in positions.items()]
    return " ".join(entries + [quoted(POSITIONS_CUT)] if cut else entries)
