"""Kimera's metrics, in three modules (docs/observability.md lists every metric):

* ``scraped``: the application's write-path histograms and counters on ``REGISTRY`` and
  the ``/metrics`` endpoint (``serve``); what ``Storage``, ``kimera workload`` and
  ``kimera serve`` record in their own process.
* ``logs``: structured JSON log lines (``kimera.entropy``, ``kimera.storage``): where
  identity ids, run ids and free text go, never labels.
* ``pushed``: Pushgateway snapshots built from the core's typed reports (migration,
  verification gates, entropy statistics, rollout stage) for the Dagster sensors. It is
  imported as ``kimera_core.metrics.pushed`` by its one user, the Dagster code location, and
  not re-exported here: it depends on the engines' report types, and the write path that
  imports this package must not load them.

This package re-exports the scraped and log names the write path uses (``metrics.X``);
anything else is imported from its module.
"""

from kimera_core.metrics.logs import (
    enable_json_logs,
    log_storage_write,
)
from kimera_core.metrics.scraped import (
    ANY_TYPE,
    DEFAULT_METRICS_HOST,
    DEFAULT_METRICS_PORT,
    DUAL_WRITES,
    IDENTITY_OPERATION_ERRORS,
    IDENTITY_OPERATION_SECONDS,
    LATENCY_BUCKETS_SECONDS,
    REGISTRY,
    SHADOW_MISMATCHED_FIELDS,
    SHADOW_READS,
    SHADOW_RECORD_FAILURES,
    STORAGE_OPERATION_SECONDS,
    init_write_path_metrics,
    observe_entropy,
    serve,
)

__all__ = [
    "ANY_TYPE",
    "DEFAULT_METRICS_HOST",
    "DEFAULT_METRICS_PORT",
    "DUAL_WRITES",
    "IDENTITY_OPERATION_ERRORS",
    "IDENTITY_OPERATION_SECONDS",
    "LATENCY_BUCKETS_SECONDS",
    "REGISTRY",
    "SHADOW_MISMATCHED_FIELDS",
    "SHADOW_READS",
    "SHADOW_RECORD_FAILURES",
    "STORAGE_OPERATION_SECONDS",
    "enable_json_logs",
    "init_write_path_metrics",
    "log_storage_write",
    "observe_entropy",
    "serve",
]
