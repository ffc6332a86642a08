"""The built-in index (the default sink): documents, their chunks, and a full-text index over
the chunks (SQLite FTS5; PostgreSQL: a tsvector column with a GIN index, written with each chunk
from the words FTS5 would see, :mod:`ingestd.words`), all in the transaction that completes the
job. A chunk is a slice of its document's text; on SQLite the slice of a document up to
SLICED_UP_TO characters is not stored again (FTS5 reads it through the view chunk_texts)."""

from __future__ import annotations

from typing import Callable

from ingestd import chunking, db, words
from ingestd.config import ProjectConfig
from ingestd.errors import ConfigError
from ingestd.extract import PDF
from ingestd.models import database
from ingestd.sinks import Document
from ingestd.sinks.text import TextSink


# SQLite reads the text of a chunk of a document up to this long from the document (see
# migration 10): the slice costs a read of the whole document's text, which for a long one,
# chunk after chunk, would cost more than storing the chunks' text again. And not at a NUL,
# where substr() stops.
SLICED_UP_TO = 64 * 1024  # characters
# A job alone writes its chunks this many at a time, checking its deadline (and a cancel)
# between: a batch takes about 50 ms here on SQLite (FTS5), 200 ms on PostgreSQL, and a 99 MB
# text indexed in one statement ran 7 s past a job_timeout_seconds of 5, holding the write lock.
BATCH_CHUNKS = 1000


class IndexSink(TextSink):
    options = ("chunk_size", "chunk_overlap")

    def __init__(self, project: ProjectConfig) -> None:
        super().__init__(project)
        self.size = self.option("chunk_size", chunking.DEFAULT_SIZE)
        self.overlap = self.option("chunk_overlap", chunking.DEFAULT_OVERLAP, minimum=0)
        if self.overlap > self.size // 2:  # was cut to that silently; config check showed it not
            raise ConfigError(f"projects.{project.name}.sink.chunk_overlap: must be at most "
                              f"half of chunk_size ({self.size // 2})")

    def parts_of(self, document: Document) -> list[tuple]:
        pieces = chunking.chunk_text(document.text, document.pages, self.size, self.overlap,
                                     paged=document.mime_type == PDF)
        if db.is_postgres():  # with each chunk's tsvector, worked out before the transaction
            return [(document.project_id, seq, piece.page, piece.start, piece.end, piece.text,
                     words.tsvector(piece.text))
                    for seq, piece in enumerate(pieces)]
        stored = len(document.text) > SLICED_UP_TO or "\0" in document.text
        return [(document.project_id, seq, piece.page, piece.start, piece.end,
                 piece.text if stored else None)
                for seq, piece in enumerate(pieces)]

    def store_parts(self, parts: list[tuple[int, list[tuple]]],
                    check: Callable[[], None] | None = None) -> None:
        if check is None or sum(len(chunks) for _, chunks in parts) <= BATCH_CHUNKS:
            self._store(parts)
            return
        for document_id, chunks in parts:  # a long document: its job's deadline in between
            after = 0
            for start in range(0, len(chunks), BATCH_CHUNKS):
                check()
                self._store([(document_id, chunks[start:start + BATCH_CHUNKS])], after)
                if not db.is_postgres():  # where the next batch's index rows begin
                    after = database.execute_sql(
                        f"SELECT max(id) FROM chunks WHERE document_id = {database.param}",
                        [document_id]).fetchone()[0]

    @staticmethod
    def _store(parts: list[tuple[int, list[tuple]]], after: int = 0) -> None:
        """Insert the chunks, and on SQLite index those of the documents with ids above
        ``after`` (the ones just inserted)."""
        rows = [(document_id, *row) for document_id, chunks in parts for row in chunks]
        if db.is_postgres():
            db.executemany("INSERT INTO chunks (document_id, project_id, seq, page, start_offset, "
                           "end_offset, text, tsv) VALUES (%s, %s, %s, %s, %s, %s, %s, "
                           "CAST(%s AS tsvector))", rows)
            return
        marks = ", ".join([database.param] * 7)
        db.executemany("INSERT INTO chunks (document_id, project_id, seq, page, start_offset, "
                       f"end_offset, text) VALUES ({marks})", rows)
        # One statement for all the chunks: FTS5 inserting them row by row from a trigger
        # cost more than twice as much CPU per chunk.
        ids = [document_id for document_id, _ in parts]
        database.execute_sql(
            "INSERT INTO chunks_fts (rowid, text) SELECT id, text FROM chunk_texts "
            f"WHERE document_id IN ({', '.join([database.param] * len(ids))}) "
            f"AND id > {database.param}", [*ids, after])
