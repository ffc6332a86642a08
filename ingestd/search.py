"""``ingestd search``: ranked passages from the built-in index of one project.

Query syntax (documented in the README): words (all must occur), ``"a phrase"``, ``prefix*``,
and ``OR`` between two terms. The query is parsed here and rebuilt for the database, so any
user input is either a valid search or a clear usage error, never an SQL, FTS5 or tsquery error,
and a query can never reach outside its project. SQLite ranks with FTS5's BM25; PostgreSQL with
ts_rank_cd over a tsvector column. Both see the same words (:mod:`ingestd.words`), so both find
the same passages; PostgreSQL's snippet is made here as FTS5 makes SQLite's.
"""

from __future__ import annotations

import bisect
import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import peewee as pw

from ingestd import words as words_
from ingestd.db import is_postgres
from ingestd.documents import CURRENT_JOB
from ingestd.errors import UsageError
from ingestd.models import database

DEFAULT_LIMIT = 10
MAX_LIMIT = 100
SIGNAL_CHECK_STEPS = 10_000  # SQLite VM steps between chances for Ctrl-C to stop a search
MARK_START, MARK_END, ELLIPSIS = "[", "]", "…"
SNIPPET_WORDS = 24  # a snippet's length in words, on both databases
_TOKEN = re.compile(r'"([^"]*)"|(\S+)')


@dataclass(frozen=True)
class Term:
    words: tuple[str, ...]   # one word, or a phrase; folded (words.fold)
    prefix: bool = False


@dataclass(frozen=True)
class Hit:
    score: float
    snippet: str
    page: int | None
    source_path: str
    job_id: int | None
    document_id: int


def parse(query: str) -> list[list[Term]]:
    """The query as OR-groups of terms that must all match; UsageError when malformed."""
    if query.count('"') % 2:
        raise UsageError('malformed query: a " is not closed')
    groups: list[list[Term]] = [[]]
    for phrase, word in _TOKEN.findall(words_.composed(query)):
        if word == "OR":
            if not groups[-1]:
                raise UsageError("malformed query: OR needs a term on each side")
            groups.append([])
            continue
        text, prefix = (phrase, False) if phrase or not word else (word.rstrip("*"), word.endswith("*"))
        found = tuple(words_.words(text))
        if found:  # punctuation alone is no term (the index does not store it either)
            groups[-1].append(Term(found, prefix))
    if not groups[-1]:
        if len(groups) > 1:
            raise UsageError("malformed query: OR needs a term on each side")
        raise UsageError("malformed query: it has no word to search for" if query.strip()
                         else "malformed query: it is empty")
    return _without_repeats(groups)


def _without_repeats(groups: list[list[Term]]) -> list[list[Term]]:
    """The same terms, each once per group, and each group once: a repeat matches nothing more,
    and FTS5's time grows with the square of a term's repeats (40 times one common word took
    8.7 s on a 3 MB document)."""
    unique_groups = dict.fromkeys(tuple(dict.fromkeys(group)) for group in groups)
    return [list(group) for group in unique_groups]


def _fts5(groups: list[list[Term]]) -> str:
    def term(t: Term) -> str:
        return '"' + " ".join(t.words) + '"' + ("*" if t.prefix else "")

    return " OR ".join("(" + " AND ".join(term(t) for t in group) + ")" for group in groups)


def _tsquery(groups: list[list[Term]]) -> str:
    """tsquery input, read as it is (no parser, no dictionary: nothing depends on the locale)."""
    def term(t: Term) -> str:
        lexemes = [words_.quoted(words_.lexeme(w)) for w in t.words]
        if t.prefix:
            lexemes[-1] = words_.quoted(words_.prefix_lexeme(t.words[-1])) + ":*"
        if len(lexemes) == 1:
            return lexemes[0]
        # A chunk whose positions PostgreSQL cut is taken by the phrase's words alone, and
        # the phrase checked in its text (see search()).
        cut = words_.quoted(words_.POSITIONS_CUT)
        return f"(({' <-> '.join(lexemes)}) | ({' & '.join(lexemes)} & {cut}))"

    return " | ".join("(" + " & ".join(term(t) for t in group) + ")" for group in groups)


# The job a passage is shown with: the oldest current job of its document (a newer version of
# a path, or the deletion of a job, passes the document on), and that job's path. Of the
# document's project: another project's sink may number its own documents alike.
_SHOWN_JOB = f"""(SELECT j.id FROM ingest_jobs j WHERE j.canonical_document_id = d.id
                 AND j.project_id = d.project_id AND {CURRENT_JOB} ORDER BY j.id LIMIT 1)"""

# ORDER BY rank (bm25 with default weights) lets FTS5 hand the matches over best first, so
# SQLite needs no sort of its own and computes snippets only for the rows it returns; with
# ORDER BY bm25(...) it made a snippet for every match, then sorted (p50 halved at 30,000
# documents, the same results).
_SQLITE = f"""
SELECT -chunks_fts.rank AS score,
       snippet(chunks_fts, 0, '{MARK_START}', '{MARK_END}', '{ELLIPSIS}', {SNIPPET_WORDS})
           AS snippet,
       c.page, d.source_path, {_SHOWN_JOB} AS job_id, d.id
FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid JOIN documents d ON d.id = c.document_id
WHERE chunks_fts MATCH ? AND c.project_id = ? AND d.deleted_at IS NULL
ORDER BY chunks_fts.rank LIMIT ?"""

# The chunk's text comes back whole: its snippet is made in Python (ts_headline's parser sees
# other words than the index: no "example" in "example.com", no "cafe" in "café").
_POSTGRES = f"""
SELECT ts_rank_cd(c.tsv, q) AS score,
       coalesce(c.text, substr(d.text, c.start_offset + 1, c.end_offset - c.start_offset))
           AS snippet,
       c.page, d.source_path, {_SHOWN_JOB} AS job_id, d.id
FROM chunks c JOIN documents d ON d.id = c.document_id, CAST(%s AS tsquery) q
WHERE c.tsv @@ q AND c.project_id = %s AND d.deleted_at IS NULL
ORDER BY score DESC LIMIT %s"""

# The hits, each with its shown job's path (the document's first path if no job is current).
_WITH_PATHS = """
SELECT h.score, h.snippet, h.page, COALESCE(j.source_path, h.source_path), h.job_id, h.id
FROM ({hits}) h LEFT JOIN ingest_jobs j ON j.id = h.job_id ORDER BY h.score DESC"""


def search(project_id: str, query: str, limit: int = DEFAULT_LIMIT) -> list[Hit]:
    """The best-matching passages of ``project_id``'s live documents, best first."""
    groups = parse(query)
    limit = max(1, min(int(limit), MAX_LIMIT))
    postgres = is_postgres()
    if postgres:
        hits, expression = _POSTGRES, _tsquery(groups)
    else:
        hits, expression = _SQLITE, _fts5(groups)
    sql = _WITH_PATHS.format(hits=hits)
    try:
        with _stoppable():
            rows = database.execute_sql(sql, (expression, project_id, limit)).fetchall()
    except pw.OperationalError as exc:
        if str(exc) == "interrupted":  # a signal handler raised in _stoppable's callback
            raise KeyboardInterrupt from None
        raise UsageError(f"malformed query: {exc}") from None  # parse() should prevent it
    if postgres and any(len(term.words) > 1 for group in groups for term in group):
        rows = [row for row in rows if _holds(row[1], groups)]
    return [Hit(float(score), " ".join((make_snippet(text, groups) if postgres else text).split()),
                page, path, job_id, document_id)
            for score, text, page, path, job_id, document_id in rows]


def _holds(text: str, groups: list[list[Term]]) -> bool:
    """Whether the passage matches the query, phrases included (PostgreSQL takes a chunk
    whose word positions it cut by the phrases' words alone)."""
    folded = [word for _, _, word in words_.spans(text)]
    return any(all(_occurrences(folded, term) for term in group) for group in groups)


def make_snippet(text: str, groups: list[list[Term]], size: int = SNIPPET_WORDS) -> str:
    """The passage's snippet as FTS5's ``snippet()`` makes it on SQLite: the window of ``size``
    words that holds the most different matched terms (a window starting a sentence preferred),
    matches in brackets (a phrase in one pair), an ellipsis where text is cut."""
    tokens = words_.spans(text)
    if not tokens:
        return text
    folded = [word for _, _, word in tokens]
    found = {term: _occurrences(folded, term) for group in groups for term in group}
    # FTS5's phrases are the terms in query order, a term of two groups twice. It lists the
    # matches as (position, phrase), in position order, and none of a group that does not match.
    phrases = [(term, all(found[other] for other in group)) for group in groups for term in group]
    matches = sorted((position, phrase) for phrase, (term, group_matched) in enumerate(phrases)
                     if group_matched for position in found[term])
    length = [len(term.words) for term, _ in phrases]
    start = _best_window(text, tokens, matches, length, size)
    return _marked(text, tokens, matches, length, start, size)


def _occurrences(folded: list[str], term: Term) -> list[int]:
    """Where ``term`` (a word, a phrase, a prefix) starts among a passage's folded words."""
    *whole, last = term.words
    span = len(term.words)
    return [position for position in range(len(folded) - span + 1)
            if all(folded[position + k] == word for k, word in enumerate(whole))
            and (folded[position + span - 1].startswith(last) if term.prefix
                 else folded[position + span - 1] == last)]


def _best_window(text: str, tokens: list[tuple[int, int, str]], matches: list[tuple[int, int]],
                 length: list[int], size: int) -> int:
    """The first word of the snippet, chosen by FTS5's scores: 1000 for each term first seen in
    the window, 1 for each repeat, plus 100 (120 at the text's start) for starting a sentence."""
    count = len(tokens)
    offsets = [position for position, _ in matches]

    def score(first_word: int) -> tuple[int, int]:
        """The window's score and the start that centres its matches."""
        seen: set[int] = set()
        total, first, last = 0, -1, 0
        for position, phrase in matches[bisect.bisect_left(offsets, first_word):
                                        bisect.bisect_left(offsets, first_word + size)]:
            total += 1 if phrase in seen else 1000
            seen.add(phrase)
            first = position if first < 0 else first
            last = position + length[phrase]
        centred = first - int((size - (last - first)) / 2)  # C's division: toward zero
        return total, max(min(centred, count - size), 0)

    # A sentence starts at the first word, and at a word after a "." or ":" and white space;
    # FTS5 looks for them only in a text longer than a snippet.
    sentences = [0]
    if count > size:
        sentences += [index for index in range(1, count)
                      if _after_sentence_end(text, tokens[index][0])]
    best_score, best_start = 0, 0
    for position, _ in matches:
        total, centred = score(position)
        if total > best_score:
            best_score, best_start = total, centred
        if count > size:
            sentence = sentences[bisect.bisect_right(sentences, position) - 1]
            if sentence < position:
                total = score(sentence)[0] + (120 if sentence == 0 else 100)
                if total > best_score:
                    best_score, best_start = total, sentence
    return best_start


def _after_sentence_end(text: str, start: int) -> bool:
    index = start - 1
    while index >= 0 and text[index] in " \t\n\r":
        index -= 1
    return 0 <= index < start - 1 and text[index] in ".:"


def _marked(text: str, tokens: list[tuple[int, int, str]], matches: list[tuple[int, int]],
            length: list[int], start: int, size: int) -> str:
    """Words ``start`` to ``start + size - 1`` of the text, each run of overlapping matches in
    one pair of marks (a run that starts before the window is not marked)."""
    count = len(tokens)
    end = min(start + size, count) - 1
    runs: list[list[int]] = []
    for position, phrase in matches:
        last = position + length[phrase] - 1
        if runs and position <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], last)
        else:
            runs.append([position, last])
    out = [ELLIPSIS] if start > 0 else []
    cursor = tokens[start][0] if start > 0 else 0
    for first, last in runs:
        if start <= first <= end:
            last = min(last, end)
            out += [text[cursor:tokens[first][0]], MARK_START,
                    text[tokens[first][0]:tokens[last][1]], MARK_END]
            cursor = tokens[last][1]
    out.append(text[cursor:tokens[end][1]])
    out.append(text[tokens[end][1]:] if start + size >= count else ELLIPSIS)
    return "".join(out)


@contextlib.contextmanager
def _stoppable() -> Iterator[None]:
    """Let Ctrl-C stop a long search (one that ranks most of a large index) at once.

    Python runs signal handlers between its own instructions, never inside a call into
    SQLite, so KeyboardInterrupt would wait for the query to end. SQLite calls back into Python
    every SIGNAL_CHECK_STEPS steps instead; a handler that raises there makes the query fail
    as "interrupted" (the exception itself is dropped: search() raises it again). psycopg
    waits for PostgreSQL in Python, where signals are handled already."""
    if is_postgres():
        yield
        return
    connection = database.connection()
    connection.set_progress_handler(_carry_on, SIGNAL_CHECK_STEPS)
    try:
        yield
    finally:
        connection.set_progress_handler(None, SIGNAL_CHECK_STEPS)


def _carry_on() -> int:
    return 0  # non-zero would abort the query

