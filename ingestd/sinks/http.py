"""The http sink: each document POSTed as JSON to the user's own endpoint.

Ingest: ``POST {url}`` with ``Content-Type: application/json`` and the object described in
:mod:`ingestd.sinks.command` (``"action": "ingest"``). A 2xx reply's body must be the new
document's id: a JSON object with an integer ``"id"``, or a bare integer.

Delete: ``DELETE {url}/{document_id}`` (the id appended to the URL's path, its query string
kept), no body. 2xx, 404 and 410 all mean done: a delete may be repeated.

Failures: 5xx, 408, 429, a refused or reset connection, a DNS failure and a timeout are
transient (retried with backoff); any other status (4xx, and 3xx: redirects are not followed)
is permanent, with the status and a short reason from the body; a 2xx reply without an id is
permanent. A reply cut short (fewer bytes than its Content-Length) is transient.
``timeout_seconds``, or what the job has left of ``job_timeout_seconds`` if that is less, bounds
the whole request: each wait for data, and a watcher that shuts the connection down once the
time is up (a server that trickles its reply). A reply read whole by then counts.

Why the standard library: this is one small JSON request per document, seconds of extraction
apart, on a few worker threads. ``urllib.request`` already does TLS with the system's CA store,
timeouts, custom headers and the usual proxy variables, so a client library (and its pinning,
vetting and shipping in the systemd venv) would buy nothing here.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message

from ingestd import __version__
from ingestd.config import ProjectConfig
from ingestd.errors import ConfigError
from ingestd.sinks import Document, SinkError, time_limit
from ingestd.sinks.external import (DEFAULT_TIMEOUT_SECONDS, Options, decode_reply, encode,
                                    ingest_message, parse_document_id, shorten, timed_out)

MAX_REPLY_BYTES = 1 << 20  # an id, or an error page: never more than this is read
TRANSIENT_STATUSES = frozenset({408, 429})  # besides every 5xx
GONE_STATUSES = frozenset({404, 410})  # a delete of these is done already
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token


class HttpSink:
    """POSTs documents to ``url``, DELETEs them at ``url/ID``; see the module docstring."""

    transactional = False
    options = ("url", "timeout_seconds", "headers")

    def __init__(self, project: ProjectConfig) -> None:
        options = Options(project, self.options)
        self.project_id = project.name
        self.url, self.where = _url(options)
        self.timeout = options.positive_number("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
        self.headers = {"User-Agent": f"ingestd/{__version__}", "Accept": "application/json",
                        **_headers(options)}

    def ingest(self, document: Document) -> int:
        body = encode(ingest_message(document))
        status, reply = self._send("POST", self.url, body)
        _check(status, reply)
        return parse_document_id(reply, f"in the HTTP {status} reply of {self.where}")

    def delete(self, document_id: int) -> None:
        status, reply = self._send("DELETE", _child(self.url, document_id), None)
        if status not in GONE_STATUSES:
            _check(status, reply)

    def _send(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        """The status and body of the reply, whatever the status; SinkError if there is none."""
        headers = dict(self.headers)
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        limit = time_limit(self.timeout)
        cutoff = _Cutoff(limit[0])
        opener = urllib.request.build_opener(_NoRedirects, _HttpHandler(cutoff),
                                             _HttpsHandler(cutoff))
        try:
            with cutoff:
                try:
                    response = opener.open(request, timeout=limit[0])
                except urllib.error.HTTPError as exc:  # a reply, just not a 2xx one
                    response = exc
                with response:
                    status, reply = response.status, response.read(MAX_REPLY_BYTES)
                    left = _unread(response)
        except (OSError, http.client.HTTPException) as exc:
            if not cutoff.cut:
                raise self._no_reply(exc, limit) from None
            left = None
        if cutoff.cut and left != 0:  # the time was up before the reply was whole
            raise SinkError(f"{self.where} {timed_out(*limit)}")
        if left and len(reply) < MAX_REPLY_BYTES:  # its Content-Length promised more
            raise SinkError(f"{self.where}: the reply was cut short ({len(reply)} bytes, "
                            f"{left} more promised)")
        return status, _redirect_note(response.headers) if 300 <= status < 400 else reply

    def _no_reply(self, exc: Exception, limit: tuple[float, str]) -> SinkError:
        """No reply at all: the endpoint is down, unreachable or slow; all worth a retry, except
        a certificate that does not verify (that needs an operator)."""
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, http.client.IncompleteRead):  # a chunked reply
            return SinkError(f"{self.where}: the reply was cut short")
        if isinstance(reason, TimeoutError):
            return SinkError(f"{self.where} {timed_out(*limit)}")
        if isinstance(reason, ssl.SSLCertVerificationError):
            return SinkError(f"{self.where}: {reason.verify_message or reason}", transient=False)
        detail = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        return SinkError(f"cannot reach {self.where}: {detail}")


class _Cutoff:
    """While its block runs, shuts the request's connection down once ``seconds`` are up: a
    socket timeout bounds each wait for data, not the whole request (a server may trickle its
    reply, a byte at a time). Build it on the thread of the request."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.cut = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    def connection(self, http_class: type[http.client.HTTPConnection]
                   ) -> type[http.client.HTTPConnection]:
        """``http_class`` for urllib, keeping each socket as it is made (before a TLS
        handshake, which may hang too) so it can be cut; urllib lets go of the connection's
        own reference once the reply's headers are in."""
        keep = self._keep

        class Kept(http_class):  # type: ignore[valid-type,misc]
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, **kwargs)
                create = self._create_connection

                def created(*args: object, **kwargs: object) -> socket.socket:
                    return keep(create(*args, **kwargs))

                self._create_connection = created

        return Kept

    def _keep(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.cut:  # made after the time was up
                _shut(sock)
        return sock

    def __enter__(self) -> _Cutoff:
        threading.Thread(target=self._watch, daemon=True, name="http-sink-cutoff").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.seconds):
            return
        with self._lock:
            self.cut = True
            for sock in self._sockets:
                _shut(sock)


def _unread(response: object) -> int | None:
    """How many bytes of its Content-Length the reply still holds back (None: no length)."""
    inner = getattr(response, "fp", None) if isinstance(response, urllib.error.HTTPError) \
        else response
    return inner.length if isinstance(inner, http.client.HTTPResponse) else None


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _KeepsSockets:
    """A urllib handler whose connections keep their sockets in ``cutoff``."""

    def __init__(self, cutoff: _Cutoff) -> None:
        super().__init__()
        self.cutoff = cutoff

    def do_open(self, http_class, req, **kwargs):  # noqa: ANN001 -- urllib's signature
        return super().do_open(self.cutoff.connection(http_class), req, **kwargs)


class _HttpHandler(_KeepsSockets, urllib.request.HTTPHandler):
    pass


class _HttpsHandler(_KeepsSockets, urllib.request.HTTPSHandler):
    pass


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib turns a redirected POST into a GET without the body, which would lose the
    document; a redirect is reported instead (set ``url`` to the final address)."""

    def redirect_request(self, *args, **kwargs) -> None:
        return None


def _check(status: int, reply: bytes) -> None:
    """Raise unless ``status`` is 2xx: transient for 5xx, 408 and 429, else permanent."""
    if 200 <= status < 300:
        return
    transient = status >= 500 or status in TRANSIENT_STATUSES
    raise SinkError(f"HTTP {status}: {_reason(status, reply)}", transient=transient)


def _reason(status: int, reply: bytes) -> str:
    """A short why from an error body: a JSON ``error``/``detail``/``message``, else its first
    line, else the status's standard phrase."""
    text, parsed = decode_reply(reply)
    if isinstance(parsed, dict):
        for key in ("error", "detail", "message", "reason"):
            if isinstance(parsed.get(key), str) and parsed[key].strip():
                return shorten(parsed[key].strip())
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return shorten(first) if first else http.client.responses.get(status, "no reason given")


def _redirect_note(headers: Message | None) -> bytes:
    location = (headers.get("Location") if headers is not None else None) or "(no Location)"
    return (f"redirected to {location} (redirects are not followed: set url to the final "
            "address)").encode()


def _url(options: Options) -> tuple[str, str]:
    """``url`` checked (http or https, a host, no credentials in it), and the scheme://host:port
    part that error messages quote (never a path or query, which may hold a token)."""
    url, key = options.required("url"), options.key("url")
    if not isinstance(url, str):
        raise ConfigError(f"{key}: must be a string (an http:// or https:// URL)")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"{key}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: must be an http:// or https:// URL with a host, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{key}: must not hold credentials; send them in headers "
                          "(e.g. headers = { Authorization = \"Bearer ...\" })")
    return url, f"{parts.scheme}://{parts.netloc}"


def _headers(options: Options) -> dict[str, str]:
    """``headers``: a table of header names to string values, checked here rather than failing
    every request later."""
    value = options.values.get("headers", {})
    key = options.key("headers")
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table of header names to strings")
    for name, content in value.items():
        if not HEADER_NAME.match(name):
            raise ConfigError(f"{key}: {name!r} is not a valid header name")
        if not isinstance(content, str) or "\r" in content or "\n" in content:
            raise ConfigError(f"{key}.{name}: must be a one-line string")
    return dict(value)


def _child(url: str, document_id: int) -> str:
    """``url`` with ``/document_id`` appended to its path (a query string stays at the end)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{document_id}"))
