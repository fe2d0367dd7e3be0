"""The verifier's driver: one verification, full or incremental, from counts to the recorded verdict.

A full verification:

1. the rollout stage (which side is authoritative), the legacy rows still in quarantine
   (``exceptions``: explained, left out up front; one probe of each legacy table's key
   column), counts per store and identity type net of them, NULL keys (``COUNTS_SQL``);
2. the checksum pass (``digests``): the legacy rows still in quarantine found by key, every
   row's fast digest summed per fine segment (``expected``: the identities row the migration
   writes, against the stored one), the normalised digest only for the segments where those
   disagree (which also counts identities rows whose columns disagree with their document,
   ``columns``), the digest cache reused where the rows are unchanged, the quarantined rows
   subtracted; duplicate keys (``DUPLICATES_SQL``: with identities keyed by its primary key,
   only in the segments the fast sums found suspect, where any must be); then bisection
   (``segments``): differing segments split down to leaves of about a thousand rows;
3. the leaves' rows compared row by row (``rows``), the column disagreements named;
4. the verdict's reasons and exceptions (``report``), and a row in ``kimera_verifications``.

An incremental verification skips 2: it compares row by row the keys written since the last
recorded verification (``CHANGED_KEYS_SQL``: by ``updated_at`` on either side, and by the
dual-write log, which also names deleted keys). Counts are always checked in full. When the
last recorded verification was inconsistent, an incremental run verifies every key instead:
it would not re-report the old problems, and the verdict must come from findings.

Everything a run creates on the connection is a temp table (``TEMP_TABLES`` of each module),
dropped at the end; the only writes are the digest cache (``cache``) and the record.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import duckdb

from kimera_core.compare import DEFAULT_TOLERANCE, Tolerance
from kimera_core.consistency import columns, digests, exceptions, rows, segments
from kimera_core.consistency.evidence import KeyEvidence, authoritative_side, next_step
from kimera_core.consistency.report import (
    Finding,
    VerificationReport,
    last_verification,
    n_rows,
    record_verification,
    verdict_reasons,
)
from kimera_core.consistency.sources import SOURCES, install_macros
from kimera_core.db import transaction
from kimera_core.rollout import authoritative_store, get_stage
from kimera_core.sql import vetted_identifier

DEFAULT_SAMPLE = 20

# {nulls_gid} etc.: the NULL keys' count, or 0 where the key is the primary key (never NULL:
# the key column is then not read at all).
COUNTS_SQL = """
SELECT 'legacy', 'geoid', count(*), {nulls_gid} FROM legacy_geoids
UNION ALL SELECT 'legacy', 'scar', count(*), {nulls_sid} FROM legacy_scars
UNION ALL SELECT 'new', identity_type, count(*), {nulls_iid} FROM identities
          GROUP BY identity_type
"""
# Duplicate keys; those explained by the quarantine (kimera_verify_excluded) left out.
DUPLICATES_SQL = """
SELECT 'legacy' AS store, id, count(*) AS n FROM (
    SELECT gid AS id FROM legacy_geoids {where_gid} UNION ALL SELECT id FROM legacy_scars {where_id}
) WHERE id IS NOT NULL AND id NOT IN (SELECT id FROM kimera_verify_excluded)
GROUP BY id HAVING count(*) > 1
UNION ALL
SELECT 'new', id, count(*) FROM identities WHERE id IS NOT NULL {and_id}
GROUP BY id HAVING count(*) > 1
"""
PRIMARY_KEY_SQL = """
SELECT table_name, constraint_column_names FROM duckdb_constraints()
WHERE database_name = current_database() AND schema_name = 'main'
AND constraint_type = 'PRIMARY KEY' AND list_contains($tables, table_name)
"""
# Keys written since $since: by updated_at on either side, or by the dual-write log (which
# also names deleted keys: they no longer have an updated_at anywhere).
CHANGED_KEYS_SQL = """
SELECT gid AS id FROM legacy_geoids WHERE updated_at > $since
UNION SELECT id FROM legacy_scars WHERE updated_at > $since
UNION SELECT id FROM identities WHERE updated_at > $since
UNION SELECT identity_id FROM dual_write_log WHERE timestamp > $since
EXCEPT SELECT id FROM kimera_verify_excluded
"""

TEMP_TABLES: tuple[str, ...] = (
    "kimera_verify_dups",
    "kimera_verify_keys",
    *exceptions.TEMP_TABLES,
    *segments.TEMP_TABLES,
    *digests.TEMP_TABLES,
    *rows.TEMP_TABLES,
    *columns.TEMP_TABLES,
)


def verify(
    con: duckdb.DuckDBPyConnection,
    *,
    incremental: bool = False,
    sample: int = DEFAULT_SAMPLE,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    record: bool = True,
    cache: bool = True,
    strict: bool = False,
    clock: Callable[[], float] = time.time,
    fast_path: bool = True,
) -> VerificationReport:
    """Verify that the legacy tables and identities agree; full, or incremental since the last run.

    ``sample``: offending keys kept per kind of finding (totals are always complete); raises
    ValueError when negative. ``tolerance``: how far weights and timestamps may differ
    (``kimera_core.compare``). ``record`` appends the verdict to ``kimera_verifications`` (the
    base of the next incremental run); pass False on a read-only connection. ``cache`` reuses
    the digests of rows unchanged since they were cached (kimera_verify_digests) and, when the
    connection is writable, caches the digests it computes; False computes every digest and
    writes nothing. ``strict``: explained exceptions (quarantine, legacy stale) count as
    failures. ``clock`` gives ``started_at`` (epoch seconds). ``fast_path=False`` digests
    every segment by the normalised forms and uses no cache: the full comparison the fast path
    (``consistency.expected``) is proven against; the findings are the same, only slower.
    """
    if sample < 0:
        raise ValueError("sample must not be negative")
    started = clock()
    t0 = time.perf_counter()
    install_macros(con)
    base = last_verification(con) if incremental else None
    notes = []
    if base is not None and base["verdict"] != "consistent":
        # an incremental run would not re-report the base's problems, and a verdict that no
        # finding explains is one no gate could share: verify every key instead
        notes.append(
            f"the base verification ({base['mode']}) was {base['verdict']}: verified every "
            "key, as an incremental run would not re-report its problems"
        )
        base = None
    mode = "incremental" if base is not None else "full"
    stage = get_stage(con)
    report = VerificationReport(
        mode=mode,
        started_at=started,
        tolerance=tolerance.to_dict(),
        stage=stage,
        authoritative=authoritative_side(authoritative_store(stage)),
        strict=strict,
        notes=notes,
    )
    # One snapshot: beside live writers (a database server) every read below must see the
    # same committed state, or a dual write committed between two reads would show as a key
    # in one store only. Nothing in it may fail on purpose (a failed statement aborts the
    # transaction), so probes for absent tables happen before it (get_stage, last_verification).
    with transaction(con):
        exceptions.classify(con)
        rows.clear(con)
        unique = _unique_keys(con)
        _counts(con, report, unique)
        if base is None:
            report.checksums["excluded_rows"] = digests.exclude_keys(con)
            digests.digest_segments(con, report, cache, fast_path)
            _duplicates(con, report, sample, keys=None, unique=unique)
            bits, leaves = segments.bisect(con, report)
            report.checksums["pass_seconds"] = round(
                report.checksums["digest_cache"]["seconds"]
                + report.checksums["levels"][0]["seconds"],
                4,
            )
            compared = 0
            if leaves:
                compared = rows.materialise_sides(con, segments.leaf_keys(con, bits, leaves))
                rows.row_level(con, report, sample, tolerance)
            report.checksums["rows_compared_row_level"] = compared
            columns.check_segments(
                con, report, segments.column_mismatch_segments(con), segments.FINE_BITS, sample
            )
        else:
            report.since = base["verified_at"]
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE kimera_verify_keys AS {CHANGED_KEYS_SQL}",
                {"since": report.since},
            )
            report.keys_checked = con.execute("SELECT count(*) FROM kimera_verify_keys").fetchone()[
                0
            ]
            _duplicates(con, report, sample, keys="kimera_verify_keys")
            rows.materialise_sides(con, "kimera_verify_keys")
            rows.row_level(con, report, sample, tolerance)
            columns.check_keys(con, report, "kimera_verify_keys", sample)
        exceptions.report_exceptions(con, report, sample)
    report.reasons = verdict_reasons(report)
    report.seconds = round(time.perf_counter() - t0, 4)
    cleanup(con)
    if record:
        record_verification(con, report)
    return report


def _counts(con: duckdb.DuckDBPyConnection, report: VerificationReport, unique: list[bool]) -> None:
    counts: dict[str, dict[str, int]] = {"legacy": {}, "quarantined": {}, "new": {}}
    nulls = {"legacy": 0, "new": 0}
    sql = COUNTS_SQL.format(
        **{
            f"nulls_{name}": "0" if pk else f"count(*) - count({vetted_identifier(s.key)})"
            for name, s, pk in zip(("gid", "sid", "iid"), SOURCES, unique, strict=True)
        }
    )
    for store, kind, n, null_keys in con.execute(sql).fetchall():
        counts[store][kind] = counts[store].get(kind, 0) + n
        nulls[store] += null_keys
    counts["quarantined"].update(exceptions.excluded_counts(con))
    kinds = sorted(set(counts["legacy"]) | set(counts["new"]))
    counts["difference"] = {
        kind: counts["new"].get(kind, 0)
        - counts["legacy"].get(kind, 0)
        + counts["quarantined"].get(kind, 0)
        for kind in kinds
    }
    for store in ("legacy", "quarantined", "new", "difference"):
        counts[store]["total"] = sum(counts[store].values())
    report.counts, report.null_keys = counts, nulls


def _unique_keys(con: duckdb.DuckDBPyConnection) -> list[bool]:
    """Per source (``SOURCES`` order): whether DuckDB enforces its key as unique and not NULL
    (the key alone is the table's primary key)."""
    keys = con.execute(PRIMARY_KEY_SQL, {"tables": [s.table for s in SOURCES]}).fetchall()
    primary = {(t, tuple(c)) for t, c in keys}
    return [(s.table, (s.key,)) in primary for s in SOURCES]


def _duplicates(
    con: duckdb.DuckDBPyConnection,
    report: VerificationReport,
    sample: int,
    keys: str | None,
    unique: list[bool] | None = None,
) -> None:
    """Duplicate keys among ``keys`` (a temp table of ids), or among every key.

    Over every key, a table whose key is its primary key cannot repeat it, so only the keys
    it shares with the other legacy table are grouped (the scan of all keys is skipped). When
    identities' key is its primary key, only the legacy keys of the fine segments the digest
    pass found suspect are grouped (none on a consistent database: no scan at all): identities
    holds such a key at most once, so two legacy rows of one key (not excluded up front) make
    the legacy rows of its segment a multiset identities cannot equal, and the segment's sums
    disagree (but for the 64-bit collision every segment sum risks).
    """
    if keys is not None:
        restrict = "{key} IN (SELECT id FROM " + vetted_identifier(keys) + ")"
        where_gid, where_id, and_id = (restrict.format(key=k) for k in ("gid", "id", "id"))
    else:
        geoids, scars, identities = unique if unique is not None else _unique_keys(con)
        both = geoids and scars
        where_gid = "gid IN (SELECT id FROM legacy_scars)" if both else "true"
        where_id = "id IN (SELECT gid FROM legacy_geoids)" if both else "true"
        and_id = "false" if identities else "true"
        if identities:
            suspect = report.checksums["digest_cache"]["segments_suspect"]
            # FINE_BITS is an int constant, never input
            in_suspect = (
                f"hash({{key}}) >> {64 - int(segments.FINE_BITS)} "
                "IN (SELECT seg FROM kimera_verify_suspect)"
            )
            where_gid, where_id = (
                f"{where} AND {in_suspect.format(key=key)}" if suspect else "false"
                for where, key in ((where_gid, "gid"), (where_id, "id"))
            )
    sql = DUPLICATES_SQL.format(
        where_gid=f"WHERE {where_gid}", where_id=f"WHERE {where_id}", and_id=f"AND {and_id}"
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE kimera_verify_dups AS {sql}")
    # every part 'false' (no suspect segment, every key a primary key): nothing to read back
    none = where_gid == where_id == and_id == "false"
    total = 0 if none else con.execute("SELECT count(*) FROM kimera_verify_dups").fetchone()[0]
    found = []
    report.duplicates_by_store = {}
    if total:
        found = con.execute(
            "SELECT store, id, n FROM kimera_verify_dups ORDER BY store, id LIMIT ?", [sample]
        ).fetchall()
        report.duplicates_by_store = dict(
            con.execute("SELECT store, count(*) FROM kimera_verify_dups GROUP BY store").fetchall()
        )
    report.duplicate_keys = Finding(
        total,
        [{"store": s, "id": i, "rows": n} for s, i, n in found],
        [KeyEvidence(i, [], f"{n_rows(n)} in the {s} store") for s, i, n in found],
        next_step("duplicate_keys", report.authoritative),
    )


def cleanup(con: duckdb.DuckDBPyConnection) -> None:
    """Drop every temp table a verification creates (also after one that failed midway)."""
    for name in TEMP_TABLES:
        con.execute(f"DROP TABLE IF EXISTS {vetted_identifier(name)}")
