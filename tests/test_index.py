"""The built-in index: chunks with pages, BM25 ranking, content dedup, atomic re-ingest,
deletes that clean up, and strict, safe search queries."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ingestd import chunking, db, documents, intake, jobs, migrations, retire, search, words
from ingestd.config import SinkConfig
from ingestd.errors import UsageError
from ingestd.models import Chunk, Document, Job
from ingestd.pipeline import Context, Control, conclude, prepare, run_job
from ingestd.sinks import Document as SinkDocument, open_sink
from ingestd.sinks.index import BATCH_CHUNKS, SLICED_UP_TO, IndexSink
from ingestd.sinks.text import TextSink

import corpus
from conftest import run_cli, wait_for
from proctree import cpu_seconds


@pytest.fixture
def ingest(cfg, any_store, extractors):
    """Drop-and-run: queue a file and run its job to the end, as a worker would."""

    def run(path: Path, project: str = "acme", sink=None) -> Job:
        settings = cfg.projects[project]
        folder, version = intake.inspect(settings, path)
        queued, _ = jobs.create(project, str(folder), version, 3)
        [claimed] = jobs.claim("w1")
        assert claimed.id == queued.id
        context = Context(owner="w1", project=settings, sink=sink or open_sink(settings),
                          extractors=extractors, control=Control(), progress_interval=60)
        return run_job(claimed, context)

    return run


def long_text(paragraphs: int, word: str) -> str:
    """Paragraphs of about 730 characters, each starting with its own marker word (``word``
    and the paragraph's number): more chunks of the default size than paragraphs / 1.2."""
    filler = " ".join(["lorem ipsum dolor sit amet consectetur adipiscing"] * 14)
    return "\n\n".join(f"{word}{index} {filler}" for index in range(paragraphs))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def delete(cfg):
    """What `ingestd jobs delete` does: the soft delete with the index clean-up."""

    def run(project: str, job: Job) -> None:
        retire.delete_job(cfg.projects[project], job.id, IndexSink(cfg.projects[project]))

    return run


class TestChunking:
    def test_chunks_respect_size_pages_and_offsets(self):
        """No chunk is longer than the size; each maps back to its text and its page."""
        pages_text = ["First page. " * 200, "Second page! " * 150]
        text = "\n\n".join(pages_text)
        spans = ((0, len(pages_text[0])), (len(pages_text[0]) + 2, len(text)))
        chunks = chunking.chunk_text(text, spans, size=400, overlap=60, paged=True)
        assert all(len(c.text) <= 400 for c in chunks)
        assert {c.page for c in chunks} == {1, 2}
        for chunk in chunks:
            assert chunk.text == text[chunk.start:chunk.end]
            assert spans[chunk.page - 1][0] <= chunk.start < chunk.end <= spans[chunk.page - 1][1]

    def test_chunks_break_at_sentences_and_overlap(self):
        """Chunks end at a sentence end and the next starts inside the previous one."""
        text = " ".join(f"Sentence number {i} ends here." for i in range(100))
        chunks = chunking.chunk_text(text, ((0, len(text)),), size=300, overlap=50)
        assert all(c.text.endswith(".") for c in chunks)
        assert all(b.start < a.end for a, b in zip(chunks, chunks[1:]))

    def test_a_chunk_ends_at_the_last_sentence_end_it_can_hold(self):
        """With no paragraph break, a chunk ends after the last sentence end (closing quotes and
        brackets included) in the second half of its room, never at an earlier one."""
        text = ('He said "stop." Then (quietly!) left? Yes. ' * 40).rstrip()
        size = 120
        chunks = chunking.chunk_text(text, ((0, len(text)),), size=size, overlap=20)
        sentence_end = re.compile(r"[.!?…][\"')\]]*\s")
        for chunk in chunks[:-1]:
            floor, limit = chunk.start + size // 2, chunk.start + size
            ends = [m.end() - 1 for m in sentence_end.finditer(text, floor, limit)]  # not \s
            assert ends and chunk.end == ends[-1]
            assert text[chunk.start:chunk.end].endswith(('."', "?", ".", "!)"))

    def test_a_line_without_spaces_is_cut_between_words(self):
        """A long line of CSV or minified JSON has no space to end a chunk at: chunks end and
        start between two words (at a comma), so the index holds no half word (cut at the
        size, "tok000097,tok00009" was found by `tok00009`, a word the file does not hold)."""
        text = "header," + ",".join(f"tok{index:06d}" for index in range(3000))
        chunks = chunking.chunk_text(text, ((0, len(text)),), size=1000, overlap=150)
        assert len(chunks) > 20
        whole = set(words.words(text))
        for chunk in chunks:
            assert set(words.words(chunk.text)) <= whole, chunk.text[:40] + "..." + chunk.text[-40:]
        assert all(b.start < a.end for a, b in zip(chunks, chunks[1:]))  # they still overlap

    def test_a_run_of_word_characters_longer_than_half_a_chunk_is_cut(self):
        """Nothing to end at but inside the word: the chunk is cut at its size."""
        text = "x" * 2500
        chunks = chunking.chunk_text(text, ((0, len(text)),), size=1000, overlap=150)
        assert chunks[0].end == 1000 and chunks[-1].end == 2500


class TestSearch:
    def test_a_word_is_found_however_its_accents_were_encoded(self, ingest, drop):
        """Text written decomposed (a letter, then a combining accent: macOS, some PDF
        producers) is found by the composed word, and a decomposed query finds composed text.
        FTS5 drops some combining accents after a letter: decomposed, "край" was indexed as
        "краи", and "мои" found "мой" while "мой" found nothing."""
        import unicodedata

        nfd = lambda text: unicodedata.normalize("NFD", text)  # noqa: E731
        decomposed = ingest(write(drop / "nfd.txt", nfd("мой край, οδός δρόμος, café")))
        composed = ingest(write(drop / "nfc.txt", "наш край"))
        assert nfd("край") != "край"
        assert {h.job_id for h in search.search("acme", "край")} == {decomposed.id, composed.id}
        assert {h.job_id for h in search.search("acme", nfd("край"))} == {decomposed.id,
                                                                          composed.id}
        [hit] = search.search("acme", "οδός")
        assert hit.job_id == decomposed.id and "[οδός]" in hit.snippet
        assert search.search("acme", "мои") == [] and search.search("acme", "οδος") == []
        assert [h.job_id for h in search.search("acme", "cafe")] == [decomposed.id]

    def test_a_word_written_with_a_ligature_is_found(self, ingest, drop):
        """A PDF's "oﬃce" (U+FB03, as PDF producers write the glyph) is found by "office", and a
        query holding a ligature finds the word spelled out. FTS5 took "ﬃ" for a letter of its
        own: "office" found nothing."""
        path = drop / "lig.pdf"
        corpus.make_remapped_pdf(path, "the o#ce manual", b"FB03")
        job = ingest(path)
        [hit] = search.search("acme", "office")
        assert hit.job_id == job.id and "[office]" in hit.snippet
        assert [h.job_id for h in search.search("acme", "\"the oﬃce\"")] == [job.id]

    def test_a_phrase_from_page_37_is_found_with_its_page(self, ingest, drop):
        """Passages of a PDF keep their page numbers."""
        pages = [f"Page {n} talks about ordinary things." for n in range(1, 41)]
        pages[36] = "Page 37 mentions the zanzibar accord in detail."
        path = drop / "report.pdf"
        corpus.make_pdf(path, pages)
        job = ingest(path)
        [hit] = search.search("acme", '"zanzibar accord"')
        assert hit.page == 37 and hit.job_id == job.id and hit.source_path == str(path)
        assert "[zanzibar] [accord]" in hit.snippet or "[zanzibar accord]" in hit.snippet

    def test_ranking_prefers_more_mentions(self, ingest, drop):
        """BM25: ten mentions rank above one."""
        filler = " ".join(f"filler{i}" for i in range(60))
        once = ingest(write(drop / "once.txt", f"{filler} turbine {filler}"))
        often = ingest(write(drop / "often.txt", f"{filler} " + "turbine " * 10 + filler))
        hits = search.search("acme", "turbine")
        assert [h.job_id for h in hits] == [often.id, once.id]
        assert hits[0].score > hits[1].score

    def test_sqlite_search_takes_the_matches_best_first_without_a_sort_of_its_own(self, store):
        """FTS5 hands the matches over by rank: SQLite then makes snippets only for the rows
        it returns (with a sort of its own, it made one for every match first)."""
        plan = db.database.execute_sql("EXPLAIN QUERY PLAN " + search._SQLITE,
                                       ('"turbine"', "acme", 10)).fetchall()
        assert any("chunks_fts" in row[-1] for row in plan)
        assert not any("TEMP B-TREE" in row[-1] for row in plan)

    def test_prefix_and_or(self, ingest, drop):
        """prefix* matches word starts; OR takes either side."""
        ingest(write(drop / "a.txt", "photosynthesis in plants"))
        ingest(write(drop / "b.txt", "chlorophyll absorbs light"))
        assert len(search.search("acme", "photo*")) == 1
        assert len(search.search("acme", "photosynthesis OR chlorophyll")) == 2
        assert search.search("acme", "photosynthesis chlorophyll") == []

    @pytest.mark.parametrize("query, groups", [
        ("kiwi KIWI kiwi", [["kiwi"]]),
        ("kiwi fig kiwi fig*", [["kiwi", "fig", "fig*"]]),
        ("kiwi OR kiwi OR fig", [["kiwi"], ["fig"]]),
        ('"kiwi fig" kiwi "kiwi fig"', [['"kiwi fig"', "kiwi"]])])
    def test_repeated_terms_are_searched_once(self, query, groups):
        """A term repeated in a group, or a group repeated, matches nothing more, and FTS5's time
        grows with the square of the repeats (40 times one word: 8.7 s): each is kept once."""
        def shown(term: search.Term) -> str:
            text = " ".join(term.words)
            return (f'"{text}"' if len(term.words) > 1 else text) + ("*" if term.prefix else "")

        assert [[shown(term) for term in group] for group in search.parse(query)] == groups

    def test_underscores_split_words_as_the_index_does(self, ingest, drop):
        """Both indexes split "snake_case" into two words and store no "_": a lone "_" in a
        query is punctuation (it made SQLite find nothing), "snake_case" is the phrase."""
        ingest(write(drop / "u.txt", "an invoice in snake_case"))
        assert len(search.search("acme", "invoice _")) == 1
        assert len(search.search("acme", "snake_case")) == 1
        assert len(search.search("acme", "snake case")) == 1
        assert search.search("acme", "case_snake") == []

    def test_a_query_repeating_a_word_finds_what_the_word_finds(self, ingest, drop):
        ingest(write(drop / "k.txt", "kiwi " * 2000))
        ingest(write(drop / "f.txt", "fig and kiwi"))
        once = search.search("acme", "kiwi", limit=100)
        assert {hit.source_path for hit in once} == {str(drop / "k.txt"), str(drop / "f.txt")}
        assert search.search("acme", " ".join(["kiwi"] * 200), limit=100) == once

    @pytest.mark.parametrize("query, reason", [
        ('"unclosed phrase', "not closed"), ("", "empty"), ("OR cats", "OR needs"),
        ("cats OR", "OR needs"), ("***", "no word"), ('""', "no word"), ("_", "no word"),
        ("😀 ™", "no word")])
    def test_malformed_queries_are_usage_errors(self, any_store, query, reason):
        """A bad query is a clear UsageError, never a database error."""
        with pytest.raises(UsageError, match=reason):
            search.search("acme", query)

    @pytest.mark.parametrize("query", ["text:secret", "secret NOT x", "NEAR(secret x)", "a-b*c",
                                       "c.project_id", "'; DROP TABLE chunks; --", "^secret"])
    def test_odd_input_is_searched_as_words_not_syntax(self, ingest, drop, query):
        """Column filters, operators and SQL in a query are only words to look for."""
        ingest(write(drop / "s.txt", "the secret word"))
        search.search("acme", query)  # no error
        assert Chunk.select().count() == 1

    def test_search_is_scoped_to_the_project(self, ingest, drop, cfg):
        """Another project's passages are never returned."""
        ingest(write(drop / "mine.txt", "kumquat harvest"))
        other = cfg.projects["other"].folders[0]
        ingest(write(other / "theirs.txt", "kumquat festival"), project="other")
        assert [h.source_path for h in search.search("acme", "kumquat")] == [str(drop / "mine.txt")]
        assert len(search.search("other", "kumquat")) == 1

    def test_the_cli_search_and_its_exit_codes(self, ingest, drop, config_file, backend):
        """`ingestd search` prints ranked passages; a malformed query exits 2."""
        ingest(write(drop / "cli.txt", "the marmalade recipe"))
        db.close_store()
        text = config_file.read_text().replace(
            "[daemon]", f'[daemon]\ndatabase = "{backend.daemon.database}"')
        config_file.write_text(text)
        found = run_cli("search", "-p", "acme", "marmalade", config=config_file)
        assert found.returncode == 0 and "cli.txt" in found.stdout and "[marmalade]" in found.stdout
        bad = run_cli("search", "-p", "acme", '"oops', config=config_file)
        assert bad.returncode == 2 and "malformed query" in bad.stderr
        assert run_cli("search", "-p", "nope", "x", config=config_file).returncode == 3


INVOICE = """Invoice dated 2024-01-15 for 3.14 units, see example.com or mail billing@example.com.
Attached: report.pdf in /srv/share/reports. Release v1.2.3.
Le café est fermé; a naïve résumé.
ΟΔΟΣ ΑΘΗΝΑΣ
"""
LONG_WORD = "語" * 700  # 2,100 bytes: more than a PostgreSQL lexeme takes (2,047)
PARITY_FILES = {
    "invoice.txt": INVOICE,
    "cjk.txt": "東京都の会議 资料",
    "emoji.txt": "a garden party, then party🥳time and a 😀 smile",
    "hyphen.txt": "a state-of-the-art design",
    "snake.txt": "call snake_case here",
    "greek.txt": "ο δρόμος της πόλης",
    "decomposed.txt": "un cafe\u0301 noir",
    "long.txt": f"{LONG_WORD} tail",
}
# What each query finds (file names), the same on SQLite (FTS5 is the reference) and PostgreSQL.
PARITY = {
    **{query: ["invoice.txt"] for query in (
        "2024-01-15", "01", "3.14", "v1.2.3", "example.com", "example", "billing@example.com",
        "billing", "report.pdf", "report", "reports", "/srv/share", "naive", "resume", "ΟΔΟΣ",
        "ΑΘΗΝΑΣ", "οδος", "fermé", "ferme*", '"example com or"', "v1.2*")},
    "cafe": ["decomposed.txt", "invoice.txt"],
    "café": ["decomposed.txt", "invoice.txt"],
    "caf*": ["decomposed.txt", "invoice.txt"],
    "naive OR smile": ["emoji.txt", "invoice.txt"],
    "2024-01-16": [],
    "a" * 3000 + " party": [],  # a word no passage has: no match, however long
    "東京都の会議": ["cjk.txt"],  # FTS5 does not split CJK runs into words: neither does PG
    "東京*": ["cjk.txt"],
    "東京都": [],
    "party🥳time": ["emoji.txt"],  # a newer emoji is a word character to FTS5
    '"then party"': [],
    "smile": ["emoji.txt"],
    "state-of-the-art": ["hyphen.txt"],
    "art": ["hyphen.txt"],
    '"art of"': [],
    "snake_case": ["snake.txt"],
    "snake case": ["snake.txt"],
    "case_snake": [],
    "δρόμος": ["greek.txt"],
    "ΔΡΌΜΟΣ": ["greek.txt"],
    "δρομος": [],  # FTS5 removes the diacritics of Latin letters only
    LONG_WORD: ["long.txt"],
    "語" * 699 + "文": [],
    "語語*": ["long.txt"],
    f'"{LONG_WORD} tail"': ["long.txt"],
}


class TestBothDatabasesSeeTheSameWords:
    """PostgreSQL's index and queries use the words FTS5 sees (ingestd.words): one corpus and
    one query find the same passages on both databases, with the same snippets."""

    def test_the_same_queries_find_the_same_files(self, ingest, drop):
        for name, text in PARITY_FILES.items():
            assert ingest(write(drop / name, text)).status == "completed"
        found = {query: sorted(Path(hit.source_path).name
                               for hit in search.search("acme", query, limit=100))
                 for query in PARITY}
        assert found == PARITY
        assert_full_text_index_consistent()

    def test_phrases_past_the_positions_postgresql_keeps_are_found(self, ingest, drop, cfg):
        """A tsvector keeps 256 places of a word and places up to 16,383: a phrase after a
        word's 256th occurrence, or past the 16,383rd word of a chunk, is found all the same
        (and a phrase that is not there is not)."""
        ingest(write(drop / "repeats.txt", "k " * 300 + "zq"))
        long_chunk = dataclasses.replace(cfg.projects["acme"], sink=SinkConfig(
            kind="index", options={"chunk_size": 400_000, "chunk_overlap": 0}))
        text = " ".join(f"w{number}" for number in range(20_000)) + " needle haystack end"
        ingest(write(drop / "far.txt", text), sink=open_sink(long_chunk))
        for query, name in [('"k zq"', "repeats.txt"), ('"needle haystack"', "far.txt"),
                            ('"w19998 w19999"', "far.txt"), ('"w100 w101"', "far.txt")]:
            assert [Path(hit.source_path).name for hit in search.search("acme", query)] == [name]
        assert search.search("acme", '"zq k"') == []
        assert search.search("acme", '"haystack needle"') == []

    @pytest.mark.parametrize("query, snippet", [
        ("example", "Invoice dated 2024-01-15 for 3.14 units, see [example].com or mail "
                    "billing@[example].com. Attached: report.pdf in /srv/share/reports…"),
        ("cafe", "…Le [café] est fermé; a naïve résumé. ΟΔΟΣ ΑΘΗΝΑΣ"),  # a sentence's start
        ('"2024 01"', "Invoice dated [2024-01]-15 for 3.14 units, see example.com or mail "
                      "billing@example.com. Attached: report.pdf in /srv/share/reports…")])
    def test_snippets_mark_the_matched_words_of_the_text(self, ingest, drop, query, snippet):
        """The marks are around the words of the original text that matched, folded or split
        ("example" in "example.com", "cafe" for "café"), in a window of 24 words."""
        ingest(write(drop / "invoice.txt", INVOICE))
        [hit] = search.search("acme", query)
        assert hit.snippet == snippet

    def test_postgresql_snippets_are_made_as_fts5_makes_sqlites(self):
        """search.make_snippet (PostgreSQL's) against FTS5's snippet() over random passages and
        queries: words, phrases, prefixes, OR, repeats, sentence starts, long passages."""
        import sqlite3

        rng = random.Random(11)
        vocabulary = ["alpha", "Beta", "café", "ΟΔΟΣ", "οδός", "example.com", "snake_case",
                      "2024-01-15", "kiwi", "fig", "party🥳time", "東京都", "Straße", "nai\u0308ve"]
        separators = [" ", " ", " ", ". ", ": ", ", ", "\n\n", " - ", "."]
        connection = sqlite3.connect(":memory:")
        connection.execute("CREATE VIRTUAL TABLE t USING fts5(x, "
                           "tokenize='unicode61 remove_diacritics 2')")
        compared = 0
        for _ in range(600):
            text = "".join(rng.choice(vocabulary) + rng.choice(separators)
                           for _ in range(rng.choice([2, 10, 30, 80]))).strip()
            terms = []
            for group in range(rng.choice([1, 1, 2])):
                terms += ["OR"] if group else []
                for _ in range(rng.choice([1, 2, 3])):
                    word = rng.choice(vocabulary)
                    terms.append(rng.choice([word, word[:2] + "*",
                                             f'"{word} {rng.choice(vocabulary)}"']))
            groups = search.parse(" ".join(terms))
            with connection:
                connection.execute("DELETE FROM t")
                connection.execute("INSERT INTO t (rowid, x) VALUES (1, ?)", (text,))
            row = connection.execute(
                f"SELECT snippet(t, 0, '[', ']', '…', {search.SNIPPET_WORDS}) FROM t "
                "WHERE t MATCH ?", (search._fts5(groups),)).fetchone()
            if row is not None:
                assert search.make_snippet(text, groups) == row[0], (text, terms)
                compared += 1
        assert compared > 150  # the others matched nothing
        connection.close()

    def test_postgresql_chunks_of_schema_10_are_found_once_migrated(self, pg_url):
        """A PostgreSQL database of schema 10 whose chunks were indexed by its generated
        tsvector (to_tsvector('simple', text)): migration 11 rebuilds every chunk's tsvector
        from ingestd.words, keeps the GIN index, and the chunks are found by today's queries;
        it runs again over its own result alike."""
        database = db.connect(pg_url)
        migrations._ensure_history(database)
        for number, name, step in migrations.MIGRATIONS[:10]:
            with database.atomic():
                step(database, migrations.DIALECTS["postgres"])
                database.execute_sql("INSERT INTO schema_migrations VALUES (%s, %s, 0)",
                                     (number, name))
        with database.atomic():  # as the index sink of schema 10 wrote them
            ids = [database.execute_sql(
                "INSERT INTO documents (project_id, content_sha256, source_path, text, "
                "created_at) VALUES ('acme', %s, %s, %s, 0) RETURNING id",
                (f"sha{n}", f"/drop/{n}.txt", text)).fetchone()[0]
                for n, text in enumerate([INVOICE, "the kumquat ledger"])]
            for document_id, text in zip(ids, [INVOICE, "the kumquat ledger"]):
                database.execute_sql(
                    "INSERT INTO chunks (document_id, project_id, seq, start_offset, end_offset, "
                    "text) VALUES (%s, 'acme', 0, 0, %s, %s)", (document_id, len(text), text))
        assert database.execute_sql(
            "SELECT count(*) FROM chunks WHERE tsv @@ CAST('cafe' AS tsquery)").fetchone() == (0,)
        database.close()

        def found() -> dict[str, list[int]]:
            return {query: [hit.document_id for hit in search.search("acme", query)]
                    for query in ("2024-01-15", "example", "cafe", "ΟΔΟΣ", "kumquat", "ledger*")}

        expected = {"2024-01-15": ids[:1], "example": ids[:1], "cafe": ids[:1],
                    "ΟΔΟΣ": ids[:1], "kumquat": ids[1:], "ledger*": ids[1:]}
        db.open_store(pg_url)  # applies 11
        try:
            assert found() == expected
            assert_full_text_index_consistent()
            assert db.database.execute_sql(
                "SELECT is_generated FROM information_schema.columns WHERE table_name = 'chunks' "
                "AND column_name = 'tsv' AND table_schema = current_schema()").fetchone() == (
                "NEVER",)
            assert db.database.execute_sql(
                "SELECT indexdef LIKE %s FROM pg_indexes WHERE indexname = 'ix_chunks_tsv' "
                "AND schemaname = current_schema()", ("% USING gin (tsv)",)).fetchone() == (True,)
            v11 = {number: step for number, _, step in migrations.MIGRATIONS}[11]
            with db.database.atomic():
                v11(db.database.obj, migrations.DIALECTS["postgres"])
            assert found() == expected
            assert_full_text_index_consistent()
        finally:
            db.close_store()


def test_ctrl_c_stops_a_long_search_at_once(drop, config_file, store):
    """A search that ranks most of a large index takes seconds (the README says how many);
    SIGINT ends it within a moment, exit 130 and nothing printed, instead of after the query.
    Here every word of 3,000 documents begins with the same 30 letters, and the query asks
    for each of their 30 prefixes (a prefix asked twice is asked once): over 15 s."""
    rng = random.Random(7)
    stem = "abcdefghijklmnopqrstuvwxyzabcd"
    words = [f"{stem}{number}x" for number in range(2000)]
    with store.atomic():  # rows written straight, the full-text index built in one go
        for number in range(3000):
            text = " ".join(rng.choices(words, k=300))
            document = Document.create(project_id="acme", content_sha256=f"{number:064x}",
                                       source_path=str(drop / f"{number}.txt"), text=text,
                                       created_at=time.time())
            Chunk.create(document=document, project_id="acme", seq=0, start_offset=0,
                         end_offset=len(text), text=text)
        store.execute_sql("INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild')")
    db.close_store()
    query = " OR ".join(f"{stem[:length]}*" for length in range(1, 31))
    process = subprocess.Popen(
        [sys.executable, "-m", "ingestd", "-c", str(config_file), "search", "-p", "acme", query],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        # Starting the CLI takes well under a second of CPU; past that it is in the query.
        wait_for(lambda: cpu_seconds(process.pid, children=False) > 1.5, timeout=60,
                 message="the search to be well into its query")
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the search went on for 10 s after SIGINT")
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130 and out == "", (out, err)


class TestDedupAndChanges:
    def test_the_same_bytes_under_two_names_make_one_document(self, ingest, drop):
        """The second file completes as a duplicate pointing at the first's document."""
        first = ingest(write(drop / "a.txt", "identical content here"))
        second = ingest(write(drop / "b.txt", "identical content here"))
        assert second.status == "completed"
        assert second.canonical_document_id == first.canonical_document_id
        assert second.message == (f"duplicate of document {first.canonical_document_id} "
                                  f"(first seen as {drop / 'a.txt'})")
        assert Document.select().count() == 1 and len(search.search("acme", "identical")) == 1

    def test_a_changed_file_replaces_its_chunks(self, ingest, drop):
        """The old phrase is gone, the new one found, one live document for the path."""
        path = write(drop / "notes.txt", "the old phrase about walruses")
        ingest(path)
        write(path, "the new phrase about penguins, longer")
        ingest(path)
        assert search.search("acme", "walruses") == []
        assert len(search.search("acme", "penguins")) == 1
        assert [document.text for document in Document.select().order_by(Document.id)] == [
            "", "the new phrase about penguins, longer"]

    @pytest.mark.parametrize("again", ["touched", "rewritten with the same bytes"])
    def test_the_same_content_again_under_its_path_keeps_its_document(self, ingest, drop,
                                                                      again):
        """A new version of a path with unchanged content (a touch, a sync tool rewriting the
        file) is a duplicate of the document it already has, which stays searchable."""
        path = write(drop / "notes.txt", "the unchanged phrase about walruses")
        first = ingest(path)
        if again == "touched":
            os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        else:
            path.unlink()
            write(path, "the unchanged phrase about walruses")
        second = ingest(path)
        assert second.id != first.id and second.message.startswith("duplicate of document")
        assert second.canonical_document_id == first.canonical_document_id
        [hit] = search.search("acme", "walruses")
        assert (hit.document_id, hit.job_id) == (first.canonical_document_id, second.id)
        assert Document.get_by_id(first.canonical_document_id).deleted_at is None

    def test_a_failed_sink_is_never_taken_for_a_duplicate(self, ingest, drop, cfg):
        """A failed attempt records no content: the same bytes later are indexed for real."""
        class Failing(IndexSink):
            def ingest_many(self, documents, check=None):
                from ingestd.sinks import SinkError
                raise SinkError("index offline", transient=False)

        failed = ingest(write(drop / "a.txt", "content once failed"),
                        sink=Failing(cfg.projects["acme"]))
        assert failed.status == "failed" and "index offline" in failed.error_message
        ok = ingest(write(drop / "b.txt", "content once failed"))
        assert ok.status == "completed" and not ok.message.startswith("duplicate")

    def test_a_search_during_a_swap_finds_old_or_new_never_neither_or_both(self, ingest, drop, cfg):
        """Re-ingest is atomic: a concurrent reader always finds exactly one version."""
        path = drop / "swap.txt"
        problems: list[int] = []
        done = threading.Event()

        def reader() -> None:  # its own connection (peewee's are per thread)
            while not done.is_set():
                count = len(search.search("acme", "anchor"))
                if count != 1:
                    problems.append(count)
            db.database.close()

        write(path, "anchor version 0")
        ingest(path)
        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for version in range(1, 30):
                write(path, f"anchor version {version} " + "x" * version)
                ingest(path)
        finally:
            done.set()
            thread.join()
        assert problems == []


class TestRaces:
    """Ends that overlap: what another worker or the CLI did meanwhile is seen in the end's
    transaction (on PostgreSQL, ends of one content or path also wait for each other)."""

    @pytest.fixture
    def started(self, cfg, any_store, extractors):
        """Queue a file and prepare its job (read, extracted), as a worker would; not ended."""

        def run(path: Path) -> tuple[Job, Context, object]:
            settings = cfg.projects["acme"]
            folder, version = intake.inspect(settings, path)
            queued, _ = jobs.create("acme", str(folder), version, 3)
            [claimed] = jobs.claim("w1")
            assert claimed.id == queued.id
            ctx = Context(owner="w1", project=settings, sink=open_sink(settings),
                          extractors=extractors, control=Control(), progress_interval=60)
            return claimed, ctx, prepare(claimed, ctx)

        return run

    def test_an_old_version_ending_after_a_newer_one_is_superseded(self, started, ingest, drop):
        """A long old version read before its file was replaced ends after the new version
        completed: it is superseded, and search shows the new text only."""
        path = write(drop / "x.txt", "the old version mentions walruses")
        old, ctx, found = started(path)
        write(path, "the new version mentions penguins, longer")
        assert ingest(path).status == "completed"
        ended = conclude(old, ctx, found)
        assert ended.status == "cancelled" and ended.message.startswith("superseded")
        assert search.search("acme", "walruses") == []
        assert len(search.search("acme", "penguins")) == 1
        assert [document.text for document in Document.select().where(
            Document.deleted_at.is_null())] == ["the new version mentions penguins, longer"]
        assert "walruses" not in "".join(document.text for document in Document.select())

    def test_a_duplicate_whose_document_went_meanwhile_is_read_again(self, started, ingest,
                                                                     drop, delete):
        """A job found to duplicate a document that is deleted before it ends does not point
        at the deleted document: it is retried, and then indexed for itself."""
        first = ingest(write(drop / "a.txt", "shared okapi text"))
        second, ctx, found = started(write(drop / "b.txt", "shared okapi text"))
        assert found.known is not None and found.known.document_id == first.canonical_document_id
        delete("acme", first)
        assert conclude(second, ctx, found).status == "queued"
        Job.update(not_before=0).where(Job.id == second.id).execute()
        [again] = jobs.claim("w1")
        ended = run_job(again, Context(owner="w1", project=ctx.project, sink=ctx.sink,
                                       extractors=ctx.extractors, control=Control(),
                                       progress_interval=60))
        assert ended.status == "completed" and not ended.message.startswith("duplicate")
        [hit] = search.search("acme", "okapi")
        assert (hit.job_id, hit.document_id) == (second.id, ended.canonical_document_id)


    def test_on_postgresql_ends_of_one_content_wait_for_each_other(self, any_store):
        """Two transactions ending jobs of the same bytes (under two paths) are serialized: the
        second waits for the first's commit, so it sees the first's document and is a
        duplicate, instead of indexing the same bytes again."""
        if not db.is_postgres():
            pytest.skip("SQLite has one writer: its ends never overlap")
        locked, release, second_done = threading.Event(), threading.Event(), threading.Event()

        def first() -> None:
            with db.database.atomic():
                documents.lock_ends([("acme", "ab" * 32, "/drop/a.txt")])
                locked.set()
                release.wait(30)

        def second() -> None:
            with db.database.atomic():
                documents.lock_ends([("acme", "ab" * 32, "/drop/b.txt")])
            second_done.set()

        threads = [threading.Thread(target=first)]
        threads[0].start()
        assert locked.wait(30)
        threads.append(threading.Thread(target=second))
        threads[1].start()
        wait_for(lambda: waiting_advisory_locks() == 1, timeout=30, message="the second end to wait")
        assert not second_done.is_set()
        release.set()
        assert second_done.wait(30)
        for thread in threads:
            thread.join(30)

    def test_a_delete_waits_for_an_end_that_may_keep_its_document(self, any_store, ingest,
                                                                    drop, cfg):
        """`jobs delete` of a document's only job while another job of the same bytes is
        completing as its duplicate (PostgreSQL runs both at once): the delete waits for that
        end, sees the duplicate, and keeps the document, which search still finds."""
        if not db.is_postgres():
            pytest.skip("SQLite has one writer: its ends never overlap")
        first = ingest(write(drop / "a.txt", "shared okapi text"))
        second = jobs.create("acme", str(drop), intake.inspect(
            cfg.projects["acme"], write(drop / "b.txt", "shared okapi text"))[1], 3)[0]
        [claimed] = jobs.claim("w1")
        assert claimed.id == second.id
        locked, release, deleted = threading.Event(), threading.Event(), threading.Event()

        def end_as_duplicate() -> None:  # what a worker's completing transaction does
            with db.database.atomic():
                documents.lock_ends([("acme", first.content_sha256, second.source_path)])
                known = documents.current_for_content("acme", first.content_sha256)
                locked.set()
                release.wait(30)
                jobs.complete(second.id, "w1", canonical_document_id=known.document_id,
                              content_sha256=first.content_sha256, message="duplicate")

        def delete_first() -> None:
            retire.delete_job(cfg.projects["acme"], first.id, IndexSink(cfg.projects["acme"]))
            deleted.set()

        threads = [threading.Thread(target=end_as_duplicate), threading.Thread(target=delete_first)]
        threads[0].start()
        assert locked.wait(30)
        threads[1].start()
        wait_for(lambda: deleted.is_set() or waiting_advisory_locks() == 1, timeout=30,
                 message="the delete to end or wait")
        release.set()
        for thread in threads:
            thread.join(30)
        assert deleted.is_set()
        [hit] = search.search("acme", "okapi")
        assert (hit.job_id, hit.document_id) == (second.id, first.canonical_document_id)


def passages_of(document_id: int) -> list[tuple[int, int, str]]:
    """(start, end, text) of each chunk of a document, its text as full-text search reads it."""
    rows = db.database.execute_sql(
        "SELECT c.start_offset, c.end_offset, t.text FROM chunks c JOIN chunk_texts t "
        f"ON t.id = c.id WHERE c.document_id = {db.database.param} ORDER BY 1",
        (document_id,)).fetchall()
    return [tuple(row) for row in rows]


def assert_full_text_index_consistent() -> None:
    """FTS5 compares its index with the chunks' text (a 'delete' given other text than was
    indexed leaves it corrupt, and this says so); on PostgreSQL, every chunk's tsvector is its
    text's words (ingestd.words)."""
    if not db.is_postgres():
        db.database.execute_sql(
            "INSERT INTO chunks_fts (chunks_fts, rank) VALUES ('integrity-check', 1)")
        return
    rows = db.database.execute_sql("SELECT id, text FROM chunk_texts").fetchall()
    assert db.database.execute_sql(
        "SELECT count(*) FROM chunks c LEFT JOIN unnest(%s::bigint[], %s::text[]) AS v (id, tsv) "
        "ON v.id = c.id WHERE c.tsv IS DISTINCT FROM CAST(v.tsv AS tsvector)",
        ([id_ for id_, _ in rows], [words.tsvector(text) for _, text in rows])).fetchone() == (0,)


class TestStorage:
    def test_a_chunk_is_its_documents_slice_and_sqlite_stores_it_once(self, ingest, drop):
        """Each chunk is the slice start:end of its document's text (multi-byte characters
        included); SQLite reads it from the document instead of storing it again, and the
        full-text index agrees with it through re-ingest and delete."""
        text = "\n\n".join(f"Paragraph {i}: naïve café Ünïcode résumé 🦔 hedgehog{i} "
                           f"{'blah ' * 60}" for i in range(8))
        job = ingest(write(drop / "slices.txt", text))
        document = Document.get_by_id(job.canonical_document_id)
        passages = passages_of(document.id)
        assert len(passages) > 3
        assert all(piece == document.text[start:end] for start, end, piece in passages)
        stored = [chunk.text for chunk in Chunk.select().where(Chunk.document == document.id)]
        assert stored == ([piece for *_, piece in passages] if db.is_postgres()
                          else [None] * len(passages))
        [hit] = search.search("acme", "hedgehog5")
        assert f"{search.MARK_START}hedgehog5{search.MARK_END}" in hit.snippet
        assert "résumé 🦔" in hit.snippet  # the words before it, read by offset
        assert_full_text_index_consistent()
        ingest(write(drop / "slices.txt", "the new version mentions only a porcupine"))
        assert search.search("acme", "hedgehog5") == []
        assert len(search.search("acme", "porcupine")) == 1
        assert_full_text_index_consistent()

    def test_a_pdf_whose_glyphs_map_to_nul_is_indexed(self, ingest, drop):
        """pypdf extracts a glyph mapped to <0000> as a NUL, which PostgreSQL's text refuses
        and SQLite's substr() stops at: it is stored as U+FFFD, and the text after it is found."""
        job = ingest(Path(corpus.make_nul_pdf(drop / "nul.pdf", "a # then the numbat")))
        assert job.status == "completed", job.error_message
        [hit] = search.search("acme", "numbat")
        assert "\ufffd" in Document.get_by_id(job.canonical_document_id).text
        assert_full_text_index_consistent()

    @pytest.mark.parametrize("text", [
        "before the nul \0 after the nul comes the wallaby",
        "the wallaby. " + "long " * (SLICED_UP_TO // 5)], ids=["nul", "long"])
    def test_a_long_document_or_one_with_a_nul_keeps_its_chunks_text(self, store, cfg, text):
        """SQLite stores the chunks' text of a document longer than SLICED_UP_TO (reading a
        slice reads the whole document, chunk after chunk) or with a NUL (no extraction makes
        one now; substr() stops there): they are found and deleted like any other."""
        sink = IndexSink(cfg.projects["acme"])
        document = SinkDocument("acme", 1, text, "/drop/x.txt", "x.txt", "text/plain", "0" * 64,
                                ((0, len(text)),))
        with db.database.atomic():
            [document_id] = sink.ingest_many([(document, sink.parts_of(document))])
        passages = passages_of(document_id)
        assert all(piece == text[start:end] for start, end, piece in passages)
        assert [chunk.text for chunk in Chunk.select().order_by(Chunk.start_offset)] == [
            piece for *_, piece in passages]
        [hit] = search.search("acme", "wallaby")
        assert hit.document_id == document_id
        assert_full_text_index_consistent()
        sink.delete(document_id)
        assert search.search("acme", "wallaby") == []
        assert_full_text_index_consistent()


class TestDeletes:
    def test_deleting_the_only_job_removes_the_document_from_search(self, ingest, drop, delete):
        """Soft-deleting the job takes its document and chunks out of the index, and the
        document's text out of the database (it was only marked deleted, the text kept)."""
        job = ingest(write(drop / "gone.txt", "ephemeral aardvark"))
        delete("acme", job)
        assert search.search("acme", "aardvark") == []
        assert Chunk.select().count() == 0
        assert [(d.text, d.deleted_at is not None) for d in Document.select()] == [("", True)]
        assert_full_text_index_consistent()

    def test_the_text_sink_deletes_what_the_index_made(self, ingest, drop, cfg):
        """After a reload from the index to the text sink, a document the index made is
        deleted by the text sink: its chunks go too, out of the full-text index (they stayed,
        their words searchable in no document, and FTS5 was to be given an empty text for
        them: a corrupt index)."""
        job = ingest(write(drop / "a.txt", "a tapir in the index"))
        TextSink(cfg.projects["acme"]).delete(job.canonical_document_id)
        assert Chunk.select().count() == 0 and search.search("acme", "tapir") == []
        assert_full_text_index_consistent()

    def test_deleting_one_of_two_jobs_keeps_the_shared_document(self, ingest, drop, delete):
        """A document still referenced by a live job stays searchable."""
        first = ingest(write(drop / "a.txt", "shared okapi text"))
        ingest(write(drop / "b.txt", "shared okapi text"))
        delete("acme", first)
        [hit] = search.search("acme", "okapi")
        assert hit.job_id != first.id

    def test_a_passage_names_a_job_and_path_that_still_hold_it(self, ingest, drop, delete):
        """A shared document is shown with a current job and that job's path: not a deleted
        job's, nor a path whose newer version has other text."""
        first = ingest(write(drop / "k1.txt", "kumquat orchard ledger"))
        second = ingest(write(drop / "k2.txt", "kumquat orchard ledger"))
        third = ingest(write(drop / "k3.txt", "kumquat orchard ledger"))
        ingest(write(drop / "k1.txt", "k1 now talks about something else"))
        [hit] = search.search("acme", "kumquat")
        assert (hit.job_id, hit.source_path) == (second.id, second.source_path)
        delete("acme", second)
        [hit] = search.search("acme", "kumquat")
        assert (hit.job_id, hit.source_path) == (third.id, third.source_path)
        assert first.canonical_document_id == hit.document_id

    @pytest.mark.parametrize("deleted", ["acme", "other"])
    def test_another_projects_document_of_the_same_number_keeps_nothing(
            self, ingest, drop, delete, tmp_path, deleted, cfg):
        """Project "other" has a sink numbering its own documents (a command or http sink),
        which gave its document the number of acme's in the index. Deleting either project's
        job releases its own document: acme's leaves search, other's sink is told to delete.
        Each was taken for kept by the other project's job, and a search of acme named
        other's job and path for acme's passage."""
        class Numbering:
            transactional, deleted = False, []

            def ingest(self, document):
                return first.canonical_document_id

            def delete(self, document_id):
                self.deleted.append(document_id)

        first = ingest(write(drop / "a.txt", "the secret word is platypus"))
        outside = Numbering()
        second = ingest(write(tmp_path / "drop" / "other" / "b.txt", "external document"),
                        project="other", sink=outside)
        assert second.canonical_document_id == first.canonical_document_id
        [hit] = search.search("acme", "platypus")
        assert (hit.job_id, hit.source_path) == (first.id, first.source_path)
        if deleted == "acme":
            delete("acme", first)
            assert search.search("acme", "platypus") == [] and outside.deleted == []
        else:
            retire.delete_job(cfg.projects["other"], second.id, outside)
            assert outside.deleted == [second.canonical_document_id]
            assert [hit.job_id for hit in search.search("acme", "platypus")] == [first.id]

    def test_a_job_past_its_time_while_indexing_fails_and_leaves_nothing(self, ingest, drop,
                                                                         cfg):
        """The index's work outlasting job_timeout_seconds: the job fails as timed out and its
        document is undone. It completed, however late (17 s against 10 s)."""
        class Slow(IndexSink):
            def ingest_many(self, documents, check=None):
                ids = super().ingest_many(documents, check)
                time.sleep(1.2)  # the index's own work, taking longer than the job may
                return ids

        cfg.projects["acme"] = dataclasses.replace(cfg.projects["acme"], job_timeout_seconds=1)
        job = ingest(write(drop / "slow.txt", "slowly indexed quokka"),
                     sink=Slow(cfg.projects["acme"]))
        assert (job.status, job.error_message) == (
            "failed", "timed out after 1 s (job_timeout_seconds)")
        assert search.search("acme", "quokka") == [] and Document.select().count() == 0

    @pytest.mark.parametrize("stop", ["deadline", "cancel"])
    def test_a_long_text_stops_between_batches_of_its_chunks(self, ingest, drop, cfg, stop):
        """A job alone writes its chunks BATCH_CHUNKS at a time, checking between them: in one
        statement, a 99 MB text ran 7 s past a job_timeout_seconds of 5, holding the write
        lock. Here the deadline passes (or a cancel comes) as the first batch is written: the
        job ends then, no second batch is written, and nothing is left."""
        batches = []

        class Watched(IndexSink):
            def store_parts(self, parts, check=None):
                context = check.__self__  # the job's Context

                def then_stopped():
                    if batches and stop == "deadline":
                        context.deadline = time.monotonic() - 1
                    elif batches:
                        context.control.cancelled = True
                    check()
                return super().store_parts(parts, then_stopped)

            def _store(self, parts, after=0):
                batches.append(sum(len(chunks) for _, chunks in parts))
                IndexSink._store(parts, after)

        settings = dataclasses.replace(cfg.projects["acme"], max_bytes=10 ** 8,
                                       job_timeout_seconds=60)
        cfg.projects["acme"] = settings
        job = ingest(write(drop / "long.txt", long_text(3 * BATCH_CHUNKS, "quokka")),
                     sink=Watched(settings))
        assert (job.status, job.error_message or job.message) == (
            ("failed", "timed out after 60 s (job_timeout_seconds)") if stop == "deadline"
            else ("cancelled", "cancelled while running"))
        assert batches == [BATCH_CHUNKS]
        assert Document.select().count() == Chunk.select().count() == 0
        assert search.search("acme", "quokka0") == []

    def test_a_long_text_written_in_batches_is_searchable_throughout(self, ingest, drop, cfg):
        """Each batch of a long document's chunks reaches the full-text index once: a word of
        the first, a middle and the last paragraph is found, in this document's passages, and
        SQLite's index holds as many chunks as the table (PostgreSQL's words are a column of
        the chunk's own row)."""
        cfg.projects["acme"] = dataclasses.replace(cfg.projects["acme"], max_bytes=10 ** 8)
        paragraphs = 4 * BATCH_CHUNKS
        job = ingest(write(drop / "long.txt", long_text(paragraphs, "quokka")))
        assert job.status == "completed"
        chunks = Chunk.select().count()
        assert chunks > 3 * BATCH_CHUNKS
        for marker in ("quokka0", f"quokka{paragraphs // 2}", f"quokka{paragraphs - 1}"):
            hits = [hit.job_id for hit in search.search("acme", marker)]
            assert hits and set(hits) == {job.id}, marker
        if not db.is_postgres():
            [[indexed]] = Chunk._meta.database.execute_sql(
                "SELECT count(*) FROM chunks_fts_docsize").fetchall()
            assert indexed == chunks

    def test_a_pdf_whose_text_passes_max_bytes_fails(self, ingest, drop, tmp_path):
        """A PDF's text is held to the project's max_bytes characters (1,000,000 here), as a
        text file's is: 3 KB of PDF drawing 2,000,000 letters fails, and nothing is indexed."""
        path = drop / "amplifies.pdf"
        corpus.make_remapped_pdf(path, "#" * 8000, b"0061" * 250)
        job = ingest(path)
        assert (job.status, job.error_message) == (
            "failed", "text of over 1,000,000 characters (max_bytes) by page 1 of 1: "
                      "possibly a PDF bomb")
        assert Document.select().count() == 0

    def test_cancel_during_indexing_leaves_no_partial_document(self, ingest, drop, cfg):
        """An operator's cancel that lands while the sink writes: cancelled, nothing indexed."""
        class CancelledMidway(IndexSink):
            def ingest_many(self, documents, check=None):
                ids = super().ingest_many(documents, check)
                for document, _ in documents:
                    jobs.cancel(document.project_id, document.job_id)  # the CLI, meanwhile
                return ids

        job = ingest(write(drop / "c.txt", "never to be indexed"),
                     sink=CancelledMidway(cfg.projects["acme"]))
        assert job.status == "cancelled"
        assert Document.select().count() == 0 and Chunk.select().count() == 0


def test_a_lone_jobs_text_is_split_before_its_transaction(ingest, drop, cfg):
    """Chunking 100 MB of text takes a second: done before the completing transaction, which
    holds the write lock (a job in a group had it so; one alone did it inside)."""
    from ingestd.models import database

    inside = []

    class Watching(IndexSink):
        def parts_of(self, document):
            inside.append(database.in_transaction())
            return super().parts_of(document)

    job = ingest(write(drop / "a.txt", "split before"), sink=Watching(cfg.projects["acme"]))
    assert job.status == "completed" and inside == [False]


def waiting_advisory_locks() -> int:
    """Advisory locks waited for by this test's connections (a suite beside it has its own)."""
    return db.database.execute_sql(
        "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) WHERE locktype = "
        "'advisory' AND NOT granted AND application_name = current_setting('application_name')"
    ).fetchone()[0]
