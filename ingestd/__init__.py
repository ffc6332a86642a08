"""ingestd: ingest files dropped into watched folders."""

__version__ = "0.1.0"
