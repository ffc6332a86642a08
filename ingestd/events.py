"""Events: outbox rows as CloudEvents 1.0 JSON lines.

Every state change is already a row of ``ingest_events`` (written by :mod:`ingestd.jobs` in the
transaction of the change). This module turns rows into CloudEvents, one JSON object per line:
``specversion, id, source, type, time, subject, datacontenttype, data`` plus the ``sequence``
extension (the database-wide, gap-free ``seq``, zero-padded so that string order is sequence
order). ``id`` is ``<installation>-<seq>-<time in microseconds>``: the same on every re-send,
and unique even when a database restored from a backup numbers its new events again.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple
from urllib.parse import quote

from peewee import fn

from ingestd import jobs
from ingestd.errors import IngestdError
from ingestd.models import Event, EventSequence, Meta, database

_json_string = json.encoder.encode_basestring  # a str as JSON, as json.dumps(ensure_ascii=False)
SEQUENCE_DIGITS = 20  # fits any 64-bit sequence, so string order is numeric order
OVERFLOW = "io.ingestd.stream.overflow"
REPLAY_BATCH = 1000


def installation_id() -> str:
    """This database's installation id (made by the first migration)."""
    return Meta.get_by_id("instance_id").value


def format_sequence(seq: int) -> str:
    return str(seq).zfill(SEQUENCE_DIGITS)


def event_id(installation: str, seq: int, time: float) -> str:
    """An event's CloudEvents id. The sequence alone would name two events after a restore
    from a backup (CloudEvents: source and id unique per distinct event); its time does not."""
    return f"{installation}-{seq}-{round(time * 1_000_000)}"


def source_uri(installation: str, project_id: str | None) -> str:
    """The CloudEvents ``source``, a URI-reference: a project name may hold a space or "#",
    percent-encoded here (a plain name reads as it is)."""
    base = f"urn:ingestd:{installation}"
    return f"{base}:project:{quote(project_id, safe='')}" if project_id else base


def _subject(row: Event | EventRow) -> str | None:
    if row.job_id is not None:
        return str(row.job_id)
    if row.type == jobs.FILE_REJECTED:
        return json.loads(row.data).get("path")
    return None


def to_line(row: Event | EventRow, installation: str) -> str:
    """The event as one CloudEvents JSON line (no newline): what ``json.dumps(envelope,
    ensure_ascii=False, separators=(",", ":"))`` writes, built as a string: the publisher does
    this for every event, in the daemon's interpreter (3 us instead of 8). ``data`` is spliced
    in as stored, not parsed and dumped again; the time and sequence need no escaping."""
    subject = _subject(row)
    return "".join((
        '{"specversion":"1.0","id":', _json_string(event_id(installation, row.seq, row.time)),
        ',"source":', _json_string(source_uri(installation, row.project_id)),
        ',"type":', _json_string(row.type),
        ',"time":"', jobs.rfc3339(row.time),
        '","datacontenttype":"application/json","sequence":"', format_sequence(row.seq), '"',
        "" if subject is None else ',"subject":' + _json_string(subject),
        ',"data":', row.data, "}"))


READ_TOO_SLOWLY = "the subscriber read too slowly; resume with --since"
STOPPING = "the daemon stopped before the subscriber read the rest; resume with --since"


def overflow_line(installation: str, last_sequence: int | None,
                  reason: str = READ_TOO_SLOWLY) -> str:
    """The last line a subscriber gets when it fell too far behind (or at a stop, before it
    read all that was queued for it)."""
    return json.dumps({
        "specversion": "1.0",
        "id": f"{installation}-overflow-{last_sequence or 0}-{uuid.uuid4().hex[:12]}",
        "source": source_uri(installation, None), "type": OVERFLOW,
        "time": jobs.rfc3339(jobs.now()), "datacontenttype": "application/json",
        "data": {"last_sequence": format_sequence(last_sequence or 0),
                 "reason": reason},
    }, separators=(",", ":"))


@dataclass(frozen=True)
class Retained:
    """The outbox keeps sequences ``first..last``; everything before ``first`` was pruned."""

    first: int
    last: int

    def check_since(self, since: int) -> None:
        """Refuse a resume point whose next events were pruned (like HTTP 410 Gone), or that
        this database never reached (it was restored from a backup since, or is another):
        its next events would be skipped without a word."""
        if since + 1 < self.first:
            raise Gone(f"events after sequence {since} are gone: the oldest kept is "
                       f"{self.first} (event_retention_days); resume with --since {self.first - 1}")
        if since > self.last:
            raise Gone(f"there is no event {since}: the last is {self.last} (a database "
                       f"restored from a backup numbers its events again from there); "
                       f"resume with --since {self.last}")


class Gone(IngestdError):
    exit_code = 1


def retained() -> Retained:
    first, last = Event.select(fn.MIN(Event.seq), fn.MAX(Event.seq)).tuples().get()
    if first is None:  # empty: everything up to the counter was pruned (or nothing happened)
        counter = EventSequence.get_by_id(1).last_seq
        return Retained(counter + 1, counter)
    return Retained(first, last)


class EventRow(NamedTuple):
    """An outbox row as read for publishing (the columns of :class:`Event`, without building a
    model object for each of the three events every file makes)."""

    seq: int
    type: str
    project_id: str | None
    job_id: int | None
    time: float
    data: str


def rows_after(seq: int, limit: int = REPLAY_BATCH) -> list[EventRow]:
    """Outbox rows with a sequence above ``seq``, in order."""
    param = database.param
    rows = database.execute_sql(
        "SELECT seq, type, project_id, job_id, time, data FROM ingest_events "
        f"WHERE seq > {param} ORDER BY seq LIMIT {param}", (seq, limit)).fetchall()
    return [EventRow(*row) for row in rows]


def replay(after: int, installation: str | None = None) -> Iterator[tuple[int, str]]:
    """``(seq, line)`` for every retained event after ``after``, in order, batch by batch."""
    installation = installation or installation_id()
    while True:
        batch = rows_after(after)
        for row in batch:
            yield row.seq, to_line(row, installation)
        if len(batch) < REPLAY_BATCH:
            return
        after = batch[-1].seq


def parse_line(line: str) -> dict[str, Any]:
    """A received line as a dict; its ``sequence`` as an int is ``int(event['sequence'])``."""
    return json.loads(line)


def prune(retention_days: float) -> int:
    """Delete events older than ``retention_days`` that every event log active within that
    period has published (an event is never pruned before it was published)."""
    horizon = jobs.now() - retention_days * 86400
    param = database.param
    with database.atomic():  # a write transaction: it queues on the writers' lock (db.py)
        cursor = database.execute_sql(
            f"DELETE FROM ingest_events WHERE time < {param} AND seq <= "
            f"(SELECT MIN(last_seq) FROM ingest_publish_cursors WHERE updated_at >= {param})",
            (horizon, horizon))
        return cursor.rowcount
