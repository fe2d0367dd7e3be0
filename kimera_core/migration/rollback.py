"""Undoing migration runs from their journal, newest first, in one transaction.

An identity a run inserted is deleted and one it updated is restored to its recorded
before-image, but only while it is still byte-for-byte what the migration wrote (the hash of
the whole row equals the journal's ``after_hash``); an identity the application changed
since is left as it is and reported. Indexes an interrupted run had dropped are rebuilt. The
quarantine rows a run superseded (``cleared_by``) are current again once it is undone.

The rule lives here, so the CLI and Dagster both get it: no rollback while the rollout
stage reads from identities (the application would lose rows under live reads), unless
the operator forces it (docs/runbook.md says when).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb

from kimera_core.checksum import table_checksum
from kimera_core.db import checkpoint, transaction
from kimera_core.errors import KimeraError
from kimera_core.migration.indexes import restore_indexes
from kimera_core.migration.schema import IDENTITY_COLUMNS, ensure_schema
from kimera_core.rollout import get_stage, routing


class RollbackRefused(KimeraError):
    """A rollback was refused before anything changed; the message says why, in one line."""


@dataclass
class RollbackReport:
    """What a rollback undid, and what it left because the application changed it since."""

    runs: list[str]
    deleted: int = 0
    restored: int = 0
    left_modified: int = 0
    left_modified_sample: list[str] = field(default_factory=list)
    identities_checksum: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ROW_HASH = (
    "hash(i.id, i.identity_type, i.data, i.created_at, i.updated_at, i.lang_axis, i.entropy_score)"
)

# A run's journal beside the identities rows now: untouched = still what the run wrote.
RUN_CHANGES_SQL = f"""
CREATE OR REPLACE TEMP TABLE rb_changes AS
SELECT c.*, i.id IS NOT NULL AS present,
       i.id IS NOT NULL AND {ROW_HASH} = c.after_hash AS untouched
FROM kimera_migration_changes c LEFT JOIN identities i ON i.id = c.id
WHERE c.run_id = ?
"""

DELETE_INSERTED_SQL = """
DELETE FROM identities WHERE id IN
    (SELECT id FROM rb_changes WHERE action = 'insert' AND untouched)
"""

RESTORE_UPDATED_SQL = """
UPDATE identities SET identity_type = c.before_identity_type, data = c.before_data,
       created_at = c.before_created_at, updated_at = c.before_updated_at,
       lang_axis = c.before_lang_axis, entropy_score = c.before_entropy_score
FROM rb_changes c
WHERE identities.id = c.id AND c.action = 'update' AND c.untouched
"""

# The run's own rows; the run stays in kimera_migration_runs as rolled_back.
RUN_TABLES: tuple[str, ...] = (
    "kimera_migration_changes",
    "kimera_quarantine",
    "kimera_migration_warnings",
    "kimera_migration_partitions",
)


UNCLEAR_QUARANTINE_SQL = "UPDATE kimera_quarantine SET cleared_by = NULL WHERE cleared_by = ?"


def rollback(
    con: duckdb.DuckDBPyConnection,
    run_id: str | None = None,
    sample: int = 20,
    *,
    force: bool = False,
) -> RollbackReport:
    """Undo migration runs newest first (one run, or all not yet rolled back), in one transaction.

    ``sample``: how many ids of identities left modified to report. Raises RollbackRefused
    while the rollout stage reads from identities (unless ``force``), and KimeraError for an
    unknown run, one already rolled back, or one with newer runs not rolled back. A refused
    rollback changes nothing.
    """
    stage = get_stage(con)
    if routing(stage).read == "new" and not force:
        raise RollbackRefused(
            f"stage {stage} reads from identities: step the rollout back to verified or "
            "earlier before rolling the migration back (docs/runbook.md, Rolling back)"
        )
    ensure_schema(con)
    runs = _runs_to_undo(con, run_id)
    report = RollbackReport(runs=runs)
    with transaction(con):
        for rid in runs:
            _rollback_run(con, rid, report, sample)
    report.identities_checksum = table_checksum(con, "identities", IDENTITY_COLUMNS).to_dict()
    checkpoint(con)
    return report


def _runs_to_undo(con: duckdb.DuckDBPyConnection, run_id: str | None) -> list[str]:
    """The runs to roll back, newest first; refuses what cannot be rolled back."""
    if run_id is None:
        return [
            r[0]
            for r in con.execute(
                "SELECT run_id FROM kimera_migration_runs WHERE status <> 'rolled_back' "
                "ORDER BY started_at DESC"
            ).fetchall()
        ]
    found = con.execute(
        "SELECT status FROM kimera_migration_runs WHERE run_id = ?", [run_id]
    ).fetchone()
    if found is None:
        raise KimeraError(f"no migration run {run_id!r} (see 'kimera migrate status')")
    if found[0] == "rolled_back":
        raise KimeraError(f"run {run_id} is already rolled back")
    newer = con.execute(
        "SELECT run_id FROM kimera_migration_runs WHERE status <> 'rolled_back' "
        "AND started_at > (SELECT started_at FROM kimera_migration_runs WHERE run_id = ?)",
        [run_id],
    ).fetchall()
    if newer:
        raise KimeraError(
            f"run {run_id} has newer runs ({', '.join(r[0] for r in newer)}): roll those "
            "back first, or roll back all runs (omit --run)"
        )
    return [run_id]


def _rollback_run(
    con: duckdb.DuckDBPyConnection, run_id: str, report: RollbackReport, sample: int
) -> None:
    """Undo one run into ``report`` (caller owns the transaction)."""
    con.execute(RUN_CHANGES_SQL, [run_id])
    modified = con.execute("SELECT id FROM rb_changes WHERE NOT untouched ORDER BY id").fetchall()
    report.left_modified += len(modified)
    room = sample - len(report.left_modified_sample)
    report.left_modified_sample.extend(r[0] for r in modified[: max(room, 0)])
    report.deleted += con.execute(DELETE_INSERTED_SQL).fetchone()[0]
    report.restored += con.execute(RESTORE_UPDATED_SQL).fetchone()[0]
    restore_indexes(con, run_id)
    for table in RUN_TABLES:
        # table names come from the fixed RUN_TABLES tuple, never from input
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
    # the quarantine rows this run superseded are current again
    con.execute(UNCLEAR_QUARANTINE_SQL, [run_id])
    con.execute(
        "UPDATE kimera_migration_runs SET status = 'rolled_back', finished_at = ? WHERE run_id = ?",
        [time.time(), run_id],
    )
