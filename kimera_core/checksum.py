"""Order-independent, NULL-safe table and partition checksums, computed set-based in DuckDB.

A row's hash is DuckDB's 64-bit ``hash()`` over its columns in a fixed order (NULL hashes
to its own value, so NULL and '' differ); a table's checksum is the row count plus the sum
of the row hashes as a 128-bit integer, so it does not depend on row order or on how the
rows are split into partitions: partition checksums add up to the table's.

``hash()`` is stable for a given DuckDB version; checksums are compared within one
installation (backup manifests record the DuckDB version they were computed with).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from kimera_core.sql import vetted_identifier

_MASK_128 = (1 << 128) - 1


@dataclass(frozen=True)
class Checksum:
    """Row count and the sum of row hashes (mod 2**128)."""

    rows: int
    digest: int

    @property
    def hex(self) -> str:
        return f"{self.digest & _MASK_128:032x}"

    def __add__(self, other: Checksum) -> Checksum:
        return Checksum(self.rows + other.rows, (self.digest + other.digest) & _MASK_128)

    def to_dict(self) -> dict[str, object]:
        return {"rows": self.rows, "checksum": self.hex}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Checksum:
        return cls(int(data["rows"]), int(str(data["checksum"]), 16))

    @classmethod
    def empty(cls) -> Checksum:
        return cls(0, 0)


def table_columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    """Column names of a table in definition order."""
    rows = con.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_catalog = current_database() AND table_schema = 'main' AND table_name = ? "
        "ORDER BY ordinal_position",
        [table],
    ).fetchall()
    if not rows:
        raise ValueError(f"no such table: {table}")
    return [r[0] for r in rows]


def row_hash_sql(columns: list[str]) -> str:
    """SQL for the 64-bit hash of a row's columns (vetted identifiers only)."""
    return "hash(" + ", ".join(vetted_identifier(c) for c in columns) + ")"


def table_checksum(
    con: duckdb.DuckDBPyConnection, table: str, columns: list[str] | None = None
) -> Checksum:
    """Checksum of a whole table over ``columns`` (default: all, in definition order)."""
    cols = columns or table_columns(con, table)
    sql = (
        f"SELECT count(*), coalesce(sum({row_hash_sql(cols)}::HUGEINT), 0) "
        f"FROM {vetted_identifier(table)}"
    )
    rows, digest = con.execute(sql).fetchone()
    return Checksum(int(rows), int(digest) & _MASK_128)


def bucket_sql(key: str, buckets: int) -> str:
    """SQL for the hash bucket (0 .. buckets-1) of a key column."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    return f"(hash({vetted_identifier(key)}) % {int(buckets)})"


def partition_checksums(
    con: duckdb.DuckDBPyConnection,
    table: str,
    key: str,
    buckets: int,
    columns: list[str] | None = None,
) -> dict[int, Checksum]:
    """Checksum per hash bucket of ``key``; buckets with no rows are present and empty."""
    cols = columns or table_columns(con, table)
    sql = (
        f"SELECT {bucket_sql(key, buckets)} AS bucket, count(*), "
        f"coalesce(sum({row_hash_sql(cols)}::HUGEINT), 0) "
        f"FROM {vetted_identifier(table)} GROUP BY bucket"
    )
    result = {b: Checksum.empty() for b in range(buckets)}
    for bucket, rows, digest in con.execute(sql).fetchall():
        result[int(bucket)] = Checksum(int(rows), int(digest) & _MASK_128)
    return result
