"""Test files made in code (nothing binary is committed): good, bad and hostile inputs for extract.

The PDFs are written by hand (pypdf cannot draw text): one Helvetica font, one content stream per
page, and a correct xref table, so any reader can find every object by offset.
"""

from __future__ import annotations

import codecs
import io
import os
import random

from pypdf import PdfReader, PdfWriter

_FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"


def _pdf_string(text: str) -> bytes:
    """A PDF literal string: cp1252 bytes with backslash and parentheses escaped."""
    raw = text.encode("cp1252")
    return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def _text_stream(text: str) -> bytes:
    """Content that shows ``text`` line by line from the top left of a Letter page."""
    lines = b" T*\n".join(_pdf_string(line) + b" Tj" for line in text.split("\n"))
    return b"BT /F1 12 Tf 14 TL 72 720 Td\n" + lines + b"\nET\n"


def _stream(content: bytes) -> bytes:
    return b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"


def _pdf_bytes(contents: list[bytes], page_extra: bytes = b"", font: bytes = _FONT,
               extra_objects: tuple[bytes, ...] = ()) -> bytes:
    """A complete PDF with one page per content stream; objects 1-3 are catalog, pages, font, and
    ``extra_objects`` come after the pages (numbered from 4 + 2 * pages)."""
    n = len(contents)
    kids = b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(n))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % n,
        font,
    ]
    for i, content in enumerate(contents):
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
            b" /Contents %d 0 R" % (5 + 2 * i) + page_extra + b" >>"
        )
        objects.append(_stream(content))
    objects += extra_objects
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref_at)
    return bytes(out)


def _write(path: str | os.PathLike, data: bytes) -> str:
    with open(path, "wb") as handle:
        handle.write(data)
    return os.fspath(path)


def make_pdf(path: str | os.PathLike, pages: list[str]) -> str:
    """A real text PDF: pypdf extracts each page's text back (``\\n`` in a page starts a new line)."""
    return _write(path, _pdf_bytes([_text_stream(text) for text in pages]))


def make_prefixed_pdf(path: str | os.PathLike, prefix: bytes, pages: list[str]) -> str:
    """``make_pdf`` with ``prefix`` before its ``%PDF-`` header (a newline, a BOM, a header line),
    which the PDF spec lets readers accept within the first 1024 bytes."""
    return _write(path, prefix + _pdf_bytes([_text_stream(text) for text in pages]))


def make_encrypted_pdf(path: str | os.PathLike, password: str, pages: list[str] | None = None) -> str:
    """``make_pdf`` encrypted with RC4-128 (needs no crypto library); ``password=""`` opens without one."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(_pdf_bytes([_text_stream(t) for t in pages or ["secret text"]]))))
    writer.encrypt(user_password=password, owner_password="owner-" + password, algorithm="RC4-128")
    with open(path, "wb") as handle:
        writer.write(handle)
    return os.fspath(path)


# Encryption dictionaries pypdf cannot open: a certificate's (public-key) handler, a future version.
UNSUPPORTED_ENCRYPTION = {
    "certificate": b"<< /Filter /Adobe.PubSec /SubFilter /adbe.pkcs7.s5 /V 4 /Length 128"
                   b" /Recipients [<3082>] >>",
    "version 7": b"<< /Filter /Standard /V 7 /R 9 /Length 256 /O <00> /U <00> /P -4 >>",
}


def make_unsupported_encrypted_pdf(path: str | os.PathLike, how: str) -> str:
    """A one-page PDF whose trailer names an encryption of ``UNSUPPORTED_ENCRYPTION``."""
    data = _pdf_bytes([_text_stream("protected by an unsupported encryption")])
    encrypt = b"/Root 1 0 R /Encrypt " + UNSUPPORTED_ENCRYPTION[how] + b" /ID [<00> <00>] >>"
    return _write(path, data.replace(b"/Root 1 0 R >>", encrypt))


def make_truncated_pdf(path: str | os.PathLike) -> str:
    """A PDF cut off inside its first page object: no xref, no trailer, no page tree to recover."""
    data = _pdf_bytes([_text_stream("this page is cut off")])
    return _write(path, data[: data.index(b"4 0 obj") + 20])


def make_nested_pdf_bomb(path: str | os.PathLike, depth: int = 100_000, where: str = "content") -> str:
    """A one-page PDF with ``depth`` nested objects that make pypdf's recursive parser overflow.

    ``where``: "content" (arrays in the page's content stream: pypdf lets a bare RecursionError out
    of extract_text), "page" (arrays in the page dictionary), "dict" (nested dictionaries there).
    """
    arrays = b"[" * depth + b"]" * depth
    if where == "content":
        return _write(path, _pdf_bytes([b"BT /F1 12 Tf 72 720 Td (under the bomb) Tj " + arrays + b" TJ ET"]))
    bomb = arrays if where == "page" else b"<< /A " * depth + b">>" * depth
    return _write(path, _pdf_bytes([_text_stream("under the bomb")], page_extra=b" /Bomb " + bomb))


def make_lone_surrogate_pdf(path: str | os.PathLike, text: str) -> str:
    """A one-page PDF whose font's ToUnicode CMap maps "#" to <D800>, half a UTF-16 surrogate pair:
    pypdf extracts each "#" of ``text`` as a lone surrogate, '\\ud800'."""
    return make_remapped_pdf(path, text, b"D800")


def make_nul_pdf(path: str | os.PathLike, text: str) -> str:
    """A one-page PDF whose font's ToUnicode CMap maps "#" to <0000>: pypdf extracts each "#"
    of ``text`` as a NUL."""
    return make_remapped_pdf(path, text, b"0000")


def make_remapped_pdf(path: str | os.PathLike, text: str, unicode_hex: bytes) -> str:
    """A one-page PDF whose font's ToUnicode CMap maps "#" to the UTF-16 code ``unicode_hex``."""
    cmap = (b"/CIDInit /ProcSet findresource begin 12 dict begin begincmap\n"
            b"/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n"
            b"/CMapName /Adobe-Identity-UCS def /CMapType 2 def\n"
            b"1 begincodespacerange <00> <FF> endcodespacerange\n"
            b"1 beginbfchar <23> <" + unicode_hex + b"> endbfchar\n"
            b"endcmap CMapName currentdict /CIDInit /ProcSet findresource pop end end\n")
    font = _FONT[:-2] + b"/ToUnicode 6 0 R >>"
    return _write(path, _pdf_bytes([_text_stream(text)], font=font, extra_objects=(_stream(cmap),)))


def make_scanned_like_pdf(path: str | os.PathLike, pages: int = 2) -> str:
    """Pages that draw only shapes (like a scan's image): a valid PDF with no text at all."""
    return _write(path, _pdf_bytes([b"0.5 g 72 72 468 648 re f\n"] * pages))


def make_binary_junk(path: str | os.PathLike, size: int = 4096, seed: int = 1234) -> str:
    """Seeded random bytes, sure to contain NULs: not text in any encoding."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[10] = 0
    return _write(path, bytes(data))


# (text before the bad bytes, the bad bytes): 0x81 0x8D 0x8F 0x90 0x9D are undefined in cp1252,
# and the C0 controls make even a lenient 8-bit reading refuse it.
INVALID_UTF8_PREFIX = "valid ascii prefix, then ".encode()
INVALID_UTF8_TAIL = b"\x81\x8d\x8f\x90\x9d \x01\x02\x07 more"


def make_invalid_utf8(path: str | os.PathLike) -> str:
    """Bytes that are invalid UTF-8 at ``len(INVALID_UTF8_PREFIX)`` and not cp1252 text either."""
    return _write(path, INVALID_UTF8_PREFIX + INVALID_UTF8_TAIL)


def make_utf16(path: str | os.PathLike, text: str) -> str:
    """UTF-16 (little endian, with BOM), as Windows tools write it."""
    return _write(path, codecs.BOM_UTF16_LE + text.encode("utf-16-le"))


def make_cp1252(path: str | os.PathLike, text: str) -> str:
    """Legacy Windows-1252 text: invalid as UTF-8 as soon as it holds an accented letter."""
    return _write(path, text.encode("cp1252"))
