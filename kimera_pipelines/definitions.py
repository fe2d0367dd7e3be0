"""The Dagster code location: ``dagster dev`` loads ``defs`` from here (workspace.yaml)."""

from __future__ import annotations

import dagster as dg

from kimera_pipelines import assets, extensions
from kimera_pipelines.checks import consistency_checks, entropy_sanity
from kimera_pipelines.jobs import (
    advance_rollout_job,
    consistency_check_job,
    entropy_report_job,
    migration_job,
    observe_legacy_job,
    rollback_migration_job,
    rollback_reads_job,
    step_back_rollout_job,
)
from kimera_pipelines.resources import database_from_env
from kimera_pipelines.schedules import SCHEDULES
from kimera_pipelines.sensors import SENSORS

defs = dg.Definitions(
    assets=[
        assets.legacy_tables,
        assets.identities,
        assets.migration_quarantine,
        assets.entropy_distribution,
        assets.effective_tau_distribution,
        assets.entropy_daily_series,
        assets.entropy_distribution_report,
        assets.database_backup,
        assets.rollout_stage,
    ],
    asset_checks=[consistency_checks, entropy_sanity],
    jobs=[
        migration_job,
        observe_legacy_job,
        consistency_check_job,
        entropy_report_job,
        advance_rollout_job,
        step_back_rollout_job,
        rollback_reads_job,
        rollback_migration_job,
    ],
    schedules=SCHEDULES,
    # Observability (kimera_pipelines/observability.py) adds its sensors via extensions.
    sensors=[*SENSORS, *extensions.EXTRA_SENSORS],
    resources={"database": database_from_env()},
)
