"""The rollout's gates as checks of rollout_stage, their results, the consistency job and schedules.

The gates are the consistency gates of ``kimera_core.gates`` (``CONSISTENCY_GATES``) and
``entropy_sanity``: together ``REQUIRED_CHECKS``. They are checks of ``rollout_stage``, not of
``identities``, and they are evaluated by the rollout step itself (``defs/rollout.py``), in
the same step that moves the stage:

* any launch that materializes ``rollout_stage`` (the job page's Materialize button, the
  asset page, the launchpad, a schedule, a sensor, ``make run``) evaluates the gates before
  the core decides whether the stage moves: the evidence cannot be missing from the run;
* a migration (an ``identities`` backfill of all, some or one partition, from any page)
  never runs them: Dagster runs the checks of the assets it materializes, and these are not
  checks of ``identities``;
* ``consistency_check_job`` runs them alone (the checks-only subset of the rollout step),
  and so do its schedules.

Each check's metadata carries its ``Gate`` whole (``GATE``) beside readable entries: the
evidence as a markdown table (``gates.gate_markdown``: each offending key with both stores'
values per differing field, the authoritative store and the next step), the one-line
summary, the numbers of offending rows or keys and of explained exceptions (which the UI
plots over time), counts, a capped sample of offending keys, the verifier's mode and
verdict, and whether a repair applies (``repair_job``, ``kimera repair``) and from which
store.
"""

from collections.abc import Iterable, Set

import dagster as dg
from pydantic import Field

from kimera_core.gates import (
    CONSISTENCY_GATES,
    GATE_DESCRIPTIONS,
    Gate,
    GateReport,
    gate_markdown,
)
from kimera_core.report import EntropySanity
from kimera_core.rollout import CheckEvidence
from kimera_pipelines.defs.entropy import (
    ENTROPY_SANITY,
    ENTROPY_SANITY_DESCRIPTION,
    entropy_sanity_result,
)
from kimera_pipelines.metadata import GATE, GATE_REPORT, md_table
from kimera_pipelines.resources import (
    IDENTITIES,
    IN_PROCESS,
    KIND_TAG,
    LEGACY_TABLES,
    ROLLOUT_STAGE,
)

GATES_OP = "rollout"  # the step that evaluates the gates (and moves the stage)
CONSISTENCY_JOB = "consistency_check_job"
# Jobs whose gate evaluations are the across-runs evidence an advance past verified needs.
VERIFYING_JOBS: tuple[str, ...] = (CONSISTENCY_JOB,)
REQUIRED_CHECKS: tuple[str, ...] = (*CONSISTENCY_GATES, ENTROPY_SANITY)
REQUIRED_CHECK_KEYS = [dg.AssetCheckKey(ROLLOUT_STAGE, name) for name in REQUIRED_CHECKS]
REQUIRED_CHECK_SELECTION = dg.AssetSelection.checks(*REQUIRED_CHECK_KEYS)
# Gates whose offending items are keys a repair re-syncs (count_parity's gap is made of them).
REPAIRABLE: frozenset[str] = frozenset(CONSISTENCY_GATES)
REPAIR_HINT = (
    " Repair applies: launch repair_job (or `kimera repair --db PATH`) to re-sync the "
    "offending keys from the authoritative store (legacy before read-new, identities from it "
    "on), journaled so it can be undone."
)
STORE_NAMES = {"legacy": "the legacy tables", "identities": "identities"}


class ConsistencyConfig(dg.Config):
    """How the gates are evaluated."""

    incremental: bool = Field(
        default=False,
        description=(
            "Verify only the keys written since the last recorded verification (the hourly "
            "schedule); false: every key (the daily schedule, and an advance by default)."
        ),
    )
    sample: int = Field(
        default=20, description="Offending keys kept per gate in the check's metadata."
    )


def _description(name: str) -> str:
    return GATE_DESCRIPTIONS[name] + (REPAIR_HINT if name in REPAIRABLE else "")


GATE_CHECK_SPECS: list[dg.AssetCheckSpec] = [
    *(
        dg.AssetCheckSpec(
            name,
            asset=ROLLOUT_STAGE,
            description=_description(name),
            additional_deps=[IDENTITIES, *LEGACY_TABLES],
        )
        for name in CONSISTENCY_GATES
    ),
    dg.AssetCheckSpec(
        ENTROPY_SANITY,
        asset=ROLLOUT_STAGE,
        description=ENTROPY_SANITY_DESCRIPTION,
        additional_deps=[IDENTITIES],
    ),
]


# What gates an advance, shown on the job pages (Info > Metadata) of the jobs that judge them.
GATES_METADATA = {
    "gates": md_table(
        ["gate (a check of rollout_stage)", "passes when"],
        [
            *((name, GATE_DESCRIPTIONS[name]) for name in CONSISTENCY_GATES),
            (ENTROPY_SANITY, ENTROPY_SANITY_DESCRIPTION.split(". When")[0] + "."),
            ("past verified", "the latest consistency_check_job gates passed too"),
            ("write-new, legacy-retired", "the stage before soaked (KIMERA_ROLLOUT_SOAK_SECONDS)"),
        ],
    )
}


def _repair_entry(gate: Gate) -> dg.MetadataValue:
    if gate.passed:
        return dg.MetadataValue.text("not needed: the gate passed")
    if gate.name not in REPAIRABLE:
        return dg.MetadataValue.text("does not apply to this gate")
    return dg.MetadataValue.md(
        f"**Applies.** Launch `repair_job` (Materialize on its page) or run "
        f"`kimera repair --db PATH`: the offending keys are re-synced from "
        f"{STORE_NAMES[gate.authoritative]}, the authoritative store at this stage, through "
        "the dual-write path, journaled (`kimera repair --undo ID` puts them back), then "
        "verified."
    )


def gate_result(gate: Gate, judged: GateReport) -> dg.AssetCheckResult:
    """One gate's check result: its ``Gate`` whole beside the entries an operator reads."""
    verification = judged.verification
    return dg.AssetCheckResult(
        check_name=gate.name,
        asset_key=ROLLOUT_STAGE,
        passed=gate.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=gate.summary,
        metadata={
            GATE: dg.MetadataValue.json(gate.to_dict()),
            "evidence": dg.MetadataValue.md(gate_markdown(gate)),  # both stores' values
            "summary": dg.MetadataValue.text(gate.summary),
            "offending": dg.MetadataValue.int(gate.offending),  # plotted by the UI
            "exceptions": dg.MetadataValue.int(gate.exceptions),
            "counts": dg.MetadataValue.json(gate.counts),
            "offending_keys_sample": dg.MetadataValue.json(gate.sample),
            "authoritative": dg.MetadataValue.text(gate.authoritative),
            "verifier_mode": dg.MetadataValue.text(verification.mode),
            "verifier_verdict": dg.MetadataValue.text(verification.verdict),
            "repair": _repair_entry(gate),
        },
    )


def gate_results(
    judged: GateReport, sanity: EntropySanity, selected: Set[dg.AssetCheckKey]
) -> Iterable[dg.AssetCheckResult | dg.AssetObservation]:
    """The whole ``GateReport`` once (an observation of rollout_stage, the verifier's report
    included), then the selected gates' check results (a step reports only the checks it was
    given)."""
    yield dg.AssetObservation(
        asset_key=ROLLOUT_STAGE, metadata={GATE_REPORT: dg.MetadataValue.json(judged.to_dict())}
    )
    for gate in judged.gates:
        if dg.AssetCheckKey(ROLLOUT_STAGE, gate.name) in selected:
            yield gate_result(gate, judged)
    if dg.AssetCheckKey(ROLLOUT_STAGE, ENTROPY_SANITY) in selected:
        yield entropy_sanity_result(sanity, ROLLOUT_STAGE)


def run_evidence(
    judged: GateReport, sanity: EntropySanity, run_id: str, at: float
) -> tuple[CheckEvidence, ...]:
    """Every gate as evaluated in this step: the evidence the core's advance reads."""
    return (
        *(CheckEvidence(g.name, g.passed, run_id, at) for g in judged.gates),
        CheckEvidence(ENTROPY_SANITY, sanity.passed, run_id, at),
    )


def failed_gates(judged: GateReport, sanity: EntropySanity) -> list[str]:
    """The names of the gates that failed, in ``REQUIRED_CHECKS`` order."""
    failed = [g.name for g in judged.gates if not g.passed]
    return failed + ([] if sanity.passed else [ENTROPY_SANITY])


consistency_check_job = dg.define_asset_job(
    name=CONSISTENCY_JOB,
    selection=REQUIRED_CHECK_SELECTION,
    description=(
        "Evaluate the rollout's gates (the consistency checks and entropy_sanity, checks of "
        "rollout_stage) alone: nothing is materialized and the stage does not move. The run "
        "fails when a gate fails. Config rollout.incremental: only keys written since the "
        "last verification."
    ),
    executor_def=IN_PROCESS,
    tags={KIND_TAG: "consistency"},
    metadata=GATES_METADATA,
)


def _consistency_config(incremental: bool) -> dict:
    return {"ops": {GATES_OP: {"config": {"incremental": incremental}}}}


consistency_hourly = dg.ScheduleDefinition(
    name="consistency_hourly",
    job=consistency_check_job,
    cron_schedule="15 * * * *",
    run_config=_consistency_config(incremental=True),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Incremental consistency checks every hour (keys written since the last verification). "
        "Running by default: safe, it only reads the stores and records the verdict; a failure "
        "while reads come from identities triggers the automatic read rollback."
    ),
)

consistency_daily_full = dg.ScheduleDefinition(
    name="consistency_daily_full",
    job=consistency_check_job,
    cron_schedule="30 2 * * *",
    run_config=_consistency_config(incremental=False),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Full consistency checks daily at 02:30 UTC (catches writers that change rows without "
        "updated_at). Running by default: safe, read-only apart from the recorded verdict."
    ),
)

defs = dg.Definitions(
    jobs=[consistency_check_job],
    schedules=[consistency_hourly, consistency_daily_full],
)
