"""The application's scraped metrics: the write path's histograms and counters, and /metrics.

Latency histograms and counters need ``rate()`` and ``histogram_quantile()``, so they are
recorded in the process that does the work (the ``Storage`` API, ``kimera workload``,
``kimera serve``) and scraped from its ``/metrics`` endpoint. They are registered on
``REGISTRY``, a dedicated ``CollectorRegistry`` rather than prometheus-client's global one, so
the endpoint shows exactly Kimera's metrics and tests read them without other libraries'
collectors. docs/observability.md lists every family.

Labels are bounded: operation names, identity types (``kimera_core.identity.IDENTITY_TYPES``
plus ``any``), write modes (a stage's write target), stores, stage names
(``kimera_core.rollout.STAGES``) and compared field names. ``init_write_path_metrics`` creates
every label combination a storage reports at 0, so series exist before the first event.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kimera_core.compare import COMPARED_FIELDS, MISSING_IN_LEGACY, MISSING_IN_NEW
from kimera_core.entropy import ENTROPY_BUCKETS_BITS, TAU_0_SECONDS, TAU_K, effective_tau
from kimera_core.identity import IDENTITY_TYPES
from kimera_core.metrics.logs import log_entropy
from kimera_core.rollout import STAGES

DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 9464

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
    """Record a stored identity's entropy (bits) and effective tau (seconds), and log them."""
    tau = effective_tau(entropy, tau_0, TAU_K)
    if entropy is not None:
        IDENTITY_ENTROPY_BITS.labels(identity_type).observe(entropy)
    IDENTITY_EFFECTIVE_TAU_SECONDS.labels(identity_type).observe(tau)
    log_entropy(identity_id, identity_type, entropy, tau)


def serve(host: str = DEFAULT_METRICS_HOST, port: int = DEFAULT_METRICS_PORT) -> tuple[Any, Any]:
    """Start the /metrics HTTP server for ``REGISTRY`` in a daemon thread: (server, thread)."""
    return start_http_server(port, addr=host, registry=REGISTRY)
