"""The rollout stage model: which store is written and read at each stage, kept in the database.

Stages run in this order::

    legacy-only -> dual-write -> backfilled -> verified -> read-new -> write-new -> legacy-retired

The live stage is one row of ``kimera_rollout_state``; every move is a row of
``kimera_rollout_history``. ``set_stage`` allows any move (forwards, backwards, skipping):
the checks that must pass before advancing arrive with the gating issue, which will wrap it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

import duckdb

from kimera_core.errors import KimeraError

STAGES: tuple[str, ...] = (
    "legacy-only",
    "dual-write",
    "backfilled",
    "verified",
    "read-new",
    "write-new",
    "legacy-retired",
)

DUAL_WRITE_ENV = "KIMERA_ID_DUAL_WRITE"

WriteTarget = Literal["legacy", "both", "new"]
ReadSource = Literal["legacy", "new"]


@dataclass(frozen=True, slots=True)
class Routing:
    """Where a stage sends writes and reads, and whether reads are shadowed on the new store."""

    write: WriteTarget
    read: ReadSource
    shadow: bool

    @property
    def writes_new(self) -> bool:
        return self.write in ("new", "both")

    @property
    def writes_legacy(self) -> bool:
        return self.write in ("legacy", "both")


_ROUTING: dict[str, Routing] = {
    "legacy-only": Routing("legacy", "legacy", False),
    "dual-write": Routing("both", "legacy", True),
    "backfilled": Routing("both", "legacy", True),
    "verified": Routing("both", "legacy", True),
    "read-new": Routing("both", "new", False),
    "write-new": Routing("new", "new", False),
    "legacy-retired": Routing("new", "new", False),
}

ROLLOUT_DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS kimera_rollout_state (
        stage TEXT NOT NULL,
        since DOUBLE NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS kimera_rollout_history (
        "at" DOUBLE NOT NULL,
        from_stage TEXT,
        to_stage TEXT NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT
    )""",
)


class RolloutError(KimeraError):
    """An unknown stage was named."""


def check_stage(stage: str) -> str:
    """The stage itself, or RolloutError naming the valid stages."""
    if stage not in _ROUTING:
        raise RolloutError(f"unknown rollout stage {stage!r}; stages are {', '.join(STAGES)}")
    return stage


def routing(stage: str) -> Routing:
    """Write targets, read source and shadow-read switch of a stage."""
    return _ROUTING[check_stage(stage)]


def default_stage() -> str:
    """The stage of a database with no recorded stage: P1's flag decides, as it did in P1."""
    return "dual-write" if os.environ.get(DUAL_WRITE_ENV) == "1" else "legacy-only"


def ensure_rollout_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the rollout tables (idempotent)."""
    for statement in ROLLOUT_DDL:
        con.execute(statement)


def get_stage(con: duckdb.DuckDBPyConnection) -> str:
    """The live stage: the recorded one, else the default from KIMERA_ID_DUAL_WRITE."""
    try:
        row = con.execute("SELECT stage FROM kimera_rollout_state LIMIT 1").fetchone()
    except duckdb.CatalogException:
        # a read-only or never-managed file has no table: the P1 flag is the only record
        return default_stage()
    return default_stage() if row is None else row[0]


def set_stage(
    con: duckdb.DuckDBPyConnection, stage: str, actor: str, reason: str | None = None
) -> str:
    """Record ``stage`` as live and append the move to the history; returns the previous stage."""
    check_stage(stage)
    if not actor:
        raise RolloutError("a stage change needs an actor (who made it)")
    ensure_rollout_tables(con)
    now = time.time()
    con.execute("BEGIN TRANSACTION")
    try:
        previous = get_stage(con)
        con.execute("DELETE FROM kimera_rollout_state")
        con.execute("INSERT INTO kimera_rollout_state VALUES (?, ?)", [stage, now])
        con.execute(
            "INSERT INTO kimera_rollout_history VALUES (?, ?, ?, ?, ?)",
            [now, previous, stage, actor, reason],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return previous


def stage_history(con: duckdb.DuckDBPyConnection) -> list[dict[str, object]]:
    """Every recorded stage move, oldest first."""
    try:
        rows = con.execute(
            'SELECT "at", from_stage, to_stage, actor, reason FROM kimera_rollout_history '
            'ORDER BY "at", rowid'
        ).fetchall()
    except duckdb.CatalogException:
        return []
    keys = ("at", "from_stage", "to_stage", "actor", "reason")
    return [dict(zip(keys, row, strict=True)) for row in rows]
