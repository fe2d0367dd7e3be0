"""Explained exceptions: the legacy rows the migration quarantined, known before any digest.

A legacy row the migration could not migrate whole is kept in ``kimera_quarantine`` with its
reasons. It is still in quarantine when the run that quarantined it was not rolled back and
no later judgement of the same key cleared it (``cleared_by``, which the migration writes;
in a file from before that column, a later run, not rolled back, that processed the row's
partition, ``hash(key) % partitions`` of that run, without quarantining it again): a row
fixed and migrated since is no longer explained by an old entry, and its absence is a loss.
A row that waits for migration work still to run (``PENDING_REASONS``) explains nothing
yet: its absence holds the gates.

``classify`` fills these temp tables, from joins against the small quarantine table and one
probe of each legacy table's key column:

* ``kimera_verify_quarantine`` (src, id, kind, reason, reasons, present): every legacy row
  still in quarantine, and whether ``identities`` holds its key;
* ``kimera_verify_excluded`` (id): the keys every legacy row of which is in quarantine and
  which ``identities`` does not hold: explained exceptions, left out of the segment sums up
  front (``digests.exclude_keys``) so a database with quarantine verifies as fast as a clean
  one, and never reported as missing;
* ``kimera_verify_held`` (src, rid, id): the legacy rows of the quarantined keys, read by
  ``excluded_counts`` and ``digests.exclude_keys`` (no other scan of the legacy tables).

A quarantined key that ``identities`` holds anyway is compared like any other key: when the
stores agree it is an exception of its own (``quarantined_in_identities``: usually written
by P1's dual write before the migration), when they differ a failure.
"""

from __future__ import annotations

import json

import duckdb

from kimera_core.consistency.evidence import KeyEvidence, next_step
from kimera_core.consistency.report import Finding, VerificationReport

# Whether this database (not an attached one) holds a quarantine table, and the quarantined
# keys of runs not rolled back: the plain form other modules (kimera_core.repair) read.
QUARANTINE_EXISTS_SQL = """
SELECT count(*) FROM information_schema.tables
WHERE table_catalog = current_database() AND table_schema = 'main'
  AND table_name = 'kimera_quarantine'
"""
QUARANTINED_KEYS_SQL = """
    SELECT DISTINCT q.key FROM kimera_quarantine q
    JOIN kimera_migration_runs r ON r.run_id = q.run_id AND r.status <> 'rolled_back'
"""
# This database's own tables and the quarantine's columns (attached databases do not count).
CATALOG_SQL = """
SELECT table_name, list(column_name) FROM duckdb_columns()
WHERE database_name = current_database() AND schema_name = 'main'
  AND table_name IN ('kimera_quarantine', 'kimera_migration_runs', 'kimera_migration_partitions')
GROUP BY table_name
"""
# Reasons that explain nothing yet: the row waits for migration work still to run (its
# related geoid's partition), so its absence holds the gates until a run judges it again.
PENDING_REASONS: tuple[str, ...] = ("related_geoid_pending",)
# Quarantine rows still current: of runs not rolled back and, where the migration records it
# (cleared_by), not cleared by a later run's judgement of the same key; {current} is that
# test. Without the column, a row is superseded by a later run (not rolled back) that
# processed its partition without quarantining it again.
STILL_QUARANTINED_SQL = """
WITH runs AS (
    SELECT run_id, started_at, partitions FROM kimera_migration_runs
    WHERE status <> 'rolled_back'
), q AS (
    SELECT q.source_table AS src, q.key AS id,
           CASE q.source_table WHEN 'legacy_geoids' THEN 'geoid' ELSE 'scar' END AS kind,
           q.reason, q.reasons::VARCHAR AS reasons, r.run_id, r.started_at
    FROM kimera_quarantine q JOIN runs r USING (run_id)
    WHERE q.key IS NOT NULL AND q.source_table IN ('legacy_geoids', 'legacy_scars')
      AND {current}
)
SELECT src, id, kind, arg_max(reason, started_at) AS reason,
       arg_max(reasons, started_at) AS reasons
FROM q GROUP BY src, id, kind
"""
CLEARED_BY = "q.cleared_by IS NULL"
NOT_SUPERSEDED = """NOT EXISTS (
        SELECT 1 FROM runs later
        JOIN kimera_migration_partitions p ON p.run_id = later.run_id
             AND p.kind = CASE q.source_table WHEN 'legacy_geoids' THEN 'geoid' ELSE 'scar' END
             AND p.bucket = hash(q.key) % later.partitions
        WHERE later.started_at > r.started_at
          AND NOT EXISTS (SELECT 1 FROM kimera_quarantine q2 WHERE q2.run_id = later.run_id
                          AND q2.source_table = q.source_table AND q2.key = q.key))"""
NO_QUARANTINE_SQL = """
SELECT NULL::TEXT AS src, NULL::TEXT AS id, NULL::TEXT AS kind, NULL::TEXT AS reason,
       NULL::TEXT AS reasons WHERE false
"""
# From {still} (the rows above: read twice, so DuckDB materialises the CTE once).
QUARANTINE_TABLE_SQL = """
CREATE OR REPLACE TEMP TABLE kimera_verify_quarantine AS
WITH kimera_still AS MATERIALIZED ({still})
SELECT q.*, q.id IN (SELECT id FROM identities
                     WHERE id IN (SELECT id FROM kimera_still)) AS present
FROM kimera_still q
"""
# Quarantined keys absent from identities, with the tables that quarantine them for a reason
# that explains (none in $pending, PENDING_REASONS): materialised once, read by both probes of
# the legacy tables below.
EXPLAINED_SQL = """
CREATE OR REPLACE TEMP TABLE kimera_verify_explained AS
SELECT id, count(DISTINCT src) AS tables FROM kimera_verify_quarantine q
WHERE NOT present AND NOT EXISTS (SELECT 1 FROM (SELECT unnest($pending::VARCHAR[]) AS reason) p
                                  WHERE list_contains(CAST(q.reasons AS TEXT[]), p.reason))
GROUP BY id
"""
# The legacy rows of the keys in kimera_verify_explained (src, rid: the row's rowid, id): one
# probe of each legacy table's key column with the few quarantined keys, which every later
# step reads instead of probing again (the excluded keys, their rows per type, the rows the
# digest pass takes out).
HELD_SQL = """
CREATE OR REPLACE TEMP TABLE kimera_verify_held AS
SELECT 'legacy_geoids' AS src, rowid AS rid, gid AS id FROM legacy_geoids
WHERE gid IN (SELECT id FROM kimera_verify_explained)
UNION ALL
SELECT 'legacy_scars', rowid, id FROM legacy_scars WHERE id IN (SELECT id FROM kimera_verify_explained)
"""
# Keys whose every legacy row is in quarantine for a reason that explains it, absent from
# identities: as many tables quarantine the key as hold it.
EXCLUDED_SQL = """
CREATE OR REPLACE TEMP TABLE kimera_verify_excluded AS
WITH held AS (SELECT id, count(DISTINCT src) AS tables FROM kimera_verify_held GROUP BY id)
SELECT id FROM kimera_verify_explained JOIN held USING (id, tables)
"""
# The legacy rows of the excluded keys, per type ('geoid', 'scar').
EXCLUDED_COUNTS_SQL = """
SELECT CASE src WHEN 'legacy_geoids' THEN 'geoid' ELSE 'scar' END, count(*)
FROM kimera_verify_held WHERE id IN (SELECT id FROM kimera_verify_excluded) GROUP BY src
"""
TEMP_TABLES: tuple[str, ...] = (
    "kimera_verify_explained",
    "kimera_verify_quarantine",
    "kimera_verify_excluded",
    "kimera_verify_held",
)


def classify(con: duckdb.DuckDBPyConnection) -> None:
    """Fill kimera_verify_quarantine and kimera_verify_excluded (module docstring); a database
    never migrated has no quarantine, so both are empty."""
    columns = dict(con.execute(CATALOG_SQL).fetchall())
    if len(columns) < 3:
        still = NO_QUARANTINE_SQL
    else:
        cleared = "cleared_by" in columns["kimera_quarantine"]
        still = STILL_QUARANTINED_SQL.format(current=CLEARED_BY if cleared else NOT_SUPERSEDED)
    con.execute(QUARANTINE_TABLE_SQL.format(still=still))
    con.execute(EXPLAINED_SQL, {"pending": list(PENDING_REASONS)})
    con.execute(HELD_SQL)
    con.execute(EXCLUDED_SQL)


def excluded_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Legacy rows of the keys excluded up front, per type ('geoid', 'scar'; absent when 0);
    needs ``classify`` first."""
    return {kind: int(n) for kind, n in con.execute(EXCLUDED_COUNTS_SQL).fetchall() if n}


def report_exceptions(
    con: duckdb.DuckDBPyConnection, report: VerificationReport, sample: int
) -> None:
    """Set the report's ``quarantined`` (legacy rows left out up front, by reason, with the
    first ``sample`` by reason and key), ``quarantine_reasons`` and
    ``quarantined_in_identities`` (quarantined keys identities holds, without a field
    difference: kimera_verify_diff holds the keys that differ)."""
    excluded = "id IN (SELECT id FROM kimera_verify_excluded)"
    report.quarantine_reasons = dict(
        con.execute(
            f"SELECT reason, count(*) FROM kimera_verify_quarantine WHERE {excluded} "
            "GROUP BY reason ORDER BY reason"
        ).fetchall()
    )
    found = con.execute(
        f"SELECT id, src, reason, reasons FROM kimera_verify_quarantine WHERE {excluded} "
        "ORDER BY reason, id, src LIMIT ?",
        [sample],
    ).fetchall()
    report.quarantined = Finding(
        sum(report.quarantine_reasons.values()),
        [{"id": i, "table": t, "reason": r} for i, t, r, _ in found],
        [KeyEvidence(i, [], f"{t}: {', '.join(json.loads(rs))}") for i, t, _, rs in found],
        next_step("quarantined", report.authoritative),
    )
    agreeing = (
        "present AND id NOT IN (SELECT id FROM kimera_verify_diff) "
        "AND id NOT IN (SELECT id FROM kimera_verify_dups)"
    )
    total = con.execute(
        f"SELECT count(DISTINCT id) FROM kimera_verify_quarantine WHERE {agreeing}"
    ).fetchone()[0]
    found = con.execute(
        f"SELECT id, string_agg(src || ': ' || reason, '; ' ORDER BY src) "
        f"FROM kimera_verify_quarantine WHERE {agreeing} GROUP BY id ORDER BY id LIMIT ?",
        [sample],
    ).fetchall()
    report.quarantined_in_identities = Finding(
        total,
        [{"id": i, "reason": note} for i, note in found],
        [KeyEvidence(i, [], note) for i, note in found],
        next_step("quarantined_in_identities", report.authoritative),
    )
