"""What a file is, from its first bytes (never from its name alone).

The name only refines a text type (``.md`` -> text/markdown); a PDF named ``.txt`` is a PDF and
binary junk named ``.txt`` is ``application/octet-stream``.
"""

from __future__ import annotations

import codecs
import os
import re

SNIFF_BYTES = 8192
OCTET_STREAM = "application/octet-stream"
PDF = "application/pdf"
# The PDF spec lets a reader find the header anywhere in the first 1024 bytes (pypdf does):
# files come with a newline, a BOM or a mail/HTTP header line before it. A text file that
# merely mentions "%PDF-" must stay text, so only a UTF-8 BOM, blank space and at most one
# other line may precede it, and it must start its line, with a version digit.
PDF_HEADER_WITHIN = 1024
_PDF_HEADER = re.compile(rb"(?:\xef\xbb\xbf)?\s*(?:[^\s\0][^\r\n\0]*(?:\r\n|\r|\n)\s*)?%PDF-\d")

_MAGIC = (
    (b"%PDF-", PDF),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x1f\x8b", "application/gzip"),
    (b"\x7fELF", "application/x-executable"),
)
_TEXT_BY_SUFFIX = {
    ".md": "text/markdown", ".markdown": "text/markdown", ".csv": "text/csv",
    ".tsv": "text/tab-separated-values", ".json": "application/json", ".html": "text/html",
    ".htm": "text/html", ".xml": "application/xml", ".rst": "text/x-rst",
}
MAX_CONTROL_SHARE = 0.10  # binary formats have NULs; random bytes are ~11% controls
_BOMS = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)
# Control characters that do not occur in text (NUL and friends; tab, newlines, form feed are fine).
BINARY_CONTROLS = bytes(set(range(0x20)) - {0x09, 0x0A, 0x0C, 0x0D, 0x1B})


def sniff_head(head: bytes, name: str) -> str:
    """The MIME type of a file whose first bytes are ``head``."""
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if _late_pdf_header(head):
        return PDF
    if not (head.startswith(_BOMS) or looks_like_text(head)):
        return OCTET_STREAM
    return _TEXT_BY_SUFFIX.get(os.path.splitext(name)[1].lower(), "text/plain")


def _late_pdf_header(head: bytes) -> bool:
    """A PDF header after a few bytes (see _PDF_HEADER), starting in the first 1024."""
    return _PDF_HEADER.match(head, 0, PDF_HEADER_WITHIN + len(b"%PDF-1") - 1) is not None


def looks_like_text(head: bytes) -> bool:
    """No NUL byte and hardly any other control byte. Text with encoding errors still counts:
    extraction then fails with the precise reason (which byte, which encodings were tried)."""
    if b"\0" in head:
        return False
    controls = len(head) - len(head.translate(None, BINARY_CONTROLS))
    return controls <= len(head) * MAX_CONTROL_SHARE


def sniff_file(path: str | bytes | os.PathLike) -> str:
    # No file object (this runs once per new file); O_NONBLOCK: a FIFO swapped in cannot hang us.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        head = os.read(fd, SNIFF_BYTES)
    finally:
        os.close(fd)
    return sniff_head(head, os.fsdecode(path))
