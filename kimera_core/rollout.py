"""The rollout stage model: which store is written and read at each stage, kept in the database.

Stages run in this order::

    legacy-only -> dual-write -> backfilled -> verified -> read-new -> write-new -> legacy-retired

The live stage is one row of ``kimera_rollout_state``; every move is a row of
``kimera_rollout_history``. ``set_stage`` allows any move (forwards, backwards, skipping);
the gates wrap it: ``advance`` moves one stage forward only on evidence that the blocking
checks passed (``gate_reasons``), ``step_back`` moves one stage back and is always allowed,
``rollback_reads`` serves reads from legacy again while legacy still receives every write.
``advance_to`` is the loop both front ends use: advance one stage at a time until the target
or the first gate that holds, and say which (``AdvanceResult``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import duckdb

from kimera_core.db import transaction
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
    with transaction(con):
        previous = get_stage(con)
        con.execute("DELETE FROM kimera_rollout_state")
        con.execute("INSERT INTO kimera_rollout_state VALUES (?, ?)", [stage, now])
        con.execute(
            "INSERT INTO kimera_rollout_history VALUES (?, ?, ?, ?, ?)",
            [now, previous, stage, actor, reason],
        )
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


# --- gating: advance only on evidence, step back always -------------------------------------
SCHEDULED_CHECKS_FROM = STAGES.index("verified") + 1  # past verified
SOAK_STAGES: frozenset[str] = frozenset({"write-new", "legacy-retired"})
SOAK_ENV = "KIMERA_ROLLOUT_SOAK_SECONDS"
DEFAULT_SOAK_SECONDS = 24 * 3600.0


class RolloutGateError(RolloutError):
    """An advance was refused; ``reasons`` say which gate held it."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("advance refused: " + "; ".join(reasons))


@dataclass(frozen=True, slots=True)
class CheckEvidence:
    """One evaluation of a blocking check: its name, verdict, run and time (epoch seconds)."""

    name: str
    passed: bool
    run_id: str | None = None
    at: float | None = None


@dataclass(frozen=True)
class Evidence:
    """What an advance rests on.

    ``run_checks``: the blocking checks evaluated in the advancing run itself.
    ``scheduled_checks``: the latest evaluation of each consistency check by the
    consistency job (scheduled or launched), from other runs.
    ``required``: check names that must appear, and pass, in both.
    """

    run_id: str
    required: tuple[str, ...]
    run_checks: tuple[CheckEvidence, ...] = ()
    scheduled_checks: tuple[CheckEvidence, ...] = ()

    def summary(self) -> str:
        passed = sorted(c.name for c in self.run_checks if c.passed)
        text = f"run {self.run_id}: blocking checks passed ({', '.join(passed) or 'none'})"
        if self.scheduled_checks:
            runs = sorted({c.run_id or "?" for c in self.scheduled_checks})
            text += f"; latest consistency checks from run(s) {', '.join(runs)}"
        return text


def next_stage(stage: str) -> str | None:
    """The stage after ``stage``, or None at the last one."""
    index = STAGES.index(check_stage(stage))
    return STAGES[index + 1] if index + 1 < len(STAGES) else None


def previous_stage(stage: str) -> str | None:
    """The stage before ``stage``, or None at the first one."""
    index = STAGES.index(check_stage(stage))
    return STAGES[index - 1] if index > 0 else None


def stage_since(con: duckdb.DuckDBPyConnection) -> float | None:
    """When the live stage was recorded (epoch seconds), or None if it never was."""
    try:
        row = con.execute("SELECT since FROM kimera_rollout_state LIMIT 1").fetchone()
    except duckdb.CatalogException:
        return None
    return None if row is None else float(row[0])


def soak_seconds() -> float:
    """How long ``read-new`` must stand, checked, before writes leave legacy (env override)."""
    text = os.environ.get(SOAK_ENV)
    if text is None:
        return DEFAULT_SOAK_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise RolloutError(f"{SOAK_ENV}={text!r} is not a number of seconds") from None
    if value < 0:
        raise RolloutError(f"{SOAK_ENV} must not be negative")
    return value


def gate_reasons(
    current: str,
    to_stage: str,
    evidence: Evidence,
    *,
    since: float | None,
    now: float,
    soak: float,
) -> list[str]:
    """Why ``current -> to_stage`` may not happen on this evidence (empty: it may)."""
    check_stage(to_stage)
    reasons: list[str] = []
    if to_stage != next_stage(current):
        return [f"{current} -> {to_stage} is not one step forward: advance one stage at a time"]
    seen = {c.name: c for c in evidence.run_checks}
    for name in evidence.required:
        check = seen.get(name)
        if check is None:
            reasons.append(f"check {name} was not evaluated in run {evidence.run_id}")
        elif not check.passed:
            reasons.append(f"check {name} failed in run {evidence.run_id}")
    if STAGES.index(to_stage) >= SCHEDULED_CHECKS_FROM:
        latest = {c.name: c for c in evidence.scheduled_checks}
        absent = [n for n in evidence.required if n not in latest]
        failed = [n for n in evidence.required if n in latest and not latest[n].passed]
        stale = [
            n
            for n in evidence.required
            if n in latest
            and latest[n].passed
            and to_stage in SOAK_STAGES
            and since is not None
            and (latest[n].at or 0) < since
        ]
        if absent:
            reasons.append(
                f"past verified needs consistency-job evaluations of {', '.join(absent)}"
            )
        if failed:
            runs = sorted({latest[n].run_id or "?" for n in failed})
            reasons.append(
                f"the latest consistency-job evaluation failed for {', '.join(failed)} "
                f"(run {', '.join(runs)})"
            )
        if stale:
            reasons.append(
                f"no consistency-job evaluation since {current} went live of {', '.join(stale)}"
            )
    if to_stage in SOAK_STAGES and since is not None and now - since < soak:
        reasons.append(
            f"{current} has been live {now - since:,.0f} s of the {soak:,.0f} s soak "
            f"({SOAK_ENV}) before writes may leave the legacy store"
        )
    return reasons


def advance(
    con: duckdb.DuckDBPyConnection,
    to_stage: str,
    evidence: Evidence,
    actor: str,
    reason: str | None = None,
    *,
    soak: float | None = None,
    clock: Callable[[], float] = time.time,
) -> str:
    """Move one stage forward if the evidence passes every gate; returns the previous stage.

    Raises RolloutGateError naming each gate that held. The move and its evidence are
    recorded in ``kimera_rollout_history``.
    """
    current = get_stage(con)
    reasons = gate_reasons(
        current,
        to_stage,
        evidence,
        since=stage_since(con),
        now=clock(),
        soak=soak_seconds() if soak is None else soak,
    )
    if reasons:
        raise RolloutGateError(reasons)
    text = evidence.summary() if not reason else f"{reason}; {evidence.summary()}"
    return set_stage(con, to_stage, actor, text)


@dataclass(frozen=True)
class AdvanceResult:
    """What ``advance_to`` did: the stages moved through (in order), what held it, where it is.

    ``held_by`` is empty when the target was reached; ``refused`` means nothing moved.
    """

    start: str
    target: str
    moved_through: tuple[str, ...]
    held_by: tuple[str, ...]
    stage: str

    @property
    def refused(self) -> bool:
        return bool(self.held_by) and not self.moved_through

    def to_dict(self) -> dict[str, object]:
        return {
            "start": self.start,
            "target": self.target,
            "moved_through": list(self.moved_through),
            "held_by": list(self.held_by),
            "stage": self.stage,
        }


def advance_to(
    con: duckdb.DuckDBPyConnection,
    target: str | None,
    evidence: Evidence,
    actor: str,
    reason: str | None = None,
    *,
    soak: float | None = None,
    clock: Callable[[], float] = time.time,
    dry_run: bool = False,
) -> AdvanceResult:
    """Advance one stage at a time up to ``target`` (None: the next stage) until a gate holds.

    Each step is ``advance`` on the same evidence, recorded in the history. A gate that
    holds stops the loop (its reasons are in ``held_by``); it is not an error. Raises
    RolloutError for an unknown target or one behind the live stage (moving back is
    ``step_back``'s job, never an advance's). ``dry_run`` records nothing and returns what
    the same call would do now (a stage it would move to counts as live from now): the
    rollout step backs the database up only when ``moved_through`` is not empty.
    """
    start = get_stage(con)
    if target is None:
        target = next_stage(start) or start
    check_stage(target)
    if STAGES.index(target) < STAGES.index(start):
        raise RolloutError(
            f"target {target} is behind the live stage {start}: an advance only moves forward "
            "(step back instead)"
        )
    soak = soak_seconds() if soak is None else soak
    current, moved, held = start, [], ()
    while current != target:
        step = STAGES[STAGES.index(current) + 1]
        try:
            if dry_run:
                since = stage_since(con) if not moved else clock()
                reasons = gate_reasons(current, step, evidence, since=since, now=clock(), soak=soak)
                if reasons:
                    raise RolloutGateError(reasons)
            else:
                advance(con, step, evidence, actor, reason, soak=soak, clock=clock)
        except RolloutGateError as exc:
            held = tuple(exc.reasons)
            break
        moved.append(step)
        current = step
    return AdvanceResult(start, target, tuple(moved), held, current)


def step_back(con: duckdb.DuckDBPyConnection, actor: str, reason: str) -> str:
    """Move back one stage (always allowed, recorded); returns the new stage."""
    current = get_stage(con)
    target = previous_stage(current)
    if target is None:
        raise RolloutError(f"{current} is the first stage: there is nothing to step back to")
    set_stage(con, target, actor, reason or "step back")
    return target


def authoritative_store(stage: str) -> ReadSource:
    """The store whose copy wins at ``stage``: the one reads come from (legacy before read-new).

    A repair re-syncs the other store from it (``kimera_core.repair``).
    """
    return routing(stage).read


def reads_can_fall_back(stage: str) -> bool:
    """True when reads come from the new store while legacy still receives every write."""
    route = routing(stage)
    return route.read == "new" and route.writes_legacy


def rollback_reads(con: duckdb.DuckDBPyConnection, actor: str, reason: str) -> str | None:
    """Serve reads from legacy again (read-new -> verified); None if reads are not on new.

    Refused (RolloutError) once legacy stops receiving writes: its data would be stale.
    """
    current = get_stage(con)
    route = routing(current)
    if route.read != "new":
        return None
    if not route.writes_legacy:
        raise RolloutError(
            f"stage {current} no longer writes the legacy store: moving reads back would serve "
            "stale data; step back to read-new first only after re-syncing legacy (runbook)"
        )
    return step_back(con, actor, reason)
