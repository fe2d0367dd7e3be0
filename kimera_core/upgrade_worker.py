"""The half of ``kimera db upgrade`` that runs under an older DuckDB, and the digest both halves use.

``kimera_core.upgrade`` runs this file as a script in a subprocess whose ``PYTHONPATH`` is a
folder holding one pinned DuckDB release (``pip install --target``), with ``python -P -s``
so that neither this folder nor the user site come first: ``import duckdb`` below is then
that release, not the venv's. So the module imports nothing but the standard library and
``duckdb``, and the project imports it too (``table_digests``, ``catalog``): one definition
of the checksum, computed by the old DuckDB on the original and by the current DuckDB on
the upgraded copy.

The digest of a table is its row count and an order-independent checksum: each row, the
tuple of Python values DuckDB returns, is written by ``repr`` (exact for floats, escapes for
any string) and hashed with sha256, and the first 16 bytes of the hashes are summed modulo
2**128. It depends on the values DuckDB hands to Python, not on DuckDB's own ``hash()``,
which is not stable across releases, and needs no sort. Should two releases hand back a
value as different Python types, the digests differ and the upgrade is refused: the check
errs on the safe side. (Measured: 2.8 s per million legacy_geoids rows; canonical JSON per
value took 6.7 s.)

Script use (prints one JSON object on stdout, exit 0; on a DuckDB error prints
``{"error": ...}`` and exits 2)::

    python -P -s upgrade_worker.py upgrade ORIGINAL COPY

``upgrade`` reads ORIGINAL read-only (its digests and catalog), then opens COPY (a byte copy
of ORIGINAL and its ``.wal``) read-write, creates and drops one table and CHECKPOINTs: the
write makes DuckDB rewrite the catalog and every index's storage metadata in its own
layout, which a bare CHECKPOINT (even FORCE CHECKPOINT) skips as there is nothing to write.
The caller then reads COPY with the current DuckDB and compares.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import duckdb

BATCH_ROWS = 10_000
CHECKSUM_BYTES = 16
MODULUS = 1 << (8 * CHECKSUM_BYTES)
# Created and dropped in the copy to force a full checkpoint; never left behind.
MARKER_TABLE = "kimera_upgrade_checkpoint_marker"

TABLES_SQL = (
    "SELECT schema_name, table_name FROM duckdb_tables() "
    "WHERE NOT internal AND NOT temporary AND database_name = current_database() "
    "ORDER BY schema_name, table_name"
)
INDEXES_SQL = (
    "SELECT schema_name, table_name, index_name FROM duckdb_indexes() "
    "WHERE database_name = current_database() ORDER BY 1, 2, 3"
)
VIEWS_SQL = (
    "SELECT schema_name, view_name FROM duckdb_views() "
    "WHERE NOT internal AND NOT temporary AND database_name = current_database() ORDER BY 1, 2"
)
SEQUENCES_SQL = (
    "SELECT schema_name, sequence_name FROM duckdb_sequences() "
    "WHERE database_name = current_database() ORDER BY 1, 2"
)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def table_digest(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> dict[str, Any]:
    """``{"rows": int, "checksum": 32 hex chars}`` of one table (order-independent)."""
    cur = con.execute(f"SELECT * FROM {_quote(schema)}.{_quote(table)}")
    rows = 0
    total = 0
    while batch := cur.fetchmany(BATCH_ROWS):
        for row in batch:
            digest = hashlib.sha256(repr(row).encode("utf-8")).digest()
            total += int.from_bytes(digest[:CHECKSUM_BYTES], "big")
        rows += len(batch)
    return {"rows": rows, "checksum": f"{total % MODULUS:0{2 * CHECKSUM_BYTES}x}"}


def table_digests(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, Any]]:
    """``"schema.table"`` -> ``table_digest`` for every table of the connection's database."""
    return {
        f"{schema}.{table}": table_digest(con, schema, table)
        for schema, table in con.execute(TABLES_SQL).fetchall()
    }


def catalog(con: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    """Names of the indexes, views and sequences (``schema.table.index``, ``schema.name``)."""
    return {
        "indexes": [".".join(row) for row in con.execute(INDEXES_SQL).fetchall()],
        "views": [".".join(row) for row in con.execute(VIEWS_SQL).fetchall()],
        "sequences": [".".join(row) for row in con.execute(SEQUENCES_SQL).fetchall()],
    }


def _read(path: str) -> dict[str, Any]:
    con = duckdb.connect(path, read_only=True)
    try:
        con.execute("SET enable_progress_bar = false")
        return {"tables": table_digests(con), "catalog": catalog(con)}
    finally:
        con.close()


def _rewrite(path: str) -> None:
    con = duckdb.connect(path)
    try:
        con.execute(f"CREATE TABLE {MARKER_TABLE} (x INTEGER)")
        con.execute(f"DROP TABLE {MARKER_TABLE}")
        con.execute("CHECKPOINT")
    finally:
        con.close()


def upgrade(original: str, copy: str) -> dict[str, Any]:
    """Digest ORIGINAL read-only and rewrite COPY; the digest and this DuckDB's version."""
    before = _read(original)
    _rewrite(copy)
    return {"duckdb": duckdb.__version__, "original": before}


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] != "upgrade":
        print(json.dumps({"error": "usage: upgrade_worker.py upgrade ORIGINAL COPY"}))
        return 2
    try:
        result = upgrade(argv[2], argv[3])
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(json.dumps({"duckdb": duckdb.__version__, "error": first}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
