"""extract: every encoding we accept, every PDF failure we must report as one clean line."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest

import corpus
from ingestd.extract import ExtractError, Extracted, extract, extract_pdf, extract_text
from ingestd.procpool import ExtractorPool
from ingestd.sniff import sniff_file, sniff_head

TEXT = "Grüße, naïve café – “quoted” €5\nsecond line"


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        (TEXT.encode("utf-8"), "utf-8"),
        (b"\xef\xbb\xbf" + TEXT.encode("utf-8"), "utf-8-sig"),
        (b"\xff\xfe" + TEXT.encode("utf-16-le"), "utf-16"),
        (b"\xfe\xff" + TEXT.encode("utf-16-be"), "utf-16"),
        (b"\xff\xfe\x00\x00" + TEXT.encode("utf-32-le"), "utf-32"),
        (b"\x00\x00\xfe\xff" + TEXT.encode("utf-32-be"), "utf-32"),
        (TEXT.encode("cp1252"), "cp1252"),
    ],
)
def test_encodings(data: bytes, encoding: str) -> None:
    """Each accepted encoding decodes to the same text (no BOM left) and names itself."""
    got = extract_text(data, "text/plain")
    assert got == Extracted(TEXT, ((0, len(TEXT)),), encoding)


@pytest.mark.parametrize(("data", "encoding", "text", "replaced"), [
    (TEXT.encode() + b" \xff\xfe joined " + TEXT.encode(), "utf-8",
     f"{TEXT} \ufffd\ufffd joined {TEXT}", 2),
    (b"\xef\xbb\xbfjust ASCII, then \x81", "utf-8-sig", "just ASCII, then \ufffd", 1),
], ids=["mostly-utf-8", "bom"])
def test_damaged_utf8_keeps_its_valid_characters(data: bytes, encoding: str, text: str,
                                                 replaced: int) -> None:
    """UTF-8 with a few invalid bytes (two files joined, a damaged copy) keeps every valid
    character, each invalid sequence read as U+FFFD and counted: read as cp1252, as it was,
    "café" became "cafÃ©" and no search found it. A BOM says it is UTF-8 whatever else."""
    got = extract_text(data, "text/plain")
    assert (got.text, got.encoding, got.replaced) == (text, encoding, replaced)


def test_legacy_text_with_lone_accent_bytes_stays_cp1252() -> None:
    """Text whose every non-ASCII byte is a lone cp1252 accent has no valid UTF-8 character:
    cp1252, as before, even with one pair of bytes that happens to be valid UTF-8."""
    data = "Ã© is rare, but here: Grüße, naïve café, déjà vu, über".encode("cp1252")
    got = extract_text(data, "text/plain")
    assert (got.encoding, got.replaced) == ("cp1252", 0)
    assert got.text == data.decode("cp1252")


def test_corpus_utf16_and_cp1252_files(tmp_path: Path) -> None:
    """The corpus's UTF-16 and cp1252 files come back as their text through extract() by path."""
    assert extract(corpus.make_utf16(tmp_path / "u.txt", TEXT), "text/plain").encoding == "utf-16"
    got = extract(corpus.make_cp1252(tmp_path / "c.md", TEXT), "text/markdown; charset=x")
    assert (got.text, got.encoding) == (TEXT, "cp1252")


def test_crlf_becomes_lf() -> None:
    """CRLF line ends become LF, and the single span covers the normalised text."""
    got = extract_text(b"a,b\r\n1,2\r\n", "text/csv")
    assert (got.text, got.pages) == ("a,b\n1,2\n", ((0, 8),))


def test_html_is_kept_as_text() -> None:
    """HTML is text: markup and entities are kept verbatim, only line ends are normalised."""
    page = b"<html>\r\n<p>Hello &amp; <b>bye</b></p>\r\n</html>"
    assert extract_text(page, "text/html").text == "<html>\n<p>Hello &amp; <b>bye</b></p>\n</html>"


def test_pdf_pages_and_offsets(tmp_path: Path) -> None:
    """In a 40-page PDF, page 37's text lies exactly at the offsets of pages[36]."""
    path = corpus.make_pdf(tmp_path / "long.pdf", [f"page {n} says (hi)" for n in range(1, 41)])
    got = extract(path, "application/pdf")
    start, end = got.pages[36]
    assert len(got.pages) == 40 and got.encoding is None
    assert got.text[start:end] == "page 37 says (hi)"
    assert got.text == "\n\n".join(f"page {n} says (hi)" for n in range(1, 41))


def test_on_page_progress(tmp_path: Path) -> None:
    """on_page is called once per page, in order, with (pages done, total pages)."""
    calls: list[tuple[int, int]] = []
    data = Path(corpus.make_pdf(tmp_path / "p.pdf", ["one", "two", "three"])).read_bytes()
    extract_pdf(data, on_page=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_on_page_exception_propagates(tmp_path: Path) -> None:
    """An exception raised by on_page (cancellation) propagates unchanged, not as ExtractError."""

    class Cancelled(Exception):
        pass

    def cancel(done: int, total: int) -> None:
        if done == 2:
            raise Cancelled("stop")

    path = corpus.make_pdf(tmp_path / "p.pdf", ["one", "two", "three"])
    with pytest.raises(Cancelled, match="stop"):
        extract_pdf(path, on_page=cancel)


def test_encrypted_pdf_needs_password(tmp_path: Path) -> None:
    """A PDF encrypted with a real password is refused with the 'needs a password' message."""
    with pytest.raises(ExtractError, match=r"^encrypted PDF \(needs a password\)$"):
        extract(corpus.make_encrypted_pdf(tmp_path / "e.pdf", "hunter2"), "application/pdf")


def test_encrypted_pdf_empty_password(tmp_path: Path) -> None:
    """A PDF encrypted with the empty user password is decrypted and extracted."""
    got = extract(corpus.make_encrypted_pdf(tmp_path / "e.pdf", "", ["open sesame"]), "application/pdf")
    assert got.text == "open sesame"


@pytest.mark.parametrize(("how", "named"), [
    ("certificate", "only Standard PDF encryption handler is available"),
    ("version 7", "Encryption V=7 NOT supported"),
])
def test_encrypted_pdf_with_unsupported_encryption(tmp_path: Path, how: str, named: str) -> None:
    """An encryption pypdf lacks (a certificate's handler, a newer version) is reported as
    encryption, naming what pypdf refused, not as a malformed PDF."""
    path = corpus.make_unsupported_encrypted_pdf(tmp_path / "e.pdf", how)
    with pytest.raises(ExtractError) as info:
        extract(path, "application/pdf")
    assert str(info.value) == f"encrypted PDF whose encryption is not supported: {named}"


def test_truncated_pdf(tmp_path: Path) -> None:
    """A truncated PDF is reported as truncated or malformed, in one line."""
    with pytest.raises(ExtractError, match=r"^truncated or malformed PDF: \S") as info:
        extract(corpus.make_truncated_pdf(tmp_path / "t.pdf"), "application/pdf")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("where", ["content", "page"])
def test_nested_bomb_fails_fast(tmp_path: Path, where: str) -> None:
    """Deeply nested arrays end as an ExtractError within seconds, never a crash or a hang."""
    path = corpus.make_nested_pdf_bomb(tmp_path / "bomb.pdf", where=where)
    deadline = time.process_time() + 5  # CPU time: a loaded machine's wall clock says little
    with pytest.raises(ExtractError, match="^truncated or malformed PDF: objects nested too deeply$"):
        extract(path, "application/pdf")
    assert time.process_time() < deadline


def test_nested_dict_bomb_is_contained(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nested dictionaries end quickly, quietly (no pypdf log spray), as an ExtractError or the page text.

    pypdf (strict=False) salvages a dictionary cut short by RecursionError, so which outcome
    occurs depends on how deep the caller's stack already is; either is acceptable, a crash is not.
    """
    path = corpus.make_nested_pdf_bomb(tmp_path / "bomb.pdf", where="dict")
    deadline = time.process_time() + 5  # CPU time: a loaded machine's wall clock says little
    with caplog.at_level(logging.WARNING):
        try:
            assert extract(path, "application/pdf").text == "under the bomb"
        except ExtractError as exc:
            assert str(exc).startswith("truncated or malformed PDF: ")
    assert time.process_time() < deadline
    assert not [record for record in caplog.records if record.name.startswith("pypdf")]
    assert logging.getLogger("pypdf").level == logging.NOTSET


def test_scanned_like_pdf(tmp_path: Path) -> None:
    """A PDF whose pages carry no text is reported as having no extractable text."""
    with pytest.raises(ExtractError, match=r"^PDF has no extractable text \(scanned\?\)$"):
        extract(corpus.make_scanned_like_pdf(tmp_path / "s.pdf"), "application/pdf")


def test_binary_junk_as_text(tmp_path: Path) -> None:
    """Random bytes with NULs claimed as text/plain are refused, not decoded as cp1252 garbage."""
    with pytest.raises(ExtractError, match="^not text: invalid UTF-8 at byte"):
        extract(corpus.make_binary_junk(tmp_path / "junk.txt"), "text/plain")


def test_binary_junk_as_pdf(tmp_path: Path) -> None:
    """Random bytes claimed as a PDF are reported as malformed."""
    with pytest.raises(ExtractError, match="^truncated or malformed PDF: "):
        extract(corpus.make_binary_junk(tmp_path / "junk.pdf"), "application/pdf")


def test_invalid_utf8_names_the_byte(tmp_path: Path) -> None:
    """Invalid UTF-8 with control bytes is refused, naming the first bad byte's offset and the
    first control character's (it said "not cp1252 text", although cp1252 was never tried)."""
    path = corpus.make_invalid_utf8(tmp_path / "bad.txt")
    offset = len(corpus.INVALID_UTF8_PREFIX)
    control = offset + corpus.INVALID_UTF8_TAIL.index(b"\x01")
    expected = (f"not text: invalid UTF-8 at byte {offset} and a control character (0x01) "
                f"at byte {control}")
    with pytest.raises(ExtractError) as info:
        extract(path, "text/plain")
    assert str(info.value) == expected


@pytest.mark.parametrize(("data", "reason"), [
    ("café \x07 bell".encode("cp1252"),
     "not text: invalid UTF-8 at byte 3 and a control character (0x07) at byte 5"),
    (b"caf\xe9 \x81\x8d", "not text: invalid UTF-8 at byte 3 and not cp1252 text"),
], ids=["control", "undefined-in-cp1252"])
def test_what_refuses_bytes_that_are_not_utf8(data: bytes, reason: str) -> None:
    """The reason is the one that applies: a control character (then nothing else is tried),
    or bytes cp1252 does not define."""
    with pytest.raises(ExtractError) as info:
        extract_text(data, "text/plain")
    assert str(info.value) == reason


def test_valid_utf8_keeps_its_control_characters() -> None:
    """The control-character rule is for guessing an encoding: valid UTF-8 is text as it is."""
    assert extract_text(b"bell \x07 tab\t", "text/plain").text == "bell \x07 tab\t"


def test_cp1252_that_happens_to_hold_one_valid_utf8_pair_stays_cp1252() -> None:
    """“CAFÉ” in cp1252: the opening quote is invalid UTF-8 and "É”" (0xC9 0x94) happens to be
    valid UTF-8 ("ɔ"). One valid against one invalid is a tie, and cp1252 reads every byte:
    as damaged UTF-8 it was "\ufffdCAFɔ", and `cafe` did not find it."""
    data = "the sign says “CAFÉ” in red".encode("cp1252")
    got = extract_text(data, "text/plain")
    assert (got.text, got.encoding, got.replaced) == (data.decode("cp1252"), "cp1252", 0)


def test_text_is_composed(tmp_path: Path) -> None:
    """Decomposed accents (a letter, then a combining mark) come out composed (NFC), in a text
    file and on a PDF's page alike, with the spans of the composed text."""
    import unicodedata

    text = "мой край, οδός, café"
    got = extract_text(unicodedata.normalize("NFD", text).encode(), "text/plain")
    assert got.text == text and got.pages == ((0, len(text)),)
    # A PDF whose font maps "#" to U+0301, the combining acute accent: pypdf gives "e\u0301".
    pdf = extract_pdf(corpus.make_remapped_pdf(tmp_path / "nfd.pdf", "cafe# ole#", b"0301"))
    assert pdf.text == "café olé" and pdf.pages == ((0, len("café olé")),)


def test_ligatures_are_spelled_out(tmp_path: Path) -> None:
    """The typographic ligatures (U+FB00-FB06) come out as their letters, on a PDF's page (a
    font mapping a glyph to "ﬃ", as PDF producers do) and in a text file alike; other
    characters NFKC would change are kept."""
    pdf = extract_pdf(corpus.make_remapped_pdf(tmp_path / "lig.pdf", "the o#ce", b"FB03"))
    assert pdf.text == "the office" and pdf.pages == ((0, len("the office")),)
    text = "ﬀ ﬁ ﬂ ﬃ ﬄ ﬅ ﬆ, x² ＡＢ"
    assert extract_text(text.encode(), "text/plain").text == "ff fi fl ffi ffl st st, x² ＡＢ"


@pytest.mark.parametrize("mime", ["image/png", "application/octet-stream", "application/zip", ""])
def test_unknown_type(mime: str) -> None:
    """A type that is neither text nor PDF is refused with a message naming the type."""
    with pytest.raises(ExtractError, match="cannot be extracted$"):
        extract(b"\x89PNG\r\n\x1a\n", mime)


def test_missing_file_is_not_a_content_error(tmp_path: Path) -> None:
    """An unreadable path raises OSError (maybe transient), not the permanent ExtractError."""
    with pytest.raises(FileNotFoundError):
        extract_pdf(tmp_path / "gone.pdf")


def test_lone_surrogates_become_replacement_characters(tmp_path: Path) -> None:
    """A ToUnicode CMap mapping a glyph to half a surrogate pair: each lone surrogate pypdf
    returns becomes U+FFFD (the store's UTF-8 refuses surrogates), the rest of the text is kept."""
    path = corpus.make_lone_surrogate_pdf(tmp_path / "s.pdf", "lone # here, #B#B")
    got = extract(path, "application/pdf")
    assert got.text == "lone \ufffd here, \ufffdB\ufffdB"
    assert got.pages == ((0, len(got.text)),)
    got.text.encode("utf-8")


def test_nuls_become_replacement_characters(tmp_path: Path) -> None:
    """A ToUnicode CMap mapping a glyph to <0000>: each NUL pypdf returns becomes U+FFFD
    (PostgreSQL's text refuses a NUL, SQLite's substr() stops at one)."""
    path = corpus.make_nul_pdf(tmp_path / "n.pdf", "nul # here, #B#B")
    got = extract(path, "application/pdf")
    assert got.text == "nul \ufffd here, \ufffdB\ufffdB"
    assert got.pages == ((0, len(got.text)),)


def amplifying_pdf(path: Path, codes: int, expansion: int) -> bytes:
    """A PDF of a few KB whose font maps each of ``codes`` codes to ``expansion`` letters."""
    return Path(corpus.make_remapped_pdf(path, "#" * codes, b"0061" * expansion)).read_bytes()


def test_a_pdf_with_no_pages_says_so(tmp_path: Path) -> None:
    """Not "no extractable text (scanned?)": there is nothing to scan."""
    from pypdf import PdfWriter

    path = tmp_path / "empty.pdf"
    with path.open("wb") as out:
        PdfWriter().write(out)
    with pytest.raises(ExtractError, match="^PDF has no pages$"):
        extract_pdf(path)


def test_a_pdfs_text_is_held_to_max_characters(tmp_path: Path) -> None:
    """A font mapping one code to 250 letters: 2,000 codes are 500,000 characters from a PDF
    of 3 KB (pages of them were hundreds of millions, and gigabytes of memory). Past
    ``max_characters`` the PDF fails, naming the limit and the page; within it, it is read."""
    data = amplifying_pdf(tmp_path / "amplifies.pdf", 2000, 250)
    assert len(data) < 5000
    with pytest.raises(ExtractError) as info:
        extract_pdf(data, max_characters=100_000)
    assert str(info.value) == ("text of over 100,000 characters (max_bytes) by page 1 of 1: "
                               "possibly a PDF bomb")
    assert len(extract_pdf(data, max_characters=500_000).text) == 500_000


def test_an_extraction_process_out_of_memory_fails_the_pdf_as_such(tmp_path: Path) -> None:
    """An extraction process under an address-space limit (LimitAS=, as a service may run)
    that a PDF's text exhausts: the PDF fails as out of memory, one line, not as "internal
    error" with a traceback in the log; the next PDF is read."""
    import resource

    pool = ExtractorPool(1)
    try:
        first = Path(corpus.make_pdf(tmp_path / "first.pdf", ["warms the process"])).read_bytes()
        pool.extract_pdf(first, time.monotonic() + 60, lambda *_: None, lambda: None)
        [worker] = pool._all
        with open(f"/proc/{worker.process.pid}/status") as status:
            size = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
        limit = (size + 64 * 1024) * 1024  # 64 MB more than it has
        resource.prlimit(worker.process.pid, resource.RLIMIT_AS, (limit, limit))
        bomb = amplifying_pdf(tmp_path / "bomb.pdf", 400_000, 250)  # 100 M characters
        with pytest.raises(ExtractError) as info:
            pool.extract_pdf(bomb, time.monotonic() + 120, lambda *_: None, lambda: None)
        assert str(info.value) == "out of memory extracting the PDF: possibly a PDF bomb"
        after = Path(corpus.make_pdf(tmp_path / "after.pdf", ["read after it"])).read_bytes()
        got = pool.extract_pdf(after, time.monotonic() + 60, lambda *_: None, lambda: None)
        assert got.text == "read after it"
    finally:
        pool.close()


def test_a_bad_pdf_keeps_its_extraction_process(tmp_path: Path) -> None:
    """A PDF the extraction process answers is bad fails, and the process reads the next one:
    it was killed and a new one started (an interpreter and pypdf's import) for every bad PDF."""
    pool = ExtractorPool(1)
    try:
        good = Path(corpus.make_pdf(tmp_path / "good.pdf", ["a good page"])).read_bytes()
        pool.extract_pdf(good, time.monotonic() + 60, lambda *_: None, lambda: None)
        [worker] = pool._all
        with pytest.raises(ExtractError, match="^truncated or malformed PDF"):
            pool.extract_pdf(good[:len(good) // 3], time.monotonic() + 60, lambda *_: None,
                             lambda: None)
        assert pool.extract_pdf(good, time.monotonic() + 60, lambda *_: None,
                                lambda: None).text == "a good page"
        assert pool._all == {worker} and worker.process.is_alive()
    finally:
        pool.close()


def test_a_killed_extraction_process_fails_the_pdf_and_is_replaced(tmp_path: Path) -> None:
    """An extraction process killed mid-PDF (as the OOM killer kills a PDF bomb) fails that PDF
    with the pool's one-line reason, and the pool's next PDF gets a new process."""
    big = Path(corpus.make_pdf(tmp_path / "big.pdf", [f"page {n} " * 20 for n in range(2000)]))
    pool = ExtractorPool(1)
    killed: list[int] = []

    def kill_at_first_report(done: int, total: int) -> None:
        if not killed and done < total:  # mid-extraction
            [worker] = pool._all
            os.kill(worker.process.pid, signal.SIGKILL)
            killed.append(worker.process.pid)

    try:
        with pytest.raises(ExtractError) as info:
            pool.extract_pdf(big.read_bytes(), time.monotonic() + 60, kill_at_first_report, lambda: None)
        assert str(info.value) == ("the extraction process died (exit code -9): "
                                   "the file may be a PDF bomb")
        assert not pool._all  # the dead process was dropped
        small = Path(corpus.make_pdf(tmp_path / "small.pdf", ["after the kill"])).read_bytes()
        got = pool.extract_pdf(small, time.monotonic() + 60, lambda *_: None, lambda: None)
        assert got.text == "after the kill"
        [replacement] = pool._all
        assert replacement.process.pid != killed[0]
    finally:
        pool.close()


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])  # cp1252 refuses control bytes already
def test_a_nul_past_the_sniffed_head_is_not_text(tmp_path: Path, encoding: str) -> None:
    """Text for the first 8 KB that sniffing reads, then binary data with a NUL: refused."""
    text = "plain words. " * 1000 + "\0binary tail"
    data = (b"\xff\xfe" + text.encode("utf-16-le")) if encoding == "utf-16" else text.encode(encoding)
    path = tmp_path / "tail.txt"
    path.write_bytes(data)
    assert sniff_file(path) == "text/plain"
    with pytest.raises(ExtractError, match=f"not text: a NUL character at offset 13000 \\({encoding}\\)"):
        extract(path, "text/plain")


@pytest.mark.parametrize("bom", [b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"])
def test_a_utf32_file_with_its_bom_is_text(tmp_path: Path, bom: bytes) -> None:
    """UTF-32 (with a BOM) sniffs as text and decodes, not as UTF-16 with NULs between."""
    path = tmp_path / "u32.txt"
    path.write_bytes(bom + TEXT.encode("utf-32-le" if bom[0] == 0xFF else "utf-32-be"))
    assert sniff_file(path) == "text/plain"
    assert extract(path, "text/plain").text == TEXT


@pytest.mark.parametrize(("head", "mime"), [
    (b"\n\n%PDF-1.4\n", "application/pdf"),
    (b"\xef\xbb\xbf%PDF-1.7\n", "application/pdf"),
    (b"Content-Type: application/pdf\r\n\r\n%PDF-1.4\n", "application/pdf"),
    (b" " * 1023 + b"%PDF-1.4\n", "application/pdf"),
    (b" " * 1024 + b"%PDF-1.4\n", "text/plain"),  # past the first 1024 bytes
    (b"Files start with %PDF-1.4, then objects.\n", "text/plain"),  # not at a line's start
    (b"Notes\nabout headers:\n%PDF-1.4 comes first\n", "text/plain"),  # after two lines
    (b"\n%PDF-x is no version\n", "text/plain"),
])
def test_a_pdf_header_within_the_first_kb_after_blank_space_or_one_line(head: bytes,
                                                                        mime: str) -> None:
    """A PDF whose header comes after a BOM, blank space or one line (a mail or HTTP header)
    is a PDF; text that merely mentions "%PDF-" stays text."""
    assert sniff_head(head + b"more text\n", "notes.txt") == mime
