"""Pushgateway snapshots, each built from one of the core's typed reports.

Batch work (a migration run, a verification, the entropy statistics, a rollout move) does
not live in a process Prometheus can scrape, so the Dagster sensors push it as gauges to a
Pushgateway (``kimera_pipelines.defs.observability``). Every snapshot here is built from the
report type the core returns, never from metadata keys guessed back out of text:

=====================  ==========================================  ======================
group (``job`` label)  built from                                  method
=====================  ==========================================  ======================
``kimera_dagster``     ``JobRuns`` (Dagster's run records of a job) PUT, per ``dagster_job``
``kimera_entropy``     ``report.EntropyStatistics``                 PUT
``kimera_migration``   ``MigrationProgress`` (a ``MigrationReport`` PUT
                       and the run's partition progress)
``kimera_consistency`` the ``gates.Gate`` results of one run        POST (keeps last success)
``kimera_rollout``     the stage of the last rollout run            PUT
``kimera_observability`` the periodic sensor's heartbeat           PUT
=====================  ==========================================  ======================

A ``Snapshot`` is a prometheus-client ``Collector`` over families built once, with the group,
grouping key and method it is pushed with. A push replaces the whole group on the gateway
(PUT) or the families pushed (POST), so each snapshot holds exactly its group's families.
Labels stay bounded (outcomes, identity types, gate names, stages, Dagster job names).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kimera_core.entropy import effective_tau
from kimera_core.gates import Gate
from kimera_core.metrics.scraped import ENTROPY_BUCKETS
from kimera_core.migration import MigrationReport
from kimera_core.report import EntropyStatistics
from kimera_core.rollout import STAGES

PUSHGATEWAY_ENV = "KIMERA_PUSHGATEWAY"
DEFAULT_PUSHGATEWAY = "127.0.0.1:9091"

# Pushgateway groups (the ``job`` label with honor_labels: true).
PUSH_JOB_DAGSTER = "kimera_dagster"  # grouping key {"dagster_job": <job name>}
PUSH_JOB_ENTROPY = "kimera_entropy"
PUSH_JOB_MIGRATION = "kimera_migration"
PUSH_JOB_CONSISTENCY = "kimera_consistency"
PUSH_JOB_HEARTBEAT = "kimera_observability"
PUSH_JOB_ROLLOUT = "kimera_rollout"

VERDICTS: tuple[str, ...] = ("consistent", "inconsistent")
RUN_OUTCOMES: tuple[str, ...] = ("success", "failure", "canceled")
MIGRATION_OUTCOMES: tuple[str, ...] = ("inserted", "updated", "unchanged", "kept", "quarantined")
SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True, eq=False)  # eq=False: a registry keys its collectors by identity
class Snapshot(Collector):
    """One Pushgateway group's families, and how to push them (PUT replaces the group)."""

    job: str
    families: tuple[Metric, ...]
    grouping_key: Mapping[str, str] = field(default_factory=dict)
    replace: bool = True

    def collect(self) -> Iterable[Metric]:
        return iter(self.families)

    def registry(self) -> CollectorRegistry:
        """A registry holding only this snapshot (for ``generate_latest`` or a plain push)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return registry


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


# --- kimera_dagster ----------------------------------------------------------------------
@dataclass(frozen=True)
class JobRuns:
    """A Dagster job's finished runs by outcome and its last runs (Unix seconds)."""

    runs: Mapping[str, int]
    last_outcome: str | None = None
    last_duration_seconds: float | None = None
    last_success_timestamp: float | None = None
    last_finished_timestamp: float | None = None


def job_snapshot(job_name: str, job: JobRuns) -> Snapshot:
    """Per-Dagster-job gauges, grouped by ``{dagster_job: job_name}``."""
    runs = CounterMetricFamily(
        "kimera_dagster_job_runs",
        "Finished runs of the Dagster job by outcome, from the run storage.",
        labels=["outcome"],
    )
    last = GaugeMetricFamily(
        "kimera_dagster_job_last_run_outcome",
        "1 for the outcome of the job's last finished run, 0 for the others.",
        labels=["outcome"],
    )
    for outcome in RUN_OUTCOMES:
        runs.add_metric([outcome], float(job.runs.get(outcome, 0)))
        last.add_metric([outcome], 1.0 if outcome == job.last_outcome else 0.0)
    families: list[Metric] = [runs, last]
    for value, name, doc in (
        (
            job.last_duration_seconds,
            "kimera_dagster_job_last_run_duration_seconds",
            "Wall-clock duration of the job's last finished run.",
        ),
        (
            job.last_success_timestamp,
            "kimera_dagster_job_last_success_timestamp_seconds",
            "Unix time at which the job's last successful run ended.",
        ),
        (
            job.last_finished_timestamp,
            "kimera_dagster_job_last_run_timestamp_seconds",
            "Unix time at which the job's last finished run ended.",
        ),
    ):
        if value is not None:
            families.append(_gauge(name, doc, value))
    return Snapshot(PUSH_JOB_DAGSTER, tuple(families), {"dagster_job": job_name})


# --- kimera_entropy ----------------------------------------------------------------------
def entropy_snapshot(stats: EntropyStatistics) -> Snapshot:
    """Per identity type: a histogram in bits, percentiles, tau at them, unknown entropies.

    The histogram is cumulative over ``ENTROPY_BUCKETS`` (the distribution's own buckets are
    not cumulative); its ``_sum`` is mean x rows of known entropy. Tau at a percentile is the
    statistics' own where it has one (p50, p99), else tau_0 (1 + k H), monotone in H.
    """
    hist = HistogramMetricFamily(
        "kimera_entropy_snapshot",
        "Entropy of the stored identities at the last snapshot, in bits (cumulative buckets).",
        labels=["identity_type"],
    )
    quantiles = GaugeMetricFamily(
        "kimera_entropy_snapshot_percentile",
        "Entropy percentile (50, 90, 99) of the stored identities at the last snapshot, in bits.",
        labels=["identity_type", "percentile"],
    )
    taus = GaugeMetricFamily(
        "kimera_effective_tau_snapshot_percentile_seconds",
        "Effective tau tau_0 * (1 + k * H) at the last snapshot's entropy percentile.",
        labels=["identity_type", "percentile"],
    )
    unknown = GaugeMetricFamily(
        "kimera_entropy_snapshot_unknown_identities",
        "Identities whose entropy is unknown (a scar without a finite weight).",
        labels=["identity_type"],
    )
    for dist in sorted(stats.distributions, key=lambda d: d.identity_type):
        kind = dist.identity_type
        if dist.histogram:
            buckets, running = [], 0.0
            for bound in ENTROPY_BUCKETS:
                key = "+Inf" if math.isinf(bound) else f"{bound:g}"
                running += float(dist.histogram.get(key, 0))
                buckets.append((key, running))
            total = float(dist.mean) * running if dist.mean is not None else 0.0
            hist.add_metric([kind], buckets, total)
        for label, value, tau_days in (
            ("50", dist.p50, dist.tau_p50_days),
            ("90", dist.p90, None),
            ("99", dist.p99, dist.tau_p99_days),
        ):
            if value is None:
                continue
            quantiles.add_metric([kind, label], float(value))
            tau = (
                float(tau_days) * SECONDS_PER_DAY if tau_days is not None else effective_tau(value)
            )
            taus.add_metric([kind, label], tau)
        unknown.add_metric([kind], float(dist.unknown))
    stamp = _gauge(
        "kimera_entropy_snapshot_timestamp_seconds",
        "Unix time the entropy statistics were computed.",
        stats.computed_at,
    )
    return Snapshot(PUSH_JOB_ENTROPY, (hist, quantiles, taus, unknown, stamp))


# --- kimera_migration --------------------------------------------------------------------
@dataclass(frozen=True)
class MigrationProgress:
    """The latest migration run: its report once finished, steps done of planned.

    ``report`` is None while the run is still going; ``progress_at`` is the Unix time of its
    latest finished step (or of the finished run). A step migrates one table (geoids or
    scars) of one partition (hash bucket): a run over N partitions has 2 N steps.
    """

    report: MigrationReport | None
    steps_done: int | None = None
    steps_planned: int | None = None
    running: bool = False
    progress_at: float | None = None


def migration_snapshot(progress: MigrationProgress, at: float) -> Snapshot:
    """Rows of the latest run by outcome, rows read, steps done / planned, running."""
    families: list[Metric] = []
    report = progress.report
    if report is not None:
        rows = GaugeMetricFamily(
            "kimera_migration_rows",
            "Rows handled by the latest migration run, by outcome.",
            labels=["outcome"],
        )
        by_outcome = report.counts.to_dict()
        for outcome in MIGRATION_OUTCOMES:
            rows.add_metric([outcome], float(by_outcome[outcome]))
        families.append(rows)
        families.append(
            _gauge(
                "kimera_migration_rows_read",
                "Legacy rows read by the latest migration run.",
                report.counts.read,
            )
        )
    for value, name, doc in (
        (
            progress.steps_done,
            "kimera_migration_steps_done",
            "Steps (one table of one partition) the latest migration run has finished.",
        ),
        (
            progress.steps_planned,
            "kimera_migration_steps_planned",
            "Steps the latest migration run plans: 2 per partition (done / planned is its progress).",
        ),
        (
            progress.progress_at,
            "kimera_migration_last_progress_timestamp_seconds",
            "Unix time of the latest migration progress event (a step or the finish).",
        ),
    ):
        if value is not None:
            families.append(_gauge(name, doc, value))
    families.append(
        _gauge(
            "kimera_migration_running",
            "1 while a migration run is in progress, else 0.",
            1.0 if progress.running else 0.0,
        )
    )
    families.append(
        _gauge(
            "kimera_migration_snapshot_timestamp_seconds",
            "Unix time this migration snapshot was pushed.",
            at,
        )
    )
    return Snapshot(PUSH_JOB_MIGRATION, tuple(families))


# --- kimera_consistency ------------------------------------------------------------------
def finding_count(gate: Gate) -> int:
    """A gate's findings: 0 when it passed, else its offending rows/keys (at least 1).

    A failing gate never reads as clean, even one whose reason is not a count of rows.
    """
    return 0 if gate.passed else max(int(gate.offending), 1)


def consistency_snapshot(gates: Sequence[Gate], checked_at: float, at: float) -> Snapshot:
    """Findings per gate, the verdict (consistent when every gate passed) and its times.

    Pushed with POST: an inconsistent verdict leaves the last success time on the gateway.
    """
    findings = GaugeMetricFamily(
        "kimera_consistency_findings",
        "Offending rows or keys of each consistency gate at the latest verification, "
        "0 when it passed.",
        labels=["kind"],
    )
    for gate in sorted(gates, key=lambda g: g.name):
        findings.add_metric([gate.name], float(finding_count(gate)))
    consistent = all(gate.passed for gate in gates)
    verdict = GaugeMetricFamily(
        "kimera_consistency_verdict",
        "1 for the verdict of the latest consistency verification, 0 for the other.",
        labels=["verdict"],
    )
    for name in VERDICTS:
        verdict.add_metric([name], 1.0 if (name == "consistent") == consistent else 0.0)
    families: list[Metric] = [
        findings,
        verdict,
        _gauge(
            "kimera_consistency_last_check_timestamp_seconds",
            "Unix time of the latest consistency verification.",
            checked_at,
        ),
    ]
    if consistent:
        families.append(
            _gauge(
                "kimera_consistency_last_success_timestamp_seconds",
                "Unix time of the latest verification whose verdict was consistent.",
                checked_at,
            )
        )
    families.append(
        _gauge(
            "kimera_consistency_snapshot_timestamp_seconds",
            "Unix time this consistency snapshot was pushed.",
            at,
        )
    )
    return Snapshot(PUSH_JOB_CONSISTENCY, tuple(families), replace=False)


# --- kimera_rollout, kimera_observability ------------------------------------------------
def rollout_snapshot(stage: str, at: float, auto_rollback_at: float | None = None) -> Snapshot:
    """The stage recorded by the last rollout run (same names as the application's gauges).

    ``auto_rollback_at``: Unix time of the latest automatic read rollback, if any (the
    dashboard annotates its changes).
    """
    family = GaugeMetricFamily(
        "kimera_rollout_stage",
        "1 for the live rollout stage, 0 for the others.",
        labels=["stage"],
    )
    for name in STAGES:
        family.add_metric([name], 1.0 if name == stage else 0.0)
    number = _gauge(
        "kimera_rollout_stage_number",
        "Position of the live rollout stage: 0 legacy-only ... 6 legacy-retired.",
        STAGES.index(stage),
    )
    stamp = _gauge(
        "kimera_rollout_snapshot_timestamp_seconds",
        "Unix time of the rollout run the stage was read from.",
        at,
    )
    families: list[Metric] = [family, number, stamp]
    if auto_rollback_at is not None:
        families.append(
            _gauge(
                "kimera_rollout_last_auto_rollback_timestamp_seconds",
                "Unix time the latest automatic read rollback (sensor auto_rollback_reads) ended.",
                auto_rollback_at,
            )
        )
    return Snapshot(PUSH_JOB_ROLLOUT, tuple(families))


def heartbeat_snapshot(push_failures: int, at: float) -> Snapshot:
    """The periodic sensor's own group: push failures it has seen, and when it last ran."""
    failures = CounterMetricFamily(
        "kimera_pushgateway_push_failures",
        "Pushes to the Pushgateway by the Dagster sensors that failed (counted by the "
        "periodic sensor and pushed once the gateway takes pushes again).",
        value=float(push_failures),
    )
    stamp = _gauge(
        "kimera_observability_last_push_timestamp_seconds",
        "Unix time of the periodic metrics sensor's last push.",
        at,
    )
    return Snapshot(PUSH_JOB_HEARTBEAT, (failures, stamp))


def pushgateway_address() -> str:
    """The Pushgateway named by KIMERA_PUSHGATEWAY, else 127.0.0.1:9091."""
    return os.environ.get(PUSHGATEWAY_ENV) or DEFAULT_PUSHGATEWAY
