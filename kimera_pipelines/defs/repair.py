"""Repair from the UI: the ``repair`` asset, its check, and ``repair_job``.

Materializing ``repair`` (``repair_job``'s Materialize button, no config needed) re-syncs the
keys the latest verification found (``kimera_core.repair``: from the store authoritative at
the live stage, through the dual-write path, journaled so ``kimera repair --undo ID`` puts
them back) and verifies them incrementally. Its check ``repaired_keys_agree`` lives in the
same step, so every launch evaluates it: it passes when every repaired key agrees and the
write path refused none, and lists the gates as that verification judged them. The
materialization carries the ``RepairReport`` whole (``REPAIR_REPORT``) beside a table of
what was done per key and the undo command. The rollout's gates are not re-judged here:
launch consistency_check_job afterwards for the verdict an advance reads.
"""

import dagster as dg
from pydantic import Field

from kimera_core.errors import KimeraError
from kimera_core.gates import GateReport
from kimera_core.repair import RepairReport, keys_from_verification, repair
from kimera_pipelines.defs.consistency import GATES_METADATA
from kimera_pipelines.metadata import REPAIR_REPORT, md_table
from kimera_pipelines.resources import (
    IDENTITIES,
    IN_PROCESS,
    KIND_TAG,
    LEGACY_TABLES,
    OWNERS,
    POOL,
    KimeraDatabase,
)

REPAIR_JOB = "repair_job"
ACTIONS_SHOWN = 50
REPAIR_VERIFIED = "repaired_keys_agree"


class RepairConfig(dg.Config):
    """Which keys to re-sync; by default the keys the latest verification found."""

    keys: list[str] = Field(
        default_factory=list,
        description="Re-sync these keys; empty: the keys a recorded verification found.",
    )
    from_verification: int = Field(
        default=0,
        description="The keys recorded verification N found (1 = the first); 0: the latest.",
    )
    dry_run: bool = Field(default=False, description="Say what would be re-synced; write nothing.")
    actor: str = Field(default="dagster", description="Who repairs: recorded in the journal.")
    sample: int = Field(default=20, description="Offending keys kept by the verification after.")


def _materialization(report: RepairReport) -> dict[str, dg.MetadataValue]:
    rows = [[a.key, a.action, a.reason] for a in report.actions[:ACTIONS_SHOWN]]
    more = len(report.actions) - len(rows)
    rows += [["…", f"{more:,} more", ""]] if more else []
    return {
        REPAIR_REPORT: dg.MetadataValue.json(report.to_dict()),
        "summary": dg.MetadataValue.text(report.summary()),
        "repair_id": dg.MetadataValue.text(report.repair_id),
        "source": dg.MetadataValue.text(report.source),
        "authority": dg.MetadataValue.text(report.authority),
        "keys_repaired": dg.MetadataValue.int(len(report.stored) + len(report.deleted)),
        "actions": md_table(["key", "action", "why"], rows),
        "undo": dg.MetadataValue.text(
            "nothing to undo (dry run)"
            if report.dry_run
            else f"kimera repair --db <database> --undo {report.repair_id}"
        ),
    }


def _verified(report: RepairReport | None, source: str) -> dg.AssetCheckResult:
    """The repair's own check: every repaired key agrees in the follow-up verification."""
    judged: GateReport | None = None if report is None else report.verification
    if report is None:
        passed, text = True, f"nothing to repair: {source} found no key that differs"
    elif report.dry_run:
        passed, text = True, "dry run: nothing written, nothing to verify"
    else:
        passed, text = report.ok, report.summary()
    gates = [] if judged is None else [[g.name, g.summary] for g in judged.gates]
    return dg.AssetCheckResult(
        check_name=REPAIR_VERIFIED,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=text,
        metadata={
            "still_differing": dg.MetadataValue.json(
                [] if report is None else report.still_differing
            ),
            "refused": dg.MetadataValue.json({} if report is None else report.refused),
            "gates_after": md_table(["gate (incremental, after the repair)", "verdict"], gates),
        },
    )


@dg.asset(
    name="repair",
    deps=[IDENTITIES, *LEGACY_TABLES],
    group_name="rollout",
    kinds={"duckdb"},
    owners=OWNERS,
    pool=POOL,
    check_specs=[
        dg.AssetCheckSpec(
            REPAIR_VERIFIED,
            asset="repair",
            description=(
                "Every key the repair re-synced agrees in the incremental verification that "
                "follows it, and the write path refused none; the metadata lists the gates as "
                "that verification judged them."
            ),
        )
    ],
    description=(
        "The latest repair: the keys a verification found, re-synced from the store "
        "authoritative at the live stage (the legacy tables before read-new, identities from "
        "it on) through the dual-write path, journaled (undo: `kimera repair --undo ID`), "
        "then verified incrementally. Launch repair_job to run one."
    ),
)
def repair_asset(
    context: dg.AssetExecutionContext, config: RepairConfig, database: KimeraDatabase
) -> dg.MaterializeResult:
    with database.get_connection() as con:
        try:
            if config.keys:
                keys, source = list(config.keys), "keys given"
            else:
                keys, source = keys_from_verification(con, config.from_verification or None)
            report = (
                repair(
                    con,
                    keys,
                    actor=config.actor,
                    source=source,
                    dry_run=config.dry_run,
                    sample=config.sample,
                )
                if keys
                else None
            )
        except KimeraError as exc:  # no verification recorded, a refused undo: one line
            raise dg.Failure(description=str(exc)) from None
    summary = f"nothing to repair: {source}" if report is None else report.summary()
    context.log.info(summary)
    metadata = (
        {"summary": dg.MetadataValue.text(summary)} if report is None else _materialization(report)
    )
    return dg.MaterializeResult(metadata=metadata, check_results=[_verified(report, source)])


repair_job = dg.define_asset_job(
    name=REPAIR_JOB,
    selection=dg.AssetSelection.assets(repair_asset),
    description=(
        "Re-sync the keys the latest verification found from the authoritative store (legacy "
        "before read-new, identities from it on), journaled, then verify them (check "
        "repaired_keys_agree). Config repair.keys / repair.from_verification pick other keys; "
        "repair.dry_run writes nothing. Then launch consistency_check_job: an advance reads "
        "its verdict."
    ),
    executor_def=IN_PROCESS,
    tags={KIND_TAG: "repair"},
    metadata=GATES_METADATA,
)

defs = dg.Definitions(assets=[repair_asset], jobs=[repair_job])
