"""Jobs. ``kimera_main_job`` is what ``make run`` executes."""

from __future__ import annotations

import dagster as dg

from kimera_pipelines.assets import identities, legacy_summary

kimera_main_job = dg.define_asset_job(
    name="kimera_main_job",
    selection=[legacy_summary, identities],
    description=(
        "Summarise the legacy Kimera tables and their entropy distribution, then migrate them "
        "into identities."
    ),
    # DuckDB work stays in one process per run.
    executor_def=dg.in_process_executor,
)
