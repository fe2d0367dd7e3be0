"""The migration's own tables: runs, partitions done, the rollback journal, quarantine, warnings.

A run is a row of ``kimera_migration_runs`` (status running | completed | unbalanced |
rolled_back, and the DDL of the identities indexes it dropped for its load until it rebuilds
them); every committed partition is a row of ``kimera_migration_partitions`` with its counts
and checksum, which is what a resumed run skips. ``kimera_migration_changes`` is the journal
of before-images that ``rollback`` undoes; ``kimera_quarantine`` keeps each row that could not
migrate whole, with its reasons, current until a later run judges the same key again
(``cleared_by``). docs/schema.md describes every column.
"""

from __future__ import annotations

import duckdb

from kimera_core.errors import KimeraError
from kimera_core.legacy import create_legacy_schema, missing_tables
from kimera_core.migration.indexes import dropped_indexes

# identities' columns, in table order: what the checksums of a run and a rollback cover
IDENTITY_COLUMNS = [
    "id",
    "identity_type",
    "data",
    "created_at",
    "updated_at",
    "lang_axis",
    "entropy_score",
]

SCHEMA_SQL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS kimera_migration_runs (
        run_id TEXT PRIMARY KEY,
        started_at DOUBLE NOT NULL,
        finished_at DOUBLE,
        status TEXT NOT NULL,          -- running | completed | unbalanced | rolled_back
        partitions INTEGER NOT NULL,
        duckdb_version TEXT NOT NULL,
        counts JSON,
        identities_rows BIGINT,
        identities_checksum TEXT
    )""",
    # DDL of the identities indexes the run dropped for its load ({name: sql}); NULL once
    # they are rebuilt. A run killed in between rebuilds them on resume or rollback.
    "ALTER TABLE kimera_migration_runs ADD COLUMN IF NOT EXISTS dropped_indexes JSON",
    """CREATE TABLE IF NOT EXISTS kimera_migration_partitions (
        run_id TEXT NOT NULL,
        kind TEXT NOT NULL,            -- geoid | scar
        bucket INTEGER NOT NULL,
        finished_at DOUBLE NOT NULL,
        read BIGINT NOT NULL,
        inserted BIGINT NOT NULL,
        updated BIGINT NOT NULL,
        unchanged BIGINT NOT NULL,
        kept BIGINT NOT NULL,
        quarantined BIGINT NOT NULL,
        identities_rows BIGINT NOT NULL,
        identities_checksum TEXT NOT NULL,
        PRIMARY KEY (run_id, kind, bucket)
    )""",
    """CREATE TABLE IF NOT EXISTS kimera_migration_changes (
        run_id TEXT NOT NULL,
        id TEXT NOT NULL,
        action TEXT NOT NULL,          -- insert | update
        before_identity_type TEXT,
        before_data JSON,
        before_created_at DOUBLE,
        before_updated_at DOUBLE,
        before_lang_axis TEXT,
        before_entropy_score DOUBLE,
        after_hash UBIGINT         -- one row per (run_id, id): a partition holds each key once
    )""",
    """CREATE TABLE IF NOT EXISTS kimera_quarantine (
        run_id TEXT NOT NULL,
        source_table TEXT NOT NULL,
        key TEXT,
        reason TEXT NOT NULL,
        reasons JSON NOT NULL,
        original JSON NOT NULL,
        row_hash UBIGINT NOT NULL,
        quarantined_at DOUBLE NOT NULL,
        PRIMARY KEY (run_id, source_table, row_hash)
    )""",
    # The run whose later judgement of the same key superseded this row; NULL while the row
    # is current (migration.statements.CLEAR_SUPERSEDED_SQL).
    "ALTER TABLE kimera_quarantine ADD COLUMN IF NOT EXISTS cleared_by TEXT",
    # The last full run's judgement per segment of keys (migration.fingerprints): the
    # fingerprint of its inputs and the outcome counts of its legacy rows.
    """CREATE TABLE IF NOT EXISTS kimera_migration_fingerprints (
        segments INTEGER NOT NULL,     -- keys go to segment hash(key) % segments
        segment INTEGER NOT NULL,
        fingerprint HUGEINT NOT NULL,  -- sum of the row hashes of its four sources
        identities_rows BIGINT NOT NULL,
        identities_sum HUGEINT NOT NULL,
        geoid_state HUGEINT NOT NULL,  -- sum of the hashes of the geoid state scars read
        geoid_unchanged BIGINT NOT NULL,
        geoid_kept BIGINT NOT NULL,
        geoid_quarantined BIGINT NOT NULL,
        scar_unchanged BIGINT NOT NULL,
        scar_kept BIGINT NOT NULL,
        scar_quarantined BIGINT NOT NULL,
        recipe TEXT NOT NULL,
        run_id TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS kimera_migration_warnings (
        run_id TEXT NOT NULL,
        source_table TEXT NOT NULL,
        key TEXT NOT NULL,
        warnings JSON NOT NULL,
        PRIMARY KEY (run_id, source_table, key)
    )""",
)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the migration's own tables (idempotent); the legacy tables must exist.

    Raises KimeraError when the file lacks legacy_geoids or legacy_scars.
    """
    missing = [t for t in missing_tables(con) if t != "dual_write_log"]
    if {"legacy_geoids", "legacy_scars"} & set(missing):
        raise KimeraError(f"not a Kimera legacy database: missing table(s) {', '.join(missing)}")
    for statement in SCHEMA_SQL:
        con.execute(statement)
    # adds identities / dual_write_log to a file that lacks them; not the indexes an
    # unfinished run dropped (it rebuilds them when it finishes or is rolled back)
    create_legacy_schema(con, indexes=not dropped_indexes(con))
