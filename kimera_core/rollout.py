"""The rollout stage model: which store is written and read at each stage, kept in the database.

Stages run in this order::

    legacy-only -> dual-write -> backfilled -> verified -> read-new -> write-new -> legacy-retired

The live stage is one row of ``kimera_rollout_state``; every move is a row of
``kimera_rollout_history``. ``set_stage`` allows any move (forwards, backwards, skipping);
the gates wrap it: ``advance`` moves one stage forward only on evidence that the blocking
checks passed (``gate_reasons``), ``step_back`` moves one stage back and is always allowed,
``rollback_reads`` serves reads from legacy again while legacy still receives every write.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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


# --- gating: advance only on evidence, step back always -------------------------------------
READS_NEW_FROM = STAGES.index("read-new")
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


def step_back(con: duckdb.DuckDBPyConnection, actor: str, reason: str) -> str:
    """Move back one stage (always allowed, recorded); returns the new stage."""
    current = get_stage(con)
    target = previous_stage(current)
    if target is None:
        raise RolloutError(f"{current} is the first stage: there is nothing to step back to")
    set_stage(con, target, actor, reason or "step back")
    return target


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


# --- the consistency gates: the verifier's findings, with the migration's quarantine ----------
CONSISTENCY_GATES: tuple[str, ...] = (
    "count_parity",
    "key_coverage_legacy_to_new",
    "key_coverage_new_to_legacy",
    "field_equality",
    "reconciliation",
)

# Legacy keys by where they stand: in identities, quarantined (by a run not rolled back) and
# absent from identities, or neither (unexplained).
KEY_STANDING_SQL = """
WITH legacy AS (
    SELECT gid AS id, 'geoid' AS kind FROM legacy_geoids WHERE gid IS NOT NULL
    UNION ALL SELECT id, 'scar' FROM legacy_scars WHERE id IS NOT NULL
), q AS (
    SELECT DISTINCT q.key FROM kimera_quarantine q
    JOIN kimera_migration_runs r ON r.run_id = q.run_id AND r.status <> 'rolled_back'
)
SELECT l.id, l.kind,
       CASE WHEN i.id IS NOT NULL THEN 'present'
            WHEN l.id IN (SELECT key FROM q) THEN 'quarantined'
            ELSE 'unexplained' END AS standing
FROM legacy l LEFT JOIN (SELECT DISTINCT id FROM identities) i ON i.id = l.id
"""


@dataclass
class Gate:
    """One blocking check's outcome: verdict, one-line reason, counts and offending keys."""

    name: str
    passed: bool
    summary: str
    counts: dict[str, object]
    sample: list[object]


def _key_standing(con: duckdb.DuckDBPyConnection, sample: int) -> tuple[dict, list[str]]:
    has_quarantine = bool(
        con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'kimera_quarantine'"
        ).fetchone()[0]
    )
    sql = KEY_STANDING_SQL
    if not has_quarantine:  # never migrated: nothing is quarantined
        sql = sql.replace(
            "SELECT DISTINCT q.key FROM kimera_quarantine q\n    JOIN kimera_migration_runs r "
            "ON r.run_id = q.run_id AND r.status <> 'rolled_back'",
            "SELECT NULL::TEXT AS key WHERE false",
        )
    con.execute(f"CREATE OR REPLACE TEMP TABLE kimera_gate_keys AS {sql}")
    counts: dict[str, dict[str, int]] = {}
    for kind, standing, n in con.execute(
        "SELECT kind, standing, count(*) FROM kimera_gate_keys GROUP BY ALL"
    ).fetchall():
        counts.setdefault(standing, {}).setdefault(kind, 0)
        counts[standing][kind] += int(n)
    keys = [
        r[0]
        for r in con.execute(
            "SELECT id FROM kimera_gate_keys WHERE standing = 'unexplained' ORDER BY id LIMIT ?",
            [sample],
        ).fetchall()
    ]
    con.execute("DROP TABLE kimera_gate_keys")
    return counts, keys


def consistency_gates(
    con: duckdb.DuckDBPyConnection,
    *,
    incremental: bool = False,
    sample: int = 20,
    record: bool = True,
) -> tuple[list[Gate], dict[str, object]]:
    """Run the consistency verifier and judge each gate; returns the gates and the report.

    Quarantined legacy rows are accounted for, not forgiven: a legacy key missing from
    identities passes only if a migration run (not rolled back) quarantined it. Counts and
    key coverage legacy -> new are computed over the whole tables (cheap key joins); field
    equality and keys only in identities come from the verifier (full or incremental).
    """
    from kimera_core.consistency import n_rows, verify  # the verifier pulls in shadow reads

    report = verify(con, incremental=incremental, sample=sample, record=record)
    standing, unexplained = _key_standing(con, sample)

    def total(kind_counts: dict[str, int] | None) -> int:
        return sum((kind_counts or {}).values())

    present, quarantined = standing.get("present", {}), standing.get("quarantined", {})
    n_unexplained = total(standing.get("unexplained"))
    new_counts = report.counts["new"]
    legacy_counts = report.counts["legacy"]
    parity = {
        kind: {
            "legacy": legacy_counts.get(kind, 0),
            "quarantined": quarantined.get(kind, 0),
            "new": new_counts.get(kind, 0),
        }
        for kind in ("geoid", "scar")
    }
    parity_off = [k for k, c in parity.items() if c["legacy"] - c["quarantined"] != c["new"]]
    legacy_total = legacy_counts.get("total", 0)
    gates = [
        Gate(
            "count_parity",
            not parity_off,
            (
                "per type, legacy rows - quarantined = identities rows"
                if not parity_off
                else "counts differ for "
                + ", ".join(
                    f"{k}: legacy {parity[k]['legacy']:,} - quarantined "
                    f"{parity[k]['quarantined']:,} != identities {parity[k]['new']:,}"
                    for k in parity_off
                )
            ),
            {"by_type": parity},
            [],
        ),
        Gate(
            "key_coverage_legacy_to_new",
            n_unexplained == 0,
            f"{n_unexplained:,} legacy keys neither in identities nor quarantined",
            {
                "legacy_keys": legacy_total,
                "present": total(present),
                "quarantined": total(quarantined),
                "unexplained": n_unexplained,
                "verifier_missing_in_new": report.missing_in_new.total,
                "duplicate_keys": report.duplicate_keys.total,
            },
            unexplained,
        ),
        Gate(
            "key_coverage_new_to_legacy",
            report.missing_in_legacy.total == 0 and not report.null_keys.get("new"),
            f"{report.missing_in_legacy.total:,} identities keys in no legacy table",
            {"missing_in_legacy": report.missing_in_legacy.total, "mode": report.mode},
            report.missing_in_legacy.sample,
        ),
        Gate(
            "field_equality",
            report.field_mismatches.total == 0,
            f"{n_rows(report.field_mismatches.total)} whose mapped fields differ",
            {
                "field_mismatches": report.field_mismatches.total,
                "by_field": report.mismatches_by_field,
                "mode": report.mode,
                "keys_checked": report.keys_checked,
            },
            report.field_mismatches.sample,
        ),
        Gate(
            "reconciliation",
            legacy_total == total(present) + total(quarantined),
            (
                f"legacy {legacy_total:,} = migrated or present {total(present):,} + "
                f"quarantined {total(quarantined):,}"
                + ("" if n_unexplained == 0 else f" (+ {n_unexplained:,} unexplained)")
            ),
            {
                "legacy": legacy_total,
                "present": total(present),
                "quarantined": total(quarantined),
                "unexplained": n_unexplained,
            },
            unexplained,
        ),
    ]
    return gates, report.to_dict()
