"""The migration engine: legacy geoids and scars into ``identities``, set-based and resumable.

A run walks partitions: every geoid hash bucket first, then every scar bucket (a scar's
related ids are checked against the geoids already migrated). Each partition is one
transaction that prepares its rows in SQL (validation, the P1 document, entropy and tau
with the bulk form), quarantines what cannot be migrated, merges the rest into
``identities`` (newer ``updated_at`` wins, identical rows are left alone), journals every
insert and update for rollback, and records itself as done with counts and a checksum. A
run killed at any point resumes from its last committed partition and ends in the same
state as an uninterrupted run. docs/migration.md is the operator's runbook.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb

from kimera_core.checksum import Checksum, table_checksum
from kimera_core.entropy import geoid_shannon_sql, scar_entropy_sql
from kimera_core.errors import KimeraError
from kimera_core.legacy import (
    create_legacy_schema,
    missing_tables,
    restore_index,
    secondary_indexes,
)
from kimera_core.sql import vetted_identifier

KINDS: tuple[str, ...] = ("geoid", "scar")
IDENTITY_COLUMNS = [
    "id",
    "identity_type",
    "data",
    "created_at",
    "updated_at",
    "lang_axis",
    "entropy_score",
]
# Rows of the larger legacy table per partition when --partitions is not given: bounds the
# memory of one partition's transaction (docs/benchmarks.md has the measured peak). At least
# two DuckDB row groups (122,880 rows), so that most of a partition is written to the file
# at its commit instead of through the WAL and again by the checkpoint.
ROWS_PER_PARTITION = 250_000
MEMORY_LIMIT_ENV = "KIMERA_MEMORY_LIMIT"
DEFAULT_MEMORY_LIMIT = "1GB"

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
    """CREATE TABLE IF NOT EXISTS kimera_migration_warnings (
        run_id TEXT NOT NULL,
        source_table TEXT NOT NULL,
        key TEXT NOT NULL,
        warnings JSON NOT NULL,
        PRIMARY KEY (run_id, source_table, key)
    )""",
)

# Exact ISO-8601 text of an epoch float, as identity.epoch_to_iso writes it: DuckDB's
# DOUBLE -> VARCHAR cast is the shortest round-trip form, like Python's repr.
ISO_MACRO = """
CREATE OR REPLACE TEMP MACRO kimera_iso(t, s) AS (
    -- s is CAST(t AS VARCHAR), passed in so that it is computed once per row
    CASE WHEN t IS NULL OR NOT isfinite(t) OR t < -6.2e10 OR t > 2.5e11 THEN NULL
         WHEN t >= 0 AND t < 1e11 AND NOT contains(s, 'e') THEN
            strftime(make_timestamp(CAST(floor(t) AS BIGINT) * 1000000), '%Y-%m-%dT%H:%M:%S')
            || '.' || rpad(rtrim(split_part(s, '.', 2), '0'), 6, '0') || '+00:00'
         ELSE strftime(make_timestamp(CAST(round(t * 1000000) AS BIGINT)),
                       '%Y-%m-%dT%H:%M:%S.%f') || '+00:00'
    END
)
"""

# Documents equal as minified JSON; for a geoid, related_ids null and [] count as the same
# (json_merge_patch moves the key, so both sides are patched alike).
SAME_DOC_MACRO = """
CREATE OR REPLACE TEMP MACRO kimera_same_doc(a, b, kind) AS (
    CASE WHEN kind = 'geoid'
              AND coalesce(json_array_length(a, '$.related_ids'), 0) = 0
              AND coalesce(json_array_length(b, '$.related_ids'), 0) = 0
         THEN json_merge_patch(a, '{"related_ids": []}') = json_merge_patch(b, '{"related_ids": []}')
         ELSE json(a) = json(b)
    END
)
"""

# The existing identity under the same key, columns renamed so nothing is ambiguous.
# Only this partition's bucket: the scan hashes every id but reads documents for 1/N rows.
_EXISTING = """(SELECT id AS i_id, identity_type AS i_type, data AS i_data, created_at AS i_created,
          updated_at AS i_updated, lang_axis AS i_lang, entropy_score AS i_entropy
   FROM identities WHERE hash(id) % $buckets::UBIGINT = $bucket::UBIGINT)"""

# Entropy rows are keyed by rowid: an old file without a primary key may repeat a key.
# The merge rule: no identity -> insert; same document and timestamps -> unchanged (a geoid's
# related_ids null and [] are the same: legacy_geoids cannot hold the list); the legacy row
# strictly newer by updated_at -> update; otherwise the identity (written by the
# application, newer or tied) is kept.
_PLAN = """
SELECT c.*, e.entropy,
       hash(c.key, c.identity_type, c.doc, c.created_at, c.updated_at, c.lang_axis, e.entropy)
           AS new_hash,
       CASE WHEN c.i_id IS NOT NULL THEN hash(c.i_id, c.i_type, c.i_data, c.i_created,
                                              c.i_updated, c.i_lang, c.i_entropy) END AS old_hash,
       CASE WHEN len(c.reasons) > 0 THEN NULL
            WHEN c.i_id IS NULL THEN 'insert'
            WHEN kimera_same_doc(c.i_data, c.doc, c.identity_type)
                 AND c.i_created = c.created_at AND c.i_updated = c.updated_at THEN 'unchanged'
            WHEN c.updated_at > c.i_updated THEN 'update'
            ELSE 'kept'
       END AS action
FROM checked_out c LEFT JOIN e ON e.key = c.src_rowid
"""

# One statement per partition: parse once, validate, build the P1 document, compute entropy
# with the bulk form's stages, and decide each row's action. __NAME__ tokens are replaced
# with vetted SQL fragments before execution.
PREPARE_GEOIDS_SQL = (
    """
CREATE OR REPLACE TEMP TABLE mig_src AS
WITH src AS (
    SELECT g.*, g.rowid AS src_rowid, __DUP_COUNT__ AS dup_count,
           coalesce(g.created_at, g.updated_at) AS c_at,
           coalesce(g.updated_at, g.created_at) AS u_at,
           CAST(c_at AS VARCHAR) AS c_s, CAST(u_at AS VARCHAR) AS u_s
    FROM mig_part g
), parsed AS (
    SELECT s.*, __META__ AS meta_j, __TAGS__ AS tags_j, i.*
    FROM src s LEFT JOIN """
    + _EXISTING
    + """ i ON i.i_id = s.gid
), terms AS (
    SELECT p.*, gid AS key,
           TRY(json_extract(meta_j, '$.terms')) AS terms_j,
           TRY(CASE WHEN json_type(tags_j) = 'ARRAY' THEN json_array_length(tags_j) END) AS n_tags
    FROM parsed p
), e_in AS (
    SELECT src_rowid AS key, terms_j, n_tags FROM terms
), e AS (SELECT * FROM (__SHANNON__)), checked AS (
    SELECT t.*,
        list_filter([
            CASE WHEN gid IS NULL OR trim(gid) = '' THEN 'null_or_empty_key' END,
            CASE WHEN dup_count > 1 THEN 'duplicate_key' END,
            CASE WHEN gid IN (SELECT id FROM legacy_scars WHERE hash(id) % $buckets::UBIGINT = $bucket::UBIGINT)
                 THEN 'key_in_both_tables' END,
            CASE WHEN i_type <> 'geoid' THEN 'identity_type_conflict' END,
            CASE WHEN meta IS NOT NULL AND meta_j IS NULL THEN 'invalid_json_meta' END,
            CASE WHEN tags IS NOT NULL AND tags_j IS NULL THEN 'invalid_json_tags' END,
            CASE WHEN json_type(meta_j) <> 'OBJECT' THEN 'non_object_meta' END,
            CASE WHEN json_type(tags_j) <> 'ARRAY' THEN 'non_list_tags' END,
            CASE WHEN raw IS NULL OR regexp_matches(raw, '^\\s*$') THEN 'empty_raw' END,
            CASE WHEN NOT isfinite(weight) THEN 'non_finite_weight' END,
            -- the text test is cheap and rules out almost every row before the JSON test
            CASE WHEN regexp_matches(terms_j, '(?i)nan|inf|e\\+?[0-9]{3}')
                      AND coalesce(TRY(len(list_filter(json_extract(terms_j, '$[*].intensity'),
                          x -> json_type(x) = 'DOUBLE' AND NOT isfinite(TRY_CAST(x AS DOUBLE))))
                          > 0), false)
                 THEN 'non_finite_intensity' END,
            CASE WHEN NOT isfinite(created_at) OR NOT isfinite(updated_at)
                 THEN 'non_finite_timestamp' END,
            CASE WHEN c_at IS NULL THEN 'missing_timestamps' END
        ], x -> x IS NOT NULL) AS reasons,
        list_filter([
            CASE WHEN weight IS NULL THEN 'null_weight' END,
            CASE WHEN echo IS DISTINCT FROM trim(raw) THEN 'echo_differs_from_raw' END,
            CASE WHEN gid <> substr(sha256(coalesce(lang_axis, 'None') || ':'
                                            || coalesce(trim(raw), 'None')), 1, 16)
                 THEN 'gid_not_derived_from_text' END,
            CASE WHEN updated_at IS NULL AND created_at IS NOT NULL THEN 'null_updated_at' END,
            CASE WHEN created_at IS NULL AND updated_at IS NOT NULL THEN 'null_created_at' END,
            CASE WHEN updated_at < created_at THEN 'updated_before_created' END,
            CASE WHEN lang_axis IS NULL THEN 'null_lang_axis' END
        ], x -> x IS NOT NULL) AS warnings,
        json_object('id', gid, 'identity_type', 'geoid', 'raw', raw, 'echo', echo,
                    'lang_axis', lang_axis, 'tags', tags_j, 'weight', weight,
                    'related_ids', '[]'::JSON, 'meta', meta_j,
                    'created_at', kimera_iso(c_at, c_s), 'updated_at', kimera_iso(u_at, u_s)) AS doc
    FROM terms t
), checked_out AS (
    SELECT key, 'geoid' AS identity_type, 'legacy_geoids' AS source_table, src_rowid, reasons,
           warnings, doc, lang_axis, c_at AS created_at, u_at AS updated_at,
           i_id, i_type, i_data, i_created, i_updated, i_lang, i_entropy
    FROM checked
)
"""
    + _PLAN
)

PREPARE_SCARS_SQL = (
    """
CREATE OR REPLACE TEMP TABLE mig_src AS
WITH src AS (
    SELECT s.*, s.rowid AS src_rowid, __DUP_COUNT__ AS dup_count,
           coalesce(s.created_at, s.updated_at) AS c_at,
           coalesce(s.updated_at, s.created_at) AS u_at,
           CAST(c_at AS VARCHAR) AS c_s, CAST(u_at AS VARCHAR) AS u_s
    FROM mig_part s
), parsed AS (
    SELECT s.*, __META__ AS meta_j, __RELATED__ AS rel_j, i.*, s.id AS key
    FROM src s LEFT JOIN """
    + _EXISTING
    + """ i ON i.i_id = s.id
), member_ids AS (
    -- related ids that are strings, one row each
    SELECT p.id, unnest(TRY(CAST(json_extract_string(p.rel_j, '$[*]') AS TEXT[]))) AS member
    FROM parsed p
    WHERE json_type(p.rel_j) = 'ARRAY'
), members AS (
    -- where each stands after the geoids; joins keep the partition's few ids on the build side
    SELECT m.id, mi.id IS NOT NULL AS migrated, lg.gid IS NOT NULL AS in_legacy
    FROM member_ids m
    LEFT JOIN (SELECT DISTINCT id FROM identities WHERE identity_type = 'geoid'
               AND id IN (SELECT member FROM member_ids)) mi ON mi.id = m.member
    LEFT JOIN (SELECT DISTINCT gid FROM legacy_geoids
               WHERE gid IN (SELECT member FROM member_ids)) lg ON lg.gid = m.member
), member_state AS (
    SELECT id,
           bool_or(NOT migrated AND NOT in_legacy) AS dangling,
           bool_or(NOT migrated AND in_legacy) AS unmigrated_member
    FROM members GROUP BY id
), e AS (SELECT * FROM (__SCAR_ENTROPY__)), checked AS (
    SELECT p.*,
        list_filter([
            CASE WHEN p.id IS NULL OR trim(p.id) = '' THEN 'null_or_empty_key' END,
            CASE WHEN dup_count > 1 THEN 'duplicate_key' END,
            CASE WHEN p.id IN (SELECT gid FROM legacy_geoids WHERE hash(gid) % $buckets::UBIGINT = $bucket::UBIGINT)
                 THEN 'key_in_both_tables' END,
            CASE WHEN i_type <> 'scar' THEN 'identity_type_conflict' END,
            CASE WHEN meta IS NOT NULL AND meta_j IS NULL THEN 'invalid_json_meta' END,
            CASE WHEN related_ids IS NOT NULL AND rel_j IS NULL THEN 'invalid_json_related_ids' END,
            CASE WHEN json_type(meta_j) <> 'OBJECT' THEN 'non_object_meta' END,
            CASE WHEN rel_j IS NULL OR json_type(rel_j) <> 'ARRAY' THEN 'related_ids_not_list'
                 WHEN json_array_length(rel_j) < 2 THEN 'too_few_related_ids'
                 WHEN len(list_filter(json_extract(rel_j, '$[*]'),
                                      x -> json_type(x) <> 'VARCHAR')) > 0
                      THEN 'related_ids_not_strings'
            END,
            CASE WHEN ms.dangling THEN 'dangling_related_id' END,
            CASE WHEN ms.unmigrated_member THEN 'related_geoid_quarantined' END,
            CASE WHEN NOT isfinite(weight) THEN 'non_finite_weight' END,
            CASE WHEN NOT isfinite(p.created_at) OR NOT isfinite(p.updated_at)
                 THEN 'non_finite_timestamp' END,
            CASE WHEN c_at IS NULL THEN 'missing_timestamps' END
        ], x -> x IS NOT NULL) AS reasons,
        list_filter([
            CASE WHEN weight IS NULL THEN 'null_weight' END,
            CASE WHEN p.updated_at IS NULL AND p.created_at IS NOT NULL THEN 'null_updated_at' END,
            CASE WHEN p.created_at IS NULL AND p.updated_at IS NOT NULL THEN 'null_created_at' END,
            CASE WHEN p.updated_at < p.created_at THEN 'updated_before_created' END
        ], x -> x IS NOT NULL) AS warnings,
        json_object('id', p.id, 'identity_type', 'scar', 'raw', NULL, 'echo', NULL,
                    'lang_axis', NULL, 'tags', NULL, 'weight', weight,
                    'related_ids', rel_j, 'meta', meta_j,
                    'created_at', kimera_iso(c_at, c_s), 'updated_at', kimera_iso(u_at, u_s)) AS doc
    FROM parsed p LEFT JOIN member_state ms ON ms.id = p.id
), checked_out AS (
    SELECT key, 'scar' AS identity_type, 'legacy_scars' AS source_table, src_rowid, reasons,
           warnings, doc, NULL::TEXT AS lang_axis, c_at AS created_at, u_at AS updated_at,
           i_id, i_type, i_data, i_created, i_updated, i_lang, i_entropy
    FROM checked
)
"""
    + _PLAN
)

# The partition's legacy rows, copied once: a plain filtered scan is pushed into the table
# scan, inside the prepare statement it is not (the whole table would be read per partition).
# src_rowid is this copy's rowid. {table} and {key} are fixed names (legacy_geoids/gid,
# legacy_scars/id).
PARTITION_ROWS_SQL = """
CREATE OR REPLACE TEMP TABLE mig_part AS
SELECT * FROM {table} WHERE hash({key}) % $buckets::UBIGINT = $bucket::UBIGINT
"""

# The original row is serialised only for the rows quarantined (found again by rowid).
QUARANTINE_SQL = """
INSERT INTO kimera_quarantine
SELECT $run_id, m.source_table, m.key, m.reasons[1], to_json(m.reasons), to_json(t),
       hash(to_json(t)), $now
FROM mig_src m JOIN mig_part t ON t.rowid = m.src_rowid
WHERE len(m.reasons) > 0
ON CONFLICT DO NOTHING
"""

WARNINGS_SQL = """
INSERT INTO kimera_migration_warnings
SELECT $run_id, source_table, key, to_json(warnings)
FROM mig_src WHERE len(reasons) = 0 AND len(warnings) > 0 AND key IS NOT NULL
ON CONFLICT DO NOTHING
"""

# Before-images for rollback; after_hash is the hash of the row as written.
JOURNAL_SQL = """
INSERT INTO kimera_migration_changes
SELECT $run_id, key, action, i_type, i_data, i_created, i_updated, i_lang, i_entropy,
       new_hash
FROM mig_src WHERE action IN ('insert', 'update')
"""

APPLY_INSERT_SQL = """
INSERT INTO identities (id, identity_type, data, created_at, updated_at, lang_axis, entropy_score)
SELECT key, identity_type, doc, created_at, updated_at, lang_axis, entropy
FROM mig_src WHERE action = 'insert'
"""

APPLY_UPDATE_SQL = """
UPDATE identities SET
    identity_type = p.identity_type, data = p.doc, created_at = p.created_at,
    updated_at = p.updated_at, lang_axis = p.lang_axis, entropy_score = p.entropy
FROM mig_src p
WHERE identities.id = p.key AND p.action = 'update'
"""

PARTITION_COUNTS_SQL = """
SELECT count(*),
       count(*) FILTER (WHERE action = 'insert'),
       count(*) FILTER (WHERE action = 'update'),
       count(*) FILTER (WHERE action = 'unchanged'),
       count(*) FILTER (WHERE action = 'kept'),
       count(*) FILTER (WHERE len(reasons) > 0)
FROM mig_src
"""

# The checksum of the identities rows this partition's legacy keys map to, after it ran.
PARTITION_CHECKSUM_SQL = """
SELECT count(*),
       coalesce(sum((CASE WHEN action IN ('insert', 'update') THEN new_hash ELSE old_hash END)
                     ::HUGEINT), 0)
FROM mig_src WHERE action IS NOT NULL
"""


@dataclass
class MigrationCounts:
    """Row counts of a run or partition; read = inserted+updated+unchanged+kept+quarantined."""

    read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    kept: int = 0
    quarantined: int = 0

    @property
    def changes(self) -> int:
        return self.inserted + self.updated

    @property
    def already_present(self) -> int:
        return self.unchanged + self.kept

    @property
    def balanced(self) -> bool:
        return self.read == self.changes + self.already_present + self.quarantined

    def add(self, other: MigrationCounts) -> None:
        for name in ("read", "inserted", "updated", "unchanged", "kept", "quarantined"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class MigrationReport:
    """What a run did, for the CLI, Dagster metadata and the reconciliation check."""

    run_id: str
    dry_run: bool
    resumed: bool
    partitions: int
    counts: MigrationCounts
    legacy_rows: int
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    partitions_skipped: int = 0
    seconds: float = 0.0
    identities_checksum: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"

    @property
    def balanced(self) -> bool:
        """legacy rows = migrated + already present + quarantined, over the whole tables."""
        return self.counts.balanced and self.counts.read == self.legacy_rows

    @property
    def rows_per_second(self) -> float:
        return self.counts.read / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["counts"]["changes"] = self.counts.changes
        data["counts"]["already_present"] = self.counts.already_present
        data["balanced"] = self.balanced
        data["rows_per_second"] = round(self.rows_per_second, 1)
        data["seconds"] = round(self.seconds, 3)
        return data


ProgressCallback = Callable[[int, int, str, int, MigrationCounts], None]


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the migration's own tables (idempotent); the legacy tables must exist."""
    missing = [t for t in missing_tables(con) if t != "dual_write_log"]
    if {"legacy_geoids", "legacy_scars"} & set(missing):
        raise KimeraError(f"not a Kimera legacy database: missing table(s) {', '.join(missing)}")
    for statement in SCHEMA_SQL:
        con.execute(statement)
    # adds identities / dual_write_log to a file that lacks them; not the indexes an
    # unfinished run dropped (it rebuilds them when it finishes or is rolled back)
    create_legacy_schema(con, indexes=not _dropped_indexes(con))


def _dropped_indexes(con: duckdb.DuckDBPyConnection, run_id: str | None = None) -> dict[str, str]:
    """{name: DDL} of identities indexes dropped by a run (default: by any run)."""
    found: dict[str, str] = {}
    for (recorded,) in con.execute(
        "SELECT dropped_indexes FROM kimera_migration_runs WHERE dropped_indexes IS NOT NULL "
        "AND (run_id = $run_id OR $run_id IS NULL) ORDER BY started_at",
        {"run_id": run_id},
    ).fetchall():
        found.update(json.loads(recorded))
    return found


def _drop_indexes_for_load(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """Drop identities' secondary indexes, their DDL recorded in the run in the same transaction.

    Maintaining P1's three secondary indexes row by row costs more than building them once
    at the end, and their memory grows with the table (docs/benchmarks.md).
    """
    live = secondary_indexes(con, "identities")
    if not live:
        return
    con.execute("BEGIN")
    try:
        con.execute(
            "UPDATE kimera_migration_runs SET dropped_indexes = ? WHERE run_id = ?",
            [json.dumps({**_dropped_indexes(con, run_id), **live}), run_id],
        )
        for name in live:
            con.execute(f"DROP INDEX {vetted_identifier(name)}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _rebuild_indexes_one_at_a_time(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """Rebuild the dropped indexes each in its own checkpointed transaction.

    A checkpoint writes the loaded rows and each finished index to the file, where DuckDB
    can evict them, so only one index is being built in memory at a time: all three in one
    transaction ran out of a 1 GB memory limit at 10 M rows (docs/benchmarks.md). The run
    keeps its record of the dropped indexes until it finishes, and rebuilding skips those
    that exist, so a run killed in between resumes or rolls back as before.
    """
    con.execute("CHECKPOINT")
    for name, ddl in _dropped_indexes(con, run_id).items():
        con.execute("BEGIN")
        try:
            restore_index(con, "identities", name, ddl)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("CHECKPOINT")


def _restore_indexes(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """Rebuild the indexes a run dropped and clear its record (caller owns the transaction)."""
    for name, ddl in _dropped_indexes(con, run_id).items():
        restore_index(con, "identities", name, ddl)
    _clear_dropped_record(con, run_id)


def _clear_dropped_record(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    con.execute(
        "UPDATE kimera_migration_runs SET dropped_indexes = NULL WHERE run_id = ?", [run_id]
    )


def _run_params(sql: str, params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if f"${k}" in sql}


def _exec(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]) -> None:
    con.execute(sql, _run_params(sql, params))


def _unfinished_run(con: duckdb.DuckDBPyConnection) -> tuple[str, int, str] | None:
    row = con.execute(
        "SELECT run_id, partitions, duckdb_version FROM kimera_migration_runs "
        "WHERE status = 'running' ORDER BY started_at DESC LIMIT 1"
    ).fetchone()
    return None if row is None else (row[0], int(row[1]), row[2])


def _done_partitions(
    con: duckdb.DuckDBPyConnection, run_id: str
) -> dict[tuple[str, int], MigrationCounts]:
    rows = con.execute(
        "SELECT kind, bucket, read, inserted, updated, unchanged, kept, quarantined "
        "FROM kimera_migration_partitions WHERE run_id = ?",
        [run_id],
    ).fetchall()
    return {(r[0], int(r[1])): MigrationCounts(*map(int, r[2:])) for r in rows}


def _has_primary_key(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE table_name = ? "
            "AND constraint_type = 'PRIMARY KEY'",
            [table],
        ).fetchone()[0]
    )


def _json_typed_columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    return {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'main' "
            "AND table_name = ? AND data_type = 'JSON'",
            [table],
        ).fetchall()
    }


def _migrate_partition(
    con: duckdb.DuckDBPyConnection, run_id: str, kind: str, bucket: int, buckets: int, record: bool
) -> tuple[MigrationCounts, Checksum]:
    """Prepare, quarantine, merge and journal one partition (caller owns the transaction)."""
    params = {"run_id": run_id, "bucket": bucket, "buckets": buckets, "now": time.time()}
    table = "legacy_geoids" if kind == "geoid" else "legacy_scars"
    key = "gid" if kind == "geoid" else "id"
    # A primary key already rules out duplicates; old files without one get the window count.
    dup = "1" if _has_primary_key(con, table) else f"count(*) OVER (PARTITION BY {key})"
    json_columns = _json_typed_columns(con, table)

    def parsed(column: str) -> str:
        # a JSON column holds valid JSON already; TEXT columns (old files) are validated
        return column if column in json_columns else f"TRY(json({column}))"

    if kind == "geoid":
        sql = PREPARE_GEOIDS_SQL.replace("__SHANNON__", geoid_shannon_sql("e_in"))
        sql = sql.replace("__META__", parsed("meta")).replace("__TAGS__", parsed("tags"))
    else:
        sql = PREPARE_SCARS_SQL.replace(
            "__SCAR_ENTROPY__", scar_entropy_sql("parsed", "src_rowid", "rel_j", "weight")
        )
        sql = sql.replace("__META__", parsed("meta")).replace("__RELATED__", parsed("related_ids"))
    _exec(con, PARTITION_ROWS_SQL.format(table=table, key=key), params)
    _exec(con, sql.replace("__DUP_COUNT__", dup), params)
    counts = MigrationCounts(*map(int, con.execute(PARTITION_COUNTS_SQL).fetchone()))
    rows, digest = con.execute(PARTITION_CHECKSUM_SQL).fetchone()
    checksum = Checksum(int(rows), int(digest))
    # One thread appends whole row groups, which DuckDB writes to the file at commit
    # ("optimistic writes"); parallel appends leave partial row groups that go through the
    # WAL and are written a second time by the checkpoint.
    con.execute("SET threads = 1")
    try:
        if record:
            _exec(con, QUARANTINE_SQL, params)
            _exec(con, WARNINGS_SQL, params)
            _exec(con, JOURNAL_SQL, params)
        con.execute(APPLY_INSERT_SQL)
        con.execute(APPLY_UPDATE_SQL)
    finally:
        con.execute("RESET threads")
    if record:
        con.execute(
            "INSERT INTO kimera_migration_partitions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                run_id,
                kind,
                bucket,
                time.time(),
                counts.read,
                counts.inserted,
                counts.updated,
                counts.unchanged,
                counts.kept,
                counts.quarantined,
                checksum.rows,
                checksum.hex,
            ],
        )
    return counts, checksum


def auto_partitions(con: duckdb.DuckDBPyConnection) -> int:
    """Partitions so that each holds at most ROWS_PER_PARTITION rows of either table."""
    largest = con.execute(
        "SELECT greatest((SELECT count(*) FROM legacy_geoids), (SELECT count(*) FROM legacy_scars))"
    ).fetchone()[0]
    return max(1, -(-int(largest) // ROWS_PER_PARTITION))


def _limit_memory(con: duckdb.DuckDBPyConnection) -> None:
    # DuckDB spills to its temp directory beyond the limit instead of growing without bound.
    limit = os.environ.get(MEMORY_LIMIT_ENV, DEFAULT_MEMORY_LIMIT)
    try:
        con.execute("SELECT current_setting('memory_limit')")
        con.execute(f"SET memory_limit = '{_vetted_size(limit)}'")
    except duckdb.Error as exc:
        raise KimeraError(
            f"{MEMORY_LIMIT_ENV}={limit!r} is not a DuckDB memory size: {exc}"
        ) from None
    con.execute("SET preserve_insertion_order = false")
    # Hand freed memory back to the OS promptly: with the defaults the allocator kept up to
    # ~800 MB above the limit at 10 M rows (docs/benchmarks.md).
    con.execute("SET allocator_flush_threshold = '16MB'")
    con.execute("SET allocator_bulk_deallocation_flush_threshold = '16MB'")
    con.execute("SET allocator_background_threads = true")
    # One checkpoint at the end of the run instead of one every 16 MB of WAL: each rewrites
    # identities and its indexes. A crash replays the WAL, which holds only committed partitions.
    con.execute("SET checkpoint_threshold = '16GB'")


def _vetted_size(text: str) -> str:
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", text, re.I):
        raise KimeraError(f"{MEMORY_LIMIT_ENV}={text!r} is not a memory size like 1GB or 512MiB")
    return text.strip()


def _legacy_rows(con: duckdb.DuckDBPyConnection) -> int:
    return int(
        con.execute(
            "SELECT (SELECT count(*) FROM legacy_geoids) + (SELECT count(*) FROM legacy_scars)"
        ).fetchone()[0]
    )


def _reason_counts(
    con: duckdb.DuckDBPyConnection, run_id: str
) -> tuple[dict[str, int], dict[str, int]]:
    reasons = dict(
        con.execute(
            "SELECT source_table || ':' || reason, count(*) FROM kimera_quarantine "
            "WHERE run_id = ? GROUP BY ALL ORDER BY 1",
            [run_id],
        ).fetchall()
    )
    warnings = dict(
        con.execute(
            "SELECT source_table || ':' || w, count(*) FROM kimera_migration_warnings, "
            "LATERAL (SELECT unnest(CAST(warnings AS TEXT[])) AS w) "
            "WHERE run_id = ? GROUP BY ALL ORDER BY 1",
            [run_id],
        ).fetchall()
    )
    return reasons, warnings


def migrate(
    con: duckdb.DuckDBPyConnection,
    *,
    partitions: int | None = None,
    dry_run: bool = False,
    on_partition: ProgressCallback | None = None,
) -> MigrationReport:
    """Backfill identities from the legacy tables; resumes an unfinished run if there is one.

    ``dry_run`` computes every count inside one transaction and rolls it back: nothing is
    written, not even the run record.
    """
    if partitions is not None and not 1 <= partitions <= 4096:
        raise KimeraError("--partitions must be between 1 and 4096")
    started = time.perf_counter()
    _limit_memory(con)
    con.execute(ISO_MACRO)
    con.execute(SAME_DOC_MACRO)
    if dry_run:
        con.execute("BEGIN")
        try:
            ensure_schema(con)
            return _dry_run(con, partitions or auto_partitions(con), started, on_partition)
        finally:
            con.execute("ROLLBACK")

    ensure_schema(con)
    resumed = False
    unfinished = _unfinished_run(con)
    if unfinished is not None:
        run_id, buckets, version = unfinished
        if partitions is not None and partitions != buckets:
            raise KimeraError(
                f"run {run_id} is unfinished with {buckets} partitions: resume it with "
                f"--partitions {buckets} (or omit --partitions), or roll it back first"
            )
        if version != duckdb.__version__:
            raise KimeraError(
                f"run {run_id} was started with DuckDB {version} and this is {duckdb.__version__}:"
                " partition buckets would differ; roll it back (kimera migrate rollback) and rerun"
            )
        resumed = True
    else:
        run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
        buckets = partitions or auto_partitions(con)
        con.execute(
            "INSERT INTO kimera_migration_runs (run_id, started_at, status, partitions, duckdb_version) "
            "VALUES (?, ?, 'running', ?, ?)",
            [run_id, time.time(), buckets, duckdb.__version__],
        )

    _drop_indexes_for_load(con, run_id)
    done = _done_partitions(con, run_id)
    total = MigrationCounts()
    plan = [(kind, b) for kind in KINDS for b in range(buckets)]
    skipped = 0
    for index, (kind, bucket) in enumerate(plan, start=1):
        if (kind, bucket) in done:
            counts = done[(kind, bucket)]
            skipped += 1
        else:
            con.execute("BEGIN")
            try:
                counts, _ = _migrate_partition(con, run_id, kind, bucket, buckets, record=True)
                con.execute("COMMIT")
            except duckdb.OutOfMemoryException as exc:
                con.execute("ROLLBACK")
                raise _out_of_memory(f"{kind} partition {bucket}", run_id, exc) from None
            except BaseException:
                con.execute("ROLLBACK")
                raise
        total.add(counts)
        if on_partition:
            on_partition(index, len(plan), kind, bucket, counts)

    try:
        return _finish(con, run_id, buckets, total, resumed, skipped, started)
    except duckdb.OutOfMemoryException as exc:
        raise _out_of_memory("rebuilding the identities indexes", run_id, exc) from None


def _out_of_memory(where: str, run_id: str, exc: duckdb.Error) -> KimeraError:
    return KimeraError(
        f"out of memory in {where} of run {run_id} ({str(exc).splitlines()[0]}); the run "
        f"resumes from there: raise {MEMORY_LIMIT_ENV} "
        f"(now {os.environ.get(MEMORY_LIMIT_ENV, DEFAULT_MEMORY_LIMIT)})"
        " or roll the run back and start again with more --partitions"
    )


def migrate_buckets(
    con: duckdb.DuckDBPyConnection,
    buckets: Sequence[int],
    *,
    partitions: int,
    on_partition: ProgressCallback | None = None,
) -> MigrationReport:
    """Migrate only the selected hash buckets (of ``partitions``) as one new run, geoids first.

    For an orchestrator that partitions the migration by bucket. The reconciliation counts
    the legacy rows of the selected buckets only. A scar whose geoids sit in a bucket not yet
    migrated is quarantined (``related_geoid_quarantined``) and migrates when its bucket runs
    again after theirs; selecting every bucket gives the same result as ``migrate``.
    """
    if not 1 <= partitions <= 4096:
        raise KimeraError("--partitions must be between 1 and 4096")
    selected = sorted(set(buckets))
    if not selected or selected[0] < 0 or selected[-1] >= partitions:
        raise KimeraError(f"buckets must be a non-empty subset of 0..{partitions - 1}")
    started = time.perf_counter()
    _limit_memory(con)
    con.execute(ISO_MACRO)
    con.execute(SAME_DOC_MACRO)
    ensure_schema(con)
    unfinished = _unfinished_run(con)
    if unfinished is not None:
        raise KimeraError(
            f"run {unfinished[0]} is unfinished: resume it (kimera migrate) or roll it back "
            "(kimera migrate rollback) before migrating selected buckets"
        )
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    con.execute(
        "INSERT INTO kimera_migration_runs (run_id, started_at, status, partitions, duckdb_version) "
        "VALUES (?, ?, 'running', ?, ?)",
        [run_id, time.time(), partitions, duckdb.__version__],
    )
    total = MigrationCounts()
    plan = [(kind, b) for kind in KINDS for b in selected]
    for index, (kind, bucket) in enumerate(plan, start=1):
        con.execute("BEGIN")
        try:
            counts, _ = _migrate_partition(con, run_id, kind, bucket, partitions, record=True)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        total.add(counts)
        if on_partition:
            on_partition(index, len(plan), kind, bucket, counts)
    legacy = int(
        con.execute(
            "SELECT (SELECT count(*) FROM legacy_geoids WHERE list_contains($b, hash(gid) % $n::UBIGINT))"
            " + (SELECT count(*) FROM legacy_scars WHERE list_contains($b, hash(id) % $n::UBIGINT))",
            {"b": selected, "n": partitions},
        ).fetchone()[0]
    )
    return _finish(con, run_id, partitions, total, False, 0, started, legacy_rows=legacy)


def _finish(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    buckets: int,
    total: MigrationCounts,
    resumed: bool,
    skipped: int,
    started: float,
    legacy_rows: int | None = None,
) -> MigrationReport:
    legacy = _legacy_rows(con) if legacy_rows is None else legacy_rows
    checksum = table_checksum(con, "identities", IDENTITY_COLUMNS)
    reasons, warnings = _reason_counts(con, run_id)
    report = MigrationReport(
        run_id=run_id,
        dry_run=False,
        resumed=resumed,
        partitions=buckets,
        counts=total,
        legacy_rows=legacy,
        quarantine_reasons=reasons,
        warnings=warnings,
        partitions_skipped=skipped,
        seconds=time.perf_counter() - started,
        identities_checksum=checksum.to_dict(),
    )
    report.status = "completed" if report.balanced else "unbalanced"
    _rebuild_indexes_one_at_a_time(con, run_id)
    con.execute("BEGIN")
    try:
        _clear_dropped_record(con, run_id)
        con.execute(
            "UPDATE kimera_migration_runs SET finished_at = ?, status = ?, counts = ?, "
            "identities_rows = ?, identities_checksum = ? WHERE run_id = ?",
            [
                time.time(),
                report.status,
                json.dumps(report.to_dict()["counts"]),
                checksum.rows,
                checksum.hex,
                run_id,
            ],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("CHECKPOINT")
    return report


def _dry_run(
    con: duckdb.DuckDBPyConnection,
    buckets: int,
    started: float,
    on_partition: ProgressCallback | None,
) -> MigrationReport:
    total = MigrationCounts()
    reasons: dict[str, int] = {}
    plan = [(kind, b) for kind in KINDS for b in range(buckets)]
    for index, (kind, bucket) in enumerate(plan, start=1):
        counts, _ = _migrate_partition(con, "dry-run", kind, bucket, buckets, record=False)
        for key, n in con.execute(
            "SELECT source_table || ':' || reasons[1], count(*) FROM mig_src "
            "WHERE len(reasons) > 0 GROUP BY ALL"
        ).fetchall():
            reasons[key] = reasons.get(key, 0) + n
        total.add(counts)
        if on_partition:
            on_partition(index, len(plan), kind, bucket, counts)
    report = MigrationReport(
        run_id="dry-run",
        dry_run=True,
        resumed=False,
        partitions=buckets,
        counts=total,
        legacy_rows=_legacy_rows(con),
        quarantine_reasons=dict(sorted(reasons.items())),
        seconds=time.perf_counter() - started,
    )
    report.status = "dry-run" if report.balanced else "unbalanced"
    return report


# --- rollback -------------------------------------------------------------------------
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


def rollback(
    con: duckdb.DuckDBPyConnection, run_id: str | None = None, sample: int = 20
) -> RollbackReport:
    """Undo migration runs newest first (one run, or all not yet rolled back), in one transaction.

    An inserted identity is deleted and an updated one restored to its recorded before-image,
    but only while it is still exactly what the migration wrote; an identity the application
    changed since is left as it is and reported.
    """
    ensure_schema(con)
    if run_id is not None:
        found = con.execute(
            "SELECT status FROM kimera_migration_runs WHERE run_id = ?", [run_id]
        ).fetchone()
        if found is None:
            raise KimeraError(f"no migration run {run_id!r} (see 'kimera migrate status')")
        if found[0] == "rolled_back":
            raise KimeraError(f"run {run_id} is already rolled back")
        runs = [run_id]
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
    else:
        runs = [
            r[0]
            for r in con.execute(
                "SELECT run_id FROM kimera_migration_runs WHERE status <> 'rolled_back' "
                "ORDER BY started_at DESC"
            ).fetchall()
        ]
    report = RollbackReport(runs=runs)
    con.execute("BEGIN")
    try:
        for rid in runs:
            _rollback_run(con, rid, report, sample)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    report.identities_checksum = table_checksum(con, "identities", IDENTITY_COLUMNS).to_dict()
    con.execute("CHECKPOINT")
    return report


def _rollback_run(
    con: duckdb.DuckDBPyConnection, run_id: str, report: RollbackReport, sample: int
) -> None:
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE rb_changes AS
        SELECT c.*, i.id IS NOT NULL AS present,
               i.id IS NOT NULL AND {ROW_HASH} = c.after_hash AS untouched
        FROM kimera_migration_changes c LEFT JOIN identities i ON i.id = c.id
        WHERE c.run_id = ?""",
        [run_id],
    )
    modified = con.execute("SELECT id FROM rb_changes WHERE NOT untouched ORDER BY id").fetchall()
    report.left_modified += len(modified)
    room = sample - len(report.left_modified_sample)
    report.left_modified_sample.extend(r[0] for r in modified[: max(room, 0)])
    report.deleted += con.execute(
        "DELETE FROM identities WHERE id IN "
        "(SELECT id FROM rb_changes WHERE action = 'insert' AND untouched)"
    ).fetchone()[0]
    report.restored += con.execute(
        """UPDATE identities SET identity_type = c.before_identity_type, data = c.before_data,
               created_at = c.before_created_at, updated_at = c.before_updated_at,
               lang_axis = c.before_lang_axis, entropy_score = c.before_entropy_score
           FROM rb_changes c
           WHERE identities.id = c.id AND c.action = 'update' AND c.untouched"""
    ).fetchone()[0]
    _restore_indexes(con, run_id)
    for table in (
        "kimera_migration_changes",
        "kimera_quarantine",
        "kimera_migration_warnings",
        "kimera_migration_partitions",
    ):
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
    con.execute(
        "UPDATE kimera_migration_runs SET status = 'rolled_back', finished_at = ? WHERE run_id = ?",
        [time.time(), run_id],
    )


# --- status and quarantine views ------------------------------------------------------
def run_history(con: duckdb.DuckDBPyConnection, limit: int = 20) -> list[dict[str, Any]]:
    """Recent runs with their progress (partitions done of total)."""
    if "kimera_migration_runs" not in {
        r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    }:
        return []
    rows = con.execute(
        """SELECT r.run_id, r.status, r.started_at, r.finished_at, r.partitions,
                  (SELECT count(*) FROM kimera_migration_partitions p WHERE p.run_id = r.run_id),
                  r.counts, r.identities_rows, r.identities_checksum
           FROM kimera_migration_runs r ORDER BY r.started_at DESC LIMIT ?""",
        [limit],
    ).fetchall()
    return [
        {
            "run_id": r[0],
            "status": r[1],
            "started_at": r[2],
            "finished_at": r[3],
            "partitions_total": 2 * int(r[4]),
            "partitions_done": int(r[5]),
            "counts": json.loads(r[6]) if r[6] else None,
            "identities_rows": r[7],
            "identities_checksum": r[8],
        }
        for r in rows
    ]


def quarantine_summary(
    con: duckdb.DuckDBPyConnection, run_id: str | None = None, sample: int = 5
) -> dict[str, Any]:
    """Quarantined rows of a run (default: the latest run) by reason, with sample keys."""
    if run_id is None:
        row = con.execute(
            "SELECT run_id FROM kimera_migration_runs WHERE status <> 'rolled_back' "
            "ORDER BY started_at DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return {"run_id": None, "total": 0, "reasons": {}}
        run_id = row[0]
    reasons: dict[str, Any] = {}
    for table, reason, count, keys in con.execute(
        """SELECT source_table, reason, count(*), list(key ORDER BY key)[1:?]
           FROM kimera_quarantine WHERE run_id = ? GROUP BY ALL ORDER BY 1, 2""",
        [sample, run_id],
    ).fetchall():
        reasons[f"{table}:{reason}"] = {"rows": int(count), "sample_keys": keys}
    return {"run_id": run_id, "total": sum(v["rows"] for v in reasons.values()), "reasons": reasons}
