"""What a migration's index rebuilds hold in memory: how their COMMIT is written.

What sets a migration's resident memory (measured phase by phase with bench/bench_memory.py,
docs/benchmarks.md, issue 14): DuckDB's buffer pool, which fills up to ``memory_limit``
because it caches every block it reads, plus memory DuckDB does not account for (the
interpreter, its working memory outside the buffer manager: 250-350 MiB during the
partitions at 1-10 M rows, and ~400 MiB more after each index build at 8-10 M rows, held
until the database is closed). The primary key of ``identities`` cannot spill before a
checkpoint (DuckDB checks each partition's COMMIT against the whole ART in memory: about
45 MiB per million identities), nor can an index being built, and a checkpoint that runs
out of memory invalidates the database: the phases keep the run's limit (half of it ran the
fingerprint pass out of memory at 10 M rows).

What is changed: ``checkpoint_at_commit``. A migration raises ``checkpoint_threshold`` for
its load (one checkpoint at the end); with it, the COMMIT of ``CREATE INDEX`` writes the
whole new index into the WAL before the checkpoint writes it again, and holds both in
memory. With DuckDB's default threshold during each build, the COMMIT checkpoints instead.
Only for an embedded database: through a database server the ``SET`` would act on every
client (and a served migration keeps its indexes).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import duckdb

from kimera_core.db import is_served, setting_within

# checkpoint_threshold while an index is rebuilt (DuckDB's default): its COMMIT writes the
# new index by a checkpoint instead of into the WAL (docs/benchmarks.md).
INDEX_BUILD_CHECKPOINT_THRESHOLD = "16MB"
# DuckDB's way of printing a size (current_setting(...)): '14.9 GiB'
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(bytes|[KMGTPE]iB)\s*")
_UNITS = {"bytes": 1} | {f"{p}iB": 1 << (10 * (i + 1)) for i, p in enumerate("KMGTPE")}


@contextlib.contextmanager
def checkpoint_at_commit(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Within the block a large COMMIT checkpoints instead of writing to the WAL.

    A migration raises ``checkpoint_threshold`` for its load (one checkpoint at the end);
    with it, the COMMIT of ``CREATE INDEX`` writes the whole new index into the WAL before
    the checkpoint writes it again, and holds both in memory: three index builds over 8 M
    rows in a fresh process peaked at 1,130 MiB RSS, against 911 MiB with DuckDB's default
    threshold (INDEX_BUILD_CHECKPOINT_THRESHOLD) during each build. The previous threshold
    is set again afterwards from DuckDB's printed text (``14.9 GiB``, set as 14.95 GiB:
    within 0.05 of that unit, printed the same every time), also when the block raises if
    DuckDB still takes a statement. Nothing changes through a database server (the setting
    would act on every client). Raises ValueError if DuckDB prints a size it cannot read.
    """
    if is_served(con):
        yield
        return
    before = con.execute("SELECT current_setting('checkpoint_threshold')").fetchone()[0]
    with setting_within(
        con,
        f"SET checkpoint_threshold = '{INDEX_BUILD_CHECKPOINT_THRESHOLD}'",
        f"SET checkpoint_threshold = '{_vetted(before)}'",
    ):
        yield


def _vetted(text: str) -> str:
    """The size DuckDB printed, as bytes to set it again: DuckDB prints one decimal of the
    unit, rounded down, so the value set is the middle of that decimal (printed the same:
    setting it again and again does not drift)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a DuckDB size: {text!r}")
    unit = _UNITS[match.group(2)]
    return f"{round((float(match.group(1)) + 0.05) * unit) if unit > 1 else match.group(1)}B"
