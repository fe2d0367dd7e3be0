"""Columns that agree with the document: each ``identities`` row against its own ``data``.

P1 reads an identity from ``data``; the columns beside it (``id``, ``identity_type``,
``lang_axis``, ``created_at``, ``updated_at``, ``entropy_score``) are what its indexes, the
entropy queries and the migration's merge rule read. docs/schema.md promises they carry the
document's values; a row where they do not answers differently depending on who asks. Each
row is checked against its own document:

* ``id``, ``identity_type``, ``lang_axis``: the column as JSON text equals the document's
  member as JSON text (byte-exact text, a number is not text, NULL only against null/absent);
* ``created_at``, ``updated_at``: ``compare``'s timestamp rule at ``COLUMN_TOLERANCE.seconds``
  (whole microseconds compared directly where both sides are exact);
* ``entropy_score``: the entropy recomputed from the document by the bulk form of
  ``kimera_core.entropy`` (the formula the migration writes it with), equal within
  ``ENTROPY_RELATIVE`` of the column, NULL-safe (a scar without a usable weight has none).

The tolerances are fixed (written into the SQL), so the digest cache can keep each segment's
count of disagreeing rows (``rows_sql(..., columns=True)``'s ``bad``) beside its digest.
``IDENTITY_ROWS_SQL`` reads each identities row once: the document's members parsed in one
``json_extract``, for the digest (``sources``) and these checks alike.
"""

from __future__ import annotations

from typing import Any

import duckdb

from kimera_core.compare import DEFAULT_TOLERANCE
from kimera_core.consistency.evidence import (
    COLUMN_SIDES,
    FieldValues,
    KeyEvidence,
    clip_pair,
    next_step,
)
from kimera_core.consistency.report import Finding, VerificationReport
from kimera_core.entropy import geoid_shannon_sql, scar_entropy_sql
from kimera_core.sql import vetted_identifier

TEMP_TABLES: tuple[str, ...] = (
    "kimera_verify_colsegs",
    "kimera_verify_colrows",
    "kimera_verify_columns",
)

COLUMN_TOLERANCE = DEFAULT_TOLERANCE
ENTROPY_RELATIVE = 1e-9  # Python's and SQL's Shannon sums differ by a few ulps at most
CHECKED_COLUMNS: tuple[str, ...] = (
    "id",
    "identity_type",
    "lang_axis",
    "created_at",
    "updated_at",
    "entropy_score",
)
# The document members every identities row is read for, in this order (f[1] .. f[12]).
DOCUMENT_PATHS: tuple[str, ...] = (
    "$.raw",
    "$.echo",
    "$.lang_axis",
    "$.tags",
    "$.weight",
    "$.related_ids",
    "$.meta",
    "$.created_at",
    "$.updated_at",
    "$.id",
    "$.identity_type",
    "$.meta.terms",
)
_PATHS = "[" + ", ".join(f"'{p}'" for p in DOCUMENT_PATHS) + "]"

# {where}: which rows; {checks}: '' or COLUMN_CHECKS_SQL; {select}: the output columns, over
# kimera_r (the row, f, w = weight as a double, c_us/u_us = the document's times in whole
# microseconds where exact, and with the checks doc_entropy and column_diffs).
IDENTITY_ROWS_SQL = (
    """
WITH kimera_p AS (
    SELECT id, identity_type, data, created_at, updated_at, lang_axis,
           entropy_score, json_extract(data, """
    + _PATHS
    + """)::VARCHAR[] AS f
    FROM identities WHERE {where}
), kimera_q AS (
    SELECT *, TRY_CAST(f[5] AS DOUBLE) + 0.0 AS w, kimera_doc_us(f[8]) AS c_us,
           kimera_doc_us(f[9]) AS u_us
    FROM kimera_p
){checks}
SELECT {select} FROM kimera_r
"""
)
_NO_CHECKS = ", kimera_r AS (SELECT * FROM kimera_q)"


def _time_ok(column: str, member: str, us: str) -> str:
    return (
        f"CASE WHEN coalesce(kimera_ts_us({column}) = {us}, false) THEN true "
        f"ELSE kimera_time_eq({column}, {member}::JSON, {COLUMN_TOLERANCE.seconds!r}) END"
    )


_TESTS = {
    "id": "to_json(id)::VARCHAR IS NOT DISTINCT FROM f[10]",
    "identity_type": "to_json(identity_type)::VARCHAR IS NOT DISTINCT FROM f[11]",
    "lang_axis": "to_json(lang_axis)::VARCHAR IS NOT DISTINCT FROM nullif(f[3], 'null')",
    "created_at": _time_ok("created_at", "f[8]", "c_us"),
    "updated_at": _time_ok("updated_at", "f[9]", "u_us"),
    "entropy_score": f"kimera_float_eq(entropy_score, doc_entropy, {ENTROPY_RELATIVE!r}, true)",
}
assert tuple(_TESTS) == CHECKED_COLUMNS
_DIFFS = ",\n        ".join(f"CASE WHEN NOT ({t}) THEN '{c}' END" for c, t in _TESTS.items())

# The document's entropy by the bulk form, by the document's own type (what P1 reads; geoids:
# meta.terms and tags, scars: related_ids and weight), and the names of the columns that
# disagree. One stream, no join: the row rides through both bulk queries as their key (a
# struct), each query computing its formula for its type and nothing for the other.
COLUMN_CHECKS_SQL = (
    """, kimera_g_in AS (
    SELECT q AS key, CASE WHEN f[11] = '"geoid"' THEN f[12] END AS terms_j,
           CASE WHEN f[11] = '"geoid"' THEN TRY(CASE WHEN json_type(f[4]) = 'ARRAY'
                                                  THEN json_array_length(f[4]) END) END AS n_tags
    FROM kimera_q q
), kimera_g AS ("""
    + geoid_shannon_sql("kimera_g_in")
    + """), kimera_s_in AS (
    SELECT {'q': key, 'ge': entropy} AS key,
           CASE WHEN key.f[11] = '"scar"' THEN key.f[6] END AS related, key.f[5] AS weight_text
    FROM kimera_g
), kimera_s AS ("""
    + scar_entropy_sql("kimera_s_in", "key", "related", "weight_text")
    + """), kimera_e AS (
    SELECT unnest(key.q),
           CASE key.q.f[11] WHEN '"geoid"' THEN key.ge WHEN '"scar"' THEN entropy END
               AS doc_entropy
    FROM kimera_s
), kimera_r AS (
    SELECT *, list_filter([
        """
    + _DIFFS
    + """
    ], x -> x IS NOT NULL) AS column_diffs
    FROM kimera_e
)"""
)

# Per column: (the column's value, the document's value) as display text, over kimera_r.
COLUMN_VALUES: dict[str, tuple[str, str]] = {
    "id": ("to_json(id)::VARCHAR", "f[10]"),
    "identity_type": ("to_json(identity_type)::VARCHAR", "f[11]"),
    "lang_axis": ("to_json(lang_axis)::VARCHAR", "f[3]"),
    "created_at": ("created_at::VARCHAR", "f[8]"),
    "updated_at": ("updated_at::VARCHAR", "f[9]"),
    "entropy_score": ("entropy_score::VARCHAR", "doc_entropy::VARCHAR"),
}
assert tuple(COLUMN_VALUES) == CHECKED_COLUMNS
EVIDENCE_SELECT = "id, column_diffs, " + ", ".join(
    f"{col} AS {name}_c, {doc} AS {name}_d" for name, (col, doc) in COLUMN_VALUES.items()
)


def identity_rows_sql(where: str, select: str, checks: bool) -> str:
    """``IDENTITY_ROWS_SQL`` over the identities rows matching ``where`` (our own SQL)."""
    return IDENTITY_ROWS_SQL.format(
        where=where, select=select, checks=COLUMN_CHECKS_SQL if checks else _NO_CHECKS
    )


def _check(
    con: duckdb.DuckDBPyConnection,
    report: VerificationReport,
    where: str,
    sample: int,
    params: list[Any] | None = None,
) -> None:
    """Set the report's column_mismatches and mismatches_by_column from the identities rows
    matching ``where`` (their first ``sample`` by key as evidence)."""
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_columns AS "
        + identity_rows_sql(where, EVIDENCE_SELECT, checks=True)
        + " WHERE len(column_diffs) > 0",
        params or [],
    )
    total = con.execute("SELECT count(*) FROM kimera_verify_columns").fetchone()[0]
    report.mismatches_by_column = dict(
        con.execute(
            "SELECT c, count(*) FROM (SELECT unnest(column_diffs) AS c FROM kimera_verify_columns) "
            "GROUP BY c ORDER BY c"
        ).fetchall()
    )
    result = con.execute("SELECT * FROM kimera_verify_columns ORDER BY id LIMIT ?", [sample])
    names = [d[0] for d in result.description]
    sample_rows, evidence = [], []
    for values in result.fetchall():
        row = dict(zip(names, values, strict=True))
        diffs = list(row["column_diffs"])
        sample_rows.append({"id": row["id"], "columns": diffs})
        evidence.append(
            KeyEvidence(
                row["id"],
                [FieldValues(c, *clip_pair(row[f"{c}_c"], row[f"{c}_d"])) for c in diffs],
            )
        )
    report.column_mismatches = Finding(
        total,
        sample_rows,
        evidence,
        next_step("column_mismatches", report.authoritative),
        COLUMN_SIDES,
    )


def check_segments(
    con: duckdb.DuckDBPyConnection,
    report: VerificationReport,
    segments: list[int],
    bits: int,
    sample: int,
) -> None:
    """Column findings of the identities rows in ``segments`` (of ``bits`` key-hash bits)
    that the digest pass counted disagreeing rows in; no segment, no query."""
    if not segments:
        report.column_mismatches = Finding(sides=COLUMN_SIDES)
        report.mismatches_by_column = {}
        return
    con.execute("CREATE OR REPLACE TEMP TABLE kimera_verify_colsegs (seg UBIGINT)")
    con.executemany("INSERT INTO kimera_verify_colsegs VALUES (?)", [[s] for s in segments])
    # the rows by their key alone first: a filter on the key hash would decompress every
    # document before it drops the row
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_colrows AS SELECT rowid AS rid "
        f"FROM identities WHERE hash(id) >> {64 - int(bits)} "
        "IN (SELECT seg FROM kimera_verify_colsegs)"
    )
    _check(con, report, "rowid IN (SELECT rid FROM kimera_verify_colrows)", sample)


def check_keys(
    con: duckdb.DuckDBPyConnection, report: VerificationReport, keys: str, sample: int
) -> None:
    """Column findings of the identities rows whose key is in the temp table ``keys`` (id)."""
    _check(con, report, f"id IN (SELECT id FROM {vetted_identifier(keys)})", sample)
