"""The two sides of a verification as normalised rows: which tables, which columns, what SQL.

Both stores are mapped to the ADR-001 fields (id, identity_type, raw, echo, lang_axis, tags,
weight, related_ids, meta, created_at, updated_at). The legacy side is two tables
(``legacy_geoids`` keyed by ``gid``, ``legacy_scars`` keyed by ``id``); the new side is
``identities``, whose fields come from the P1 document in ``data`` (what P1 reads) and whose
type comes from the ``identity_type`` column. Each table is a ``Source``: its key, the
columns its digest reads, and the digest itself.

Normalisation, so that equal values hash equal (reladiff normalises columns the same way
before hashing): text as minified JSON text (the legacy text columns quoted by ``to_json``,
as the document quotes them), JSON null as SQL NULL, JSON minified (``kimera_jnorm``),
timestamps in whole microseconds (ISO-8601 text of any offset or epoch seconds:
``kimera_iso_us``), a geoid's ``related_ids`` ``[]`` as NULL (legacy_geoids has no column
for it). A digest is a filter, never the judge: rows whose digests differ are compared field
by field under ``kimera_core.compare``'s rules, which ``kimera_json_eq`` and
``kimera_float_eq`` state in SQL.

The macros are temp macros (per connection), so they work on read-only files too;
``install_macros`` creates them.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from kimera_core.checksum import row_hash_sql
from kimera_core.sql import vetted_identifier

MACROS: tuple[str, ...] = (
    # JSON text, minified, with JSON null as SQL NULL; text that is not JSON stays as it is
    """CREATE OR REPLACE TEMP MACRO kimera_jnorm(x) AS
       nullif(coalesce(TRY(json(x))::VARCHAR, x::VARCHAR), 'null')""",
    # the text inside a JSON string literal that needs no unescaping (ISO timestamps)
    """CREATE OR REPLACE TEMP MACRO kimera_unquote(x) AS
       CASE WHEN starts_with(x, '"') THEN substr(x, 2, length(x) - 2) ELSE x END""",
    # ISO-8601 (any offset) or a JSON number -> epoch seconds, exact to the fraction digits
    """CREATE OR REPLACE TEMP MACRO kimera_iso_epoch(x) AS
       coalesce(TRY_CAST(x AS DOUBLE),
                epoch(TRY_CAST(substr(x, 1, 19) AS TIMESTAMP))
                + coalesce(TRY_CAST('0' || nullif(regexp_extract(x, '^[^.]*(\\.\\d+)', 1), '')
                                    AS DOUBLE), 0)
                - CASE WHEN regexp_matches(x, '[+-]\\d\\d:?\\d\\d$') THEN
                       (CASE WHEN regexp_extract(x, '([+-])\\d\\d:?\\d\\d$', 1) = '-'
                             THEN -1 ELSE 1 END)
                       * (TRY_CAST(regexp_extract(x, '[+-](\\d\\d):?\\d\\d$', 1) AS INTEGER) * 3600
                          + TRY_CAST(regexp_extract(x, '[+-]\\d\\d:?(\\d\\d)$', 1) AS INTEGER) * 60)
                  ELSE 0 END)""",
    # the same in whole microseconds, with a fast path for the UTC text P1 writes
    """CREATE OR REPLACE TEMP MACRO kimera_iso_us(x) AS
       CASE WHEN suffix(x, '+00:00') THEN epoch_us(TRY_CAST(x AS TIMESTAMP))
            ELSE TRY_CAST(round(kimera_iso_epoch(x) * 1000000) AS BIGINT) END""",
    # an order-independent fingerprint of a JSON value: object key order does not count,
    # array order does, numbers compare by value (1 = 1.0), types otherwise strict
    """CREATE OR REPLACE TEMP MACRO kimera_json_canon(j) AS (
       SELECT hash(list(hash(t.fullkey,
                  CASE WHEN t.type IN ('BIGINT', 'UBIGINT', 'DOUBLE', 'HUGEINT', 'UHUGEINT')
                       THEN 'N' || TRY_CAST(t.atom AS DOUBLE)::VARCHAR
                       ELSE t.type || ':' || coalesce(t.atom::VARCHAR, t.value::VARCHAR) END)
                  ORDER BY t.fullkey))
       FROM json_tree(j) t
       WHERE t.type NOT IN ('OBJECT', 'ARRAY') OR t.value::VARCHAR IN ('{}', '[]'))""",
    # JSON equality as values, NULL-safe: compare.json_equal in SQL
    """CREATE OR REPLACE TEMP MACRO kimera_json_eq(a, b) AS
       (a IS NULL AND b IS NULL)
       OR (a IS NOT NULL AND b IS NOT NULL AND (a = b OR (json_valid(a) AND json_valid(b)
           AND kimera_json_canon(a) = kimera_json_canon(b))))""",
    # a float within a tolerance, absolute or relative to max(1, |a|), NULL-safe, NaN = NaN:
    # compare._float_equal in SQL
    """CREATE OR REPLACE TEMP MACRO kimera_float_eq(a, b, tol, rel) AS
       (a IS NULL AND b IS NULL)
       OR (a IS NOT NULL AND b IS NOT NULL AND (a = b OR (isnan(a) AND isnan(b))
           OR abs(a - b) <= tol * CASE WHEN rel THEN greatest(1, abs(a)) ELSE 1 END))""",
)


@dataclass(frozen=True)
class Source:
    """One source table: its key, the columns its digest reads, and the digest's SQL."""

    table: str
    side: str  # 'legacy' or 'new'
    key: str
    stored: tuple[str, ...]  # every column the digest reads: the fingerprint covers them
    digest: str  # the normalised digest over ``stored`` (and ``parsed`` as ``f``)
    parsed: str | None = None  # a document parsed once per row, only when a digest is computed


# A row's digest: the mixed hash of (key, identity_type, raw, echo, lang_axis, tags, weight,
# related_ids, meta, created_us, updated_us), every text as minified JSON text (strings
# quoted, as to_json quotes the legacy text columns), JSON null as SQL NULL, timestamps in
# whole microseconds. A geoid's related_ids: legacy_geoids has no column for it, so an empty
# list in identities is normalised to NULL like legacy's. The key is in the digest so that
# two rows trading contents change their segment's sum; the outer hash() mixes the row hash
# (DuckDB combines column hashes with XOR, so a plain sum could cancel out a swap of one
# column's values between two rows).
_US = "TRY_CAST(round({c} * 1000000) AS BIGINT)"
SOURCES: tuple[Source, ...] = (
    Source(
        "legacy_geoids",
        "legacy",
        "gid",
        ("gid", "raw", "echo", "lang_axis", "tags", "weight", "meta", "created_at", "updated_at"),
        "hash(hash(gid, 'geoid', to_json(raw)::VARCHAR, to_json(echo)::VARCHAR, "
        "to_json(lang_axis)::VARCHAR, kimera_jnorm(tags), weight, NULL::VARCHAR, "
        f"kimera_jnorm(meta), {_US.format(c='created_at')}, {_US.format(c='updated_at')}))",
    ),
    Source(
        "legacy_scars",
        "legacy",
        "id",
        ("id", "weight", "related_ids", "meta", "created_at", "updated_at"),
        "hash(hash(id, 'scar', NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, "
        "weight, kimera_jnorm(related_ids), kimera_jnorm(meta), "
        f"{_US.format(c='created_at')}, {_US.format(c='updated_at')}))",
    ),
    Source(
        "identities",
        "new",
        "id",
        ("id", "identity_type", "data"),
        "hash(hash(id, identity_type, nullif(f[1], 'null'), nullif(f[2], 'null'), "
        "nullif(f[3], 'null'), nullif(f[4], 'null'), TRY_CAST(f[5] AS DOUBLE), "
        "CASE WHEN identity_type = 'geoid' AND f[6] IN ('[]', 'null') THEN NULL "
        "ELSE nullif(f[6], 'null') END, nullif(f[7], 'null'), "
        "kimera_iso_us(kimera_unquote(f[8])), kimera_iso_us(kimera_unquote(f[9]))))",
        # one parse of each document: every field comes out as minified JSON text
        "json_extract(data, ['$.raw', '$.echo', '$.lang_axis', '$.tags', '$.weight', "
        "'$.related_ids', '$.meta', '$.created_at', '$.updated_at'])::VARCHAR[]",
    ),
)

# Per row of one source: id, kh = hash(key), rh = the digest. {where} filters on the key.
ROWS_SQL = """
SELECT {key} AS id, hash({key}) AS kh, {digest} AS rh
FROM (SELECT {stored}{parsed} FROM {table} WHERE {where})
"""


def install_macros(con: duckdb.DuckDBPyConnection) -> None:
    """Create the normalisation and comparison macros on ``con`` (temp: this connection only)."""
    for macro in MACROS:
        con.execute(macro)


def sides(side: str) -> tuple[Source, ...]:
    """The sources of one side, 'legacy' or 'new'."""
    return tuple(s for s in SOURCES if s.side == side)


def sql_parts(source: Source) -> dict[str, str]:
    """The pieces of SQL a template needs for ``source`` (vetted identifiers, our own SQL):
    key, table, digest, stored (column list), parsed (``, <parse> AS f`` or '') and
    fingerprint (the hash of the key and every stored column, as stored)."""
    return {
        "key": vetted_identifier(source.key),
        "table": vetted_identifier(source.table),
        "digest": source.digest,
        "stored": ", ".join(vetted_identifier(c) for c in source.stored),
        "parsed": f", {source.parsed} AS f" if source.parsed else "",
        "fingerprint": row_hash_sql(list(source.stored)),
    }


def rows_sql(source: Source, where: str) -> str:
    """SQL for (id, kh, rh) of the ``source`` rows matching ``where`` ({key}: the key)."""
    parts = sql_parts(source)
    return ROWS_SQL.format(**{**parts, "where": where.format(key=parts["key"])})
