"""Repair from the UI: the ``repair`` asset, what its materialization shows, and ``repair_job``.

``repair`` is materialized by the rollout step (``defs/rollout.py``), the same step that
evaluates the gates, so ``repair_job`` (Materialize on its page, no config needed) re-syncs
the keys the latest verification found (``kimera_core.repair``: from the store authoritative
at the live stage, through the dual-write path, journaled) and then reports the gates, judged
incrementally, on the checks of ``rollout_stage``: the check pages turn green in the same run
when the repair worked. Those evaluations count as consistency evidence for an advance past
``verified``, as the consistency job's do. The materialization carries the ``RepairReport``
whole (``REPAIR_REPORT``) beside a table of what was done per key and the undo command.
"""

from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from kimera_core.gates import judge_gates
from kimera_core.repair import RepairReport, keys_from_verification, repair
from kimera_core.report import entropy_sanity
from kimera_pipelines.defs.consistency import (
    REPAIR_JOB,
    REQUIRED_CHECK_SELECTION,
    ConsistencyConfig,
    gate_results,
)
from kimera_pipelines.metadata import REPAIR_REPORT, md_table
from kimera_pipelines.resources import (
    IDENTITIES,
    IN_PROCESS,
    KIND_TAG,
    LEGACY_TABLES,
    OWNERS,
    REPAIR,
    KimeraDatabase,
)

ACTIONS_SHOWN = 50

REPAIR_SPEC = dg.AssetSpec(
    REPAIR,
    deps=[IDENTITIES, *LEGACY_TABLES],
    group_name="rollout",
    kinds={"duckdb"},
    owners=OWNERS,
    skippable=True,
    description=(
        "The latest repair: the keys a verification found, re-synced from the store "
        "authoritative at the live stage (the legacy tables before read-new, identities from "
        "it on) through the dual-write path, journaled (undo: `kimera repair --undo ID`), "
        "then verified incrementally. Launch repair_job to run one."
    ),
)


class RepairConfig(dg.Config):
    """Which keys repair_job re-syncs (the other jobs ignore these fields)."""

    keys: list[str] = Field(
        default_factory=list,
        description="repair_job: re-sync these keys; empty: the keys a verification found.",
    )
    from_verification: int = Field(
        default=0,
        description=(
            "repair_job: the keys recorded verification N found (1 = the first); 0: the latest."
        ),
    )
    dry_run: bool = Field(
        default=False, description="repair_job: say what would be re-synced; write nothing."
    )


def _materialization(report: RepairReport) -> dg.MaterializeResult:
    rows = [[a.key, a.action, a.reason] for a in report.actions[:ACTIONS_SHOWN]]
    more = len(report.actions) - len(rows)
    return dg.MaterializeResult(
        asset_key=REPAIR,
        metadata={
            REPAIR_REPORT: dg.MetadataValue.json(report.to_dict()),
            "summary": dg.MetadataValue.text(report.summary()),
            "repair_id": dg.MetadataValue.text(report.repair_id),
            "source": dg.MetadataValue.text(report.source),
            "authority": dg.MetadataValue.text(report.authority),
            "keys_repaired": dg.MetadataValue.int(len(report.stored) + len(report.deleted)),
            "refused": dg.MetadataValue.json(report.refused),
            "still_differing": dg.MetadataValue.json(report.still_differing),
            "actions": md_table(
                ["key", "action", "why"], rows + ([["…", f"{more:,} more", ""]] if more else [])
            ),
            "undo": dg.MetadataValue.text(
                "nothing to undo (dry run)"
                if report.dry_run
                else f"kimera repair --db <database> --undo {report.repair_id}"
            ),
        },
    )


def repair_step(
    context: dg.AssetExecutionContext,
    config: RepairConfig,
    consistency: ConsistencyConfig,
    database: KimeraDatabase,
    actor: str,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Re-sync, then report the gates the repair's incremental verification judged."""
    checks = context.selected_asset_check_keys
    with database.get_connection() as con:
        if config.keys:
            keys, source = list(config.keys), "keys given"
        else:
            keys, source = keys_from_verification(con, config.from_verification or None)
        if keys:
            report = repair(
                con,
                keys,
                actor=actor,
                source=source,
                dry_run=config.dry_run,
                sample=consistency.sample,
            )
            judged = report.verification
            context.log.info(f"repair {report.repair_id}: {report.summary()}")
        else:
            report, judged = None, None
            context.log.info(f"nothing to repair: {source} found no key that differs")
        if checks and judged is None:
            judged = judge_gates(
                con, incremental=True, sample=consistency.sample, record=not config.dry_run
            )
        sanity = entropy_sanity(con, consistency.sample) if checks else None
    if report is not None:
        yield _materialization(report)
    else:
        yield dg.MaterializeResult(
            asset_key=REPAIR,
            metadata={"summary": dg.MetadataValue.text(f"nothing to repair: {source}")},
        )
    if checks:
        yield from gate_results(judged, sanity, checks)


repair_job = dg.define_asset_job(
    name=REPAIR_JOB,
    selection=dg.AssetSelection.assets(REPAIR) | REQUIRED_CHECK_SELECTION,
    description=(
        "Re-sync the keys the latest verification found from the authoritative store (legacy "
        "before read-new, identities from it on), journaled, then judge the gates "
        "incrementally (the checks of rollout_stage). Config rollout.keys / "
        "rollout.from_verification pick other keys; rollout.dry_run writes nothing."
    ),
    executor_def=IN_PROCESS,
    tags={KIND_TAG: "repair"},
)

defs = dg.Definitions(jobs=[repair_job])
