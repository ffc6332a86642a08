"""ingestd.words against SQLite's FTS5 (the reference): the same words, folded the same way,
for every code point; and PostgreSQL's lexemes for words longer than a tsvector takes."""

from __future__ import annotations

import sqlite3

import pytest

from ingestd import words

TOKENIZER = "unicode61 remove_diacritics 2"  # as migrations.py makes chunks_fts
CODE_POINTS = [code for code in range(1, 0x110000) if not 0xD800 <= code <= 0xDFFF]
# Planes 4 to 13 hold no character (word characters to FTS5, which does not know them): one
# code point in 101 of them is enough, and halves the time of the test of every code point.
SOME_CODE_POINTS = [code for code in CODE_POINTS
                    if not 0x40000 <= code < 0xE0000 or code % 101 == 0]


@pytest.fixture(scope="module")
def fts5():
    """An in-memory FTS5 table with the index's tokenizer; ``tokens(text)`` is what it stores."""
    connection = sqlite3.connect(":memory:")

    def tokens(*texts: str) -> list[list[str]]:
        with connection:
            connection.execute("DROP TABLE IF EXISTS v")
            connection.execute("DROP TABLE IF EXISTS t")
            connection.execute(f"CREATE VIRTUAL TABLE t USING fts5(x, tokenize='{TOKENIZER}')")
            connection.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, instance)")
            connection.executemany("INSERT INTO t (rowid, x) VALUES (?, ?)",
                                   enumerate(texts, start=1))
        found: list[list[str]] = [[] for _ in texts]
        for term, row in connection.execute("SELECT term, doc FROM v ORDER BY doc, offset"):
            found[row - 1].append(term)
        return found

    yield tokens
    connection.close()


def test_every_code_point_is_a_word_character_a_separator_or_an_accent_as_in_fts5(fts5):
    """Each character alone and between two letters: FTS5 stores it folded, or not at all (a
    separator; an accent continues the word it follows); words.words does the same. Newer
    emoji and private-use characters are words, as in FTS5."""
    def contexts(code: int) -> str:
        return f"{chr(code)} a{chr(code)}b"

    blocks = [SOME_CODE_POINTS[i:i + 4096] for i in range(0, len(SOME_CODE_POINTS), 4096)]
    texts = [" ".join(map(contexts, block)) for block in blocks]
    differ = []
    for block, text, stored in zip(blocks, texts, fts5(*texts)):
        if words.words(text) != stored:  # which characters: each on its own
            differ += [(hex(code), one, words.words(contexts(code)))
                       for code, one in zip(block, fts5(*map(contexts, block)))
                       if one != words.words(contexts(code))]
    assert differ[:20] == []


def test_folding_keeps_offsets_and_word_boundaries():
    """Every character folds to one character, a word character to a word character and a
    separator to itself: the words of the folded text are at the offsets of the original's."""
    for code in SOME_CODE_POINTS:
        character = chr(code)
        folded = words.fold(character)
        assert len(folded) == 1, hex(code)
        is_word = bool(words.WORD.fullmatch(character))
        assert bool(words.WORD.fullmatch(folded)) == is_word, hex(code)
        assert is_word or folded == character, hex(code)


SAMPLES = [
    "Invoice dated 2024-01-15 for 3.14 units, see example.com or billing@example.com.",
    "Attached: report.pdf in /srv/share/reports. Release v1.2.3, snake_case, state-of-the-art.",
    "Le café est fermé; a naïve résumé. Crème brûlée à Noël. Ǆemal, Straße, İstanbul, ǖ ǡ Ǡ.",
    "cafe\u0301 and nai\u0308ve, decomposed; a\u0335b \u0301x",  # some accents join words
    "ΟΔΟΣ ΑΘΗΝΑΣ, οδός Αθηνάς, ὁδὸς ᾎ ΐ µ ς ϐ",
    "Москва, ЁЖИК в тумане; Ӂ ӂ",
    "हिन्दी भाषा, क़लम, क़लम",  # precomposed and decomposed nukta
    "東京都の会議、资料 한국어 カタカナ ｶﾀｶﾅ Ｆｕｌｌｗｉｄｔｈ",
    "party🥳time 😀 smile 🦔hedgehog \uf0b7bullet ™ ½ x² ①",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_sample_texts_have_fts5s_words(fts5, text):
    """Latin, Greek, Cyrillic, Devanagari, CJK, emoji: the words FTS5 stores, in order."""
    [stored] = fts5(text)
    assert words.words(text) == stored


def test_spans_give_each_words_offsets_in_the_original_text():
    text = "Ἀθῆναι: ΟΔΟΣ café"
    assert [(text[start:end], word) for start, end, word in words.spans(text)] == [
        ("Ἀθῆναι", "ἀθῆναι"), ("ΟΔΟΣ", "οδοσ"), ("café", "cafe")]


def test_a_word_too_long_for_a_tsvector_gets_a_lexeme_of_its_own():
    """PostgreSQL refuses a lexeme over 2047 bytes (FTS5 takes any): a longer word becomes its
    head and a digest, so only that word (in a query too) gives that lexeme; a prefix of it
    still starts the lexeme."""
    long_a, long_b = "é" * 1500, "é" * 1499 + "f"  # 3000 bytes each, the same first 2000
    assert words.lexeme("é" * 1023) == "é" * 1023  # 2046 bytes: as it is
    lexemes = {words.lexeme(long_a), words.lexeme(long_b)}
    assert len(lexemes) == 2
    assert all(len(lexeme.encode()) <= words.MAX_LEXEME_BYTES for lexeme in lexemes)
    assert all(lexeme.startswith(words.prefix_lexeme("é" * 900)) for lexeme in lexemes)
    assert words.lexeme(long_a) == words.lexeme("é" * 1500)


def test_tsvector_input_lists_each_word_once_with_its_positions():
    assert words.tsvector("Kiwi, fig; KIWI café") == "'kiwi':1,3 'fig':2 'cafe':4"
    assert words.tsvector("... ---") == ""


def test_a_long_text_is_composed_a_piece_at_a_time_as_it_would_be_whole():
    """composed() normalizes a long text in pieces (a run of combining marks costs time
    quadratic in its length): the pieces end where nothing composes across, so the text comes
    out as NFC of the whole would give it. Random texts of accents, marks in and out of order,
    Hangul jamo, Indic and Oriya vowel signs, CJK, emoji."""
    import random
    import unicodedata

    rng = random.Random(7)
    alphabet = list("abcdefghij \n.,") + [
        "\u0301", "\u0308", "\u0327", "\u0316", "e\u0301", "\u00e9", "\u4e2d", "\u1100\u1161",
        "\u11a8", "\u0b47\u0b3e", "\u0915\u093c", "\U0001F600", "\u03bf\u0301", "\u0438\u0306"]
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(2_000, 20_000)))
        assert words.composed(text) == unicodedata.normalize("NFC", text)
    no_ascii = [letter for letter in alphabet if not letter.isascii()]
    for _ in range(50):  # no ASCII for thousands of characters: cut before other starters
        text = "".join(rng.choice(no_ascii) for _ in range(rng.randint(2_000, 20_000)))
        assert words.composed(text) == unicodedata.normalize("NFC", text)
    for text in ("あ" + unicodedata.normalize("NFD", "が" * 3000),  # decomposed: macOS
                 unicodedata.normalize("NFD", "한국어" * 2000),
                 unicodedata.normalize("NFD", "άέήίόύώ" * 800)):
        assert words.composed(text) == unicodedata.normalize("NFC", text)


def test_composing_stops_when_its_check_says_so():
    """The check (a job's deadline) is asked between pieces, and what it raises stops it."""
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise TimeoutError("past the deadline")

    with pytest.raises(TimeoutError):
        words.composed("a" + "\u0301\u0316" * 100_000, check)
    assert len(calls) == 3
