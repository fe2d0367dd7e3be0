"""The two sides of a verification as rows with digests: which tables, which columns, what SQL.

Both stores are mapped to the ADR-001 fields (id, identity_type, raw, echo, lang_axis, tags,
weight, related_ids, meta, created_at, updated_at). The legacy side is two tables
(``legacy_geoids`` keyed by ``gid``, ``legacy_scars`` keyed by ``id``); the new side is
``identities``, whose fields come from the P1 document in ``data`` (what P1 reads) and whose
type comes from the ``identity_type`` column. Each table is a ``Source``: its key and the
columns its digest reads; ``rows_sql`` gives (id, kh, fp, rh, bad) per row.

A row's digest is a filter, never the judge: rows whose digests differ are compared field by
field under ``kimera_core.compare``'s rules. It must never make two unequal rows look equal,
so each field enters it in a normal form that is equal only for equal values, and equal for
the values equal writers produce (reladiff normalises columns the same way before hashing):

* text as JSON text (the legacy columns quoted by ``to_json``, as the document's strings are
  written): a JSON number ``2024`` and the text ``'2024'`` differ;
* weight as a double plus 0.0 (so -0.0 is 0.0; ``1`` and ``1.0`` are one double) and, for a
  document weight that is not a number (``"None"``), its JSON text: never SQL NULL;
* JSON as minified JSON text (equal texts are equal values; the same value written another
  way, keys reordered or ``1.0`` for ``1``, differs here and is found equal row by row: a
  token-aware rewrite of every number costs four times the whole verification);
* timestamps as whole microseconds where that is exact on both sides (a legacy double that is
  a whole number of microseconds; document text with six fraction digits in UTC), else as the
  ISO-8601 text P1 writes for the legacy epoch (``kimera_core.sql``'s formula) against the
  document's text, else the legacy double alone (never equal to a document value).

Only ``identities`` rows carry ``bad``: the number of its columns that disagree with its own
document (``consistency.columns``), so the digest cache keeps that count per segment too.
The macros are temp macros (per connection), so they work on read-only files too;
``install_macros`` creates them with ``compare``'s and ``sql``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from kimera_core.checksum import row_hash_sql
from kimera_core.compare import install_compare_macros
from kimera_core.consistency.columns import identity_rows_sql
from kimera_core.migration.schema import IDENTITY_COLUMNS
from kimera_core.sql import filled_times_sql, install_epoch_iso_macros, vetted_identifier

MACROS: tuple[str, ...] = (
    # JSON text, minified, with JSON null as SQL NULL; text that is not JSON stays as it is
    """CREATE OR REPLACE TEMP MACRO kimera_jnorm(x) AS
       nullif(coalesce(TRY(json(x))::VARCHAR, x::VARCHAR), 'null')""",
    # a legacy epoch as whole microseconds, when it is exactly the double of one
    """CREATE OR REPLACE TEMP MACRO kimera_ts_us(t) AS
       CASE WHEN kimera_iso_micro_exact(t) THEN CAST(round(t * 1000000) AS BIGINT) END""",
    # else the document's ISO text for it (as JSON text), else the double itself
    """CREATE OR REPLACE TEMP MACRO kimera_ts_txt(t) AS
       CASE WHEN NOT coalesce(kimera_iso_micro_exact(t), true)
            THEN '"' || kimera_epoch_iso(t) || '"' END""",
    """CREATE OR REPLACE TEMP MACRO kimera_ts_dbl(t) AS
       CASE WHEN NOT coalesce(kimera_iso_micro_exact(t), true) AND kimera_epoch_iso(t) IS NULL
            THEN t END""",
    # a document timestamp (JSON text) 'YYYY-MM-DDTHH:MM:SS.ffffff+00:00' as microseconds
    """CREATE OR REPLACE TEMP MACRO kimera_doc_us(f) AS
       CASE WHEN length(f) = 34 AND substr(f, 21, 1) = '.' AND suffix(f, '+00:00"')
                 AND substr(f, 13, 2) < '24' AND substr(f, 16, 2) < '60'
                 AND substr(f, 19, 2) < '60'
            THEN epoch_us(TRY_CAST(substr(f, 2, 32) AS TIMESTAMP)) END""",
)


@dataclass(frozen=True)
class Source:
    """One source table: its key and every stored column its digest reads (the fingerprint
    covers them), and which side it is on ('legacy' or 'new')."""

    table: str
    side: str
    key: str
    stored: tuple[str, ...]


SOURCES: tuple[Source, ...] = (
    Source(
        "legacy_geoids",
        "legacy",
        "gid",
        ("gid", "raw", "echo", "lang_axis", "tags", "weight", "meta", "created_at", "updated_at"),
    ),
    Source(
        "legacy_scars",
        "legacy",
        "id",
        ("id", "weight", "related_ids", "meta", "created_at", "updated_at"),
    ),
    Source("identities", "new", "id", tuple(IDENTITY_COLUMNS)),
)

# The digest of a legacy row: the mixed hash of (key, identity_type, raw, echo, lang_axis,
# tags, weight as a double, weight as text, related_ids, meta, created_at as (us, text,
# double), updated_at likewise). The key is in the digest so that two rows trading contents
# change their segment's sum; the outer hash() mixes the row hash (DuckDB combines column
# hashes with XOR, so a plain sum could cancel out a swap of one column's values).
# The timestamps as the migration writes them (one missing takes the other's value).
_CREATED, _UPDATED = filled_times_sql()
_LEGACY_TIMES = (
    f"kimera_ts_us({_CREATED}), kimera_ts_txt({_CREATED}), kimera_ts_dbl({_CREATED}), "
    f"kimera_ts_us({_UPDATED}), kimera_ts_txt({_UPDATED}), kimera_ts_dbl({_UPDATED})"
)
LEGACY_DIGESTS: dict[str, str] = {
    "legacy_geoids": (
        "hash(hash(gid, 'geoid', to_json(raw)::VARCHAR, to_json(echo)::VARCHAR, "
        "to_json(lang_axis)::VARCHAR, kimera_jnorm(tags), weight + 0.0, NULL::VARCHAR, "
        f"NULL::VARCHAR, kimera_jnorm(meta), {_LEGACY_TIMES}))"
    ),
    "legacy_scars": (
        "hash(hash(id, 'scar', NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, "
        "weight + 0.0, NULL::VARCHAR, kimera_jnorm(related_ids), kimera_jnorm(meta), "
        f"{_LEGACY_TIMES}))"
    ),
}
# The same fields of an identities row from its document (f: the members as JSON text, in
# columns.DOCUMENT_PATHS order; w, c_us, u_us computed once per row by IDENTITY_ROWS_SQL).
IDENTITY_DIGEST = (
    "hash(hash(id, identity_type, nullif(f[1], 'null'), nullif(f[2], 'null'), "
    "nullif(f[3], 'null'), nullif(f[4], 'null'), w, "
    "CASE WHEN w IS NULL THEN nullif(f[5], 'null') END, "
    "CASE WHEN identity_type = 'geoid' AND f[6] IN ('[]', 'null') THEN NULL "
    "ELSE nullif(f[6], 'null') END, nullif(f[7], 'null'), "
    "c_us, CASE WHEN c_us IS NULL THEN nullif(f[8], 'null') END, NULL::DOUBLE, "
    "u_us, CASE WHEN u_us IS NULL THEN nullif(f[9], 'null') END, NULL::DOUBLE))"
)

# Per legacy row: id, kh = hash(key), fp = the fingerprint, rh = the digest, bad = 0.
LEGACY_ROWS_SQL = """
SELECT {key} AS id, hash({key}) AS kh, {fp} AS fp, {digest} AS rh, 0 AS bad
FROM {table} WHERE {where}
"""


def install_macros(con: duckdb.DuckDBPyConnection) -> None:
    """Create the comparison, ISO and normalisation macros on ``con`` (temp: this connection)."""
    install_compare_macros(con)
    install_epoch_iso_macros(con)
    for macro in MACROS:
        con.execute(macro)


def sides(side: str) -> tuple[Source, ...]:
    """The sources of one side, 'legacy' or 'new'."""
    return tuple(s for s in SOURCES if s.side == side)


def fingerprint_sql(source: Source) -> str:
    """SQL for the hash of the key and every stored column of ``source``, as stored."""
    return row_hash_sql(list(source.stored))


def rows_sql(
    source: Source, where: str = "true", fingerprint: bool = True, columns: bool = False
) -> str:
    """SQL for (id, kh, fp, rh, bad) of the ``source`` rows matching ``where`` ({key}: the
    key column). ``fingerprint=False`` leaves fp NULL; ``columns`` computes ``bad`` for
    identities (its columns checked against its document, entropy recomputed), else 0."""
    key = vetted_identifier(source.key)
    fp = f"hash({fingerprint_sql(source)})" if fingerprint else "NULL::UBIGINT"
    where = where.format(key=key)
    if source.side == "legacy":
        return LEGACY_ROWS_SQL.format(
            key=key,
            fp=fp,
            digest=LEGACY_DIGESTS[source.table],
            table=vetted_identifier(source.table),
            where=where,
        )
    bad = "len(column_diffs)" if columns else "0"
    return identity_rows_sql(
        where, f"id, hash(id) AS kh, {fp} AS fp, {IDENTITY_DIGEST} AS rh, {bad} AS bad", columns
    )
