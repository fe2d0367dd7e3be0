"""identities' secondary indexes during a load: dropped, recorded, rebuilt one at a time.

Maintaining P1's three secondary indexes row by row costs more than building them once at
the end, and their memory grows with the table (docs/benchmarks.md). A run therefore drops
them before its first partition, in the same transaction that records their DDL in
``kimera_migration_runs.dropped_indexes``; the record stays until they are rebuilt. A run
killed in between keeps the record, so resuming or rolling it back rebuilds them, and a
rebuild skips an index that exists (an application that opened the file in between may
have recreated it): nothing is lost and nothing duplicated. The primary key stays: it is
a constraint.
"""

from __future__ import annotations

import json

import duckdb

from kimera_core.db import checkpoint, transaction
from kimera_core.legacy import restore_index, secondary_indexes
from kimera_core.migration.memory import checkpoint_at_commit
from kimera_core.sql import vetted_identifier

DROPPED_INDEXES_SQL = """
SELECT dropped_indexes FROM kimera_migration_runs
WHERE dropped_indexes IS NOT NULL AND (run_id = $run_id OR $run_id IS NULL)
ORDER BY started_at
"""
RECORD_DROPPED_SQL = "UPDATE kimera_migration_runs SET dropped_indexes = ? WHERE run_id = ?"
CLEAR_DROPPED_SQL = "UPDATE kimera_migration_runs SET dropped_indexes = NULL WHERE run_id = ?"


def dropped_indexes(con: duckdb.DuckDBPyConnection, run_id: str | None = None) -> dict[str, str]:
    """{name: DDL} of identities indexes dropped by a run (default: by any run)."""
    found: dict[str, str] = {}
    for (recorded,) in con.execute(DROPPED_INDEXES_SQL, {"run_id": run_id}).fetchall():
        found.update(json.loads(recorded))
    return found


def drop_indexes_for_load(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """Drop identities' secondary indexes, their DDL recorded in the run in the same transaction."""
    live = secondary_indexes(con, "identities")
    if not live:
        return
    with transaction(con):
        con.execute(
            RECORD_DROPPED_SQL, [json.dumps({**dropped_indexes(con, run_id), **live}), run_id]
        )
        for name in live:
            con.execute(f"DROP INDEX {vetted_identifier(name)}")


def rebuild_indexes_one_at_a_time(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """Rebuild the dropped indexes each in its own checkpointed transaction.

    A checkpoint writes the loaded rows and each finished index to the file, where DuckDB
    can evict them, so only one index is being built in memory at a time: all three in one
    transaction ran out of a 1 GB memory limit at 10 M rows (docs/benchmarks.md). The run
    keeps its record of the dropped indexes until it finishes (the caller clears it), and
    rebuilding skips those that exist, so a run killed in between resumes or rolls back as
    before. They keep the run's memory limit: an index is built whole in memory (it cannot
    spill until its checkpoint writes it; ~430 MiB for ``updated_at`` at 10 M rows), and a
    checkpoint that runs out of memory invalidates the database (DuckDB's FATAL error).
    Each build's COMMIT checkpoints instead of writing the index into the WAL
    (``memory.checkpoint_at_commit``).
    """
    dropped = dropped_indexes(con, run_id)
    if not dropped:
        return
    checkpoint(con)
    for name, ddl in dropped.items():
        with checkpoint_at_commit(con):
            with transaction(con):
                restore_index(con, "identities", name, ddl)
            checkpoint(con)


def restore_indexes(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """Rebuild the indexes a run dropped and clear its record (caller owns the transaction)."""
    for name, ddl in dropped_indexes(con, run_id).items():
        restore_index(con, "identities", name, ddl)
    clear_dropped_record(con, run_id)


def clear_dropped_record(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """Forget the indexes a run dropped (caller owns the transaction; they exist again)."""
    con.execute(CLEAR_DROPPED_SQL, [run_id])
