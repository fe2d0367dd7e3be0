"""What a migration's phases after its load hold in memory: DuckDB settings for them.

What sets a migration's resident memory (measured phase by phase with bench/bench_memory.py,
docs/benchmarks.md): DuckDB's buffer pool, which fills up to ``memory_limit`` because it
caches every block it reads, plus memory DuckDB does not account for (the interpreter, its
working memory outside the buffer manager: 250-350 MiB during the partitions at 1-10 M
rows, and ~400 MiB more after each index build at 8-10 M rows, held until the database is
closed). During the load the pool must hold the whole primary key of ``identities`` (DuckDB
checks each partition's COMMIT against the ART in memory and cannot spill it: about 45 MiB
per million identities), so the partitions run under the run's limit, and so do the index
builds (a new index cannot spill before its checkpoint, and a checkpoint out of memory
invalidates the database). Two settings for the phases after the load:

* ``lowered_memory_limit``: the fingerprint pass (one grouped pass over every table, which
  spills its groups) runs under ``AFTER_LOAD_SHARE`` of the run's limit, which empties the
  cache DuckDB would otherwise keep full beside it;
* ``checkpoint_at_commit``: each index build's COMMIT checkpoints instead of writing the
  whole index into the WAL first (the load's raised ``checkpoint_threshold`` made it do both).

Only for an embedded database: through a database server a ``SET`` would act on every
client (the server keeps its own settings), and nothing is changed. A limit DuckDB cannot
lower to (more memory is pinned) is left as it is: the phase then runs as before.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import duckdb

from kimera_core.db import is_served

# Share of the run's memory limit the fingerprint pass runs under (docs/benchmarks.md).
AFTER_LOAD_SHARE = 0.5
# checkpoint_threshold while an index is rebuilt (DuckDB's default): its COMMIT writes the
# new index by a checkpoint instead of into the WAL (docs/benchmarks.md).
INDEX_BUILD_CHECKPOINT_THRESHOLD = "16MB"
# DuckDB's way of printing a size (current_setting('memory_limit')): '953.6 MiB'
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(bytes|[KMGT]iB)\s*")
_UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def memory_limit_bytes(con: duckdb.DuckDBPyConnection) -> int | None:
    """DuckDB's current ``memory_limit`` in bytes, to DuckDB's printed precision (0.1 of its
    unit); None when it prints something else (no limit)."""
    text = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    match = _SIZE.fullmatch(str(text))
    if match is None:
        return None
    return round(float(match.group(1)) * _UNITS[match.group(2)])


@contextlib.contextmanager
def lowered_memory_limit(
    con: duckdb.DuckDBPyConnection, share: float | None = None
) -> Iterator[None]:
    """Run the block under ``share`` (0 < share <= 1; default AFTER_LOAD_SHARE, read at the
    call) of DuckDB's current memory limit.

    The previous limit is set again afterwards, from DuckDB's printed text (``953.6 MiB``,
    set again as 953.65 MiB: within 0.05 of that unit, the same text every time); when the
    block raises, only if DuckDB still accepts a statement (after a failed statement inside
    a transaction it does not: the limit stays lowered). Nothing changes through a database server, without a limit, or when DuckDB refuses the lower
    limit (blocks it cannot evict). Raises ValueError for a share outside (0, 1].
    """
    if share is None:
        share = AFTER_LOAD_SHARE
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], not {share}")
    if is_served(con):
        yield
        return
    before = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    limit = memory_limit_bytes(con)
    lowered = False
    restore = ""
    if limit is not None and share < 1:
        # from DuckDB's own text of the size ('953.6 MiB'), not input
        restore = f"SET memory_limit = '{_vetted(before)}'"
        try:
            con.execute(f"SET memory_limit = '{int(limit * share)}B'")
            lowered = True
        except duckdb.OutOfMemoryException:
            lowered = False
    try:
        yield
    except BaseException:
        # after a failed statement DuckDB refuses any other until the ROLLBACK: the first
        # error is the one to see (the limit then stays lowered on this database)
        if lowered:
            with contextlib.suppress(duckdb.Error):
                con.execute(restore)
        raise
    if lowered:
        con.execute(restore)


@contextlib.contextmanager
def checkpoint_at_commit(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Within the block a large COMMIT checkpoints instead of writing to the WAL.

    A migration raises ``checkpoint_threshold`` for its load (one checkpoint at the end);
    with it, the COMMIT of ``CREATE INDEX`` writes the whole new index into the WAL before
    the checkpoint writes it again, and holds both in memory: three index builds over 8 M
    rows in a fresh process peaked at 1,130 MiB RSS, against 911 MiB with DuckDB's default
    threshold (INDEX_BUILD_CHECKPOINT_THRESHOLD) during each build. The previous threshold
    is set again afterwards, as DuckDB printed it. Nothing changes through a database
    server (the setting would act on every client).
    """
    if is_served(con):
        yield
        return
    before = con.execute("SELECT current_setting('checkpoint_threshold')").fetchone()[0]
    restore = f"SET checkpoint_threshold = '{_vetted(before)}'"
    con.execute(f"SET checkpoint_threshold = '{INDEX_BUILD_CHECKPOINT_THRESHOLD}'")
    try:
        yield
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute(restore)
        raise
    con.execute(restore)


def _vetted(text: str) -> str:
    """The size DuckDB printed, as bytes to set it again: DuckDB prints one decimal of the
    unit, rounded down, so the value set is the middle of that decimal (printed the same:
    setting it again and again does not drift)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a DuckDB size: {text!r}")
    unit = _UNITS[match.group(2)]
    return f"{round((float(match.group(1)) + 0.05) * unit) if unit > 1 else match.group(1)}B"
