"""Row-by-row comparison of the rows bisection or incremental mode names (≈ reladiff's joindiff).

Given a temp table of keys (the leaf segments' keys, or the keys changed since the last
verification), ``materialise_sides`` fetches those rows of each side as (id, key hash, digest)
and ``row_level`` joins the two sides on the key: keys on one side only are findings
(``missing_in_new``, ``missing_in_legacy``); keys on both sides whose digests differ are
compared field by field, and only rows with a field that differs under
``kimera_core.compare``'s rules are ``field_mismatches``. A digest is a filter, never the
judge: a row whose digest differs may still turn out equal (JSON keys in another order, a
weight within tolerance).

``FIELD_DIFF_SQL`` maps both stores to the ADR-001 fields and tests each field named in
``compare.FIELD_RULES`` with the SQL form of its rule (``kimera_json_eq``, ``kimera_float_eq``
with the ``Tolerance`` bound as parameters, ``IS DISTINCT FROM``), so the field list, the
JSON and time fields and the tolerances have one definition, in ``compare``. A geoid's
``related_ids`` is ``[]`` on both sides when NULL (legacy_geoids has no column for it), as in
``compare.differing_fields``.
"""

from __future__ import annotations

from typing import Any

import duckdb

from kimera_core.compare import FIELD_RULES, Tolerance
from kimera_core.consistency.report import Finding, VerificationReport
from kimera_core.consistency.sources import rows_sql, sides
from kimera_core.sql import vetted_identifier

KEY_LIST_MAX = 4096  # rows compared row by row are fetched by a list of keys up to this many

# The SQL test of each rule on the mapped values l.<field> (legacy) and n.<field> (new).
_RULE_SQL: dict[str, str] = {
    "exact": "l.{f} IS DISTINCT FROM n.{f}",
    "json": "NOT kimera_json_eq(l.{f}, n.{f})",
    "relative": "NOT kimera_float_eq(l.{f}, n.{f}, $weight_relative, true)",
    "seconds": "NOT kimera_float_eq(l.{f}, n.{f}, $seconds, false)",
}
_FIELD_TESTS = ",\n    ".join(
    f"CASE WHEN {_RULE_SQL[rule].format(f=name)} THEN '{name}' END"
    for name, rule in FIELD_RULES.items()
)

# Field by field over the keys in kimera_verify_changed, both sides present: (id, the names of
# the fields that differ, in compare.COMPARED_FIELDS order).
FIELD_DIFF_SQL = (
    """
WITH l AS (
    SELECT gid AS id, 'geoid' AS identity_type, raw, echo, lang_axis, kimera_jnorm(tags) AS tags,
           weight, '[]' AS related_ids, kimera_jnorm(meta) AS meta, created_at, updated_at
    FROM legacy_geoids WHERE gid IN (SELECT id FROM kimera_verify_changed)
    UNION ALL
    SELECT id, 'scar', NULL, NULL, NULL, NULL, weight, kimera_jnorm(related_ids),
           kimera_jnorm(meta), created_at, updated_at
    FROM legacy_scars WHERE id IN (SELECT id FROM kimera_verify_changed)
), n AS (
    SELECT id, identity_type, data->>'$.raw' AS raw, data->>'$.echo' AS echo,
           data->>'$.lang_axis' AS lang_axis, kimera_jnorm(data->'$.tags') AS tags,
           TRY_CAST(data->>'$.weight' AS DOUBLE) AS weight,
           CASE WHEN identity_type = 'geoid'
                THEN coalesce(kimera_jnorm(data->'$.related_ids'), '[]')
                ELSE kimera_jnorm(data->'$.related_ids') END AS related_ids,
           kimera_jnorm(data->'$.meta') AS meta,
           kimera_iso_epoch(data->>'$.created_at') AS created_at,
           kimera_iso_epoch(data->>'$.updated_at') AS updated_at
    FROM identities WHERE id IN (SELECT id FROM kimera_verify_changed)
)
SELECT id, list_filter([
    """
    + _FIELD_TESTS
    + """
], x -> x IS NOT NULL) AS fields
FROM l JOIN n USING (id)
"""
)
MISSING_SQL = """
SELECT 'new' AS missing_in, l.id FROM kimera_verify_l l ANTI JOIN kimera_verify_n n USING (id)
UNION ALL
SELECT 'legacy', n.id FROM kimera_verify_n n ANTI JOIN kimera_verify_l l USING (id)
"""
# Keys on both sides whose digests differ, duplicate keys (reported as such) left out.
CHANGED_SQL = """
SELECT DISTINCT l.id FROM kimera_verify_l l JOIN kimera_verify_n n USING (id)
WHERE l.rh IS DISTINCT FROM n.rh AND l.id NOT IN (SELECT id FROM kimera_verify_dups)
"""

TEMP_TABLES: tuple[str, ...] = (
    "kimera_verify_l",
    "kimera_verify_n",
    "kimera_verify_missing",
    "kimera_verify_changed",
    "kimera_verify_diff",
)


def materialise_sides(con: duckdb.DuckDBPyConnection, keys: str) -> int:
    """(id, kh, rh) per side of the rows whose key is in the temp table ``keys`` (column id),
    as the temp tables kimera_verify_l and kimera_verify_n; returns their rows together.

    Up to KEY_LIST_MAX keys are bound as a list of constants, which DuckDB checks in the scan
    of the key column before it reads the other columns; a semi-join would decompress every
    stored document to find a few hundred rows.
    """
    keys = vetted_identifier(keys)
    n = con.execute(f"SELECT count(*) FROM {keys}").fetchone()[0]
    params: list[Any] = []
    if n == 0:
        where = "false"
    elif n <= KEY_LIST_MAX:
        params = [r[0] for r in con.execute(f"SELECT id FROM {keys}").fetchall()]
        where = "{key} IN (" + ", ".join("?" * len(params)) + ")"
    else:
        where = "{key} IN (SELECT id FROM " + keys + ")"
    fetched = 0
    for side, table in (("legacy", "kimera_verify_l"), ("new", "kimera_verify_n")):
        parts = [rows_sql(s, where) for s in sides(side)]
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS " + " UNION ALL ".join(parts),
            params * len(parts) if "?" in where else [],
        )
        fetched += con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return fetched


def row_level(
    con: duckdb.DuckDBPyConnection, report: VerificationReport, sample: int, tol: Tolerance
) -> None:
    """Compare the rows in kimera_verify_l / kimera_verify_n (duplicate keys, in the temp table
    kimera_verify_dups, left out): sets the report's missing_in_new, missing_in_legacy,
    field_mismatches (samples of up to ``sample`` keys, by key) and mismatches_by_field."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE kimera_verify_missing AS {MISSING_SQL}")
    for side, attr in (("new", "missing_in_new"), ("legacy", "missing_in_legacy")):
        total = con.execute(
            "SELECT count(*) FROM kimera_verify_missing WHERE missing_in = ?", [side]
        ).fetchone()[0]
        ids = con.execute(
            "SELECT id FROM kimera_verify_missing WHERE missing_in = ? ORDER BY id LIMIT ?",
            [side, sample],
        ).fetchall()
        setattr(report, attr, Finding(total, [{"id": r[0]} for r in ids]))
    con.execute(f"CREATE OR REPLACE TEMP TABLE kimera_verify_changed AS {CHANGED_SQL}")
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_diff AS SELECT * FROM ("
        + FIELD_DIFF_SQL
        + ") WHERE len(fields) > 0",
        tol.to_dict(),
    )
    total = con.execute("SELECT count(*) FROM kimera_verify_diff").fetchone()[0]
    rows = con.execute(
        "SELECT id, fields FROM kimera_verify_diff ORDER BY id LIMIT ?", [sample]
    ).fetchall()
    report.field_mismatches = Finding(total, [{"id": i, "fields": f} for i, f in rows])
    report.mismatches_by_field = dict(
        con.execute(
            "SELECT f, count(*) FROM (SELECT unnest(fields) AS f FROM kimera_verify_diff) "
            "GROUP BY f ORDER BY f"
        ).fetchall()
    )
