"""Splitting a document's text into overlapping chunks for the index.

Chunks never cross a page (each keeps its page number) and end, where possible, at a paragraph
break, else at a sentence end, else at a space, else between two words (a comma of a line of
CSV or minified JSON); the next chunk starts ``overlap`` characters earlier, at a word start,
so a phrase cut by one boundary is whole in one of the two chunks. Only a run of word
characters longer than half a chunk is cut inside.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ingestd.words import SEPARATOR

DEFAULT_SIZE = 1000
DEFAULT_OVERLAP = 150
# Up to the last sentence end (greedy): one match from the end instead of finding them all.
_THROUGH_LAST_SENTENCE_END = re.compile(r".*[.!?…][\"')\]]*\s", re.DOTALL)
_THROUGH_LAST_SEPARATOR = re.compile(f".*{SEPARATOR.pattern}", re.DOTALL)


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int   # character offsets in the document's text: text[start:end] == self.text
    end: int
    page: int | None  # 1-based page of a PDF; None for a text file


def chunk_text(text: str, pages: tuple[tuple[int, int], ...], size: int = DEFAULT_SIZE,
               overlap: int = DEFAULT_OVERLAP, paged: bool = False) -> list[Chunk]:
    """Chunks of at most ``size`` characters covering every non-blank part of every page."""
    chunks: list[Chunk] = []
    for number, (page_start, page_end) in enumerate(pages or ((0, len(text)),), start=1):
        for start, end in _spans(text, page_start, page_end, size, overlap):
            span = text[start:end]
            piece = span.strip()
            if piece:  # the offsets of the piece, not of its span: text[first:last] is its text
                first = start + len(span) - len(span.lstrip())
                chunks.append(Chunk(piece, first, first + len(piece), number if paged else None))
    return chunks


def _spans(text: str, start: int, stop: int, size: int, overlap: int) -> list[tuple[int, int]]:
    spans = []
    while start < stop:
        end = stop if stop - start <= size else _break(text, start, start + size)
        spans.append((start, end))
        if end >= stop:
            break
        start = max(_word_start(text, end - overlap, end), start + 1)
    return spans


def _break(text: str, start: int, limit: int) -> int:
    """The best place to end a chunk in ``text[start:limit]``, in its second half if possible."""
    floor = start + (limit - start) // 2
    paragraph = text.rfind("\n\n", floor, limit)
    if paragraph != -1:
        return paragraph + 2
    sentence = _THROUGH_LAST_SENTENCE_END.match(text, floor, limit)
    if sentence:
        return sentence.end()
    space = max(text.rfind(" ", floor, limit), text.rfind("\n", floor, limit))
    if space != -1:
        return space + 1
    between = _THROUGH_LAST_SEPARATOR.match(text, floor, limit)
    return between.end() if between else limit


def _word_start(text: str, position: int, limit: int) -> int:
    """The first word start at or after ``position`` (before ``limit``)."""
    position = max(position, 0)
    if position == 0 or SEPARATOR.match(text, position - 1):
        return position
    separator = SEPARATOR.search(text, position, limit)
    return separator.end() if separator else position
