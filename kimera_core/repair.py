"""Repair: re-sync the keys a verification found from the store authoritative at the current stage.

Which store wins is the rollout's rule (``rollout.authoritative_store``): the store reads
come from, so the legacy tables before ``read-new`` and ``identities`` from it on. For each
key the authoritative copy is read and written again through the dual-write path
(``kimera_core.storage.Storage`` routed as ``dual-write``: both stores and a
``dual_write_log`` row in one transaction per key); a key the authoritative store does not
hold is deleted from both. Keys quarantined by a migration run (not rolled back) are left
alone: they are explained exceptions, not divergences.

Every repair is journaled before it writes: the rows of both stores for its keys go to
``kimera_repair_identities``, ``kimera_repair_legacy_geoids`` and
``kimera_repair_legacy_scars`` (the tables' own columns plus ``repair_id``), and the repair
itself to ``kimera_repairs``. ``undo_repair`` puts those rows back in one transaction and logs
each key in ``dual_write_log`` (operation ``repair_undo``), so the next incremental
verification looks at them again. A repair ends with an incremental verification
(``gates.judge_gates``): its report says whether the repaired keys agree now.

The keys come from the caller (``--keys``) or from a recorded verification
(``keys_from_verification``): its offending samples, or, when a sample was capped below its
total, every key the verifier finds differing now.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import duckdb

from kimera_core.consistency import n_keys, verify
from kimera_core.db import transaction
from kimera_core.errors import KimeraError
from kimera_core.gates import QUARANTINE_EXISTS_SQL, QUARANTINED_KEYS_SQL, GateReport, judge_gates
from kimera_core.legacy import fetch_legacy_identity, read_identity_p1
from kimera_core.rollout import authoritative_store, get_stage
from kimera_core.storage import LOG_INSERT, Storage, StorageError

Action = Literal["store", "delete", "none", "quarantined"]

# The verifier findings whose sampled keys a repair re-syncs.
REPAIRED_FINDINGS: tuple[str, ...] = (
    "missing_in_new",
    "missing_in_legacy",
    "field_mismatches",
    "column_mismatches",
)
# Each journaled table and its key column.
JOURNALED: dict[str, str] = {"identities": "id", "legacy_geoids": "gid", "legacy_scars": "id"}
REPAIRS_DDL = """CREATE TABLE IF NOT EXISTS kimera_repairs (
    repair_id TEXT PRIMARY KEY,
    "at" DOUBLE NOT NULL,
    actor TEXT NOT NULL,
    stage TEXT NOT NULL,
    authority TEXT NOT NULL,
    source TEXT,
    keys JSON NOT NULL,
    status TEXT NOT NULL,
    report JSON
)"""
JOURNAL_DDL = (
    "CREATE TABLE IF NOT EXISTS kimera_repair_{table} AS "
    "SELECT ''::TEXT AS repair_id, * FROM {table} WHERE false"
)
JOURNAL_INSERT = (
    "INSERT INTO kimera_repair_{table} BY NAME "
    "SELECT $repair_id AS repair_id, * FROM {table} WHERE list_contains($keys, {key})"
)
UNDO_DELETE = "DELETE FROM {table} WHERE list_contains($keys, {key})"
UNDO_INSERT = (
    "INSERT INTO {table} BY NAME "
    "SELECT * EXCLUDE (repair_id) FROM kimera_repair_{table} WHERE repair_id = $repair_id"
)
VERIFICATIONS_SQL = "SELECT verified_at, findings FROM kimera_verifications ORDER BY verified_at"


class RepairError(KimeraError):
    """A repair could not be planned, run or undone (one line says why)."""


@dataclass(frozen=True)
class RepairAction:
    """What a repair does to one key: store the authoritative copy, delete it, or nothing."""

    key: str
    action: Action
    reason: str


@dataclass
class RepairReport:
    """One repair: what it planned and did, and the verification that followed.

    ``stored``/``deleted``: keys written again / removed from both stores; ``refused``: key ->
    the one-line reason the write path gave; ``still_differing``: repaired keys the follow-up
    verification still finds offending (empty when the repair worked).
    """

    repair_id: str
    stage: str
    authority: str
    source: str
    dry_run: bool
    actions: list[RepairAction]
    stored: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    still_differing: list[str] = field(default_factory=list)
    verification: GateReport | None = None

    @property
    def ok(self) -> bool:
        return not self.refused and not self.still_differing

    def summary(self) -> str:
        verb = "would re-sync" if self.dry_run else "re-synced"
        changing = sum(a.action in ("store", "delete") for a in self.actions)
        text = (
            f"{verb} {n_keys(changing)} from "
            f"{'identities' if self.authority == 'new' else 'the legacy tables'} "
            f"(stage {self.stage})"
        )
        skipped = sum(a.action == "quarantined" for a in self.actions)
        if skipped:
            text += f"; {n_keys(skipped)} quarantined, left alone"
        absent = sum(a.action == "none" for a in self.actions)
        if absent:
            text += f"; {n_keys(absent)} in neither store"
        if self.refused:
            text += f"; {len(self.refused):,} refused"
        if self.verification is not None:
            text += (
                "; verification: repaired keys agree"
                if not self.still_differing
                else f"; verification: {len(self.still_differing):,} still differ"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "repair_id": self.repair_id,
            "stage": self.stage,
            "authority": self.authority,
            "source": self.source,
            "dry_run": self.dry_run,
            "actions": [asdict(a) for a in self.actions],
            "stored": self.stored,
            "deleted": self.deleted,
            "refused": self.refused,
            "still_differing": self.still_differing,
            "verification": None if self.verification is None else self.verification.to_dict(),
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RepairReport:
        """The report ``to_dict`` made (``summary`` is derived)."""
        return cls(
            d["repair_id"],
            d["stage"],
            d["authority"],
            d["source"],
            d["dry_run"],
            [RepairAction(**a) for a in d["actions"]],
            list(d["stored"]),
            list(d["deleted"]),
            dict(d["refused"]),
            list(d["still_differing"]),
            None if d["verification"] is None else GateReport.from_dict(d["verification"]),
        )


# --- which keys ---------------------------------------------------------------------------
def _finding_keys(findings: dict[str, Any]) -> tuple[list[str], bool]:
    """The keys sampled by the repairable findings, and whether every total was sampled."""
    keys: set[str] = set()
    complete = True
    for name in REPAIRED_FINDINGS:
        finding = findings.get(name) or {"total": 0, "sample": []}
        sample = finding.get("sample") or []
        keys.update(str(s["id"] if isinstance(s, dict) else s) for s in sample)
        complete = complete and int(finding.get("total", 0)) <= len(sample)
    return sorted(keys), complete


def keys_from_verification(
    con: duckdb.DuckDBPyConnection, verification: int | None = None
) -> tuple[list[str], str]:
    """The keys a recorded verification found, and a line saying which verification.

    ``verification``: its number (1 = the first recorded, in time order), None = the latest.
    When the verification kept only a sample of a finding, every key the verifier finds
    differing now is taken instead (a full verification, not recorded). Keys quarantined by a
    migration run are left out (explained, not divergent). Raises RepairError when there is
    no such verification.
    """
    try:
        rows = con.execute(VERIFICATIONS_SQL).fetchall()
    except duckdb.CatalogException:
        rows = []
    if not rows:
        raise RepairError("no verification is recorded: run `kimera verify` or the consistency job")
    number = len(rows) if verification is None else verification
    if not 1 <= number <= len(rows):
        raise RepairError(f"no verification {number}: {len(rows)} are recorded (1 to {len(rows)})")
    at, findings = rows[number - 1]
    recorded = json.loads(findings) if isinstance(findings, str) else findings
    keys, complete = _finding_keys(recorded)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    source = f"verification {number} of {len(rows)} ({when})"
    if not complete:
        cap = max(int((recorded.get(n) or {}).get("total", 0)) for n in REPAIRED_FINDINGS)
        keys, _ = _finding_keys(verify(con, sample=cap, record=False, cache=False).to_dict())
        source += ", its samples capped: every key differing now"
    quarantined = _quarantined(con, keys)
    if quarantined:
        keys = [k for k in keys if k not in quarantined]
        source += f"; {len(quarantined):,} quarantined keys left out"
    return keys, source


# --- plan, run, undo ------------------------------------------------------------------------
def _quarantined(con: duckdb.DuckDBPyConnection, keys: list[str]) -> set[str]:
    if not keys or not con.execute(QUARANTINE_EXISTS_SQL).fetchone()[0]:
        return set()
    rows = con.execute(
        f"SELECT key FROM ({QUARANTINED_KEYS_SQL}) WHERE list_contains(?, key)", [keys]
    ).fetchall()
    return {r[0] for r in rows}


def plan_repair(con: duckdb.DuckDBPyConnection, keys: list[str]) -> tuple[str, list[RepairAction]]:
    """The live stage's authoritative store and, per key, what a repair would do (reads only)."""
    stage = get_stage(con)
    authority = authoritative_store(stage)
    read = read_identity_p1 if authority == "new" else fetch_legacy_identity
    other = fetch_legacy_identity if authority == "new" else read_identity_p1
    where = "identities" if authority == "new" else "the legacy tables"
    quarantined = _quarantined(con, keys)
    actions = []
    for key in dict.fromkeys(keys):
        if key in quarantined:
            actions.append(RepairAction(key, "quarantined", "quarantined by a migration run"))
        elif read(con, key) is not None:
            actions.append(RepairAction(key, "store", f"copy from {where} to both stores"))
        elif other(con, key) is not None:
            actions.append(RepairAction(key, "delete", f"not in {where}: delete from both"))
        else:
            actions.append(RepairAction(key, "none", "in neither store"))
    return stage, actions


def _journal(
    con: duckdb.DuckDBPyConnection, report: RepairReport, actor: str, keys: list[str]
) -> None:
    con.execute(REPAIRS_DDL)
    for table in JOURNALED:
        con.execute(JOURNAL_DDL.format(table=table))
    with transaction(con):
        for table, key in JOURNALED.items():
            con.execute(
                JOURNAL_INSERT.format(table=table, key=key),
                {"repair_id": report.repair_id, "keys": keys},
            )
        con.execute(
            "INSERT INTO kimera_repairs VALUES (?, ?, ?, ?, ?, ?, ?, 'running', NULL)",
            [
                report.repair_id,
                time.time(),
                actor,
                report.stage,
                report.authority,
                report.source,
                json.dumps(keys),
            ],
        )


def repair(
    con: duckdb.DuckDBPyConnection,
    keys: list[str],
    *,
    actor: str,
    source: str = "keys given",
    dry_run: bool = False,
    sample: int = 20,
) -> RepairReport:
    """Re-sync ``keys`` from the authoritative store, journaled, then verify incrementally.

    ``dry_run`` plans only (reads; a read-only connection will do). Each write is one
    dual-write transaction; a key the write path refuses is listed in ``refused`` and the
    others go on. Raises RepairError when ``keys`` is empty.
    """
    if not keys:
        raise RepairError("no keys to repair: the verification found none (or give --keys)")
    stage, actions = plan_repair(con, keys)
    report = RepairReport(
        repair_id=f"r{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}",
        stage=stage,
        authority=authoritative_store(stage),
        source=source,
        dry_run=dry_run,
        actions=actions,
    )
    if dry_run:
        return report
    changing = [a for a in actions if a.action in ("store", "delete")]
    _journal(con, report, actor, [a.key for a in changing])
    read = read_identity_p1 if report.authority == "new" else fetch_legacy_identity
    storage = Storage(con, stage="dual-write", shadow_sample=0.0)
    for action in changing:
        try:
            if action.action == "store":
                storage.store(read(con, action.key))
                report.stored.append(action.key)
            else:
                storage.delete(action.key)
                report.deleted.append(action.key)
        except StorageError as exc:
            report.refused[action.key] = str(exc)
    report.verification = judge_gates(con, incremental=True, sample=max(sample, len(changing)))
    offending = {
        str(s["id"] if isinstance(s, dict) else s)
        for g in report.verification.gates
        for s in g.sample
    }
    report.still_differing = sorted(offending & {a.key for a in changing})
    con.execute(
        "UPDATE kimera_repairs SET status = ?, report = ? WHERE repair_id = ?",
        ["done" if report.ok else "partial", json.dumps(report.to_dict()), report.repair_id],
    )
    return report


@dataclass(frozen=True)
class UndoReport:
    """An undone repair: its id and the rows put back per table."""

    repair_id: str
    restored: dict[str, int]
    keys: list[str]


def undo_repair(con: duckdb.DuckDBPyConnection, repair_id: str) -> UndoReport:
    """Put back every row a repair journaled (both stores), in one transaction; logged.

    Raises RepairError for an unknown or already undone repair.
    """
    try:
        row = con.execute(
            "SELECT keys, status FROM kimera_repairs WHERE repair_id = ?", [repair_id]
        ).fetchone()
    except duckdb.CatalogException:
        row = None
    if row is None:
        raise RepairError(f"no repair {repair_id!r} is recorded")
    if row[1] == "undone":
        raise RepairError(f"repair {repair_id} was already undone")
    keys = json.loads(row[0])
    restored: dict[str, int] = {}
    now = time.time()
    with transaction(con):
        for table, key in JOURNALED.items():
            con.execute(UNDO_DELETE.format(table=table, key=key), {"keys": keys})
            restored[table] = con.execute(
                UNDO_INSERT.format(table=table), {"repair_id": repair_id}
            ).fetchone()[0]
        details = json.dumps({"repair_id": repair_id})
        for key in keys:
            con.execute(LOG_INSERT, [now, key, "repair_undo", "success", details])
        con.execute("UPDATE kimera_repairs SET status = 'undone' WHERE repair_id = ?", [repair_id])
    return UndoReport(repair_id, restored, keys)
