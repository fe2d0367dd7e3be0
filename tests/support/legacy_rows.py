"""Test data in the existing layouts: legacy rows written and read one by one, P1 rows stored.

Row at a time, as the existing system wrote them (``kimera_core.legacy``'s ``geoid_to_row``
and ``scar_to_row``, ``identities_row``): for tests that plant exact rows. P1's own paths are
set-based (the migration, the batch write) and never call these.
"""

from __future__ import annotations

from collections.abc import Iterator

import duckdb

from kimera_core.identity import Geoid, Identity, Scar
from kimera_core.legacy import (
    GEOID_COLUMNS,
    IDENTITY_ROW_COLUMNS,
    SCAR_COLUMNS,
    geoid_from_row,
    geoid_to_row,
    identities_row,
    scar_from_row,
    scar_to_row,
)


def insert_geoids(con: duckdb.DuckDBPyConnection, geoids: list[Geoid]) -> None:
    """Insert ``geoids`` into legacy_geoids, one row each."""
    con.executemany(
        "INSERT INTO legacy_geoids (gid, raw, echo, lang_axis, tags, weight, meta, created_at, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [geoid_to_row(g) for g in geoids],
    )


def insert_scars(con: duckdb.DuckDBPyConnection, scars: list[Scar]) -> None:
    """Insert ``scars`` into legacy_scars, one row each."""
    con.executemany(
        "INSERT INTO legacy_scars (id, weight, related_ids, meta, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [scar_to_row(s) for s in scars],
    )


def iter_geoids(con: duckdb.DuckDBPyConnection, batch_size: int = 10_000) -> Iterator[Geoid]:
    """Every legacy geoid in gid order, fetched ``batch_size`` rows at a time."""
    cur = con.execute(f"SELECT {GEOID_COLUMNS} FROM legacy_geoids ORDER BY gid")
    while rows := cur.fetchmany(batch_size):
        yield from map(geoid_from_row, rows)


def iter_scars(con: duckdb.DuckDBPyConnection, batch_size: int = 10_000) -> Iterator[Scar]:
    """Every legacy scar in id order, fetched ``batch_size`` rows at a time."""
    cur = con.execute(f"SELECT {SCAR_COLUMNS} FROM legacy_scars ORDER BY id")
    while rows := cur.fetchmany(batch_size):
        yield from map(scar_from_row, rows)


def store_identity_p1(
    con: duckdb.DuckDBPyConnection, identity: Identity, entropy: float | None
) -> None:
    """Write an identity the way P1 does: the JSON document plus its indexed columns."""
    con.execute(
        f"INSERT OR REPLACE INTO identities ({IDENTITY_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
        identities_row(identity, entropy),
    )
