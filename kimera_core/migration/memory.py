"""A lower DuckDB memory limit for the phases of a run that come after its load.

What sets a migration's resident memory (measured phase by phase with bench/bench_memory.py,
docs/benchmarks.md): DuckDB's buffer pool, which fills up to ``memory_limit`` because it
caches every block it reads, plus memory DuckDB does not account for (its working memory
outside the buffer manager, the allocator's state, the interpreter: 250-350 MiB at 1-2 M
rows, more at 10 M). During the load the pool must hold the whole primary key of
``identities`` (DuckDB checks each partition's COMMIT against the ART in memory and cannot
spill it: about 45 MiB per million identities), so the partitions run under the run's
limit. After the load nothing has to stay in memory: the table is on disk, an index being
built is the only thing that cannot spill, and the fingerprint pass spills its groups. The
closing phases (the checkpoint of the loaded table, the index rebuilds, the fingerprints)
therefore run under ``AFTER_LOAD_SHARE`` of the run's limit, which empties the cache DuckDB
would otherwise keep full beside their own working memory.

Only for an embedded database: through a database server ``SET memory_limit`` would act on
every client (the server keeps its own setting), and nothing is changed. A limit DuckDB
cannot lower to (more memory is pinned) is left as it is: the phase then runs as before.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import duckdb

from kimera_core.db import is_served

# Share of the run's memory limit the closing phases run under (docs/benchmarks.md).
AFTER_LOAD_SHARE = 0.5
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

    The previous limit is set again afterwards, as DuckDB printed it (``953.6 MiB``: it
    can come back up to 0.1 of that unit lower); when the block raises, only if DuckDB still accepts a statement (after a
    failed statement inside a transaction it does not: the limit stays lowered). Nothing
    changes through a database server, without a limit, or when DuckDB refuses the lower
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
        # DuckDB's own text of the size ('953.6 MiB'), not input
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


def _vetted(text: str) -> str:
    if _SIZE.fullmatch(text) is None:
        raise ValueError(f"not a DuckDB size: {text!r}")
    return text.strip()
