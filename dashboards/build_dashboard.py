"""Writes dashboards/kimera.json: the Grafana dashboard, generated so panels stay uniform.

Run ``python dashboards/build_dashboard.py`` after editing; tests check the JSON it writes
(structure) and evaluate every expression in it against a real Prometheus. The stage names
of the rollout panels are ``kimera_core.rollout.STAGES``, the one stage list, each with its
own colour. The stage comes from one source, the rollout step's pushed snapshot
(``job="kimera_rollout"``); the application's own view is its own panel. Stage changes and
automatic read rollbacks are annotations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kimera_core.rollout import STAGES

DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
ROLLOUT_JOB = "kimera_rollout"  # the Pushgateway group of the rollout step's stage
# One colour per stage, from the start (grey) to the point of no easy return (red) and done.
STAGE_COLOURS = ("#8e8e8e", "#5794F2", "#B877D9", "#FADE2A", "#FF9830", "#F2495C", "#73BF69")
ANNOTATIONS: list[dict[str, Any]] = [
    {
        "name": "Rollout stage changes",
        "datasource": DS,
        "enable": True,
        "iconColor": "#5794F2",
        "expr": f'changes(kimera_rollout_stage_number{{job="{ROLLOUT_JOB}"}}[2m]) > 0',
        "step": "60s",
        "titleFormat": "rollout stage changed",
        "textFormat": "see rollout_stage's history in Dagster",
    },
    {
        "name": "Automatic read rollbacks",
        "datasource": DS,
        "enable": True,
        "iconColor": "#F2495C",
        "expr": "changes(kimera_rollout_last_auto_rollback_timestamp_seconds[2m]) > 0",
        "step": "60s",
        "titleFormat": "automatic read rollback",
        "textFormat": "auto_rollback_reads moved reads back to legacy",
    },
]


def _mappings(values: dict[int, tuple[str, str]]) -> list[dict[str, Any]]:
    return [
        {
            "type": "value",
            "options": {
                str(k): {"text": text, "color": color, "index": i}
                for i, (k, (text, color)) in enumerate(values.items())
            },
        }
    ]


STAGE_MAPPINGS = _mappings(
    {i: (name, colour) for i, (name, colour) in enumerate(zip(STAGES, STAGE_COLOURS, strict=True))}
)


class Board:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.next_id = 1
        self.y = 0
        self.x = 0
        self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "id": self._id(),
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
            }
        )
        self.y += 1

    def panel(
        self,
        kind: str,
        title: str,
        targets: list[tuple[str, str]],
        unit: str,
        *,
        w: int = 8,
        h: int = 8,
        description: str = "",
        options: dict[str, Any] | None = None,
        mappings: list[dict[str, Any]] | None = None,
        fmt: str = "time_series",
        instant: bool = False,
        thresholds: list[tuple[float | None, str]] | None = None,
    ) -> None:
        if self.x + w > 24:
            self._newline()
        defaults: dict[str, Any] = {"unit": unit, "mappings": mappings or []}
        if thresholds:
            defaults["thresholds"] = {
                "mode": "absolute",
                "steps": [{"value": v, "color": c} for v, c in thresholds],
            }
        panel = {
            "type": kind,
            "id": self._id(),
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options or {},
            "targets": [
                {
                    "datasource": DS,
                    "refId": chr(ord("A") + i),
                    "expr": expr,
                    "legendFormat": legend,
                    "format": fmt,
                    "instant": instant,
                    "range": not instant,
                }
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
        self.x = 0
        self.row_height = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def build() -> dict[str, Any]:
    b = Board()
    stat = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}

    b.row("Rollout overview")
    b.panel(
        "stat",
        "Rollout stage",
        [(f'max(kimera_rollout_stage_number{{job="{ROLLOUT_JOB}"}})', "stage")],
        "none",
        w=6,
        h=5,
        description=(
            "The stage the rollout step recorded in the database at its latest run, pushed by "
            "the Dagster sensors (Pushgateway group kimera_rollout): the one source of truth. "
            "The application's own view is the next panel."
        ),
        options=stat,
        mappings=STAGE_MAPPINGS,
    )
    b.panel(
        "stat",
        "Stage the application routes by",
        [
            (
                f'max by (instance) (kimera_rollout_stage_number{{job!="{ROLLOUT_JOB}"}})',
                "{{instance}}",
            )
        ],
        "none",
        w=6,
        h=5,
        description=(
            "kimera_rollout_stage_number scraped from each application process: the stage it "
            "read when it opened its storage. A process that differs from the rollout stage "
            "has not refreshed its stage yet."
        ),
        options=stat,
        mappings=STAGE_MAPPINGS,
    )
    b.panel(
        "stat",
        "Last consistency verdict",
        [('max(kimera_consistency_verdict{verdict="inconsistent"})', "verdict")],
        "none",
        w=4,
        h=5,
        description="Verdict of the latest consistency verification pushed by the sensors.",
        options=stat,
        mappings=_mappings({0: ("consistent", "green"), 1: ("inconsistent", "red")}),
    )
    b.panel(
        "stat",
        "Since last consistent verification",
        [("time() - max(kimera_consistency_last_success_timestamp_seconds)", "age")],
        "s",
        w=4,
        h=5,
        description="Alert KimeraConsistencyCheckNotSucceeded fires above 2 h.",
        options=stat,
        thresholds=[(None, "green"), (3600, "orange"), (7200, "red")],
    )
    b.panel(
        "stat",
        "Pushgateway push failures (sensors)",
        [("max(kimera_pushgateway_push_failures_total)", "failures")],
        "short",
        w=4,
        h=5,
        description="Failed pushes counted by the Dagster sensors since the instance began.",
        options=stat,
    )
    b.panel(
        "bargauge",
        "Since last successful run, per job",
        [
            (
                "time() - max by (dagster_job) (kimera_dagster_job_last_success_timestamp_seconds)",
                "{{dagster_job}}",
            )
        ],
        "s",
        w=8,
        instant=True,
        options={**stat, "orientation": "horizontal", "displayMode": "basic"},
    )
    b.panel(
        "stat",
        "Last run failed, per job",
        [
            (
                'max by (dagster_job) (kimera_dagster_job_last_run_outcome{outcome="failure"})',
                "{{dagster_job}}",
            )
        ],
        "none",
        w=8,
        options=stat,
        mappings=_mappings({0: ("ok", "green"), 1: ("failed", "red")}),
    )
    b.panel(
        "timeseries",
        "Last run duration, per job",
        [
            (
                "max by (dagster_job) (kimera_dagster_job_last_run_duration_seconds)",
                "{{dagster_job}}",
            )
        ],
        "s",
        w=8,
    )
    b.panel(
        "bargauge",
        "Runs by outcome, per job",
        [
            (
                "sum by (dagster_job, outcome) (kimera_dagster_job_runs_total)",
                "{{dagster_job}} {{outcome}}",
            )
        ],
        "short",
        w=12,
        instant=True,
        options={**stat, "orientation": "horizontal", "displayMode": "basic"},
    )
    b.panel(
        "timeseries",
        "Since last push, per Pushgateway group",
        [
            (
                'time() - max by (job, dagster_job) (push_time_seconds{job=~"kimera_.*"})',
                "{{job}} {{dagster_job}}",
            )
        ],
        "s",
        w=12,
        description="Pushgateway's own push_time_seconds: a growing line is a sensor not pushing.",
    )

    b.row("Migration progress")
    b.panel(
        "gauge",
        "Steps done (one table of one partition)",
        [
            (
                "max(kimera_migration_steps_done) / max(kimera_migration_steps_planned)",
                "done",
            )
        ],
        "percentunit",
        w=6,
        options=stat,
    )
    b.panel(
        "stat",
        "Migration running",
        [("max(kimera_migration_running)", "running")],
        "none",
        w=6,
        options=stat,
        mappings=_mappings({0: ("idle", "green"), 1: ("running", "blue")}),
    )
    b.panel(
        "stat",
        "Since last migration progress",
        [("time() - max(kimera_migration_last_progress_timestamp_seconds)", "age")],
        "s",
        w=6,
        options=stat,
    )
    b.panel(
        "stat",
        "Legacy rows read (latest run)",
        [("max(kimera_migration_rows_read)", "read")],
        "short",
        w=6,
        options=stat,
    )
    b.panel(
        "timeseries",
        "Rows by outcome (latest run)",
        [("sum by (outcome) (kimera_migration_rows)", "{{outcome}}")],
        "short",
        w=24,
    )

    b.row("Consistency")
    b.panel(
        "timeseries",
        "Consistency findings by kind",
        [("sum by (kind) (kimera_consistency_findings)", "{{kind}}")],
        "short",
        w=8,
    )
    b.panel(
        "timeseries",
        "Shadow reads not matching, per second",
        [
            (
                f'sum by (operation, outcome) (rate(kimera_shadow_reads_total{{outcome!="match"}}[{RATE}]))',
                "{{operation}} {{outcome}}",
            )
        ],
        "ops",
        w=8,
    )
    b.panel(
        "timeseries",
        "Shadow-read mismatched fields, per second",
        [
            (
                f"sum by (field) (rate(kimera_shadow_mismatched_fields_total[{RATE}]))",
                "{{field}}",
            )
        ],
        "ops",
        w=8,
    )

    b.row("Entropy and effective tau")
    b.panel(
        "bargauge",
        "Entropy distribution, last snapshot (bits, cumulative)",
        [("sum by (le) (kimera_entropy_snapshot_bucket)", "{{le}}")],
        "short",
        w=12,
        fmt="heatmap",
        instant=True,
        options={**stat, "orientation": "vertical", "displayMode": "gradient"},
    )
    b.panel(
        "heatmap",
        "Entropy of identities stored (write path)",
        [(f"sum by (le) (increase(kimera_identity_entropy_bucket[{RATE}]))", "{{le}}")],
        "short",
        w=12,
        fmt="heatmap",
        options={"calculate": False, "yAxis": {"unit": "none"}},
    )
    b.panel(
        "timeseries",
        "Entropy percentiles, last snapshot",
        [
            (
                "max by (identity_type, percentile) (kimera_entropy_snapshot_percentile)",
                "{{identity_type}} p{{percentile}}",
            )
        ],
        "suffix: bits",
        w=6,
    )
    b.panel(
        "timeseries",
        "Entropy quantiles, write path",
        [
            (
                f"histogram_quantile(0.5, sum by (le, identity_type) (rate(kimera_identity_entropy_bucket[{RATE}])))",
                "{{identity_type}} p50",
            ),
            (
                f"histogram_quantile(0.99, sum by (le, identity_type) (rate(kimera_identity_entropy_bucket[{RATE}])))",
                "{{identity_type}} p99",
            ),
        ],
        "suffix: bits",
        w=6,
    )
    b.panel(
        "timeseries",
        "Effective tau percentiles, last snapshot",
        [
            (
                "max by (identity_type, percentile) "
                "(kimera_effective_tau_snapshot_percentile_seconds)",
                "{{identity_type}} p{{percentile}}",
            )
        ],
        "s",
        w=6,
    )
    b.panel(
        "timeseries",
        "Effective tau p50, write path",
        [
            (
                f"histogram_quantile(0.5, sum by (le, identity_type) (rate(kimera_identity_effective_tau_seconds_bucket[{RATE}])))",
                "{{identity_type}}",
            )
        ],
        "s",
        w=6,
    )

    b.row("Identity operations")
    b.panel(
        "timeseries",
        "Identity operations per second",
        [
            (
                f"sum by (operation) (rate(kimera_identity_operation_duration_seconds_count[{RATE}]))",
                "{{operation}}",
            )
        ],
        "ops",
        w=8,
    )
    b.panel(
        "timeseries",
        "Identity operation errors per second",
        [
            (
                f"sum by (operation) (rate(kimera_identity_operation_errors_total[{RATE}]))",
                "{{operation}}",
            )
        ],
        "ops",
        w=8,
    )
    b.panel(
        "timeseries",
        "Dual-write failure ratio",
        [
            (
                f'sum(rate(kimera_dual_writes_total{{outcome="failure"}}[{RATE}])) '
                f"/ sum(rate(kimera_dual_writes_total[{RATE}]))",
                "failure ratio",
            )
        ],
        "percentunit",
        w=8,
        description="Alert KimeraDualWriteFailureRate fires above 0.1 % for 5 min.",
        thresholds=[(None, "green"), (0.001, "red")],
    )
    b.panel(
        "timeseries",
        "Identity operation latency p99",
        [
            (
                f"histogram_quantile(0.99, sum by (le, operation) (rate(kimera_identity_operation_duration_seconds_bucket[{RATE}])))",
                "{{operation}}",
            )
        ],
        "s",
        w=12,
        thresholds=[(None, "green"), (0.2, "red")],
    )
    b.panel(
        "timeseries",
        "Store latency p50 by identity type and write mode",
        [
            (
                f'histogram_quantile(0.5, sum by (le, identity_type, write_mode) (rate(kimera_identity_operation_duration_seconds_bucket{{operation="store"}}[{RATE}])))',
                "{{identity_type}} {{write_mode}}",
            )
        ],
        "s",
        w=12,
    )

    b.row("Storage operations")
    b.panel(
        "timeseries",
        "Storage operations per second",
        [
            (
                f"sum by (operation, store) (rate(kimera_storage_operation_duration_seconds_count[{RATE}]))",
                "{{operation}} {{store}}",
            )
        ],
        "ops",
        w=8,
    )
    b.panel(
        "timeseries",
        "Storage operation latency p99",
        [
            (
                f"histogram_quantile(0.99, sum by (le, operation) (rate(kimera_storage_operation_duration_seconds_bucket[{RATE}])))",
                "{{operation}}",
            )
        ],
        "s",
        w=8,
    )
    b.panel(
        "timeseries",
        "Writes per second by outcome and mode",
        [
            (
                f"sum by (outcome, write_mode) (rate(kimera_dual_writes_total[{RATE}]))",
                "{{write_mode}} {{outcome}}",
            )
        ],
        "ops",
        w=8,
    )

    return {
        "uid": "kimera-rollout",
        "title": "Kimera migration and rollout",
        "description": "Rollout, migration, consistency, entropy and write-path health of Kimera.",
        "tags": ["kimera"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "utc",
        "annotations": {"list": ANNOTATIONS},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                }
            ]
        },
        "panels": b.panels,
    }


def main() -> None:
    path = Path(__file__).with_name("kimera.json")
    path.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
