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
:class:`~ingestd.sinks.SinkError` on failure (any other exception fails the job as an internal
error). A built-in kind's name always means the built-in sink, whatever is installed.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Iterable

from ingestd.config import ProjectConfig
from ingestd.errors import ConfigError
from ingestd.sinks import Sink

ENTRY_POINT_GROUP = "ingestd.sinks"


def installed() -> dict[str, EntryPoint]:
    """The installed sink plugins by name; of two with one name, the first found on sys.path
    wins, as it would for an import."""
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry)
    return found


def open_plugin(project: ProjectConfig, builtin: Iterable[str]) -> Sink:
    """The plugin sink named by ``project.sink.kind``, made for ``project``. ConfigError when no
    plugin has that name (listing what there is, since the usual cause is a typo or a package
    installed into another environment), or when it cannot be loaded or made."""
    kind, key = project.sink.kind, f"projects.{project.name}.sink.kind"
    plugins = installed()
    if kind not in plugins:
        raise ConfigError(f"{key}: unknown sink kind {kind!r} (built-in: "
                          f"{', '.join(sorted(builtin))}; installed plugins: "
                          f"{', '.join(sorted(plugins)) or 'none'})")
    factory = _load(plugins[kind], key)
    return _checked(_make(factory, project, key), key, kind)


def _load(entry: EntryPoint, key: str) -> Callable[[ProjectConfig], Any]:
    """The entry point's object; any failure to import it is the plugin's, reported as such."""
    try:
        factory = entry.load()
    except Exception as exc:  # an import error, a missing attribute, a bug at import time
        raise ConfigError(f"{key}: sink plugin {entry.name!r} ({entry.value}) failed to load: "
                          f"{type(exc).__name__}: {exc}") from None
    if not callable(factory):
        raise ConfigError(f"{key}: sink plugin {entry.name!r} ({entry.value}) is not callable")
    return factory


def _make(factory: Callable[[ProjectConfig], Any], project: ProjectConfig, key: str) -> Any:
    try:
        return factory(project)
    except ConfigError:
        raise  # the plugin's own option check: it already names its key
    except Exception as exc:
        raise ConfigError(f"{key}: sink plugin {project.sink.kind!r} failed to start: "
                          f"{type(exc).__name__}: {exc}") from None


def _checked(sink: Any, key: str, kind: str) -> Sink:
    """``sink`` if it has the Sink protocol's members, so a wrong plugin fails at start rather
    than as an internal error in the middle of a job."""
    if (isinstance(getattr(sink, "transactional", None), bool)
            and callable(getattr(sink, "ingest", None))
            and callable(getattr(sink, "delete", None))):
        return sink
    raise ConfigError(f"{key}: sink plugin {kind!r} gave {type(sink).__name__}, which is not a "
                      "sink (needs transactional: bool, ingest(document), delete(document_id))")
