"""The consistency gates as blocking checks on identities, their job and their schedules.

``consistency_checks`` runs the verifier once (``kimera_core.gates.judge_gates``) and reports
one blocking check per gate. Each check's metadata carries its ``Gate`` whole (``GATE``) beside
readable entries: the one-line summary, the number of offending rows or keys (which the UI
plots over time), counts, a capped sample of offending keys and the verifier's mode and
verdict. ``consistency_check_job`` runs them with ``entropy_sanity``:
together they are ``REQUIRED_CHECKS``, what a rollout advance requires.
"""

import dagster as dg

from kimera_core.gates import CONSISTENCY_GATES, GATE_DESCRIPTIONS, judge_gates
from kimera_pipelines.defs.entropy import ENTROPY_SANITY
from kimera_pipelines.metadata import GATE
from kimera_pipelines.resources import IDENTITIES, IN_PROCESS, KIND_TAG, POOL, KimeraDatabase

CONSISTENCY_JOB = "consistency_check_job"
# The checks a rollout advance requires, in its own run and (past verified) in this job.
REQUIRED_CHECKS: tuple[str, ...] = (*CONSISTENCY_GATES, ENTROPY_SANITY)
REQUIRED_CHECK_KEYS = [dg.AssetCheckKey(IDENTITIES, name) for name in REQUIRED_CHECKS]
REQUIRED_CHECK_SELECTION = dg.AssetSelection.checks(*REQUIRED_CHECK_KEYS)


class ConsistencyConfig(dg.Config):
    """incremental: only keys written since the last recorded verification (hourly)."""

    incremental: bool = False
    sample: int = 20


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(name, asset=IDENTITIES, blocking=True, description=text)
        for name, text in GATE_DESCRIPTIONS.items()
    ],
    name="consistency_checks",
    description="Run the consistency verifier once and judge each rollout gate.",
    pool=POOL,
)
def consistency_checks(
    context: dg.AssetCheckExecutionContext, config: ConsistencyConfig, database: KimeraDatabase
):
    with database.get_connection() as con:
        judged = judge_gates(con, incremental=config.incremental, sample=config.sample)
    verification = judged.verification
    verdict = "consistent" if verification.consistent else "inconsistent"
    context.log.info(f"verifier: {verdict} ({verification.mode}) {verification.reasons}")
    for gate in judged.gates:
        yield dg.AssetCheckResult(
            check_name=gate.name,
            asset_key=IDENTITIES,
            passed=gate.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=gate.summary,
            metadata={
                GATE: dg.MetadataValue.json(gate.to_dict()),
                "summary": dg.MetadataValue.text(gate.summary),
                "offending": dg.MetadataValue.int(gate.offending),  # plotted by the UI
                "counts": dg.MetadataValue.json(gate.counts),
                "offending_keys_sample": dg.MetadataValue.json(gate.sample),
                "verifier_mode": dg.MetadataValue.text(verification.mode),
                "verifier_verdict": dg.MetadataValue.text(verdict),
            },
        )


consistency_check_job = dg.define_asset_job(
    name=CONSISTENCY_JOB,
    selection=REQUIRED_CHECK_SELECTION,
    description=(
        "Run the blocking consistency checks and the entropy sanity check on identities, alone "
        "(no materialization). Config consistency_checks.incremental: only keys written since "
        "the last verification."
    ),
    executor_def=IN_PROCESS,
    tags={KIND_TAG: "consistency"},
)


def _consistency_config(incremental: bool) -> dict:
    return {"ops": {"consistency_checks": {"config": {"incremental": incremental}}}}


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
    asset_checks=[consistency_checks],
    jobs=[consistency_check_job],
    schedules=[consistency_hourly, consistency_daily_full],
)
