"""Bytes to text, by the MIME type that ingestd.sniff found (never by the file name).

Text: a UTF-8 BOM -> "utf-8-sig"; a UTF-32 or UTF-16 BOM (LE or BE) -> "utf-32", "utf-16"; else
strict UTF-8; else, if no control byte but tab, LF, CR, form feed, ESC occurs (sniff's rule for
text; else it is refused, naming the first): UTF-8 with its few invalid sequences read as U+FFFD,
when it holds more valid non-ASCII characters (or has a BOM); else the one fallback, cp1252
(legacy Windows text), taken only if every byte is defined in cp1252. Anything else is refused,
not turned into mojibake, and so is text with a NUL character (binary data after a text-like
head). CRLF becomes LF, and the text is composed (NFC: see ingestd.words.composed).
Markdown, CSV, JSON, XML and HTML stay as they are (markup included: the words are all there,
and no offset is shifted by a lossy tag stripper).

PDFs are read page by page with pypdf (strict=False). On a broken or hostile file pypdf raises
nearly anything (ValueError, KeyError, a bare RecursionError...), so each pypdf call is guarded and
any failure becomes one ExtractError; ``on_page`` runs outside the guard, so cancellation propagates.
An encrypted PDF opens with the empty password or fails as encrypted: needing a password, or
with an encryption pypdf does not support. A PDF's text may be held to a number of characters
(the project's max_bytes, the most a text file can give): a few KB of PDF can draw hundreds of
millions (a font mapping one code to a long string), and running out of memory is a failure of
the file too.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import re
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar


from ingestd.sniff import BINARY_CONTROLS, PDF
from ingestd.words import composed

TEXT_TYPES = ("application/json", "application/xml")  # besides every text/* type
_MAX_REASON = 200
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile(b"[" + re.escape(BINARY_CONTROLS) + b"]")
T = TypeVar("T")

OnPage = Callable[[int, int], None]
Source = bytes | bytearray | memoryview | str | os.PathLike


class ExtractError(Exception):
    """Permanent: the file's content cannot be turned into text; str(exc) is one line saying why."""


@dataclass(frozen=True)
class Extracted:
    text: str  # the whole text; PDF pages joined with "\n\n"
    pages: tuple[tuple[int, int], ...]  # (start, end) of each page's text in `text`; one span for text files
    encoding: str | None  # "utf-8", "utf-8-sig", "utf-16", "utf-32", "cp1252"; None for PDFs
    replaced: int = 0  # invalid UTF-8 sequences in mostly-UTF-8 text, read as U+FFFD

    def __post_init__(self) -> None:
        # Every extracted text is made here: keep it storable (frozen: object.__setattr__).
        object.__setattr__(self, "text", _storable(self.text))


def extract(data_or_path: Source, mime_type: str, on_page: OnPage | None = None) -> Extracted:
    """Dispatch on the sniffed type; a type we cannot read is a permanent ExtractError."""
    if _base_type(mime_type) == PDF:
        return extract_pdf(data_or_path, on_page)
    return extract_text(_read(data_or_path), mime_type)


def extract_text(data: bytes, mime_type: str, check: Callable[[], None] = lambda: None
                 ) -> Extracted:
    """Decode a text file (see the module docstring for the encodings tried) into one span;
    ``check()`` is called as it goes, and raises to stop (a job's deadline)."""
    mime = _base_type(mime_type)
    if not (mime.startswith("text/") or mime in TEXT_TYPES):
        raise ExtractError(f"type {mime or '(none)'} cannot be extracted")
    text, encoding, replaced = _decode(bytes(data))
    text = composed(text.replace("\r\n", "\n"), check)
    return Extracted(text, ((0, len(text)),), encoding, replaced)


def extract_pdf(path_or_bytes: Source, on_page: OnPage | None = None,
                max_characters: int | None = None) -> Extracted:
    """Text of each page, reporting on_page(done, total) after each so the caller can cancel;
    ExtractError once the text passes ``max_characters``."""
    data = _read(path_or_bytes)  # outside the guard: an unreadable file is an OSError, not a bad PDF
    texts: list[str] = []
    characters = 0
    with _quiet_pypdf():
        reader = _guarded(lambda: _open_pdf(data))
        total = _guarded(lambda: len(reader.pages))
        if total == 0:
            raise ExtractError("PDF has no pages")
        for index in range(total):
            text = _guarded(lambda: reader.pages[index].extract_text() or "")  # called at once
            texts.append(composed(text))
            characters += len(texts[-1])
            if max_characters is not None and characters > max_characters:
                raise ExtractError(f"text of over {max_characters:,} characters (max_bytes) by "
                                   f"page {index + 1} of {total}: possibly a PDF bomb")
            if on_page is not None:
                on_page(index + 1, total)
    if not any(text.strip() for text in texts):
        raise ExtractError("PDF has no extractable text (scanned?)")
    spans, start = [], 0
    for text in texts:
        spans.append((start, start + len(text)))
        start += len(text) + 2
    return Extracted("\n\n".join(texts), tuple(spans), None)


def _storable(text: str) -> str:
    """``text`` with each lone surrogate and each NUL as U+FFFD, one character for one (``pages``
    stay right).

    pypdf returns them for a ToUnicode CMap that maps a glyph to half a UTF-16 pair (<D800>) or
    to <0000>. UTF-8 (SQLite, JSON, a sink) refuses a surrogate; PostgreSQL's text refuses a
    NUL, and SQLite's substr() stops at one. extract_text never returns either (its decoders
    are strict, and it refuses text with a NUL)."""
    if "\0" in text:
        text = text.replace("\0", "\ufffd")
    if text.isascii():  # fast, and ASCII holds no surrogate
        return text
    try:
        text.encode("utf-8")  # C speed; fails only on a surrogate
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _base_type(mime_type: str) -> str:
    return mime_type.split(";", 1)[0].strip().lower()


def _read(source: Source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    with open(source, "rb") as handle:
        return handle.read()


def _decode(data: bytes) -> tuple[str, str, int]:
    """(text, encoding name, invalid UTF-8 sequences replaced) by BOM, then UTF-8, then the
    cp1252 fallback; else ExtractError. Decoded text with a NUL in it is binary data after a
    text-like head: not text either."""
    text, encoding, replaced = _decode_any(data)
    nul = text.find("\0")
    if nul != -1:
        raise ExtractError(f"not text: a NUL character at offset {nul} ({encoding})")
    return text, encoding, replaced


def _decode_any(data: bytes) -> tuple[str, str, int]:
    # UTF-32 first: its little-endian BOM starts with UTF-16's.
    for boms, encoding in (((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE), "utf-32"),
                           ((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE), "utf-16")):
        if data.startswith(boms):
            try:
                return data.decode(encoding), encoding, 0
            except UnicodeDecodeError as exc:
                raise ExtractError(f"not text: invalid {encoding.upper()} at byte {exc.start}") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    utf8 = "utf-8-sig" if bom else "utf-8"
    try:
        return data[bom:].decode("utf-8"), utf8, 0
    except UnicodeDecodeError as exc:
        bad = bom + exc.start
    control = _first_control(data)
    if control is not None:  # not text by sniff's rule: no other reading is tried
        raise ExtractError(f"not text: invalid UTF-8 at byte {bad} and a control character "
                           f"(0x{data[control]:02x}) at byte {control}")
    damaged = _damaged_utf8(data[bom:], bom > 0)
    if damaged is not None:
        return damaged[0], utf8, damaged[1]
    try:
        return data.decode("cp1252"), "cp1252", 0
    except UnicodeDecodeError:
        pass
    raise ExtractError(f"not text: invalid UTF-8 at byte {bad}" + ("" if bom else " and not cp1252 text"))


def _first_control(data: bytes) -> int | None:
    """Where the first control byte but tab, LF, CR, form feed and ESC is; None if none is."""
    found = _CONTROL.search(data)
    return None if found is None else found.start()


def _damaged_utf8(data: bytes, bom: bool) -> tuple[str, int] | None:
    """UTF-8 text with a few invalid bytes (damaged, or two files joined): its text with each
    invalid sequence read as U+FFFD, and how many; None if it does not look like UTF-8. A BOM
    says it is; else it must hold more valid non-ASCII characters than invalid sequences:
    legacy 8-bit text has its accents as lone bytes, none of them valid UTF-8, and read as
    cp1252 it keeps them, where this text would turn every valid one into mojibake. Now and
    then two cp1252 characters make one valid UTF-8 sequence (a capital "É" before a closing
    quote: 0xC9 0x94 is "ɔ"), always beside an invalid one (the opening quote): on a tie, the
    reading that decodes every byte wins."""
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - data.count("\ufffd".encode())
    valid = len(text) - len(text.encode("ascii", "ignore")) - replaced
    return (text, replaced) if bom or valid > replaced else None


def _open_pdf(data: bytes) -> Any:
    """A reader, decrypted with the empty password if the file is encrypted and that opens it.

    pypdf is imported here, not at the top: only the PDF extraction processes need it (about
    20 MB in each process that imports it)."""
    from pypdf import PasswordType, PdfReader

    reader = PdfReader(io.BytesIO(data), strict=False)
    if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
        raise ExtractError("encrypted PDF (needs a password)")
    return reader


OUT_OF_MEMORY = "out of memory extracting the PDF: possibly a PDF bomb"


def _guarded(call: Callable[[], T]) -> T:
    """Run one pypdf call; whatever it raises on a bad file becomes a one-line ExtractError."""
    try:
        return call()
    except ExtractError:
        raise
    except MemoryError:
        raise ExtractError(OUT_OF_MEMORY) from None
    except Exception as exc:
        from pypdf.errors import DependencyError

        if isinstance(exc, DependencyError):  # AES encryption without 'cryptography'
            raise ExtractError(f"PDF cannot be read here: {_reason(exc)}") from exc
        if _unsupported_encryption(exc):
            raise ExtractError("encrypted PDF whose encryption is not supported: "
                               f"{_one_line(exc)}") from exc
        raise ExtractError(f"truncated or malformed PDF: {_reason(exc)}") from exc


def _unsupported_encryption(exc: Exception) -> bool:
    """pypdf's encryption code refusing a handler or version it lacks (a certificate's
    /Adobe.PubSec, /V 7...): NotImplementedError, like an unsupported stream filter's, so
    told apart by where it was raised."""
    return isinstance(exc, NotImplementedError) and any(
        frame.f_globals.get("__name__") == "pypdf._encryption"
        for frame, _ in traceback.walk_tb(exc.__traceback__))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError) or isinstance(exc.__cause__, RecursionError):
        return "objects nested too deeply"
    text = _one_line(exc)
    from pypdf.errors import PyPdfError

    if not isinstance(exc, PyPdfError):  # "KeyError: '/Root'" says more than "'/Root'"
        text = f"{type(exc).__name__}: {text}".rstrip(": ")
    return text[:_MAX_REASON] or type(exc).__name__


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:_MAX_REASON]


@contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """Mute pypdf's logger meanwhile: a broken file logs a warning per bad object (22k for one bomb),
    and its only error-level message dumps a whole 256-glyph table.

    A call that finds the logger already muted (overlapping calls) leaves it for the first to restore.
    """
    logger = logging.getLogger("pypdf")
    saved = logger.level
    logger.setLevel(max(saved, logging.CRITICAL))
    try:
        yield
    finally:
        if saved < logging.CRITICAL:
            logger.setLevel(saved)
