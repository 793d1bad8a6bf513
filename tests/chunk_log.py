"""Tests only: log each map chunk a precompute writes, one ``<split>/<map> <chunk>`` line each.

The fault and precompute tests count chunk computations with it (a resume must not compute a
done chunk again). Production code has no hook for it: the log wraps
:meth:`saliency_cache.store.MapWriter.write_chunk`, the one call that lands a computed chunk.

- in this process: ``monkeypatch.setattr(MapWriter, "write_chunk", logged_write_chunk(log))``;
- in a ``sat`` subprocess: run :func:`sat_command` instead of ``python -m pipelines.cli``;
- in dask worker processes: within ``with in_dask_workers(log):`` dask preloads this module
  into each worker it starts, which installs the log named by ``SAT_TEST_CHUNK_LOG``.

Each line is one short ``O_APPEND`` write, so lines from several processes never mix.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

ENV = "SAT_TEST_CHUNK_LOG"

_SAT = """
import sys
from tests.chunk_log import install
install(sys.argv[1])
from pipelines.cli import main
main(sys.argv[2:], prog_name="sat")
"""


def logged_write_chunk(log: str | Path, real=None):
    """``MapWriter.write_chunk`` (or ``real``) that appends a line to ``log`` after each write."""
    if real is None:
        from saliency_cache.store import MapWriter

        real = MapWriter.write_chunk

    def write_chunk(self, k, values):
        real(self, k, values)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{self.split.name}/{self.name} {k}\n".encode())
        finally:
            os.close(fd)

    return write_chunk


def install(log: str | Path) -> None:
    """Log every chunk this process writes to ``log`` (for a whole subprocess)."""
    from saliency_cache.store import MapWriter

    MapWriter.write_chunk = logged_write_chunk(log)


def sat_command(log: str | Path | None) -> list[str]:
    """argv that runs ``sat ARGS...`` (append them) with every chunk written logged to ``log``;
    without a log, plain ``python -m pipelines.cli``."""
    if log is None:
        return [sys.executable, "-m", "pipelines.cli"]
    return [sys.executable, "-c", _SAT, str(log)]


@contextlib.contextmanager
def in_dask_workers(log: str | Path) -> Iterator[None]:
    """Within the block, dask workers that a precompute starts log their chunks to ``log``."""
    import dask
    import distributed  # noqa: F401  (registers its config defaults before they are changed:
    # otherwise leaving dask.config.set would drop the whole "distributed" section)

    before = os.environ.get(ENV)
    os.environ[ENV] = str(log)  # inherited by the worker processes
    preload = list(dask.config.get("distributed.worker.preload", []))
    try:
        with dask.config.set({"distributed.worker.preload": [*preload, __name__]}):
            yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def dask_setup(worker) -> None:  # called by dask when it preloads this module into a worker
    if os.environ.get(ENV):
        install(os.environ[ENV])
