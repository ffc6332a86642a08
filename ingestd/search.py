"""``ingestd search``: ranked passages from the built-in index of one project.

Query syntax (documented in the README): words (all must occur), ``"a phrase"``, ``prefix*``,
and ``OR`` between two terms. The query is parsed here and rebuilt for the database, so any
user input is either a valid search or a clear usage error, never an SQL or FTS5 error, and a
query can never reach outside its project. SQLite ranks with FTS5's BM25; PostgreSQL with
ts_rank_cd over a tsvector column.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import peewee as pw

from ingestd.db import is_postgres
from ingestd.documents import CURRENT_JOB
from ingestd.errors import UsageError
from ingestd.models import database

DEFAULT_LIMIT = 10
MAX_LIMIT = 100
SIGNAL_CHECK_STEPS = 10_000  # SQLite VM steps between chances for Ctrl-C to stop a search
MARK_START, MARK_END = "[", "]"
_TOKEN = re.compile(r'"([^"]*)"|(\S+)')
_WORD = re.compile(r"[^\W_]+")  # letters and digits: the indexes split words at "_" too


@dataclass(frozen=True)
class Term:
    words: tuple[str, ...]   # one word, or a phrase
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
    for phrase, word in _TOKEN.findall(query):
        if word == "OR":
            if not groups[-1]:
                raise UsageError("malformed query: OR needs a term on each side")
            groups.append([])
            continue
        text, prefix = (phrase, False) if phrase or not word else (word.rstrip("*"), word.endswith("*"))
        words = tuple(w.lower() for w in _WORD.findall(text))
        if words:  # punctuation alone is no term (the index does not store it either)
            groups[-1].append(Term(words, prefix))
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
    def term(t: Term) -> str:
        words = [f"'{w}'" for w in t.words]
        if t.prefix:
            words[-1] += ":*"
        return "(" + " <-> ".join(words) + ")"

    return " | ".join("(" + " & ".join(term(t) for t in group) + ")" for group in groups)


# The job a passage is shown with: the oldest current job of its document (a newer version of
# a path, or the deletion of a job, passes the document on), and that job's path.
_SHOWN_JOB = f"""(SELECT j.id FROM ingest_jobs j WHERE j.canonical_document_id = d.id
                 AND {CURRENT_JOB} ORDER BY j.id LIMIT 1)"""

# ORDER BY rank (bm25 with default weights) lets FTS5 hand the matches over best first, so
# SQLite needs no sort of its own and computes snippets only for the rows it returns; with
# ORDER BY bm25(...) it made a snippet for every match, then sorted (p50 halved at 30,000
# documents, the same results).
_SQLITE = f"""
SELECT -chunks_fts.rank AS score,
       snippet(chunks_fts, 0, '{MARK_START}', '{MARK_END}', '…', 24) AS snippet,
       c.page, d.source_path, {_SHOWN_JOB} AS job_id, d.id
FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid JOIN documents d ON d.id = c.document_id
WHERE chunks_fts MATCH ? AND c.project_id = ? AND d.deleted_at IS NULL
ORDER BY chunks_fts.rank LIMIT ?"""

_POSTGRES = f"""
SELECT ts_rank_cd(c.tsv, q) AS score,
       ts_headline('simple', c.text, q, 'StartSel={MARK_START}, StopSel={MARK_END}, MaxWords=30, MinWords=10')
           AS snippet,
       c.page, d.source_path, {_SHOWN_JOB} AS job_id, d.id
FROM chunks c JOIN documents d ON d.id = c.document_id, to_tsquery('simple', %s) q
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
    if is_postgres():
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
    return [Hit(float(score), " ".join(snippet.split()), page, path, job_id, document_id)
            for score, snippet, page, path, job_id, document_id in rows]


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

