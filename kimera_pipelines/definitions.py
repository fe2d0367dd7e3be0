"""The Dagster code location: ``dagster dev`` loads ``defs`` from here (workspace.yaml)."""

from __future__ import annotations

import dagster as dg

from kimera_pipelines.assets import identities, legacy_summary
from kimera_pipelines.jobs import kimera_main_job
from kimera_pipelines.resources import database_from_env

defs = dg.Definitions(
    assets=[legacy_summary, identities],
    jobs=[kimera_main_job],
    resources={"database": database_from_env()},
)
