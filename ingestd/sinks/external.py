"""What ingestd's sinks outside its own database share: the JSON objects the command sink
writes to its program's stdin and the http sink POSTs (see :mod:`ingestd.sinks.command` for the
contract), the document id a program, endpoint or plugin answers, and the checks of their
options."""

from __future__ import annotations

import json
from typing import Any

from ingestd.config import MAX_SECONDS, ProjectConfig
from ingestd.errors import ConfigError
from ingestd.sinks import Document, SinkError

DEFAULT_TIMEOUT_SECONDS = 30.0
MAX_DOCUMENT_ID = 2**63 - 1  # the jobs table keeps it in a 64-bit column
SHOWN_CHARS = 200  # how much of a program's output a reason quotes


# --- the JSON contract ----------------------------------------------------------------------

def ingest_message(document: Document) -> dict[str, Any]:
    """The object a sink program or endpoint receives for one document."""
    return {"action": "ingest", "project": document.project_id, "job_id": document.job_id,
            "text": document.text, "source_path": document.source_path,
            "original_filename": document.original_filename, "mime_type": document.mime_type,
            "sha256": document.sha256, "pages": [[start, end] for start, end in document.pages],
            "replaces": document.replaces}


def delete_message(project: str, document_id: int) -> dict[str, Any]:
    return {"action": "delete", "project": project, "document_id": document_id}


def encode(message: dict[str, Any]) -> bytes:
    """ASCII JSON: any parser reads it, and a file name with undecodable bytes (a lone
    surrogate in Python) still encodes, as a \\u escape."""
    return json.dumps(message, ensure_ascii=True).encode("ascii")


def decode_reply(raw: bytes) -> tuple[str, Any]:
    """A reply's text, and its JSON value (None when it is not JSON)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        return text, json.loads(text)
    except ValueError:
        return text, None


def parse_document_id(raw: bytes, source: str) -> int:
    """The id in a reply (``42`` or ``{"id": 42, ...}``); anything else is a permanent error,
    since the same program would answer the same way again."""
    text, value = decode_reply(raw)
    if isinstance(value, dict):
        value = value.get("id")
    if is_document_id(value):
        return value
    raise SinkError(f"expected a document id {source} (an integer, or a JSON object with an "
                    f"integer \"id\"), got {shorten(text)!r}", transient=False)


def is_document_id(value: Any) -> bool:
    """An integer the jobs table can keep as a document's id (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_DOCUMENT_ID


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def timed_out(seconds: float, setting: str) -> str:
    """The reason of a call stopped after ``seconds`` by ``setting`` (see sinks.time_limit)."""
    return f"timed out after {round(seconds, 2):g} s ({setting})"


# --- options ----------------------------------------------------------------------------------

class Options:
    """A sink's options, checked when the sink is made: a typo is a ConfigError naming
    ``projects.NAME.sink.KEY`` at start, not a failed job an hour later."""

    def __init__(self, project: ProjectConfig, known: tuple[str, ...]) -> None:
        self.project = project
        self.values = dict(project.sink.options)
        unknown = sorted(set(self.values) - set(known))
        if unknown:
            raise ConfigError(*(
                f"{self.key(name)}: unknown option for kind {project.sink.kind!r} "
                f"(known: {', '.join(known)})" for name in unknown))

    def key(self, name: str) -> str:
        return f"projects.{self.project.name}.sink.{name}"

    def required(self, name: str) -> Any:
        if name not in self.values:
            raise ConfigError(f"{self.key(name)}: required for kind {self.project.sink.kind!r}")
        return self.values[name]

    def positive_number(self, name: str, default: float) -> float:
        """Seconds: a positive number, at most config.MAX_SECONDS (as every *_seconds key)."""
        value = self.values.get(name, default)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not 0 < value <= MAX_SECONDS):  # nan and inf fail this too
            raise ConfigError(f"{self.key(name)}: must be a positive number of seconds, at most "
                              f"{MAX_SECONDS} (one year)")
        return float(value)
