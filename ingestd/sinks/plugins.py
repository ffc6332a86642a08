"""Sinks from other packages, found as entry points in the group ``ingestd.sinks``.

So a sink for someone's vector store can ship as its own package, with no change to ingestd.
The package declares, in its ``pyproject.toml``::

    [project.entry-points."ingestd.sinks"]
    vectors = "acme_vectors.sink:VectorSink"

and a project uses it with ``[projects.NAME.sink] kind = "vectors"``; the table's other keys
are in ``project.sink.options`` for the plugin to check. The entry point (a class or a factory)
is called with the :class:`~ingestd.config.ProjectConfig` and returns an object with the
:class:`~ingestd.sinks.Sink` protocol: ``transactional`` (False unless it writes into
ingestd's own database), ``ingest(document) -> int`` and ``delete(document_id)``, raising
:class:`~ingestd.sinks.SinkError` on failure. A built-in kind's name always means the built-in
sink, whatever is installed.

The worker never calls the plugin directly: :class:`PluginSink` stands between them and keeps
the protocol whatever the plugin does. Any other exception out of ``ingest`` or ``delete``
(KeyboardInterrupt and SystemExit included: on a worker's thread only the plugin can raise
them) fails the job permanently with a one-line reason naming the plugin, its traceback in the
daemon's log; an ingest that returns anything but a document id (an int from 0 to 2**63-1,
as the command and http sinks take) fails it permanently saying what came back; a SinkError's
reason is made one line. Likewise a plugin that raises anything at import or when made is a
ConfigError naming the key.
"""

from __future__ import annotations

import functools
import reprlib
import signal
import threading
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Iterable

import structlog

from ingestd.config import ProjectConfig
from ingestd.errors import ConfigError
from ingestd.sinks import Document, Sink, SinkError
from ingestd.sinks.external import is_document_id, shorten

log = structlog.get_logger(__name__)
ENTRY_POINT_GROUP = "ingestd.sinks"
_SHOWN = reprlib.Repr()  # a returned value as a reason quotes it: bounded, whatever it is
_SHOWN.maxstring = _SHOWN.maxother = 80


def installed() -> dict[str, EntryPoint]:
    """The installed sink plugins by name; of two with one name, the first found on sys.path
    wins, as it would for an import."""
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry)
    return found


def open_plugin(project: ProjectConfig, builtin: Iterable[str]) -> Sink:
    """The plugin sink named by ``project.sink.kind``, made for ``project``, in its
    :class:`PluginSink`. ConfigError when no plugin has that name (listing what there is, since
    the usual cause is a typo or a package installed into another environment), or when it
    cannot be loaded or made."""
    kind, key = project.sink.kind, f"projects.{project.name}.sink.kind"
    plugins = installed()
    if kind not in plugins:
        raise ConfigError(f"{key}: unknown sink kind {kind!r} (built-in: "
                          f"{', '.join(sorted(builtin))}; installed plugins: "
                          f"{', '.join(sorted(plugins)) or 'none'})")
    factory = _load(plugins[kind], key)
    sink = _checked(_make(factory, project, key), key, kind)
    return _adapter_for(type(sink))(sink, kind)


def _load(entry: EntryPoint, key: str) -> Callable[[ProjectConfig], Any]:
    """The entry point's object; any failure to import it is the plugin's, reported as such."""
    try:
        factory = entry.load()
    except BaseException as exc:  # an import error, a missing attribute, a bug, sys.exit()
        if _may_be_the_users_interrupt(exc):
            raise
        raise ConfigError(f"{key}: sink plugin {entry.name!r} ({entry.value}) failed to load: "
                          f"{_described(exc)}") from None
    if not callable(factory):
        raise ConfigError(f"{key}: sink plugin {entry.name!r} ({entry.value}) is not callable")
    return factory


def _make(factory: Callable[[ProjectConfig], Any], project: ProjectConfig, key: str) -> Any:
    try:
        return factory(project)
    except ConfigError:
        raise  # the plugin's own option check: it already names its key
    except BaseException as exc:  # a bug, sys.exit(): a start-up (or a reload) must not end
        if _may_be_the_users_interrupt(exc):
            raise
        raise ConfigError(f"{key}: sink plugin {project.sink.kind!r} failed to start: "
                          f"{_described(exc)}") from None


def _checked(sink: Any, key: str, kind: str) -> Sink:
    """``sink`` if it has the Sink protocol's members, so a wrong plugin fails at start rather
    than as an internal error in the middle of a job."""
    if (isinstance(getattr(sink, "transactional", None), bool)
            and callable(getattr(sink, "ingest", None))
            and callable(getattr(sink, "delete", None))):
        return sink
    raise ConfigError(f"{key}: sink plugin {kind!r} gave {type(sink).__name__}, which is not a "
                      "sink (needs transactional: bool, ingest(document), delete(document_id))")


class PluginSink:
    """A plugin's sink as the worker sees it: the Sink protocol kept whatever the plugin does
    (see the module's docstring). ``transactional`` and any other attribute are the plugin's."""

    def __init__(self, plugin: Any, kind: str) -> None:
        self.plugin = plugin
        self.kind = kind

    @property
    def transactional(self) -> bool:
        return self.plugin.transactional

    def ingest(self, document: Document) -> int:
        """The plugin's id for ``document``; a permanent SinkError if it is not a document id
        (the same plugin would answer the same way again)."""
        returned = self._call("ingest", document, job_id=document.job_id)
        if is_document_id(returned):
            return int(returned)
        raise SinkError(f"plugin {self.kind!r} returned {_shown(returned)} from ingest, not a "
                        "document id (an integer from 0 to 2**63-1)", transient=False)

    def delete(self, document_id: int) -> None:
        self._call("delete", document_id, document_id=document_id)

    def _call(self, method: str, argument: Any, **about: Any) -> Any:
        try:
            return getattr(self.plugin, method)(argument)
        except SinkError as exc:  # its reason in one line, as a job's error_message must be
            raise SinkError(_text(exc), transient=exc.transient) from exc
        except BaseException as exc:
            if _may_be_the_users_interrupt(exc):
                raise
            log.error("sink_plugin_error", plugin=self.kind, call=method, **about,
                      error=_described(exc), exc_info=True)
            text = _text(exc)
            raise SinkError(f"plugin {self.kind!r} raised {type(exc).__name__} in {method}"
                            + (f": {shorten(text)}" if text else ""), transient=False) from exc

    def __getattr__(self, name: str) -> Any:
        plugin = self.__dict__.get("plugin")
        if plugin is None:
            raise AttributeError(name)
        return getattr(plugin, name)

    def __repr__(self) -> str:
        return f"<PluginSink {self.kind!r}: {self.plugin!r}>"


@functools.lru_cache(maxsize=None)
def _adapter_for(plugin_class: type) -> type[PluginSink]:
    """:class:`PluginSink` under the plugin class's name, so ``type(sink).__name__`` (what a
    log or a test looks at) still names the plugin's sink."""
    return type(plugin_class.__name__, (PluginSink,),
                {"__qualname__": f"PluginSink[{plugin_class.__qualname__}]",
                 "__module__": __name__})


def _may_be_the_users_interrupt(exc: BaseException) -> bool:
    """A KeyboardInterrupt on the main thread under Python's own SIGINT handler (a command in a
    terminal) may be the user's Ctrl-C rather than the plugin's: it goes on as one. Elsewhere
    (a worker's thread; the daemon's main thread, whose signals go to its inbox) only the
    plugin can have raised it."""
    return (isinstance(exc, KeyboardInterrupt)
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


def _text(exc: BaseException) -> str:
    """``str(exc)`` as one line: its lines joined by "; "."""
    try:
        text = str(exc)
    except Exception:  # a plugin's exception class may be as broken as the rest of it
        return f"<unprintable {type(exc).__name__}>"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _described(exc: BaseException) -> str:
    """The exception's type and (shortened) message, in one line: ``RuntimeError: disk full``."""
    text = _text(exc)
    return f"{type(exc).__name__}: {shorten(text)}" if text else type(exc).__name__


def _shown(value: Any) -> str:
    """A bounded, one-line repr of what a plugin returned."""
    return shorten(" ".join(_SHOWN.repr(value).split()))
