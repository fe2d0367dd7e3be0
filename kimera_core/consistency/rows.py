"""Row-by-row comparison of the rows bisection or incremental mode names (≈ reladiff's joindiff).

Given a temp table of keys (the leaf segments' keys, or the keys changed since the last
verification), ``materialise_sides`` fetches those rows of each side as (id, key hash, digest)
and ``row_level`` joins the two sides on the key: keys on one side only are findings
(``missing_in_new``, ``missing_in_legacy``); keys on both sides whose digests differ are
compared field by field under ``kimera_core.compare``'s rules, in SQL: text with
``kimera_text_eq``, weight with ``kimera_weight_eq``, timestamps with ``kimera_time_eq`` (the
``Tolerance`` bound as parameters), JSON fields as canonical (path, atom) lists
(``compare.JSON_CANON_SQL``, set-based over every value that is not the same text on both
sides). The field list and each field's rule come from ``compare.FIELD_RULES``; a geoid's
``related_ids`` rule follows the legacy side's type (legacy_geoids has no column for it).
A digest is a filter, never the judge: a row whose digest differs may still turn out equal.

A row that differs while its ``identities`` row is newer than its legacy row (the
``updated_at`` column against legacy's ``updated_at``, else ``created_at``: the migration's
merge rule) is ``legacy_stale``, an explained exception with its own repair direction; any
other differing row is a ``field_mismatches`` failure. Each finding carries the evidence of
its first ``sample`` keys: both sides' values of every differing field.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb

from kimera_core.compare import FIELD_RULES, JSON_CANON_SQL, JSON_FIELDS, Tolerance
from kimera_core.consistency.evidence import (
    FieldValues,
    KeyEvidence,
    clip,
    clip_pair,
    display,
    next_step,
)
from kimera_core.consistency.report import Finding, VerificationReport
from kimera_core.consistency.sources import rows_sql, sides
from kimera_core.sql import filled_times_sql, vetted_identifier

KEY_LIST_MAX = 4096  # rows compared row by row are fetched by a list of keys up to this many

# Both sides of every key in kimera_verify_changed held by both: the legacy columns, the
# identities type and updated_at columns, and the document's members as JSON (NULL: absent).
# The legacy timestamps as the migration writes them (one missing takes the other's value).
_TIMES = "{} AS created_at, {} AS updated_at".format(*filled_times_sql())
PAIRS_SQL = f"""
CREATE OR REPLACE TEMP TABLE kimera_verify_pairs AS
WITH l AS (
    SELECT gid AS id, 'geoid' AS ltype, raw, echo, lang_axis, tags::VARCHAR AS tags, weight,
           NULL::VARCHAR AS related_ids, meta::VARCHAR AS meta, {_TIMES}
    FROM legacy_geoids WHERE gid IN (SELECT id FROM kimera_verify_changed)
    UNION ALL
    SELECT id, 'scar', NULL, NULL, NULL, NULL, weight, related_ids::VARCHAR, meta::VARCHAR,
           {_TIMES}
    FROM legacy_scars WHERE id IN (SELECT id FROM kimera_verify_changed)
), n AS (
    SELECT id, identity_type AS ntype, updated_at AS n_updated_col,
           json_extract(data, ['$.raw', '$.echo', '$.lang_axis', '$.tags', '$.weight',
                               '$.related_ids', '$.meta', '$.created_at', '$.updated_at']) AS f
    FROM identities WHERE id IN (SELECT id FROM kimera_verify_changed)
)
SELECT row_number() OVER (ORDER BY l.id) AS r, l.*, n.ntype, n.n_updated_col,
       f[1] AS n_raw, f[2] AS n_echo, f[3] AS n_lang_axis, f[4] AS n_tags, f[5] AS n_weight,
       f[6] AS n_related_ids, f[7] AS n_meta, f[8] AS n_created_at, f[9] AS n_updated_at
FROM l JOIN n USING (id)
"""
_JSON = sorted(JSON_FIELDS)
# Each JSON field of each pair: equal (true), different (false), or NULL when only the
# canonical lists can tell (both sides valid, non-null JSON written differently).
JSON_EQ_SQL = (
    "CREATE OR REPLACE TEMP TABLE kimera_verify_jeq AS SELECT *, CASE "
    "WHEN field = 'related_ids' AND ltype = 'geoid' THEN n IS NULL OR n IN ('null', '[]') "
    "WHEN l_null AND (n IS NULL OR n = 'null') THEN true "
    "WHEN l_null OR n IS NULL OR n = 'null' OR NOT l_valid THEN false "
    "WHEN json(l)::VARCHAR = n THEN true END AS eq FROM ("
    + " UNION ALL ".join(
        f"SELECT r, '{name}' AS field, {i} AS fi, ltype, {name} AS l, n_{name}::VARCHAR AS n, "
        f"coalesce(json_valid({name}), false) AS l_valid, "
        f"{name} IS NULL OR coalesce(TRY(json_type({name})) = 'NULL', false) AS l_null "
        "FROM kimera_verify_pairs"
        for i, name in enumerate(_JSON)
    )
    + ")"
)
JSON_VALUES_SQL = """
CREATE OR REPLACE TEMP TABLE kimera_verify_jvals AS
SELECT r * 8 + fi * 2 AS k, l AS j FROM kimera_verify_jeq WHERE eq IS NULL
UNION ALL SELECT r * 8 + fi * 2 + 1, n FROM kimera_verify_jeq WHERE eq IS NULL
"""
JSON_RESULT_SQL = (
    "CREATE OR REPLACE TEMP TABLE kimera_verify_jres AS SELECT r, "
    + ", ".join(f"bool_and(eq) FILTER (WHERE field = '{n}') AS {n}_eq" for n in _JSON)
    + " FROM (SELECT e.r, e.field, coalesce(e.eq, cl.canon = cn.canon, false) AS eq "
    "FROM kimera_verify_jeq e "
    "LEFT JOIN kimera_verify_jcanon cl ON cl.k = e.r * 8 + e.fi * 2 "
    "LEFT JOIN kimera_verify_jcanon cn ON cn.k = e.r * 8 + e.fi * 2 + 1) GROUP BY r"
)


def _field_test(name: str, rule: str) -> str:
    if name == "identity_type":
        return "p.ltype IS DISTINCT FROM p.ntype"
    if rule == "json":
        return f"NOT j.{name}_eq"
    if rule == "relative":
        return f"NOT kimera_weight_eq(p.{name}, p.n_{name}, $weight_relative)"
    if rule == "seconds":
        return f"NOT kimera_time_eq(p.{name}, p.n_{name}, $seconds)"
    return f"NOT kimera_text_eq(p.{name}, p.n_{name})"


# Per pair: the fields that differ (in compare.COMPARED_FIELDS order) and whether identities
# is the newer side (the pairs' legacy updated_at is already filled from created_at).
FIELD_DIFF_SQL = (
    "CREATE OR REPLACE TEMP TABLE kimera_verify_diff AS SELECT * FROM ("
    "SELECT p.id, list_filter(["
    + ", ".join(
        f"CASE WHEN {_field_test(name, rule)} THEN '{name}' END"
        for name, rule in FIELD_RULES.items()
    )
    + "], x -> x IS NOT NULL) AS fields, "
    "coalesce(p.n_updated_col > p.updated_at, false) AS stale "
    "FROM kimera_verify_pairs p JOIN kimera_verify_jres j USING (r)) WHERE len(fields) > 0"
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
    "kimera_verify_pairs",
    "kimera_verify_jeq",
    "kimera_verify_jvals",
    "kimera_verify_jcanon",
    "kimera_verify_jres",
    "kimera_verify_diff",
)


def clear(con: duckdb.DuckDBPyConnection) -> None:
    """An empty kimera_verify_diff (id, fields, stale): a run that compares no row has none."""
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_diff (id VARCHAR, fields VARCHAR[], stale BOOLEAN)"
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
        parts = [
            f"SELECT id, kh, rh FROM ({rows_sql(s, where, fingerprint=False)})" for s in sides(side)
        ]
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS " + " UNION ALL ".join(parts),
            params * len(parts) if "?" in where else [],
        )
        fetched += con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return fetched


def compare_fields(con: duckdb.DuckDBPyConnection, tol: Tolerance) -> None:
    """Compare field by field every key in kimera_verify_changed held by both stores; the
    temp table kimera_verify_diff gets (id, fields, stale) for each key with a difference."""
    con.execute(PAIRS_SQL)
    con.execute(JSON_EQ_SQL)
    con.execute(JSON_VALUES_SQL)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_jcanon AS "
        + JSON_CANON_SQL.format(values="kimera_verify_jvals")
    )
    con.execute(JSON_RESULT_SQL)
    con.execute(FIELD_DIFF_SQL, tol.to_dict())


def row_level(
    con: duckdb.DuckDBPyConnection, report: VerificationReport, sample: int, tol: Tolerance
) -> None:
    """Compare the rows in kimera_verify_l / kimera_verify_n (duplicate keys, in the temp table
    kimera_verify_dups, left out): sets the report's missing_in_new, missing_in_legacy,
    field_mismatches, legacy_stale (samples and evidence of up to ``sample`` keys, by key)
    and mismatches_by_field (the failing rows' fields)."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE kimera_verify_missing AS {MISSING_SQL}")
    for side, attr in (("new", "missing_in_new"), ("legacy", "missing_in_legacy")):
        total = con.execute(
            "SELECT count(*) FROM kimera_verify_missing WHERE missing_in = ?", [side]
        ).fetchone()[0]
        ids = [
            r[0]
            for r in con.execute(
                "SELECT id FROM kimera_verify_missing WHERE missing_in = ? ORDER BY id LIMIT ?",
                [side, sample],
            ).fetchall()
        ]
        rows = _legacy_rows(con, ids) if side == "new" else _documents(con, ids)
        evidence = [
            KeyEvidence(
                i,
                [FieldValues("row", display(rows.get(i)), None)]
                if side == "new"
                else [FieldValues("row", None, clip(rows.get(i)))],
            )
            for i in ids
        ]
        setattr(
            report,
            attr,
            Finding(
                total,
                [{"id": i} for i in ids],
                evidence,
                next_step(attr, report.authoritative),
            ),
        )
    con.execute(f"CREATE OR REPLACE TEMP TABLE kimera_verify_changed AS {CHANGED_SQL}")
    compare_fields(con, tol)
    for stale, attr in ((False, "field_mismatches"), (True, "legacy_stale")):
        total = con.execute(
            "SELECT count(*) FROM kimera_verify_diff WHERE stale = ?", [stale]
        ).fetchone()[0]
        rows = con.execute(
            "SELECT id, fields FROM kimera_verify_diff WHERE stale = ? ORDER BY id LIMIT ?",
            [stale, sample],
        ).fetchall()
        setattr(
            report,
            attr,
            Finding(
                total,
                [{"id": i, "fields": f} for i, f in rows],
                pair_evidence(con, rows),
                next_step(attr, report.authoritative),
            ),
        )
    report.mismatches_by_field = dict(
        con.execute(
            "SELECT f, count(*) FROM (SELECT unnest(fields) AS f FROM kimera_verify_diff "
            "WHERE NOT stale) GROUP BY f ORDER BY f"
        ).fetchall()
    )


_PAIR_FIELDS = tuple(FIELD_RULES)  # identity_type, raw, ..., updated_at
_PAIR_COLUMNS = ", ".join(
    [
        "id",
        "ltype",
        *_PAIR_FIELDS[1:],
        "ntype",
        *(f"n_{name}::VARCHAR" for name in _PAIR_FIELDS[1:]),
        "n_updated_col",
    ]
)


def pair_evidence(
    con: duckdb.DuckDBPyConnection, rows: list[tuple[str, list[str]]]
) -> list[KeyEvidence]:
    """Evidence of each (id, differing fields) from kimera_verify_pairs: per field the legacy
    value and the document's (its JSON text; None when the member is absent)."""
    if not rows:
        return []
    width = len(_PAIR_FIELDS)
    found = {
        r[0]: r
        for r in con.execute(
            f"SELECT {_PAIR_COLUMNS} FROM kimera_verify_pairs WHERE id IN "
            f"({', '.join('?' * len(rows))})",
            [i for i, _ in rows],
        ).fetchall()
    }
    evidence = []
    for key, fields in rows:
        row = found[key]
        legacy = dict(zip(_PAIR_FIELDS, row[1 : 1 + width], strict=True))
        new = dict(zip(_PAIR_FIELDS, row[1 + width : 1 + 2 * width], strict=True))
        new["identity_type"] = json.dumps(new["identity_type"])
        legacy_time = legacy["updated_at"]  # already created_at where updated_at is NULL
        newer = row[-1] - legacy_time if row[-1] is not None and legacy_time is not None else 0
        note = f"identities newer by {newer:,.6g} s" if newer > 0 else ""
        evidence.append(
            KeyEvidence(
                key,
                [FieldValues(f, *clip_pair(_legacy_text(f, legacy[f]), new[f])) for f in fields],
                note,
            )
        )
    return evidence


def _legacy_text(name: str, value: Any) -> str:
    """A legacy value as JSON text: a JSON column as stored, a NULL as null, others encoded."""
    if value is None:
        return "null"
    if FIELD_RULES[name] == "json":
        return " ".join(str(value).splitlines())
    return json.dumps(value, ensure_ascii=False)


def _legacy_rows(con: duckdb.DuckDBPyConnection, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The legacy rows of ``ids`` as {column: value} (the geoid's if a key is in both)."""
    if not ids:
        return {}
    marks = ", ".join("?" * len(ids))
    out: dict[str, dict[str, Any]] = {}
    for table, key in (("legacy_scars", "id"), ("legacy_geoids", "gid")):
        result = con.execute(f"SELECT * FROM {table} WHERE {key} IN ({marks})", ids)
        names = [d[0] for d in result.description]
        for values in result.fetchall():
            row = dict(zip(names, values, strict=True))
            out[row[key]] = {k: v for k, v in row.items() if v is not None}
    return out


def _documents(con: duckdb.DuckDBPyConnection, ids: list[str]) -> dict[str, str]:
    """The identities documents of ``ids`` as stored."""
    if not ids:
        return {}
    marks = ", ".join("?" * len(ids))
    return dict(
        con.execute(
            f"SELECT id, data::VARCHAR FROM identities WHERE id IN ({marks})", ids
        ).fetchall()
    )
