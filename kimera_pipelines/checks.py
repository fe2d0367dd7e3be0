"""Asset checks on identities, and the evidence the rollout gates read from Dagster's event log.

The consistency checks run the verifier once (``kimera_core.gates.consistency_gates``) and
report one blocking check per gate; ``entropy_sanity`` checks every entropy score. Each
check's metadata carries its counts and a capped sample of offending keys.
"""

import dagster as dg

from kimera_core.gates import CONSISTENCY_GATES, GATE_DESCRIPTIONS, consistency_gates
from kimera_core.report import entropy_sanity as core_entropy_sanity
from kimera_core.rollout import CheckEvidence, Evidence
from kimera_pipelines.assets import POOL
from kimera_pipelines.resources import KimeraDatabase

IDENTITIES = dg.AssetKey("identities")
CONSISTENCY_JOB = "consistency_check_job"

ENTROPY_SANITY = "entropy_sanity"
# The checks a rollout advance requires, in this run and (past verified) in the consistency job.
REQUIRED_CHECKS: tuple[str, ...] = (*CONSISTENCY_GATES, ENTROPY_SANITY)
REQUIRED_CHECK_KEYS = [dg.AssetCheckKey(IDENTITIES, name) for name in REQUIRED_CHECKS]


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
    with database.connect() as con:
        gates, report = consistency_gates(con, incremental=config.incremental, sample=config.sample)
    context.log.info(f"verifier: {report['verdict']} ({report['mode']}) {report['reasons']}")
    for gate in gates:
        yield dg.AssetCheckResult(
            check_name=gate.name,
            asset_key=IDENTITIES,
            passed=gate.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=gate.summary,
            metadata={
                "summary": dg.MetadataValue.text(gate.summary),
                "counts": dg.MetadataValue.json(gate.counts),
                "offending_keys_sample": dg.MetadataValue.json(gate.sample),
                "verifier_mode": dg.MetadataValue.text(str(report["mode"])),
                "verifier_verdict": dg.MetadataValue.text(str(report["verdict"])),
            },
        )


@dg.asset_check(
    asset=IDENTITIES,
    name=ENTROPY_SANITY,
    blocking=True,
    pool=POOL,
    description=(
        "Every entropy score is finite, 0 <= H <= its bound (log2 of the distribution's "
        "members; times |weight| for a scar), and tau_eff >= tau_0."
    ),
)
def entropy_sanity(database: KimeraDatabase) -> dg.AssetCheckResult:
    with database.connect(read_only=True) as con:
        sanity = core_entropy_sanity(con)
    return dg.AssetCheckResult(
        passed=sanity.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"{sanity.checked:,} identities checked"
            + ("" if sanity.passed else f"; problems: {sanity.problems}")
        ),
        metadata={
            "checked": dg.MetadataValue.int(sanity.checked),
            "counts": dg.MetadataValue.json(sanity.problems),
            "offending_keys_sample": dg.MetadataValue.json(sanity.sample),
        },
    )


def _job_of(instance: dg.DagsterInstance, run_id: str, cache: dict[str, str | None]) -> str | None:
    if run_id not in cache:
        run = instance.get_run_by_id(run_id)
        cache[run_id] = run.job_name if run else None
    return cache[run_id]


def latest_check_evaluations(
    instance: dg.DagsterInstance,
    *,
    exclude_run: str | None = None,
    job_name: str | None = None,
    names: tuple[str, ...] = REQUIRED_CHECKS,
) -> list[CheckEvidence]:
    """The latest completed evaluation of each identities check, from Dagster's event log."""
    found: list[CheckEvidence] = []
    jobs: dict[str, str | None] = {}
    for name in names:
        records = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(IDENTITIES, name), limit=50
        )
        for record in records:
            if record.status.value not in ("SUCCEEDED", "FAILED"):
                continue
            if exclude_run and record.run_id == exclude_run:
                continue
            if job_name and _job_of(instance, record.run_id, jobs) != job_name:
                continue
            found.append(
                CheckEvidence(
                    name, record.status.value == "SUCCEEDED", record.run_id, record.create_timestamp
                )
            )
            break
    return found


def run_check_evaluations(instance: dg.DagsterInstance, run_id: str) -> list[CheckEvidence]:
    """The identities checks evaluated in one run."""
    found = []
    for name in REQUIRED_CHECKS:
        for record in instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(IDENTITIES, name), limit=50
        ):
            if record.run_id == run_id and record.status.value in ("SUCCEEDED", "FAILED"):
                found.append(
                    CheckEvidence(
                        name,
                        record.status.value == "SUCCEEDED",
                        run_id,
                        record.create_timestamp,
                    )
                )
                break
    return found


def rollout_evidence(instance: dg.DagsterInstance, run_id: str) -> Evidence:
    """What an advance in ``run_id`` rests on: this run's checks and the consistency job's."""
    return Evidence(
        run_id=run_id,
        required=REQUIRED_CHECKS,
        run_checks=tuple(run_check_evaluations(instance, run_id)),
        scheduled_checks=tuple(
            latest_check_evaluations(instance, exclude_run=run_id, job_name=CONSISTENCY_JOB)
        ),
    )
