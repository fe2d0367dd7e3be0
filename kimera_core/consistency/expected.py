"""The fast digest: each legacy row as the ``identities`` row the migration writes for it.

Parsing a million P1 documents is the cost of a cold verification; reading and hashing their
text is several times cheaper. So before any document is parsed, every legacy row is turned
into the ``identities`` row the migration would write for it, without parsing its JSON: the P1
document's text spelled as ``json_object`` spells it (keys in ``identity.DOCUMENT_KEYS``
order, text and numbers by ``to_json``, the JSON columns embedded verbatim, the timestamps by
``kimera_core.sql``'s one epoch -> ISO formula), the columns beside it and the entropy by
``kimera_core.entropy``'s bulk form. That row is hashed exactly as ``identities`` rows are
fingerprinted (``sources.fingerprint_sql``), so per fine segment the legacy side's sum of
these *expected* digests equals the ``identities`` fingerprint sum exactly when (but for a
64-bit collision) every ``identities`` row is byte for byte the expected row.

Why equal bytes are equal values, field by field and column by column: a document equal to
the expected text is a JSON object whose members are exactly the embedded pieces, each a
complete JSON value (``to_json`` output, or a JSON-typed column, which DuckDB validates on
write; a TEXT column of an old file is embedded through ``json()``, never verbatim), so it
parses to the legacy values under ``compare``'s rules; its columns are the legacy columns
the document was built from, and its ``entropy_score`` is the bulk entropy of the same bytes
the column check parses. A JSON column's text is embedded verbatim unless it holds whitespace
(then re-written minified by ``json()``, as ``json_object`` writes it). A row the expected text cannot stand for (a NULL timestamp, an
epoch the macros cannot write) gets a digest no stored row has. A segment whose sums agree is
therefore consistent with no column disagreement; only the others are digested by the
normalised forms of ``sources`` and compared as before. ``tests/core/consistency/
test_fast_path.py`` proves on generated rows that both paths give the same findings.

A document spelled any other way (keys reordered, P1 writing from Python) only misses the
fast path: its segment is compared by the normalised digests, never judged by text.
"""

from __future__ import annotations

import duckdb

from kimera_core.consistency.sources import Source, fingerprint_sql
from kimera_core.entropy import geoid_meta_shannon_sql, scar_entropy_sql
from kimera_core.identity import DOCUMENT_KEYS
from kimera_core.sql import filled_times_sql, vetted_identifier

# The legacy JSON columns the expected text embeds, per table.
JSON_COLUMNS: dict[str, tuple[str, ...]] = {
    "legacy_geoids": ("tags", "meta"),
    "legacy_scars": ("related_ids", "meta"),
}
JSON_TYPED_SQL = """
SELECT table_name, column_name FROM duckdb_columns()
WHERE database_name = current_database() AND schema_name = 'main'
  AND table_name IN ('legacy_geoids', 'legacy_scars') AND data_type = 'JSON'
"""
# The whitespace JSON allows between tokens (as SQL string literals).
WHITESPACE: tuple[str, ...] = ("' '", "chr(10)", "chr(13)", "chr(9)")
# A legacy row the expected text cannot stand for: a digest no identities row hashes to.
NO_FORM = "'kimera: no expected row'"


def json_typed(con: duckdb.DuckDBPyConnection) -> frozenset[str]:
    """The legacy JSON columns (as 'table.column') DuckDB types as JSON, i.e. validates."""
    return frozenset(f"{t}.{c}" for t, c in con.execute(JSON_TYPED_SQL).fetchall())


def _text(expr: str) -> str:
    return f"coalesce(to_json({expr})::VARCHAR, 'null')"


def _json(table: str, column: str, typed: frozenset[str]) -> tuple[str, bool]:
    """(SQL for the column's JSON text, whether it may be NULL: no expected form)."""
    name = vetted_identifier(column)
    if f"{table}.{column}" in typed:
        # json_object writes a JSON value minified: text with whitespace is re-written by
        # json() (whitespace inside strings only costs that parse), the rest embedded as is
        spaced = " OR ".join(f"contains({name}, {c})" for c in WHITESPACE)
        return (
            f"CASE WHEN {name} IS NULL THEN 'null' WHEN {spaced} THEN json({name})::VARCHAR "
            f"ELSE {name}::VARCHAR END",
            False,
        )
    # a TEXT column may hold anything: only a parsed value is embedded (NULL when invalid)
    return f"CASE WHEN {name} IS NULL THEN 'null' ELSE TRY(json({name}))::VARCHAR END", True


# The ISO texts of a legacy row's timestamps, computed once per row in a first projection
# (the document's guard and its text both read them): columns of ``legacy_rows_sql``.
ISO_COLUMNS: dict[str, str] = {"created_at": "kimera_ci", "updated_at": "kimera_ui"}
# The timestamps as the migration writes them (one missing takes the other's value):
# kimera_c / kimera_u, and their ISO texts.
_CREATED, _UPDATED = filled_times_sql()
_FILLED = {"created_at": _CREATED, "updated_at": _UPDATED}
# updated_at's text is created_at's where the two are equal (about half the rows of a table
# never updated): an equal double (-0.0 and 0.0, NaN and NaN included) has the same text.
LEGACY_ROWS_SQL = f"""(SELECT *, CASE WHEN kimera_u = kimera_c THEN kimera_ci
       ELSE kimera_epoch_iso(kimera_u) END AS kimera_ui FROM (
    SELECT *, kimera_epoch_iso({_CREATED}) AS kimera_ci, {_CREATED} AS kimera_c,
           {_UPDATED} AS kimera_u FROM {{table}} WHERE {{where}}))"""


def legacy_rows_sql(source: Source, where: str) -> str:
    """The legacy ``source`` rows matching ``where`` (SQL over its columns) with the
    ``ISO_COLUMNS`` beside them, as a parenthesised query."""
    return LEGACY_ROWS_SQL.format(table=vetted_identifier(source.table), where=where)


def document_sql(source: Source, typed: frozenset[str], iso: dict[str, str] | None = None) -> str:
    """SQL for the P1 document text the migration writes for a row of ``source`` (legacy),
    NULL when a piece cannot be written (then the row has no expected form). ``iso``: the
    columns holding the timestamps' ISO texts (``ISO_COLUMNS`` over ``legacy_rows_sql``),
    else computed in place.

    One ``concat`` (a single allocation per row; a chain of ``||`` copies the growing text
    once per piece, twice the cost), guarded: ``concat`` skips a NULL piece.
    """
    table = source.table
    nullable = []

    def json_piece(column: str) -> str:
        sql, may_be_null = _json(table, column, typed)
        if may_be_null:
            nullable.append(sql)
        return sql

    if table == "legacy_geoids":
        members = {
            "id": _text("gid"),
            "identity_type": """'"geoid"'""",
            "raw": _text("raw"),
            "echo": _text("echo"),
            "lang_axis": _text("lang_axis"),
            "tags": json_piece("tags"),
            "weight": _text("weight"),
            "related_ids": "'[]'",
            "meta": json_piece("meta"),
        }
    else:
        members = {
            "id": _text("id"),
            "identity_type": """'"scar"'""",
            "raw": "'null'",
            "echo": "'null'",
            "lang_axis": "'null'",
            "tags": "'null'",
            "weight": _text("weight"),
            "related_ids": json_piece("related_ids"),
            "meta": json_piece("meta"),
        }
    for column in ("created_at", "updated_at"):
        text = vetted_identifier(iso[column]) if iso else f"kimera_epoch_iso({_FILLED[column]})"
        nullable.append(text)
        members[column] = f"""'"', {text}, '"'"""
    assert set(members) == set(DOCUMENT_KEYS)
    parts = [
        f"""'{"{" if i == 0 else ","}"{k}":', {members[k]}""" for i, k in enumerate(DOCUMENT_KEYS)
    ]
    guard = " AND ".join(f"{p} IS NOT NULL" for p in nullable)
    return f"CASE WHEN {guard} THEN concat({', '.join(parts)}, '}}') END"


# {rows}: the legacy rows as (key: the struct below, entropy inputs); the struct carries the
# row through the bulk entropy query (one stream, no join back).
GEOID_EXPECTED_SQL = """
WITH kimera_x AS (
    SELECT {{'id': gid, 'fp': {fp}, 'doc': {doc}, 'c': kimera_c, 'u': kimera_u,
            'l': lang_axis}} AS key,
           {meta} AS meta, TRY(json_array_length({tags})) AS n_tags
    FROM {rows}
), kimera_xe AS ({shannon})
SELECT key.id AS id, hash(key.id) AS kh, key.fp AS fp,
       CASE WHEN key.doc IS NULL THEN hash(key.id, {no_form})
            ELSE hash(hash(key.id, 'geoid', key.doc, key.c, key.u, key.l, entropy)) END AS xh
FROM kimera_xe
"""
SCAR_EXPECTED_SQL = """
WITH kimera_x AS (
    SELECT {{'id': id, 'fp': {fp}, 'doc': {doc}, 'c': kimera_c, 'u': kimera_u}} AS key,
           {related} AS related, weight
    FROM {rows}
), kimera_xe AS ({entropy})
SELECT key.id AS id, hash(key.id) AS kh, key.fp AS fp,
       CASE WHEN key.doc IS NULL THEN hash(key.id, {no_form})
            ELSE hash(hash(key.id, 'scar', key.doc, key.c, key.u, NULL::VARCHAR, entropy)) END
           AS xh
FROM kimera_xe
"""


def expected_rows_sql(
    source: Source, typed: frozenset[str], where: str = "true", fingerprint: bool = True
) -> str:
    """SQL for (id, kh, fp, xh) of the legacy ``source`` rows matching ``where`` ({key}: the
    key column): xh hashes the identities row the migration writes for the row, as
    ``fingerprint_sql`` hashes a stored identities row; fp is the row's own fingerprint
    (NULL without ``fingerprint``)."""
    key = vetted_identifier(source.key)
    fp = f"hash({fingerprint_sql(source)})" if fingerprint else "NULL::UBIGINT"
    common = {
        "fp": fp,
        "doc": document_sql(source, typed, ISO_COLUMNS),
        "rows": legacy_rows_sql(source, where.format(key=key)),
        "no_form": NO_FORM,
    }
    if source.table == "legacy_geoids":
        # the entropy inputs as the migration reads them (a TEXT column parsed, else as is)
        meta, tags = (
            c if f"legacy_geoids.{c}" in typed else f"TRY(json({c}))" for c in ("meta", "tags")
        )
        return GEOID_EXPECTED_SQL.format(
            meta=meta, tags=tags, shannon=geoid_meta_shannon_sql("kimera_x"), **common
        )
    related = "related_ids" if "legacy_scars.related_ids" in typed else "TRY(json(related_ids))"
    return SCAR_EXPECTED_SQL.format(
        related=related,
        entropy=scar_entropy_sql("kimera_x", "key", "related", "weight"),
        **common,
    )
