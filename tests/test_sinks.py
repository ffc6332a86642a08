"""The external sinks (command, http, plugins): real programs, a real HTTP server, a real
installed entry point, and the daemon retrying, failing or warning on what they say."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from ingestd import db, intake, jobs, retire, sinks, work
from ingestd.config import ProjectConfig, SinkConfig
from ingestd.errors import ConfigError
from ingestd.jobs import JOB_RETRYING
from ingestd.models import Event, Job
from ingestd.scheduling import new_scheduler
from ingestd.sinks import Document, SinkError, job_deadline, open_sink, plugins
from ingestd.sinks.command import CommandSink
from ingestd.sinks.http import HttpSink

from conftest import run_cli, wait_for
from proctree import gone
from harness import Daemon, finish_all, jobs_for, open_db, wait_ended, write_config

DOCUMENT = Document(project_id="acme", job_id=12, text="héllo wörld\nsecond page",
                    source_path="/srv/drop/acme/a.txt", original_filename="a.txt",
                    mime_type="text/plain", sha256="ab" * 32, pages=((0, 11), (12, 23)),
                    replaces=7)
EXPECTED_MESSAGE = {"action": "ingest", "project": "acme", "job_id": 12,
                    "text": "héllo wörld\nsecond page", "source_path": "/srv/drop/acme/a.txt",
                    "original_filename": "a.txt", "mime_type": "text/plain", "sha256": "ab" * 32,
                    "pages": [[0, 11], [12, 23]], "replaces": 7}


def project(tmp_path: Path, kind: str, **options) -> ProjectConfig:
    return ProjectConfig(name="acme", folders=(tmp_path,),
                         sink=SinkConfig(kind=kind, options=options))


def script(tmp_path: Path, body: str, name: str = "sink.py") -> list[str]:
    """A Python program written to ``tmp_path``, as a ``command`` option runs it."""
    path = tmp_path / name
    path.write_text("import json, os, sys, time, subprocess\n" + textwrap.dedent(body))
    return [sys.executable, str(path)]


# --- the command sink -------------------------------------------------------------------------

class TestCommandSink:
    def test_the_id_on_stdout_is_the_document_id(self, tmp_path):
        """A program that prints a bare integer gives that integer as the document id."""
        sink = open_sink(project(tmp_path, "command", command=script(tmp_path, "print(41)")))
        assert isinstance(sink, CommandSink) and sink.transactional is False
        assert sink.ingest(DOCUMENT) == 41

    def test_a_json_object_with_an_id_is_accepted(self, tmp_path):
        """A program that prints a JSON object with an integer id gives that id."""
        command = script(tmp_path, 'print(json.dumps({"id": 9, "chunks": 3}))')
        assert open_sink(project(tmp_path, "command", command=command)).ingest(DOCUMENT) == 9

    def test_the_program_receives_the_document_as_one_json_object(self, tmp_path):
        """stdin holds exactly the documented ingest object, the text intact."""
        got = tmp_path / "got.json"
        command = script(tmp_path, f"""
            data = sys.stdin.buffer.read()
            open({str(got)!r}, "wb").write(data)
            print(1)
        """)
        open_sink(project(tmp_path, "command", command=command)).ingest(DOCUMENT)
        assert json.loads(got.read_bytes()) == EXPECTED_MESSAGE

    def test_a_command_string_is_split_without_a_shell(self, tmp_path):
        """A string command is split like a shell would, quotes kept, and no shell runs it."""
        command = script(tmp_path, "print(len(sys.argv[1]) + (sys.argv[2] == '$HOME'))",
                         name="my sink.py")
        line = f"{sys.executable} '{command[1]}' 'a b c' '$HOME'"
        assert open_sink(project(tmp_path, "command", command=line)).ingest(DOCUMENT) == 6

    def test_a_failure_gives_the_last_stderr_line_and_is_permanent(self, tmp_path):
        """A non-zero exit other than 75 is permanent, its reason the last non-empty stderr line."""
        command = script(tmp_path, """
            print("connecting", file=sys.stderr)
            print("rejected: schema mismatch", file=sys.stderr)
            print("", file=sys.stderr)
            sys.exit(1)
        """)
        with pytest.raises(SinkError) as caught:
            open_sink(project(tmp_path, "command", command=command)).ingest(DOCUMENT)
        assert str(caught.value) == "rejected: schema mismatch"
        assert caught.value.transient is False

    def test_exit_75_is_transient(self, tmp_path):
        """Exit status 75 (EX_TEMPFAIL) is a transient error, retried by the worker."""
        command = script(tmp_path, 'print("index busy", file=sys.stderr); sys.exit(75)')
        with pytest.raises(SinkError) as caught:
            open_sink(project(tmp_path, "command", command=command)).ingest(DOCUMENT)
        assert (str(caught.value), caught.value.transient) == ("index busy", True)

    def test_silent_failure_says_how_it_ended(self, tmp_path):
        """With nothing on stderr, the reason is the exit status."""
        command = script(tmp_path, "sys.exit(3)")
        with pytest.raises(SinkError, match=r"exited with status 3 \(nothing on stderr\)"):
            open_sink(project(tmp_path, "command", command=command)).ingest(DOCUMENT)

    def test_unparsable_stdout_is_permanent_and_quoted(self, tmp_path):
        """A reply that is not an id is a permanent error quoting (a truncated) what came back."""
        command = script(tmp_path, 'print("ok, stored " + "x" * 1000)')
        with pytest.raises(SinkError) as caught:
            open_sink(project(tmp_path, "command", command=command)).ingest(DOCUMENT)
        assert caught.value.transient is False
        assert "got 'ok, stored xxx" in str(caught.value) and len(str(caught.value)) < 400

    def test_a_missing_program_is_permanent(self, tmp_path):
        """A command that does not exist fails permanently, naming it."""
        sink = open_sink(project(tmp_path, "command", command=[str(tmp_path / "nope")]))
        with pytest.raises(SinkError, match="cannot run .*nope") as caught:
            sink.ingest(DOCUMENT)
        assert caught.value.transient is False

    def test_a_timeout_kills_the_whole_process_group(self, tmp_path):
        """Past timeout_seconds a transient error arrives promptly and the program and its
        children are gone."""
        pids = tmp_path / "pids"
        command = script(tmp_path, f"""
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            open({str(pids)!r} + ".tmp", "w").write(f"{{os.getpid()}} {{child.pid}}")
            os.rename({str(pids)!r} + ".tmp", {str(pids)!r})
            time.sleep(120)
        """)
        sink = open_sink(project(tmp_path, "command", command=command, timeout_seconds=3))
        started = time.monotonic()
        with pytest.raises(SinkError) as caught:
            sink.ingest(DOCUMENT)
        assert time.monotonic() - started < 15
        assert (str(caught.value), caught.value.transient) == (
            "timed out after 3 s (timeout_seconds)", True)
        program, child = map(int, pids.read_text().split())
        wait_for(lambda: gone(program) and gone(child), timeout=10,
                 message="the timed-out program and its child to be gone")

    def test_a_nearer_job_deadline_stops_the_program_there(self, tmp_path):
        """Inside job_deadline, a run gets only the job's remaining time when that is less
        than timeout_seconds: killed at the deadline, a transient error naming the job's
        setting."""
        command = script(tmp_path, "sys.stdin.read(); time.sleep(120)")
        sink = open_sink(project(tmp_path, "command", command=command, timeout_seconds=20))
        started = time.monotonic()
        with pytest.raises(SinkError) as caught, job_deadline(started + 1):
            sink.ingest(DOCUMENT)
        assert 0.9 < time.monotonic() - started < 5
        assert caught.value.transient is True
        assert re.fullmatch(r"timed out after [\d.]+ s \(job_timeout_seconds\)", str(caught.value))

    def test_no_time_left_runs_nothing(self, tmp_path):
        """Past the job's deadline the program is not started at all."""
        ran = tmp_path / "ran"
        command = script(tmp_path, f"open({str(ran)!r}, 'w'); print(1)")
        sink = open_sink(project(tmp_path, "command", command=command))
        with pytest.raises(SinkError, match="time ran out"), job_deadline(time.monotonic() - 1):
            sink.ingest(DOCUMENT)
        assert not ran.exists()

    def test_a_farther_job_deadline_keeps_timeout_seconds(self, tmp_path):
        """With more time left in the job than timeout_seconds, timeout_seconds applies."""
        command = script(tmp_path, "sys.stdin.read(); time.sleep(120)")
        sink = open_sink(project(tmp_path, "command", command=command, timeout_seconds=1))
        with pytest.raises(SinkError, match=r"^timed out after 1 s \(timeout_seconds\)$"), \
                job_deadline(time.monotonic() + 60):
            sink.ingest(DOCUMENT)

    def test_a_background_child_holding_stdout_does_not_hold_the_run(self, tmp_path):
        """A program that exits leaving a child in the background with its stdout (``cmd &`` in
        a script) is done when it exits: its id is read, no timeout waits for the child."""
        sink = CommandSink(project(tmp_path, "command", timeout_seconds=20, command=script(
            tmp_path, """
            sys.stdin.read()
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            print(4711, flush=True)
            """)))
        began = time.monotonic()
        assert sink.ingest(DOCUMENT) == 4711
        assert time.monotonic() - began < 10

    def test_delete_runs_the_program_with_the_id(self, tmp_path):
        """delete(N) runs the program with the delete object; its stdout does not matter."""
        got = tmp_path / "got.json"
        command = script(tmp_path, f"open({str(got)!r}, 'w').write(sys.stdin.read())")
        open_sink(project(tmp_path, "command", command=command)).delete(7)
        assert json.loads(got.read_text()) == {"action": "delete", "project": "acme",
                                               "document_id": 7}

    def test_a_failed_delete_is_a_sink_error(self, tmp_path):
        """A delete that exits non-zero raises SinkError like an ingest does."""
        command = script(tmp_path, 'print("no such index", file=sys.stderr); sys.exit(2)')
        with pytest.raises(SinkError, match="no such index"):
            open_sink(project(tmp_path, "command", command=command)).delete(7)

    def test_a_program_starting_for_a_job_let_go_is_killed_before_it_gets_the_document(
            self, tmp_path):
        """A worker's stop re-queues its jobs, then kills their sink programs; one a slot was
        just starting must not store its document after that (the job would be done twice).
        Nor must one for a job whose lease was lost. Deletes (no job) are not concerned."""
        stored = tmp_path / "stored"
        sink = open_sink(project(tmp_path, "command", command=script(tmp_path, f"""
            message = json.load(sys.stdin)
            time.sleep(0.5)
            open({str(stored)!r}, "a").write(message["action"] + "\\n")
            print(5)
        """)))
        with sinks.job_abandoned(lambda: True):
            with pytest.raises(SinkError, match="killed at its start") as caught:
                sink.ingest(DOCUMENT)
            assert caught.value.transient is True and not stored.exists()  # killed, reaped
        with sinks.job_abandoned(lambda: False):
            assert sink.ingest(DOCUMENT) == 5
        sink.delete(5)
        assert stored.read_text() == "ingest\ndelete\n"


class TestCommandOptions:
    @pytest.mark.parametrize("options, key", [
        ({}, "command"),
        ({"command": []}, "command"),
        ({"command": ["/bin/true", 3]}, "command"),
        ({"command": "unclosed 'quote"}, "command"),
        ({"command": ["/bin/true"], "timeout_seconds": "30"}, "timeout_seconds"),
        ({"command": ["/bin/true"], "timeout_seconds": 0}, "timeout_seconds"),
        ({"command": ["/bin/true"], "timeout_seconds": True}, "timeout_seconds"),
        ({"command": ["/bin/true"], "timeout_seconds": float("inf")}, "timeout_seconds"),
        ({"command": ["/bin/true"], "timeout_seconds": float("nan")}, "timeout_seconds"),
        ({"command": ["/bin/true"], "timeout_seconds": 10**400}, "timeout_seconds"),
        ({"command": ["/bin/true"], "timeout": 30}, "timeout"),
    ])
    def test_a_bad_option_names_its_key(self, tmp_path, options, key):
        """A missing, mistyped or unknown option is a ConfigError naming projects.NAME.sink.KEY."""
        with pytest.raises(ConfigError, match=rf"^projects\.acme\.sink\.{key}: "):
            open_sink(project(tmp_path, "command", **options))


# --- the http sink ----------------------------------------------------------------------------

class TestIndexOptions:
    def test_no_overlap_is_a_choice(self, tmp_path, store):
        """chunk_overlap = 0 is accepted: the chunks then follow each other without overlap,
        nothing but the space between them left out. (The chunk rows depend on the bound
        database, SQLite here: after a PostgreSQL test the models stayed bound to it.)"""
        sink = open_sink(project(tmp_path, "index", chunk_size=40, chunk_overlap=0))
        text = "One sentence here. Another one there. A third one follows. The end."
        rows = sink.parts_of(Document("acme", 1, text, "/x", "x", "text/plain", "0" * 64,
                                      ((0, len(text)),)))
        spans = [(start, end) for _, _, _, start, end, _ in rows]
        assert len(spans) > 1 and all(a[1] <= b[0] and text[a[1]:b[0]].isspace()
                                      for a, b in zip(spans, spans[1:]))

    @pytest.mark.parametrize(("options", "key"), [({"chunk_size": 0}, "chunk_size"),
                                                  ({"chunk_overlap": -1}, "chunk_overlap"),
                                                  ({"chunk_size": "big"}, "chunk_size")])
    def test_a_bad_option_names_its_key(self, tmp_path, options, key):
        with pytest.raises(ConfigError, match=f"sink.{key}: must be"):
            open_sink(project(tmp_path, "index", **options))


class Recorder(BaseHTTPRequestHandler):
    """Records each request; replies with ``server.replies[path]`` (default 200 ``{"id": 7}``)."""

    def do_POST(self) -> None:
        self.answer()

    def do_DELETE(self) -> None:
        self.answer()

    def answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        status, reply = self.server.replies.get(self.path, (200, b'{"id": 7}'))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    """A real HTTP server on 127.0.0.1, on a port of its own, in a thread."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # 127.0.0.1 must not go through a proxy
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    httpd.requests, httpd.replies = [], {}
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@contextlib.contextmanager
def raw_server(replies: list[bytes], pause: float = 0.0, hold: bool = False) -> Iterator[str]:
    """A server of one connection on 127.0.0.1 that reads the request, sends ``replies`` one
    by one ``pause`` s apart and closes (with ``hold``, once the block ends); its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    done = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(1 << 20)
            for part in replies:
                if done.wait(pause):
                    return
                connection.sendall(part)
            if hold:
                done.wait(60)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/docs"
    finally:
        done.set()
        thread.join(timeout=10)
        listener.close()


class TestHttpSink:
    def test_a_200_with_an_id_returns_it_and_the_json_is_posted(self, tmp_path, server):
        """The document is POSTed as the documented JSON (with the configured headers); the
        reply's id is the document id."""
        sink = open_sink(project(tmp_path, "http", url=server.url + "/docs",
                                 headers={"Authorization": "Bearer s3cret"}))
        assert isinstance(sink, HttpSink) and sink.transactional is False
        assert sink.ingest(DOCUMENT) == 7
        [(method, path, headers, body)] = server.requests
        assert (method, path) == ("POST", "/docs")
        assert headers["Content-Type"] == "application/json"
        assert headers["Authorization"] == "Bearer s3cret"
        assert json.loads(body) == EXPECTED_MESSAGE

    def test_a_bare_integer_reply_is_an_id(self, tmp_path, server):
        """A 2xx body that is a bare integer is the document id."""
        server.replies["/docs"] = (201, b"12\n")
        assert open_sink(project(tmp_path, "http", url=server.url + "/docs")).ingest(DOCUMENT) == 12

    @pytest.mark.parametrize("status, body, reason, transient", [
        (500, b'{"error": "index is rebuilding"}', "HTTP 500: index is rebuilding", True),
        (404, b"no such collection\nmore detail\n", "HTTP 404: no such collection", False),
    ], ids=["5xx-transient", "4xx-permanent"])
    def test_an_error_status_is_a_sink_error(self, tmp_path, server, status, body, reason,
                                             transient):
        """A 5xx reply is a transient error with the status and the body's reason; a 4xx is a
        permanent one with the status and the first line of the body."""
        server.replies["/docs"] = (status, body)
        with pytest.raises(SinkError) as caught:
            open_sink(project(tmp_path, "http", url=server.url + "/docs")).ingest(DOCUMENT)
        assert (str(caught.value), caught.value.transient) == (reason, transient)

    def test_a_2xx_without_an_id_is_permanent(self, tmp_path, server):
        """A success reply that does not carry an id is a permanent error quoting it."""
        server.replies["/docs"] = (200, b'{"status": "ok"}')
        with pytest.raises(SinkError, match="got '{\"status\": \"ok\"}'") as caught:
            open_sink(project(tmp_path, "http", url=server.url + "/docs")).ingest(DOCUMENT)
        assert caught.value.transient is False

    def test_a_refused_connection_is_transient(self, tmp_path, server):
        """Nobody listening on the port is a transient error."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        sink = open_sink(project(tmp_path, "http", url=f"http://127.0.0.1:{port}/docs"))
        with pytest.raises(SinkError, match=f"cannot reach http://127.0.0.1:{port}") as caught:
            sink.ingest(DOCUMENT)
        assert caught.value.transient is True

    def test_a_silent_server_times_out_transiently(self, tmp_path, server):
        """A server that accepts but never answers is a transient timeout after timeout_seconds."""
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            url = f"http://127.0.0.1:{silent.getsockname()[1]}/docs"
            started = time.monotonic()
            with pytest.raises(SinkError, match=r"timed out after 0\.5 s") as caught:
                open_sink(project(tmp_path, "http", url=url, timeout_seconds=0.5)).ingest(DOCUMENT)
        assert caught.value.transient is True and time.monotonic() - started < 10

    def test_a_silent_server_is_given_up_at_the_job_deadline(self, tmp_path, server):
        """Inside job_deadline, a server that never answers is given up at the job's deadline
        when that is nearer than timeout_seconds."""
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            url = f"http://127.0.0.1:{silent.getsockname()[1]}/docs"
            sink = open_sink(project(tmp_path, "http", url=url, timeout_seconds=20))
            started = time.monotonic()
            with pytest.raises(SinkError, match=r"timed out after [\d.]+ s "
                                                r"\(job_timeout_seconds\)") as caught, \
                    job_deadline(started + 0.5):
                sink.ingest(DOCUMENT)
        assert caught.value.transient is True and time.monotonic() - started < 5

    def test_a_reply_cut_short_is_transient_not_an_id(self, tmp_path):
        """A reply whose connection closes before its Content-Length is complete is a
        transient error: "12" of a promised "12345" used to be taken for document 12."""
        with raw_server([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n12"]) as url:
            with pytest.raises(SinkError, match=r"the reply was cut short \(2 bytes, 3 more "
                                                r"promised\)") as caught:
                open_sink(project(tmp_path, "http", url=url)).ingest(DOCUMENT)
        assert caught.value.transient is True

    @pytest.mark.parametrize("length", [True, False], ids=["content-length", "until-close"])
    def test_a_trickling_reply_is_given_up_when_the_time_is_up(self, tmp_path, length):
        """A server that sends its reply a byte every 0.2 s never lets one wait for data time
        out: the request is cut at timeout_seconds all the same. It used to take as long as
        the server liked."""
        head = b"HTTP/1.1 200 OK\r\n" + (b"Content-Length: 40\r\n" if length else b"")
        with raw_server([head + b"\r\n"] + [b" "] * 40, pause=0.2) as url:
            started = time.monotonic()
            with pytest.raises(SinkError, match=r"timed out after 1 s \(timeout_seconds\)"):
                open_sink(project(tmp_path, "http", url=url, timeout_seconds=1)).ingest(DOCUMENT)
        assert time.monotonic() - started < 3

    def test_an_error_reply_is_bounded_by_the_time_too(self, tmp_path):
        """A 503 whose body trickles is cut at timeout_seconds like any reply (it used to be
        read with no bound but each wait for data); a delete's stalled error body is a
        SinkError, never a bare TimeoutError."""
        head = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 40\r\n\r\n"
        with raw_server([head] + [b" "] * 40, pause=0.2) as url:
            started = time.monotonic()
            with pytest.raises(SinkError, match=r"timed out after 1 s \(timeout_seconds\)"):
                open_sink(project(tmp_path, "http", url=url, timeout_seconds=1)).ingest(DOCUMENT)
        assert time.monotonic() - started < 3
        with raw_server([head + b"stalled"], hold=True) as url:
            with pytest.raises(SinkError, match="timed out") as caught:
                open_sink(project(tmp_path, "http", url=url, timeout_seconds=1)).delete(9)
        assert caught.value.transient is True

    def test_delete_sends_delete_to_the_url_and_id(self, tmp_path, server):
        """delete(N) sends DELETE to the url with /N appended, the query string kept."""
        open_sink(project(tmp_path, "http", url=server.url + "/docs/?token=t")).delete(42)
        [(method, path, _, body)] = server.requests
        assert (method, path, body) == ("DELETE", "/docs/42?token=t", b"")

    def test_deleting_a_missing_document_succeeds(self, tmp_path, server):
        """A 404 to a DELETE means the document is gone already: no error."""
        server.replies["/docs/42"] = (404, b"not found")
        open_sink(project(tmp_path, "http", url=server.url + "/docs")).delete(42)
        assert [request[:2] for request in server.requests] == [("DELETE", "/docs/42")]

    def test_a_redirect_is_not_followed(self, tmp_path, server):
        """A 3xx reply is a permanent error naming where it pointed; the POST is not replayed."""
        server.replies["/docs"] = (308, b"")
        with pytest.raises(SinkError, match="HTTP 308: redirected to") as caught:
            open_sink(project(tmp_path, "http", url=server.url + "/docs")).ingest(DOCUMENT)
        assert caught.value.transient is False and len(server.requests) == 1


class TestHttpOptions:
    @pytest.mark.parametrize("options, key", [
        ({}, "url"),
        ({"url": "ftp://example.com/x"}, "url"),
        ({"url": "file:///etc/passwd"}, "url"),
        ({"url": "http://user:pw@example.com/"}, "url"),
        ({"url": "http://example.com:99999/"}, "url"),
        ({"url": 5}, "url"),
        ({"url": "http://example.com/", "timeout_seconds": -1}, "timeout_seconds"),
        ({"url": "http://example.com/", "headers": ["a"]}, "headers"),
        ({"url": "http://example.com/", "headers": {"X-Key": 5}}, r"headers\.X-Key"),
        ({"url": "http://example.com/", "headers": {"X-Key": "a\r\nb"}}, r"headers\.X-Key"),
        ({"url": "http://example.com/", "method": "PUT"}, "method"),
    ])
    def test_a_bad_option_names_its_key(self, tmp_path, options, key):
        """Only http(s) URLs and well-formed options are accepted; the error names the key."""
        with pytest.raises(ConfigError, match=rf"^projects\.acme\.sink\.{key}: "):
            open_sink(project(tmp_path, "http", **options))


# --- plugins ----------------------------------------------------------------------------------

PLUGIN_MODULE = '''
from ingestd.errors import ConfigError

class MemorySink:
    transactional = False

    def __init__(self, project):
        self.project = project
        self.prefix = project.sink.options.get("prefix", 0)
        if not isinstance(self.prefix, int):
            raise ConfigError(f"projects.{project.name}.sink.prefix: must be an integer")

    def ingest(self, document):
        return self.prefix + document.job_id

    def delete(self, document_id):
        pass

def not_a_sink(project):
    return object()
'''


@contextlib.contextmanager
def installed(monkeypatch, site: Path, name: str, entry_points: str,
              modules: dict[str, str]) -> Iterator[Path]:
    """A really installed distribution in ``site`` (a dist-info with ``ingestd.sinks`` entry
    points and its modules), as pip would leave it, without pip, on sys.path while in use."""
    dist_info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[ingestd.sinks]\n" + textwrap.dedent(entry_points))
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))
    try:
        yield site
    finally:
        for module in modules:
            sys.modules.pop(module, None)


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """The memory sink and a few broken entry points, installed on sys.path."""
    with installed(monkeypatch, tmp_path / "site", "ingestd-memory-sink", """
        memory = ingestd_memory_sink:MemorySink
        broken = ingestd_memory_sink_missing:Nothing
        notasink = ingestd_memory_sink:not_a_sink
        text = ingestd_memory_sink:MemorySink
    """, {"ingestd_memory_sink": PLUGIN_MODULE}) as site:
        yield site


class TestPlugins:
    def test_an_installed_entry_point_is_a_sink_kind(self, tmp_path, plugin_path):
        """A kind named by an ingestd.sinks entry point opens that plugin, made for the project."""
        sink = open_sink(project(tmp_path, "memory", prefix=1000))
        assert type(sink).__name__ == "MemorySink" and sink.project.name == "acme"
        assert sink.ingest(DOCUMENT) == 1012

    def test_a_plugin_checks_its_own_options(self, tmp_path, plugin_path):
        """A plugin's own ConfigError passes through unchanged."""
        with pytest.raises(ConfigError, match=r"^projects\.acme\.sink\.prefix: must be an int"):
            open_sink(project(tmp_path, "memory", prefix="x"))

    def test_an_unknown_kind_lists_builtins_and_plugins(self, tmp_path, plugin_path):
        """An unknown kind is a ConfigError listing the built-in kinds and installed plugins."""
        with pytest.raises(ConfigError) as caught:
            open_sink(project(tmp_path, "memroy"))
        message = str(caught.value)
        assert message.startswith("projects.acme.sink.kind: unknown sink kind 'memroy'")
        assert "built-in: command, http, index, text" in message
        assert "memory" in message and "broken" in message

    def test_a_plugin_that_fails_to_load_is_a_config_error(self, tmp_path, plugin_path):
        """A plugin whose module cannot be imported is a ConfigError with the reason."""
        with pytest.raises(ConfigError, match=r"plugin 'broken' .* failed to load: "
                                              r"ModuleNotFoundError: .*ingestd_memory_sink_missing"):
            open_sink(project(tmp_path, "broken"))

    def test_a_plugin_that_is_not_a_sink_is_refused(self, tmp_path, plugin_path):
        """A plugin that returns something without the Sink protocol is a ConfigError."""
        with pytest.raises(ConfigError, match="not a sink"):
            open_sink(project(tmp_path, "notasink"))

    def test_builtin_kinds_win_over_plugins(self, tmp_path, plugin_path):
        """A plugin named like a built-in kind does not shadow it."""
        assert type(open_sink(project(tmp_path, "text"))).__name__ == "TextSink"
        assert type(open_sink(project(tmp_path, "index"))).__name__ == "IndexSink"


# --- with the daemon --------------------------------------------------------------------------

@pytest.fixture
def sink_daemon(tmp_path):
    """Start the daemon with project acme's sink running a given script; stopped afterwards."""
    started: list[Daemon] = []
    drop = tmp_path / "drop"
    drop.mkdir()

    def start(command: list[str], acme_extra: str = "") -> Path:
        config = write_config(tmp_path, f"""
            [daemon]
            state_dir = "state"
            workers = 2
            shutdown_grace_seconds = 5

            [defaults]
            settle_seconds = 0.3
            max_attempts = 3

            [projects.acme]
            folders = [{json.dumps(str(drop))}]
            {acme_extra}

            [projects.acme.sink]
            kind = "command"
            command = {json.dumps(command)}
            timeout_seconds = 20
        """)
        started.append(Daemon(tmp_path, config).start())
        open_db(config)
        return drop

    start.started = started
    yield start
    finish_all(started)
    db.close_store()


def retrying_events(job_id: int) -> int:
    return Event.select().where(Event.type == JOB_RETRYING, Event.job_id == job_id).count()


ALWAYS_REJECTS = """
    sys.stdin.read()
    print("rejected: schema mismatch", file=sys.stderr)
    sys.exit(1)
"""


class TestWithTheDaemon:
    def test_a_sink_failing_twice_then_succeeding_completes(self, tmp_path, sink_daemon):
        """Two transient sink failures are retried (two retrying events) and the job completes
        with the id the sink gave."""
        counter = tmp_path / "calls"
        command = script(tmp_path, f"""
            message = json.load(sys.stdin)
            calls = int(open({str(counter)!r}).read()) if os.path.exists({str(counter)!r}) else 0
            open({str(counter)!r}, "w").write(str(calls + 1))
            if message["action"] == "ingest" and calls < 2:
                print("index busy, try later", file=sys.stderr)
                sys.exit(75)
            print(json.dumps({{"id": 4242}}))
        """)
        path = sink_daemon(command) / "doc.txt"
        path.write_text("flaky sink content")
        job = wait_ended(path, timeout=60)
        assert (job.status, job.canonical_document_id, job.attempts) == ("completed", 4242, 3)
        assert retrying_events(job.id) == 2
        assert counter.read_text() == "3"

    def test_a_sink_failing_transiently_to_the_last_attempt_says_it_gave_up(self, tmp_path,
                                                                           sink_daemon):
        """Out of attempts, a transient sink failure fails the job saying so, as a transient
        read failure does: "(gave up after 3 attempts)"."""
        command = script(tmp_path, """
            sys.stdin.read()
            print("index busy, try later", file=sys.stderr)
            sys.exit(75)
        """)
        path = sink_daemon(command) / "doc.txt"
        path.write_text("never taken")
        job = wait_ended(path, timeout=60)
        assert (job.status, job.attempts) == ("failed", 3)
        assert job.error_message == "sink: index busy, try later (gave up after 3 attempts)"
        assert retrying_events(job.id) == 2

    def test_a_permanent_sink_failure_fails_the_job(self, tmp_path, sink_daemon):
        """A sink that fails permanently fails the job at once with the sink's reason."""
        path = sink_daemon(script(tmp_path, ALWAYS_REJECTS)) / "doc.txt"
        path.write_text("refused content")
        job = wait_ended(path, timeout=60)
        assert (job.status, job.error_message) == ("failed", "sink: rejected: schema mismatch")
        assert job.attempts == 1 and retrying_events(job.id) == 0

    def test_with_sink_errors_warn_a_failing_sink_completes_with_a_warning(self, tmp_path,
                                                                          sink_daemon):
        """Under sink_errors = "warn" a failing sink completes the job, the reason in message."""
        path = sink_daemon(script(tmp_path, ALWAYS_REJECTS), 'sink_errors = "warn"') / "doc.txt"
        path.write_text("warned content")
        job = wait_ended(path, timeout=60)
        assert job.status == "completed" and job.canonical_document_id is None
        assert "rejected: schema mismatch" in job.message and "sink_errors = warn" in job.message

    def test_a_cancel_requested_while_the_sink_fails_transiently_ends_cancelled(self, tmp_path,
                                                                               sink_daemon):
        """A transient sink failure does not undo a cancel requested meanwhile: the job ends
        cancelled, with no retry and no second call of the sink."""
        calls, go = tmp_path / "calls", tmp_path / "go"
        command = script(tmp_path, f"""
            message = json.load(sys.stdin)
            with open({str(calls)!r}, "a") as log:
                log.write(message["action"] + "\\n")
            deadline = time.monotonic() + 30
            while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:
                time.sleep(0.02)
            print("index busy, try later", file=sys.stderr)
            sys.exit(75)
        """)
        path = sink_daemon(command) / "doc.txt"
        path.write_text("cancelled while its sink fails")
        wait_for(calls.exists, timeout=30, message="the sink to be called")
        [job] = jobs_for(path)
        assert jobs.cancel("acme", job.id).cancel_requested
        go.touch()
        job = wait_ended(path, timeout=30)
        assert job.status == "cancelled" and retrying_events(job.id) == 0
        assert calls.read_text() == "ingest\n"

    def test_a_sink_slower_than_the_job_timeout_fails_the_job_at_its_deadline(self, tmp_path,
                                                                             sink_daemon):
        """A command sink gets only the job's remaining time (job_timeout_seconds = 3, its own
        timeout_seconds 20): the job ends failed with the job timeout's reason within about
        3 s, after one call of the sink, with no retry; the program is killed."""
        calls = tmp_path / "calls"
        command = script(tmp_path, f"""
            sys.stdin.read()
            with open({str(calls)!r}, "a") as log:
                log.write(f"{{os.getpid()}}\\n")
            time.sleep(100)
        """)
        drop = sink_daemon(command, "job_timeout_seconds = 3\nmax_attempts = 2")
        path = drop / "doc.txt"
        path.write_text("a document for a sink that hangs")
        job = wait_ended(path, timeout=15)
        assert (job.status, job.error_message) == (
            "failed", "timed out after 3 s (job_timeout_seconds)")
        assert job.completed_at - job.started_at < 10  # not the 3 s timeout once per attempt
        assert job.attempts == 1 and retrying_events(job.id) == 0
        [pid] = map(int, calls.read_text().split())
        wait_for(lambda: gone(pid), timeout=10, message="the sink program to be killed")


# A command sink that logs each call (one JSON line: action, job, document) to CALLS, numbers
# documents from 101 (or, with SAME_ID, gives one id to every version), and fails a delete with
# exit 75 while FAIL_DELETE exists (removed as it fails, with ONCE) or waits while HOLD exists.
RECORDING_SINK = """
    from pathlib import Path
    calls, fail, hold, once = map(Path, sys.argv[1:5])
    message = json.load(sys.stdin)
    with calls.open("a") as log:
        log.write(json.dumps([message["action"], message.get("job_id"),
                              message.get("document_id")]) + "\\n")
    if message["action"] == "delete":
        while hold.exists():
            time.sleep(0.05)
        if fail.exists():
            if once.exists():
                fail.unlink()
            print("index busy, try later", file=sys.stderr)
            sys.exit(75)
        sys.exit(0)
    print(4242 if os.environ.get("SAME_ID") else 100 + message["job_id"])
"""


class TestRetiredDocuments:
    """A document no current job refers to leaves an external sink after the change that let
    go of it committed, never while it holds the write lock, and again until the sink takes
    it (see ingestd.retire)."""

    @pytest.fixture
    def recording(self, tmp_path, sink_daemon):
        """Start the daemon with RECORDING_SINK; its calls so far, as (action, job, id)."""
        files = [tmp_path / name for name in ("calls", "fail-delete", "hold", "once")]
        command = script(tmp_path, RECORDING_SINK)

        def start(env_same_id: bool = False) -> Path:
            if env_same_id:
                command[:0] = ["env", "SAME_ID=1"]
            return sink_daemon(command + [str(path) for path in files])

        def calls() -> list[tuple]:
            text = files[0].read_text() if files[0].exists() else ""
            return [tuple(json.loads(line)) for line in text.splitlines()]

        start.calls, start.fail, start.hold, start.once = calls, *files[1:]
        return start

    @staticmethod
    def two_versions(drop: Path) -> tuple[Job, Job]:
        path = drop / "doc.txt"
        path.write_text("the first version")
        first = wait_ended(path)
        path.write_text("the second version, longer")
        wait_for(lambda: len(jobs_for(path)) == 2 and jobs_for(path)[1].status == "completed",
                 timeout=30, message="the second version completed")
        return first, jobs_for(path)[1]

    def test_a_new_version_retires_the_previous_document_after_its_commit(self, recording):
        first, second = self.two_versions(recording())
        assert (first.canonical_document_id, second.canonical_document_id) == (
            100 + first.id, 100 + second.id)
        wait_for(lambda: ("delete", None, 100 + first.id) in recording.calls(), timeout=30,
                 message="the previous document deleted")
        wait_for(lambda: owed() == [], timeout=10, message="the delete no longer owed")

    def test_an_id_the_sink_gives_again_is_not_deleted(self, recording, sink_daemon):
        """A sink that updates by path answers every version with the same id: that document
        is the new version's, and must not be deleted as the previous one's."""
        first, second = self.two_versions(recording(env_same_id=True))
        assert first.canonical_document_id == second.canonical_document_id == 4242
        assert sink_daemon.started[-1].stop() == 0  # its jobs' ends all made
        assert [call for call in recording.calls() if call[0] == "delete"] == []
        assert owed() == []

    def test_a_delete_the_sink_fails_is_made_again_later(self, recording):
        """The previous document's delete fails (exit 75): the daemon makes it again, after
        a backoff, until the sink takes it. It used to be logged and forgotten."""
        recording.fail.touch()
        recording.once.touch()
        first, _ = self.two_versions(recording())
        wait_for(lambda: recording.calls().count(("delete", None, 100 + first.id)) == 2,
                 timeout=30, message="the delete made again")
        wait_for(lambda: owed() == [], timeout=10, message="the delete no longer owed")

    def test_jobs_delete_does_not_hold_the_write_lock_while_the_sink_deletes(self, recording,
                                                                            tmp_path):
        """`jobs delete` waits for the sink's delete after its transaction: meanwhile the
        daemon goes on ingesting. It used to call the sink holding the write lock, and
        nothing was written for as long as the sink took (up to its timeout)."""
        drop = recording()
        (drop / "a.txt").write_text("to be deleted")
        job = wait_ended(drop / "a.txt")
        recording.hold.touch()
        deleting = subprocess.Popen(
            [sys.executable, "-m", "ingestd", "-c", str(tmp_path / "ingestd.toml"), "jobs",
             "delete", "-p", "acme", str(job.id)], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: ("delete", None, 100 + job.id) in recording.calls(), timeout=30,
                     message="the sink's delete under way")
            (drop / "b.txt").write_text("ingested while the delete waits")
            assert wait_ended(drop / "b.txt", timeout=15).status == "completed"
            assert deleting.poll() is None  # the delete still waits for the sink
        finally:
            recording.hold.unlink()
        out, err = deleting.communicate(timeout=30)
        assert deleting.returncode == 0 and err == "", err
        assert owed() == []

    def test_jobs_delete_says_when_the_sink_has_not_taken_the_delete_yet(self, recording,
                                                                        tmp_path):
        """The sink fails the delete: the job is deleted all the same (exit 0), one line on
        stderr says the document is still in the sink, and the daemon makes the delete."""
        drop = recording()
        (drop / "a.txt").write_text("to be deleted")
        job = wait_ended(drop / "a.txt")
        recording.fail.touch()
        recording.once.touch()
        deleted = run_cli("jobs", "delete", "-p", "acme", str(job.id),
                          config=tmp_path / "ingestd.toml")
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stderr.splitlines() == [
            f"ingestd: job {job.id} deleted; its document {100 + job.id} is still in the sink "
            "(index busy, try later); the daemon tries again"]
        wait_for(lambda: recording.calls().count(("delete", None, 100 + job.id)) == 2,
                 timeout=30, message="the daemon making the delete")
        wait_for(lambda: owed() == [], timeout=10, message="the delete no longer owed")


def test_a_look_for_due_deletes_with_none_due_takes_no_write_lock(cfg, store, tmp_path):
    """The daemon looks every 5 s, nearly always finding nothing: that look is a read, so it
    neither waits for nor takes the write lock (another program holds it here)."""
    project = replace(cfg.projects["acme"], sink=SinkConfig(
        kind="command", options={"command": ["true"]}))
    holder = sqlite3.connect(cfg.daemon.database.removeprefix("sqlite:///"),
                             isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        assert retire.retry_due([project], open_sink) == 0
        assert time.monotonic() - started < 5  # SQLite's busy wait is 10 s
    finally:
        holder.execute("ROLLBACK")
        holder.close()


class TestRetiredDocumentsAfterTheSinkChanged:
    """Document ids are their sink's own: a reload to another sink drops what is owed to the
    old one, saying so, and sends nothing to the new one (a delete of the same number there
    would remove another document). A project now on the index had its owed deletes counted
    by status for ever, never tried nor dropped."""

    @pytest.mark.parametrize("new_sink", ["another command", "index"])
    def test_a_reload_to_another_sink_drops_what_was_owed(self, tmp_path, sink_daemon,
                                                           new_sink):
        calls, other_calls = tmp_path / "calls", tmp_path / "other-calls"
        refuses = tmp_path / "refuse"
        refuses.touch()
        old = script(tmp_path, RECORDING_SINK) + [str(calls), str(refuses), str(tmp_path / "no"),
                                                   str(tmp_path / "no")]
        drop = sink_daemon(old)
        TestRetiredDocuments.two_versions(drop)
        wait_for(lambda: owed() and owed()[0][2] >= 1, timeout=30,
                 message="a delete owed after the sink refused it")
        other = script(tmp_path, RECORDING_SINK, name="other.py") + [
            str(other_calls), str(tmp_path / "no"), str(tmp_path / "no"), str(tmp_path / "no")]
        sink = ('kind = "index"' if new_sink == "index" else
                f'kind = "command"\ncommand = {json.dumps(other)}')
        config = tmp_path / "ingestd.toml"
        text = config.read_text()  # the sink's table ends the file: replaced whole
        config.write_text(text[:text.index('kind = "command"')] + sink + "\n")
        daemon = sink_daemon.started[-1]
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: owed() == [], timeout=30, message="the owed delete dropped")
        assert "sink_delete_dropped" in daemon.log()
        assert not other_calls.exists()  # the new sink was never asked to delete it


def owed() -> list[tuple]:
    """The deletes owed to sinks: (project, document, attempts)."""
    return db.database.execute_sql(
        "SELECT project_id, document_id, attempts FROM sink_deletes").fetchall()


# --- plugins that misbehave -------------------------------------------------------------------

ROGUE_MODULE = """
import ast, builtins
from ingestd.sinks import SinkError

class RogueSink:
    '''Does what the document's text says: "raise:NAME", "return:LITERAL", "sinkerror:REASON";
    any other text is stored, as id 1000 + the job's id.'''

    def __init__(self, project):
        self.transactional = project.sink.options.get("transactional", False)

    def ingest(self, document):
        verb, _, what = document.text.partition(":")
        if verb == "raise":
            raise getattr(builtins, what)(f"{what} from\\nthe plugin")
        if verb == "return":
            return ast.literal_eval(what)
        if verb == "sinkerror":
            raise SinkError(what, transient=False)
        return 1000 + document.job_id

    def delete(self, document_id):
        raise SystemExit(f"cannot delete {document_id}")

class ExitingSink:
    def __init__(self, project):
        raise SystemExit("ctor exit")
"""


@pytest.fixture
def rogue_plugin(tmp_path, monkeypatch):
    """A really installed distribution with sinks that misbehave (see ROGUE_MODULE)."""
    with installed(monkeypatch, tmp_path / "rogue-site", "ingestd-rogue-sink", """
        rogue = ingestd_rogue_sink:RogueSink
        exits_when_made = ingestd_rogue_sink:ExitingSink
        exits_at_import = ingestd_rogue_exits:Nothing
    """, {"ingestd_rogue_sink": ROGUE_MODULE,
          "ingestd_rogue_exits": 'raise SystemExit("import exit")\n'}) as site:
        yield site


@pytest.fixture
def rogue_pool(cfg, store, drop, rogue_plugin):
    """Start a real worker pool of ONE slot (on its scheduler's threads, as in a worker
    process) whose project acme has the rogue sink; returns a function that queues a file with
    the given text and returns its job once it ended and the slot is free again."""
    started = []

    def start(transactional: bool = False):
        sink = SinkConfig(kind="rogue", options={"transactional": transactional})
        config = replace(cfg, daemon=replace(cfg.daemon, workers=1),
                         projects={**cfg.projects,
                                   "acme": replace(cfg.projects["acme"], sink=sink)})
        scheduler = new_scheduler(threads=2)
        pool = work.WorkerPool(config, scheduler)
        started.append((pool, scheduler))
        pool.start()
        scheduler.start()

        def ingest(name: str, text: str):
            path = drop / name
            path.write_text(text)
            folder, version = intake.inspect(config.projects["acme"], path)
            jobs.create("acme", str(folder), version, 3)
            pool.wake()
            job = wait_ended(path, timeout=20)
            wait_for(lambda: not pool.busy, timeout=10, message="the slot to be free")
            return job

        return ingest

    yield start
    for pool, scheduler in started:
        pool.stop(grace_seconds=5)
        scheduler.shutdown(wait=False)


class TestPluginsThatMisbehave:
    @pytest.mark.parametrize("raised", ["KeyboardInterrupt", "SystemExit", "RuntimeError"])
    def test_an_exception_out_of_ingest_fails_the_job_and_the_slot_goes_on(self, rogue_pool,
                                                                           raised):
        """Anything a plugin's ingest raises, KeyboardInterrupt and SystemExit included, fails
        its job at once with a one-line reason naming the plugin and the exception; the pool's
        one slot then completes the next file."""
        ingest = rogue_pool()
        failed = ingest("bad.txt", f"raise:{raised}")
        assert (failed.status, failed.attempts) == ("failed", 1)
        assert failed.error_message == (
            f"sink: plugin 'rogue' raised {raised} in ingest: {raised} from; the plugin")
        done = ingest("good.txt", "an ordinary document")
        assert (done.status, done.canonical_document_id) == ("completed", 1000 + done.id)

    def test_a_transactional_plugin_keeps_its_flag_and_fails_the_same_way(self, rogue_pool,
                                                                         tmp_path):
        """A plugin's transactional = true is kept (its small files end in a group's
        transaction); a SystemExit from its ingest there fails only that job."""
        assert open_sink(project(tmp_path, "rogue", transactional=True)).transactional is True
        assert open_sink(project(tmp_path, "rogue")).transactional is False
        ingest = rogue_pool(transactional=True)
        failed = ingest("bad.txt", "raise:SystemExit")
        assert (failed.status, failed.attempts) == ("failed", 1)
        assert failed.error_message == (
            "sink: plugin 'rogue' raised SystemExit in ingest: SystemExit from; the plugin")
        done = ingest("good.txt", "an ordinary document")
        assert (done.status, done.canonical_document_id) == ("completed", 1000 + done.id)

    @pytest.mark.parametrize("literal, shown", [
        ("None", "None"), ("'abc'", "'abc'"), ("1.5", "1.5"), ("-7", "-7"), ("True", "True"),
        ("-1", "-1"), ("9223372036854775808", "9223372036854775808")])
    def test_a_returned_value_that_is_not_a_document_id_fails_the_job(self, rogue_pool,
                                                                      literal, shown):
        """An ingest that returns anything but an int from 0 to 2**63-1 (not a bool) fails the
        job permanently, saying what it returned; the next file completes."""
        ingest = rogue_pool()
        failed = ingest("bad.txt", f"return:{literal}")
        assert (failed.status, failed.attempts) == ("failed", 1)
        assert failed.canonical_document_id is None
        assert failed.error_message == (
            f"sink: plugin 'rogue' returned {shown} from ingest, not a document id "
            "(an integer from 0 to 2**63-1)")
        assert ingest("good.txt", "an ordinary document").status == "completed"

    def test_a_returned_zero_is_a_document_id(self, rogue_pool):
        """0 is an id, as from the command and http sinks: an external store may count from 0."""
        done = rogue_pool()("zero.txt", "return:0")
        assert (done.status, done.canonical_document_id) == ("completed", 0)

    def test_a_long_returned_value_is_shortened(self, tmp_path, rogue_plugin):
        """What a reason quotes of a returned value is bounded and one line."""
        sink = open_sink(project(tmp_path, "rogue"))
        with pytest.raises(SinkError) as caught:
            sink.ingest(replace(DOCUMENT, text="return:'" + "x\\n" * 5000 + "'"))
        assert len(str(caught.value)) < 300 and "\n" not in str(caught.value)
        assert caught.value.transient is False

    def test_a_multi_line_sink_error_becomes_one_line(self, rogue_pool):
        """A plugin's SinkError("first\\nsecond", transient=False) fails the job with the
        error_message "sink: first; second", without a retry."""
        failed = rogue_pool()("bad.txt", "sinkerror:first\nsecond")
        assert (failed.status, failed.error_message, failed.attempts) == (
            "failed", "sink: first; second", 1)

    def test_a_sink_error_keeps_its_transient_flag(self, tmp_path, rogue_plugin):
        """Made one line, a plugin's SinkError keeps whether trying again may help."""
        sink = open_sink(project(tmp_path, "rogue"))
        with pytest.raises(SinkError) as caught:
            sink.ingest(replace(DOCUMENT, text="sinkerror:first\n\nsecond\r\nthird"))
        assert (str(caught.value), caught.value.transient) == ("first; second; third", False)

    def test_an_exception_out_of_delete_is_a_sink_error(self, tmp_path, rogue_plugin):
        """delete is kept to the protocol too: a SystemExit becomes a permanent SinkError."""
        with pytest.raises(SinkError, match=r"^plugin 'rogue' raised SystemExit in delete: "
                                            r"cannot delete 12$") as caught:
            open_sink(project(tmp_path, "rogue")).delete(12)
        assert caught.value.transient is False

    def test_a_keyboard_interrupt_on_the_main_thread_may_be_ctrl_c_and_goes_on(self, tmp_path,
                                                                                rogue_plugin):
        """On the main thread under Python's own SIGINT handler (a command in a terminal) a
        KeyboardInterrupt stays one: it may be the user's Ctrl-C."""
        sink = open_sink(project(tmp_path, "rogue"))
        with pytest.raises(KeyboardInterrupt):
            sink.ingest(replace(DOCUMENT, text="raise:KeyboardInterrupt"))

    @pytest.mark.parametrize("kind, reason", [
        ("exits_when_made", "failed to start: SystemExit: ctor exit"),
        ("exits_at_import", r"\(ingestd_rogue_exits:Nothing\) failed to load: "
                            "SystemExit: import exit")])
    def test_a_plugin_exiting_when_loaded_or_made_is_a_config_error(self, tmp_path,
                                                                     rogue_plugin, kind, reason):
        """A plugin that raises SystemExit at import or in its constructor is a ConfigError
        naming the key and the reason (a start-up, reload or config check goes on to say so)."""
        with pytest.raises(ConfigError, match=rf"^projects\.acme\.sink\.kind: sink plugin "
                                              rf"'{kind}' .*{reason}$"):
            open_sink(project(tmp_path, kind))

    @pytest.mark.parametrize("transactional", [False, True])
    def test_the_pool_fails_a_job_whose_unwrapped_sink_raises_keyboard_interrupt(
            self, rogue_pool, monkeypatch, transactional):
        """The worker's last line of defence: a KeyboardInterrupt that reaches it from a job's
        run (here from a sink given to it unwrapped) fails that job as an internal error, and
        the slot completes the next file."""
        monkeypatch.setattr(sinks, "open_sink", lambda project: plugins.installed()[
            project.sink.kind].load()(project))
        ingest = rogue_pool(transactional=transactional)
        failed = ingest("bad.txt", "raise:KeyboardInterrupt")
        assert (failed.status, failed.error_message) == (
            "failed", "internal error (see the daemon's log)")
        done = ingest("good.txt", "an ordinary document")
        assert (done.status, done.canonical_document_id) == ("completed", 1000 + done.id)


def test_an_owed_delete_held_by_a_clock_stepped_back_is_due(cfg, store):
    """An owed delete's due time further ahead than any delay can be was set before the wall
    clock was stepped back: it is due (it waited out the step, an hour for an hour back). One
    within reach still waits."""
    project = replace(cfg.projects["acme"], sink=SinkConfig(
        kind="command", options={"command": ["true"]}))
    assert retire._record(project, 7, None) is not None  # due in FIRST_TRY_SECONDS
    assert retire.retry_due([project], open_sink) == 0
    db.execute("UPDATE sink_deletes SET not_before = ?",
               (time.time() + retire.FIRST_TRY_SECONDS + 7200,))
    assert retire.retry_due([project], open_sink) == 1
    assert db.execute("SELECT count(*) FROM sink_deletes").fetchone() == (0,)
