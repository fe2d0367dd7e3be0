"""Entropy of identities: distributions, effective tau, the daily series, the report, sanity.

``entropy_distribution`` publishes the core's ``EntropyStatistics`` whole
(``ENTROPY_STATISTICS``) beside a readable entry per identity type and statistic; the
metrics sensor pushes its snapshot from that report. ``entropy_sanity`` is one of the
rollout's gates: its spec and result are built here, and it is evaluated with the consistency
gates by the rollout step (``defs/consistency.py``).
"""

import base64

import dagster as dg

from kimera_core.report import (
    EntropySanity,
    daily_series,
    entropy_distributions,
    entropy_statistics,
    write_entropy_report,
)
from kimera_pipelines.metadata import ENTROPY_STATISTICS, md_table
from kimera_pipelines.resources import IDENTITIES, IN_PROCESS, OWNERS, POOL, KimeraDatabase

ENTROPY = {"group_name": "entropy", "kinds": {"duckdb"}, "owners": OWNERS, "pool": POOL}
ENTROPY_SANITY = "entropy_sanity"


@dg.asset(
    deps=[IDENTITIES],
    description=(
        "Entropy (bits) of identities by identity type: count, mean, p50/p90/p99 and the "
        "fixed histogram buckets (Prometheus le semantics)."
    ),
    **ENTROPY,
)
def entropy_distribution(database: KimeraDatabase) -> dg.MaterializeResult:
    with database.get_connection(read_only=True) as con:
        stats = entropy_statistics(con)
    metadata: dict[str, object] = {ENTROPY_STATISTICS: dg.MetadataValue.json(stats.to_dict())}
    for d in stats.distributions:
        metadata[f"{d.identity_type}/count"] = dg.MetadataValue.int(d.count)
        for stat, value in (("mean", d.mean), ("p50", d.p50), ("p90", d.p90), ("p99", d.p99)):
            metadata[f"{d.identity_type}/{stat}"] = dg.MetadataValue.float(float(value or 0.0))
        metadata[f"{d.identity_type}/histogram"] = dg.MetadataValue.json(d.histogram)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    deps=[IDENTITIES],
    description=(
        "Effective decay time constant tau_eff = tau_0 (1 + k H) of identities by type, in "
        "days: mean, p50, p99 (tau_0 = 14 days, k = 0.1)."
    ),
    **ENTROPY,
)
def effective_tau_distribution(database: KimeraDatabase) -> dg.MaterializeResult:
    with database.get_connection(read_only=True) as con:
        dists = entropy_distributions(con)
    metadata: dict[str, object] = {}
    for d in dists:
        for stat, value in (
            ("tau_mean_days", d.tau_mean_days),
            ("tau_p50_days", d.tau_p50_days),
            ("tau_p99_days", d.tau_p99_days),
        ):
            metadata[f"{d.identity_type}/{stat}"] = dg.MetadataValue.float(float(value or 0.0))
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    deps=[IDENTITIES],
    description=(
        "Daily time series of identities by updated_at (UTC day) and type: rows, mean and "
        "p90 entropy."
    ),
    **ENTROPY,
)
def entropy_daily_series(database: KimeraDatabase) -> dg.MaterializeResult:
    with database.get_connection(read_only=True) as con:
        series = daily_series(con)
    recent = [
        [r["day"], r["identity_type"], r["count"], f"{r['mean'] or 0:.3f}", f"{r['p90'] or 0:.3f}"]
        for r in series[-14:]
    ]
    return dg.MaterializeResult(
        metadata={
            "days": dg.MetadataValue.int(len({r["day"] for r in series})),
            "rows": dg.MetadataValue.int(sum(r["count"] for r in series)),
            "recent": md_table(["day", "type", "rows", "mean", "p90"], recent),
        }
    )


@dg.asset(
    deps=[entropy_distribution, effective_tau_distribution, entropy_daily_series],
    description=(
        "A readable entropy report: markdown tables and a histogram plot, attached to the "
        "materialization and written as entropy_report.md and entropy_histogram.png to the "
        "reports folder (reports/ beside the database file unless the database resource's "
        "reports_dir says otherwise)."
    ),
    **ENTROPY,
)
def entropy_distribution_report(database: KimeraDatabase) -> dg.MaterializeResult:
    with database.get_connection(read_only=True) as con:
        stats = entropy_statistics(con)
    files = write_entropy_report(stats, database.reports_path)
    image = base64.b64encode(files.image.read_bytes()).decode("ascii")
    body = files.text.replace(
        f"![entropy histogram]({files.image.name})",
        f"![entropy histogram](data:image/png;base64,{image})",
    )
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.md(body),
            "report_path": dg.MetadataValue.path(str(files.markdown.resolve())),
            "image_path": dg.MetadataValue.path(str(files.image.resolve())),
        }
    )


ENTROPY_SANITY_DESCRIPTION = (
    "Every entropy score in identities is finite, 0 <= H <= its bound (log2 of the "
    "distribution's members; times |weight| for a scar), and tau_eff >= tau_0. When it fails: "
    "the sample names the identities; re-migrate them (a pattern means a writer computes "
    "entropy wrongly). Repair does not apply: both stores would carry the same score."
)


def entropy_sanity_result(sanity: EntropySanity, asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    """The entropy_sanity check's result on ``asset_key`` from the core's ``EntropySanity``."""
    return dg.AssetCheckResult(
        check_name=ENTROPY_SANITY,
        asset_key=asset_key,
        passed=sanity.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"{sanity.checked:,} identities checked"
            + ("" if sanity.passed else f"; problems: {sanity.problems}")
        ),
        metadata={
            "checked": dg.MetadataValue.int(sanity.checked),
            "offending": dg.MetadataValue.int(sum(sanity.problems.values())),
            "counts": dg.MetadataValue.json(sanity.problems),
            "offending_keys_sample": dg.MetadataValue.json(sanity.sample),
        },
    )


entropy_report_job = dg.define_asset_job(
    name="entropy_report_job",
    selection=dg.AssetSelection.assets(
        entropy_distribution,
        effective_tau_distribution,
        entropy_daily_series,
        entropy_distribution_report,
    ),
    description="Compute the entropy statistics of identities and write the entropy report.",
    executor_def=IN_PROCESS,
)

entropy_report_daily = dg.ScheduleDefinition(
    name="entropy_report_daily",
    job=entropy_report_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Entropy statistics and report daily at 03:00 UTC. Running by default: safe, it reads "
        "identities and writes only the report files."
    ),
)

defs = dg.Definitions(
    assets=[
        entropy_distribution,
        effective_tau_distribution,
        entropy_daily_series,
        entropy_distribution_report,
    ],
    jobs=[entropy_report_job],
    schedules=[entropy_report_daily],
)
