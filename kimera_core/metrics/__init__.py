"""Prometheus metric definitions: the write path's scraped metrics and the pushed snapshots.

Two kinds of metric live here (docs/observability.md lists every one):

* **Scraped** from the application's ``/metrics`` endpoint (``kimera metrics serve``,
  ``kimera workload``): latency histograms and counters that need ``rate()`` and
  ``histogram_quantile()``. They are registered on ``REGISTRY``, a dedicated
  ``CollectorRegistry`` rather than prometheus-client's global one, so the endpoint shows
  exactly Kimera's metrics and tests can read them without other libraries' collectors.
* **Pushed** to a Pushgateway by the Dagster sensors (``kimera_pipelines.observability``):
  per-job gauges and the entropy, migration and consistency snapshots. Each push builds a
  fresh registry from plain dicts (``*_registry`` functions below), because a push replaces
  the whole group on the gateway.

Labels are bounded: operation names, identity types, write modes, stores, stage names,
finding kinds and Dagster job names. Identity ids, run ids and free text never become
labels; they go to the structured logs (``kimera.entropy``, ``kimera.storage``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import push_to_gateway, pushadd_to_gateway
from prometheus_client.registry import Collector

from kimera_core.entropy import ENTROPY_BUCKETS_BITS, TAU_0_SECONDS, TAU_K, effective_tau
from kimera_core.rollout import STAGES

PUSHGATEWAY_ENV = "KIMERA_PUSHGATEWAY"
DEFAULT_PUSHGATEWAY = "127.0.0.1:9091"
DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 9464

# Pushgateway groups (the ``job`` label with honor_labels: true).
PUSH_JOB_DAGSTER = "kimera_dagster"  # grouping key {"dagster_job": <job name>}
PUSH_JOB_ENTROPY = "kimera_entropy"
PUSH_JOB_MIGRATION = "kimera_migration"
PUSH_JOB_CONSISTENCY = "kimera_consistency"
PUSH_JOB_HEARTBEAT = "kimera_observability"
PUSH_JOB_ROLLOUT = "kimera_rollout"

# --- bucket edges -----------------------------------------------------------------------
# Entropy in bits: the edges of kimera_core.entropy (0 = no information, 1 = two equal
# terms, 2 = four, ...), so a dashboard bar and an alert threshold fall on an edge.
ENTROPY_BUCKETS: tuple[float, ...] = (*ENTROPY_BUCKETS_BITS, math.inf)
# Effective tau in seconds at exactly those entropies: tau is monotone in H, so the tau
# histogram's buckets are the entropy buckets mapped through tau_0 * (1 + k * H).
TAU_BUCKETS_SECONDS: tuple[float, ...] = (
    *(effective_tau(b) for b in ENTROPY_BUCKETS_BITS),
    math.inf,
)
# Latency in seconds; 0.2 is an edge because the p99 write alert looks there.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.5,
    5.0,
    math.inf,
)

IDENTITY_TYPES: tuple[str, ...] = ("geoid", "scar")
WRITE_MODES: tuple[str, ...] = ("legacy", "both", "new")
IDENTITY_OPERATIONS: tuple[str, ...] = (
    "store",
    "store_batch",
    "delete",
    "fetch",
    "list",
    "search",
    "find_by_entropy",
)
# identity_type of an operation that is not about one typed identity
ANY_TYPE = "any"
STORAGE_OPERATIONS: tuple[str, ...] = (
    "write_transaction",
    "batch_transaction",
    "rollback",
    "failure_log",
    "read",
)
STORES: tuple[str, ...] = ("identities", "legacy", "both")
OUTCOMES: tuple[str, ...] = ("success", "failure")
SHADOW_OUTCOMES: tuple[str, ...] = ("match", "mismatch", "error")
SHADOW_OPERATIONS: tuple[str, ...] = ("fetch", "list", "search", "find_by_entropy")
FINDING_KINDS: tuple[str, ...] = (
    "count_difference",
    "null_keys",
    "duplicate_keys",
    "missing_in_new",
    "missing_in_legacy",
    "field_mismatches",
)
VERDICTS: tuple[str, ...] = ("consistent", "inconsistent")
RUN_OUTCOMES: tuple[str, ...] = ("success", "failure", "canceled")
MIGRATION_OUTCOMES: tuple[str, ...] = ("inserted", "updated", "unchanged", "kept", "quarantined")

# --- scraped metrics (the application's /metrics) -------------------------------------
REGISTRY = CollectorRegistry()

IDENTITY_OPERATION_SECONDS = Histogram(
    "kimera_identity_operation_duration_seconds",
    "Latency of identity operations through the storage API.",
    ["operation", "identity_type", "write_mode"],
    buckets=LATENCY_BUCKETS_SECONDS,
    registry=REGISTRY,
)
IDENTITY_OPERATION_ERRORS = Counter(
    "kimera_identity_operation_errors_total",
    "Identity operations that raised (refused or rolled back writes, failed reads).",
    ["operation", "identity_type", "write_mode"],
    registry=REGISTRY,
)
STORAGE_OPERATION_SECONDS = Histogram(
    "kimera_storage_operation_duration_seconds",
    "Latency of DuckDB storage operations under the identity operations.",
    ["operation", "store"],
    buckets=LATENCY_BUCKETS_SECONDS,
    registry=REGISTRY,
)
DUAL_WRITES = Counter(
    "kimera_dual_writes_total",
    "Identities written through the storage API by outcome, as dual_write_log records them.",
    ["operation", "write_mode", "outcome"],
    registry=REGISTRY,
)
SHADOW_READS = Counter(
    "kimera_shadow_reads_total",
    "Sampled shadow reads by outcome: the new store's answer matched, mismatched or raised.",
    ["operation", "outcome"],
    registry=REGISTRY,
)
SHADOW_MISMATCHED_FIELDS = Counter(
    "kimera_shadow_mismatched_fields_total",
    "Fields found different by shadow reads (one per identity and field).",
    ["field"],
    registry=REGISTRY,
)
SHADOW_RECORD_FAILURES = Counter(
    "kimera_shadow_record_failures_total",
    "Shadow mismatches that could not be recorded in kimera_shadow_mismatches.",
    registry=REGISTRY,
)
IDENTITY_ENTROPY_BITS = Histogram(
    "kimera_identity_entropy",
    "Entropy of identities stored through the storage API, in bits.",
    ["identity_type"],
    buckets=ENTROPY_BUCKETS,
    registry=REGISTRY,
)
IDENTITY_EFFECTIVE_TAU_SECONDS = Histogram(
    "kimera_identity_effective_tau_seconds",
    "Effective decay time constant tau_0 * (1 + k * H) of stored identities.",
    ["identity_type"],
    buckets=TAU_BUCKETS_SECONDS,
    registry=REGISTRY,
)
ROLLOUT_STAGE = Gauge(
    "kimera_rollout_stage",
    "1 for the rollout stage the application's storage routes by, 0 for the others.",
    ["stage"],
    registry=REGISTRY,
)
ROLLOUT_STAGE_NUMBER = Gauge(
    "kimera_rollout_stage_number",
    "Position of the live rollout stage: 0 legacy-only ... 6 legacy-retired.",
    registry=REGISTRY,
)

ENTROPY_LOG = logging.getLogger("kimera.entropy")
STORAGE_LOG = logging.getLogger("kimera.storage")

_initialised_modes: set[str] = set()


def init_write_path_metrics(write_mode: str, stage: str) -> None:
    """Create every label combination a storage in this mode reports, so series exist at 0."""
    set_rollout_stage(stage)
    if write_mode in _initialised_modes:
        return
    _initialised_modes.add(write_mode)
    for operation in IDENTITY_OPERATIONS:
        for identity_type in (*IDENTITY_TYPES, ANY_TYPE):
            IDENTITY_OPERATION_SECONDS.labels(operation, identity_type, write_mode)
            IDENTITY_OPERATION_ERRORS.labels(operation, identity_type, write_mode)
    for operation in ("store", "store_batch", "delete"):
        for outcome in OUTCOMES:
            DUAL_WRITES.labels(operation, write_mode, outcome)
    for operation in STORAGE_OPERATIONS:
        for store in STORES:
            STORAGE_OPERATION_SECONDS.labels(operation, store)
    for operation in SHADOW_OPERATIONS:
        for outcome in SHADOW_OUTCOMES:
            SHADOW_READS.labels(operation, outcome)
    from kimera_core.compare import COMPARED_FIELDS, MISSING_IN_LEGACY, MISSING_IN_NEW

    for name in (*COMPARED_FIELDS, MISSING_IN_NEW, MISSING_IN_LEGACY):
        SHADOW_MISMATCHED_FIELDS.labels(name)
    for identity_type in IDENTITY_TYPES:
        IDENTITY_ENTROPY_BITS.labels(identity_type)
        IDENTITY_EFFECTIVE_TAU_SECONDS.labels(identity_type)


def set_rollout_stage(stage: str) -> None:
    """Mark ``stage`` as the live one on the application's endpoint."""
    for name in STAGES:
        ROLLOUT_STAGE.labels(name).set(1 if name == stage else 0)
    if stage in STAGES:
        ROLLOUT_STAGE_NUMBER.set(STAGES.index(stage))


def observe_entropy(
    identity_id: str, identity_type: str, entropy: float | None, *, tau_0: float = TAU_0_SECONDS
) -> None:
    """Record a stored identity's entropy and effective tau, and log the entropy event."""
    tau = effective_tau(entropy, tau_0, TAU_K)
    if entropy is not None:
        IDENTITY_ENTROPY_BITS.labels(identity_type).observe(entropy)
    IDENTITY_EFFECTIVE_TAU_SECONDS.labels(identity_type).observe(tau)
    if ENTROPY_LOG.isEnabledFor(logging.INFO):
        ENTROPY_LOG.info(
            json.dumps(
                {
                    "evt": "entropy",
                    "id": identity_id,
                    "identity_type": identity_type,
                    "entropy": entropy,
                    "tau": tau,
                }
            )
        )


def log_storage_write(
    identity_id: str | None,
    operation: str,
    write_mode: str,
    outcome: str,
    seconds: float,
    rows: int = 1,
    error: str | None = None,
) -> None:
    """A structured line for one storage write (``kimera.storage``), when INFO is enabled."""
    if not STORAGE_LOG.isEnabledFor(logging.INFO):
        return
    line: dict[str, Any] = {
        "evt": "storage_write",
        "id": identity_id,
        "operation": operation,
        "write_mode": write_mode,
        "outcome": outcome,
        "rows": rows,
        "seconds": round(seconds, 6),
    }
    if error is not None:
        line["error"] = error
    STORAGE_LOG.log(logging.WARNING if outcome == "failure" else logging.INFO, json.dumps(line))


class JsonLineFormatter(logging.Formatter):
    """Passes the JSON message through, adding the time and logger name."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            payload = json.loads(record.getMessage())
        except ValueError:
            payload = {"msg": record.getMessage()}
        if not isinstance(payload, dict):
            payload = {"msg": payload}
        return json.dumps({"ts": round(record.created, 6), "logger": record.name, **payload})


def enable_json_logs(stream: Any = None, level: int = logging.INFO) -> logging.Handler:
    """Send ``kimera.entropy`` and ``kimera.storage`` lines as JSON to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    for logger in (ENTROPY_LOG, STORAGE_LOG):
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return handler


# --- pushed snapshots -------------------------------------------------------------------
class _Families(Collector):
    """A collector over metric families built once."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterable[Any]:
        return iter(self.families)


def _registry(families: list[Any]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return registry


def job_registry(job: Mapping[str, Any]) -> CollectorRegistry:
    """Per-Dagster-job gauges from a summary of its run records (see ``job_summary``).

    ``job`` holds ``runs`` (outcome -> count) and, when known, ``last_duration_seconds``,
    ``last_success_timestamp``, ``last_finished_timestamp`` and ``last_outcome``.
    """
    families: list[Any] = []
    runs = CounterMetricFamily(
        "kimera_dagster_job_runs",
        "Finished runs of the Dagster job by outcome, from the run storage.",
        labels=["outcome"],
    )
    for outcome in RUN_OUTCOMES:
        runs.add_metric([outcome], float(job.get("runs", {}).get(outcome, 0)))
    families.append(runs)
    outcome_family = GaugeMetricFamily(
        "kimera_dagster_job_last_run_outcome",
        "1 for the outcome of the job's last finished run, 0 for the others.",
        labels=["outcome"],
    )
    last = job.get("last_outcome")
    for outcome in RUN_OUTCOMES:
        outcome_family.add_metric([outcome], 1.0 if outcome == last else 0.0)
    families.append(outcome_family)
    for key, name, doc in (
        (
            "last_duration_seconds",
            "kimera_dagster_job_last_run_duration_seconds",
            "Wall-clock duration of the job's last finished run.",
        ),
        (
            "last_success_timestamp",
            "kimera_dagster_job_last_success_timestamp_seconds",
            "Unix time at which the job's last successful run ended.",
        ),
        (
            "last_finished_timestamp",
            "kimera_dagster_job_last_run_timestamp_seconds",
            "Unix time at which the job's last finished run ended.",
        ),
    ):
        value = job.get(key)
        if value is not None:
            families.append(GaugeMetricFamily(name, doc, value=float(value)))
    return _registry(families)


def entropy_registry(snapshot: Mapping[str, Mapping[str, Any]], at: float) -> CollectorRegistry:
    """The entropy snapshot: per identity type a histogram in bits, quantiles and tau.

    ``snapshot`` maps identity type -> ``count``, ``unknown``, ``mean``, ``p50``, ``p90``,
    ``p99`` and ``histogram`` (upper bound text -> rows in that bucket, as
    ``kimera_core.stats`` computes it). Missing keys count as absent, never as zero rows.
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
    for identity_type, dist in sorted(snapshot.items()):
        histogram = dist.get("histogram") or {}
        if histogram:
            buckets, running = [], 0.0
            for bound in ENTROPY_BUCKETS:
                key = "+Inf" if math.isinf(bound) else f"{bound:g}"
                running += float(histogram.get(key, 0))
                buckets.append((key, running))
            known = running
            mean = dist.get("mean")
            total = float(mean) * known if mean is not None else 0.0
            hist.add_metric([identity_type], buckets, total)
        for q in ("p50", "p90", "p99"):
            value = dist.get(q)
            if value is None:
                continue
            label = q[1:]
            quantiles.add_metric([identity_type, label], float(value))
            tau_days = dist.get(f"tau_{q}_days")
            tau = float(tau_days) * 86400.0 if tau_days is not None else effective_tau(value)
            taus.add_metric([identity_type, label], tau)
        if dist.get("unknown") is not None:
            unknown.add_metric([identity_type], float(dist["unknown"]))
    stamp = GaugeMetricFamily(
        "kimera_entropy_snapshot_timestamp_seconds",
        "Unix time of the entropy snapshot (the materialization it was read from).",
        value=at,
    )
    return _registry([hist, quantiles, taus, unknown, stamp])


def migration_registry(progress: Mapping[str, Any], at: float) -> CollectorRegistry:
    """Migration progress: rows of the last run by outcome and partitions done / total."""
    families: list[Any] = []
    rows = progress.get("rows") or {}
    if rows:
        family = GaugeMetricFamily(
            "kimera_migration_rows",
            "Rows handled by the latest migration run, by outcome.",
            labels=["outcome"],
        )
        for outcome in MIGRATION_OUTCOMES:
            family.add_metric([outcome], float(rows.get(outcome, 0)))
        families.append(family)
    for key, name, doc in (
        ("read", "kimera_migration_rows_read", "Legacy rows read by the latest migration run."),
        (
            "partitions_done",
            "kimera_migration_partitions_done",
            "Partitions the latest migration run has finished.",
        ),
        (
            "partitions_total",
            "kimera_migration_partitions_planned",
            "Partitions the latest migration run plans (done / planned is its progress).",
        ),
        (
            "running",
            "kimera_migration_running",
            "1 while a migration run is in progress, else 0.",
        ),
        (
            "progress_timestamp",
            "kimera_migration_last_progress_timestamp_seconds",
            "Unix time of the latest migration progress event (partition or finish).",
        ),
    ):
        value = progress.get(key)
        if value is not None:
            families.append(GaugeMetricFamily(name, doc, value=float(value)))
    families.append(
        GaugeMetricFamily(
            "kimera_migration_snapshot_timestamp_seconds",
            "Unix time this migration snapshot was pushed.",
            value=at,
        )
    )
    return _registry(families)


def consistency_registry(result: Mapping[str, Any], at: float) -> CollectorRegistry:
    """Consistency results: findings by kind, verdict, last check and last success times.

    ``result`` holds ``verdict`` ('consistent' / 'inconsistent'), ``findings`` (kind ->
    count), ``checked_at`` and ``last_success_at`` (Unix times, when known).
    """
    families: list[Any] = []
    findings = result.get("findings")
    if findings is not None:
        family = GaugeMetricFamily(
            "kimera_consistency_findings",
            "Findings of the latest consistency verification by kind (check), 0 when clean.",
            labels=["kind"],
        )
        for kind in sorted(findings):
            family.add_metric([kind], float(findings[kind]))
        families.append(family)
    verdict = result.get("verdict")
    if verdict in VERDICTS:
        family = GaugeMetricFamily(
            "kimera_consistency_verdict",
            "1 for the verdict of the latest consistency verification, 0 for the other.",
            labels=["verdict"],
        )
        for name in VERDICTS:
            family.add_metric([name], 1.0 if name == verdict else 0.0)
        families.append(family)
    for key, name, doc in (
        (
            "checked_at",
            "kimera_consistency_last_check_timestamp_seconds",
            "Unix time of the latest consistency verification.",
        ),
        (
            "last_success_at",
            "kimera_consistency_last_success_timestamp_seconds",
            "Unix time of the latest verification whose verdict was consistent.",
        ),
    ):
        value = result.get(key)
        if value is not None:
            families.append(GaugeMetricFamily(name, doc, value=float(value)))
    families.append(
        GaugeMetricFamily(
            "kimera_consistency_snapshot_timestamp_seconds",
            "Unix time this consistency snapshot was pushed.",
            value=at,
        )
    )
    return _registry(families)


def rollout_registry(stage: str, at: float) -> CollectorRegistry:
    """The rollout stage recorded by the last rollout run (same names as the app's gauges)."""
    family = GaugeMetricFamily(
        "kimera_rollout_stage",
        "1 for the live rollout stage, 0 for the others.",
        labels=["stage"],
    )
    for name in STAGES:
        family.add_metric([name], 1.0 if name == stage else 0.0)
    return _registry(
        [
            family,
            GaugeMetricFamily(
                "kimera_rollout_stage_number",
                "Position of the live rollout stage: 0 legacy-only ... 6 legacy-retired.",
                value=float(STAGES.index(stage)),
            ),
            GaugeMetricFamily(
                "kimera_rollout_snapshot_timestamp_seconds",
                "Unix time of the rollout run the stage was read from.",
                value=at,
            ),
        ]
    )


def heartbeat_registry(push_failures: int, at: float) -> CollectorRegistry:
    """The periodic sensor's own group: push failures it has seen, and when it last ran."""
    return _registry(
        [
            CounterMetricFamily(
                "kimera_pushgateway_push_failures",
                "Pushes to the Pushgateway by the Dagster sensors that failed (counted by the "
                "periodic sensor and pushed once the gateway takes pushes again).",
                value=float(push_failures),
            ),
            GaugeMetricFamily(
                "kimera_observability_last_push_timestamp_seconds",
                "Unix time of the periodic metrics sensor's last push.",
                value=at,
            ),
        ]
    )


def pushgateway_address() -> str:
    """The Pushgateway named by KIMERA_PUSHGATEWAY, else 127.0.0.1:9091."""
    return os.environ.get(PUSHGATEWAY_ENV) or DEFAULT_PUSHGATEWAY


def push(
    registry: CollectorRegistry,
    job: str,
    grouping_key: Mapping[str, str] | None = None,
    *,
    replace: bool = True,
    gateway: str | None = None,
    timeout: float = 10.0,
) -> None:
    """Push a group to the Pushgateway; raises OSError on failure.

    ``replace=True`` PUTs (the group becomes exactly these metrics); ``replace=False`` POSTs
    (only the metrics pushed are replaced, the group's others are kept).
    """
    send = push_to_gateway if replace else pushadd_to_gateway
    send(
        gateway or pushgateway_address(),
        job=job,
        registry=registry,
        grouping_key=dict(grouping_key or {}),
        timeout=timeout,
    )


def serve(host: str = DEFAULT_METRICS_HOST, port: int = DEFAULT_METRICS_PORT) -> tuple[Any, Any]:
    """Start the /metrics HTTP server for ``REGISTRY`` in a daemon thread: (server, thread)."""
    return start_http_server(port, addr=host, registry=REGISTRY)
