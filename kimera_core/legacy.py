"""The existing Kimera storage layout (P1): create it, and read its rows as records.

The DDL below is the layout of KIMERA_LEGACY.md, statement for statement. The project
never alters these tables; its own state lives in separate ``kimera_*`` tables
(docs/schema.md).

The legacy tables read as identities (the read path before ``read-new``) are written here
once, for ``storage`` and ``query``: ``LEGACY_IDENTITIES_SQL`` (both tables in one shape,
``LEGACY_IDENTITY_FIELDS``), ``LEGACY_IDENTITIES_ENTROPY_SQL`` (the same rows with their
entropy by the migration's bulk formulas), ``fetch_legacy_identity`` (one id) and
``identity_from_legacy_row`` (a row of that shape as an ``Identity``).

Catalog lookups (``duckdb_indexes()``, ``sql.table_exists``) are restricted to the
connection's own database: they list every attached database too, whose ``main`` schema
would otherwise pass for this one's.
"""

from __future__ import annotations

import json
import re
from typing import Any

import duckdb

from kimera_core.entropy import entropy_union_sql, geoid_entropy_sql, scar_entropy_sql
from kimera_core.identity import Geoid, Identity, Scar
from kimera_core.sql import table_exists

LEGACY_TABLES: tuple[str, ...] = (
    "legacy_geoids",
    "legacy_scars",
    "echoforms",
    "identities",
    "dual_write_log",
)

LEGACY_DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS legacy_geoids (
        gid TEXT PRIMARY KEY,
        raw TEXT NOT NULL,
        echo TEXT,
        lang_axis TEXT,
        tags JSON,
        weight DOUBLE,
        meta JSON,
        created_at DOUBLE,
        updated_at DOUBLE
    )""",
    """CREATE TABLE IF NOT EXISTS legacy_scars (
        id TEXT PRIMARY KEY,
        weight DOUBLE,
        related_ids JSON,
        meta JSON,
        created_at DOUBLE,
        updated_at DOUBLE
    )""",
    """CREATE TABLE IF NOT EXISTS echoforms (
        anchor TEXT PRIMARY KEY,
        blob JSON,
        created_at DOUBLE,
        updated_at DOUBLE,
        domain TEXT,
        phase TEXT,
        intensity_sum DOUBLE
    )""",
    """CREATE TABLE IF NOT EXISTS identities (
        id TEXT PRIMARY KEY,
        identity_type TEXT NOT NULL,
        data JSON NOT NULL,
        created_at DOUBLE NOT NULL,
        updated_at DOUBLE NOT NULL,
        lang_axis TEXT,
        entropy_score DOUBLE
    )""",
    "CREATE SEQUENCE IF NOT EXISTS dual_write_log_seq",
    """CREATE TABLE IF NOT EXISTS dual_write_log (
        log_id INTEGER PRIMARY KEY DEFAULT nextval('dual_write_log_seq'),
        timestamp DOUBLE NOT NULL,
        identity_id TEXT NOT NULL,
        operation TEXT NOT NULL,
        status TEXT NOT NULL,
        details JSON
    )""",
)

# (name, table, column, DDL): created only when the table has no index on that column yet,
# whatever its name, so an existing P1 file is never given duplicate indexes.
LEGACY_INDEXES: tuple[tuple[str, str, str, str], ...] = (
    (
        "idx_identities_updated_at",
        "identities",
        "updated_at",
        "CREATE INDEX idx_identities_updated_at ON identities(updated_at DESC)",
    ),
    (
        "idx_identities_type",
        "identities",
        "identity_type",
        "CREATE INDEX idx_identities_type ON identities(identity_type)",
    ),
    (
        "idx_identities_entropy",
        "identities",
        "entropy_score",
        "CREATE INDEX idx_identities_entropy ON identities(entropy_score DESC)",
    ),
    (
        "idx_echoforms_updated_at",
        "echoforms",
        "updated_at",
        "CREATE INDEX idx_echoforms_updated_at ON echoforms(updated_at DESC)",
    ),
    (
        "idx_echoforms_domain",
        "echoforms",
        "domain",
        "CREATE INDEX idx_echoforms_domain ON echoforms(domain)",
    ),
)

# The P1 application's read path; it must keep working whatever the project adds.
P1_READ_IDENTITY_SQL = "SELECT data FROM identities WHERE id = ?"

# This connection's own catalog only: the catalog functions list attached databases too.
_OWN_INDEXES = "duckdb_indexes() WHERE database_name = current_database() AND schema_name = 'main'"
INDEXED_COLUMNS_SQL = f"SELECT table_name, expressions FROM {_OWN_INDEXES}"
SECONDARY_INDEXES_SQL = (
    f"SELECT index_name, sql FROM {_OWN_INDEXES} "
    "AND table_name = ? AND NOT is_unique AND NOT is_primary ORDER BY index_name"
)


def create_legacy_schema(con: duckdb.DuckDBPyConnection, *, indexes: bool = True) -> None:
    """Create the P1 tables, sequence and indexes that are missing (idempotent, adds nothing else).

    ``indexes=False`` creates the tables only: a migration that dropped the secondary indexes
    for its load restores them itself at its end (``kimera_core.migration.indexes``).
    """
    for statement in LEGACY_DDL:
        con.execute(statement)
    if not indexes:
        return
    indexed = {
        (table, expressions.strip("[]").replace("'", "").replace('"', "").strip().lower())
        for table, expressions in con.execute(INDEXED_COLUMNS_SQL).fetchall()
    }
    for _name, table, column, ddl in LEGACY_INDEXES:
        if (table, column) not in indexed:
            con.execute(ddl)


def secondary_indexes(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    """Name -> DDL (as DuckDB's catalog writes it) of a table's indexes that enforce nothing.

    Primary keys and unique indexes are constraints and never listed: dropping one would let
    duplicates in.
    """
    return dict(con.execute(SECONDARY_INDEXES_SQL, [table]).fetchall())


_INDEX_DDL = re.compile(r'CREATE INDEX "?(\w+)"? ON "?(\w+)"?\s*\([^;]*\);?', re.IGNORECASE)


def restore_index(con: duckdb.DuckDBPyConnection, table: str, name: str, ddl: str) -> bool:
    """Recreate a recorded secondary index of ``table`` unless it exists; True if created.

    ``ddl`` comes from duckdb_indexes() by way of the migration's run record; it is run only
    if it is a plain CREATE INDEX of that name on that table.
    """
    match = _INDEX_DDL.fullmatch(ddl.strip())
    if match is None or match.group(1) != name or match.group(2) != table:
        raise ValueError(f"not a CREATE INDEX {name} ON {table} statement: {ddl!r}")
    if name in secondary_indexes(con, table):
        return False
    con.execute(ddl)
    return True


def missing_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The legacy tables this database lacks."""
    return [name for name in LEGACY_TABLES if not table_exists(con, name)]


def table_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Row count of each legacy table that exists."""
    counts: dict[str, int] = {}
    missing = set(missing_tables(con))
    for name in LEGACY_TABLES:
        if name in missing:
            continue
        # name comes from the fixed LEGACY_TABLES tuple, never from input
        counts[name] = con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
    return counts


def _json(value: Any) -> Any:
    """A JSON column value as Python; text that does not parse stays text."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


GEOID_COLUMNS = "gid, raw, echo, lang_axis, tags, weight, meta, created_at, updated_at"
SCAR_COLUMNS = "id, weight, related_ids, meta, created_at, updated_at"


def geoid_from_row(row: tuple[Any, ...]) -> Geoid:
    gid, raw, echo, lang_axis, tags, weight, meta, created_at, updated_at = row
    return Geoid(
        gid=gid,
        raw=raw,
        echo=echo,
        lang_axis=lang_axis,
        context_layers=_json(tags),
        weight=weight,
        meta=_json(meta),
        created_at=created_at,
        updated_at=updated_at,
    )


def scar_from_row(row: tuple[Any, ...]) -> Scar:
    scar_id, weight, related_ids, meta, created_at, updated_at = row
    return Scar(
        scar_id=scar_id,
        gid_pair=_json(related_ids),
        weight=weight,
        meta=_json(meta),
        created_at=created_at,
        updated_at=updated_at,
    )


def geoid_to_row(geoid: Geoid) -> tuple[Any, ...]:
    return (
        geoid.gid,
        geoid.raw,
        geoid.echo,
        geoid.lang_axis,
        None
        if geoid.context_layers is None
        else json.dumps(geoid.context_layers, ensure_ascii=False),
        geoid.weight,
        None if geoid.meta is None else json.dumps(geoid.meta, ensure_ascii=False),
        geoid.created_at,
        geoid.updated_at,
    )


def scar_to_row(scar: Scar) -> tuple[Any, ...]:
    return (
        scar.scar_id,
        scar.weight,
        None if scar.gid_pair is None else json.dumps(scar.gid_pair, ensure_ascii=False),
        None if scar.meta is None else json.dumps(scar.meta, ensure_ascii=False),
        scar.created_at,
        scar.updated_at,
    )


# --- the legacy tables as identities (the read path before read-new) ---------------------
# Both tables in one shape: (identity_type, id, raw, echo, lang_axis, tags, weight,
# related_ids, meta, created_at, updated_at), what identity_from_legacy_row reads.
LEGACY_IDENTITY_FIELDS = (
    "identity_type, id, raw, echo, lang_axis, tags, weight, related_ids, meta, created_at, "
    "updated_at"
)
LEGACY_IDENTITIES_SQL = """
SELECT 'geoid' AS identity_type, gid AS id, raw, echo, lang_axis, tags, weight,
       NULL::JSON AS related_ids, meta, created_at, updated_at
FROM legacy_geoids
UNION ALL
SELECT 'scar', id, NULL, NULL, NULL, NULL, weight, related_ids, meta, created_at, updated_at
FROM legacy_scars
"""
# The same rows and a twelfth column, entropy (bits; NULL when unknown), computed by the
# migration's bulk formulas (kimera_core.entropy): a full scan of both tables.
_LEGACY_ENTROPY = entropy_union_sql(
    geoid_entropy_sql("legacy_geoids", "gid"), scar_entropy_sql("legacy_scars", "id")
)
LEGACY_IDENTITIES_ENTROPY_SQL = f"""
WITH e AS ({_LEGACY_ENTROPY}), u AS ({LEGACY_IDENTITIES_SQL})
SELECT u.*, e.entropy FROM u LEFT JOIN e ON e.key = u.id
"""
GEOID_BY_ID_SQL = f"SELECT {GEOID_COLUMNS} FROM legacy_geoids WHERE gid = ?"
SCAR_BY_ID_SQL = f"SELECT {SCAR_COLUMNS} FROM legacy_scars WHERE id = ?"


def identity_from_legacy_row(row: tuple[Any, ...]) -> Identity:
    """An Identity from a row whose first columns are ``LEGACY_IDENTITY_FIELDS``."""
    kind, key, raw, echo, lang, tags, weight, related, meta, created, updated = row[:11]
    if kind == "geoid":
        record: Geoid | Scar = geoid_from_row(
            (key, raw, echo, lang, tags, weight, meta, created, updated)
        )
    else:
        record = scar_from_row((key, weight, related, meta, created, updated))
    return record.to_identity()


def fetch_legacy_identity(con: duckdb.DuckDBPyConnection, identity_id: str) -> Identity | None:
    """The geoid or scar with this id from the legacy tables, as an Identity; None if absent."""
    row = con.execute(GEOID_BY_ID_SQL, [identity_id]).fetchone()
    if row is not None:
        return geoid_from_row(row).to_identity()
    row = con.execute(SCAR_BY_ID_SQL, [identity_id]).fetchone()
    return None if row is None else scar_from_row(row).to_identity()


# The columns of an identities row, in the order identities_row gives their values.
IDENTITY_ROW_COLUMNS = "id, identity_type, data, created_at, updated_at, lang_axis, entropy_score"


def identities_row(identity: Identity, entropy: float | None) -> list[Any]:
    """The identities row P1 writes for an identity: its document and the indexed columns.

    In ``IDENTITY_ROW_COLUMNS`` order; ``entropy`` in bits (None when unknown).
    """
    return [
        identity.id,
        identity.identity_type,
        identity.to_json(),
        identity.created_at,
        identity.updated_at,
        identity.lang_axis,
        entropy,
    ]


def read_identity_p1(con: duckdb.DuckDBPyConnection, identity_id: str) -> Identity | None:
    """The P1 read path: ``SELECT data FROM identities WHERE id = ?`` and rebuild."""
    row = con.execute(P1_READ_IDENTITY_SQL, [identity_id]).fetchone()
    return None if row is None else Identity.from_document(row[0])
