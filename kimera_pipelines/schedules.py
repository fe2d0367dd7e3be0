"""Schedules. Each says in its description whether it runs by default and why."""

from __future__ import annotations

import dagster as dg

from kimera_pipelines.assets import bucket_partitions
from kimera_pipelines.jobs import (
    consistency_check_job,
    entropy_report_job,
    migration_job,
    observe_legacy_job,
)

RUNNING = dg.DefaultScheduleStatus.RUNNING
STOPPED = dg.DefaultScheduleStatus.STOPPED


def _consistency_config(incremental: bool) -> dict:
    return {"ops": {"consistency_checks": {"config": {"incremental": incremental}}}}


consistency_hourly = dg.ScheduleDefinition(
    name="consistency_hourly",
    job=consistency_check_job,
    cron_schedule="15 * * * *",
    run_config=_consistency_config(incremental=True),
    default_status=RUNNING,
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
    default_status=RUNNING,
    description=(
        "Full consistency checks daily at 02:30 UTC (catches writers that change rows without "
        "updated_at). Running by default: safe, read-only apart from the recorded verdict."
    ),
)

entropy_report_daily = dg.ScheduleDefinition(
    name="entropy_report_daily",
    job=entropy_report_job,
    cron_schedule="0 3 * * *",
    default_status=RUNNING,
    description=(
        "Entropy statistics and report daily at 03:00 UTC. Running by default: safe, it reads "
        "identities and writes only the report files."
    ),
)

observe_legacy_hourly = dg.ScheduleDefinition(
    name="observe_legacy_hourly",
    job=observe_legacy_job,
    cron_schedule="5 * * * *",
    default_status=RUNNING,
    description="Observe the legacy tables hourly. Running by default: safe, read-only.",
)


@dg.schedule(
    name="migration_nightly",
    job=migration_job,
    cron_schedule="0 1 * * *",
    default_status=STOPPED,
    description=(
        "Re-run the migration over every bucket nightly at 01:00 UTC (idempotent: picks up rows "
        "written to legacy only). Stopped by default: it writes identities; start it only in "
        "the dual-write stages, and stop it before write-new."
    ),
)
def migration_nightly(context: dg.ScheduleEvaluationContext):
    keys = bucket_partitions.get_partition_keys()
    return dg.RunRequest(
        run_key=None,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )


SCHEDULES = [
    consistency_hourly,
    consistency_daily_full,
    entropy_report_daily,
    observe_legacy_hourly,
    migration_nightly,
]
