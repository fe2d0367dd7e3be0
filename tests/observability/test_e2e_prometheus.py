"""End to end against real Prometheus and Pushgateway servers (Debian binaries, free ports).

The real jobs of the code location run in-process on a demo database; the observability
sensors push to the Pushgateway; ``kimera workload`` serves /metrics while it writes and
reads identities. Prometheus scrapes both, and every PromQL expression of every dashboard
panel and every alert rule must return data through /api/v1/query.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
from dagster_prometheus import PrometheusResource
from support.servers import free_port, require_binary, stop_process_group, wait_until

from kimera_pipelines.definitions import defs
from kimera_pipelines.defs import observability as obs
from kimera_pipelines.resources import ALL_BUCKETS_TAGS, KimeraDatabase
from observability.exprs import (
    ALERTS,
    alert_rules,
    alert_signals,
    annotation_exprs,
    dashboard_exprs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
KIMERA = str(Path(sys.executable).with_name("kimera"))


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(_get(url))
    except urllib.error.HTTPError as exc:  # 400 carries the parse error in its body
        return json.loads(exc.read().decode())


def _start(args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        args, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, **kwargs
    )


def _promtool_metrics(promtool: str, text: str) -> None:
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _run_jobs(instance, db_path: Path) -> list:
    database = KimeraDatabase(database=str(db_path))
    results = []
    for name, kwargs in (
        ("observe_legacy_job", {}),
        ("migration_job", {"tags": ALL_BUCKETS_TAGS}),
        ("consistency_check_job", {}),
        ("entropy_report_job", {}),
        ("advance_rollout_job", {}),  # the rollout group: the stage, refused or moved
    ):
        result = defs.resolve_job_def(name).execute_in_process(
            instance=instance, resources={"database": database}, raise_on_error=False, **kwargs
        )
        results.append(result)
    return results


def test_every_dashboard_and_alert_expression_returns_data(tmp_path):
    prometheus = require_binary("prometheus", "prometheus")
    pushgateway = require_binary("prometheus-pushgateway", "prometheus-pushgateway")
    promtool = require_binary("promtool", "prometheus")
    pg_port, app_port, prom_port = free_port(), free_port(), free_port()
    gateway = f"127.0.0.1:{pg_port}"
    pushing = {"prometheus": PrometheusResource(gateway=gateway, timeout=5)}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            _start([pushgateway, f"--web.listen-address={gateway}"], tmp_path / "pushgateway.log")
        )
        wait_until(lambda: _get(f"http://{gateway}/-/ready"), 20, what="pushgateway ready")

        # the write path: a workload through the storage API in dual-write, 5 % refused writes
        procs.append(
            _start(
                [
                    KIMERA, "workload", "--db", str(tmp_path / "app.duckdb"), "--seconds", "20",
                    "--rate", "60", "--stage", "dual-write", "--failure-share", "0.05",
                    "--shadow-sample", "0.5", "--port", str(app_port), "--linger", "200",
                ],
                tmp_path / "workload.log",
            )
        )  # fmt: skip
        wait_until(lambda: _get(f"http://127.0.0.1:{app_port}/metrics"), 30, what="/metrics")

        config = tmp_path / "prometheus.yml"
        config.write_text(
            f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {ALERTS}
scrape_configs:
  - job_name: pushgateway
    honor_labels: true
    static_configs: [{{targets: ["{gateway}"]}}]
  - job_name: kimera_app
    static_configs: [{{targets: ["127.0.0.1:{app_port}"]}}]
"""
        )
        procs.append(
            _start(
                [
                    prometheus, f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                tmp_path / "prometheus.log",
            )
        )  # fmt: skip
        base = f"http://127.0.0.1:{prom_port}"
        wait_until(lambda: _get(f"{base}/-/ready"), 30, what="prometheus ready")

        # the real jobs, in-process, on a demo database; then the sensors over their records
        db_path = tmp_path / "kimera.duckdb"
        subprocess.run(
            [KIMERA, "demo-data", "--db", str(db_path), "--geoids", "1500", "--scars", "700"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        (tmp_path / "dagster_home").mkdir()
        with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
            results = _run_jobs(instance, db_path)
            for result in results:
                assert result.success, result.run_id
                context = dg.build_run_status_sensor_context(
                    sensor_name=obs.kimera_push_on_success.name,
                    dagster_instance=instance,
                    dagster_run=instance.get_run_by_id(result.run_id),
                    dagster_event=result.get_run_success_event(),
                    resources=pushing,
                )
                obs.kimera_push_on_success(context)
            obs.kimera_metrics_sensor(dg.build_sensor_context(instance=instance, resources=pushing))
            assert obs.push_failures(instance) == 0

        pushed = _get(f"http://{gateway}/metrics")
        _promtool_metrics(promtool, pushed)
        _promtool_metrics(promtool, _get(f"http://127.0.0.1:{app_port}/metrics"))
        for group in (
            "kimera_dagster",
            "kimera_entropy",
            "kimera_migration",
            "kimera_consistency",
            "kimera_rollout",
        ):
            assert f'job="{group}"' in pushed, group

        # every expression, once Prometheus has scraped both targets a few times
        targets = [(title, expr) for title, expr in dashboard_exprs()]
        for rule in alert_rules():
            targets += [(f"{rule['alert']} signal", s) for s in alert_signals(rule["expr"])]
        wait_until(
            lambda: all(
                _query(base, e)["data"]["result"]
                for e in ('kimera_dagster_job_runs_total', "kimera_dual_writes_total",
                          "kimera_consistency_findings", "kimera_entropy_snapshot_bucket")
            ),
            60,
            what="first scrapes",
        )  # fmt: skip
        assert len(targets) >= 40
        empty: dict[str, str] = {}

        def all_have_data() -> bool:
            empty.clear()
            for title, expr in targets:
                answer = _query(base, expr)
                assert answer["status"] == "success", (title, expr, answer)
                if not answer["data"]["result"]:
                    empty[title] = expr
            return not empty

        try:
            wait_until(all_have_data, 40, interval=2, what="every expression to return data")
        except TimeoutError:
            pytest.fail(f"expressions without data: {json.dumps(empty, indent=2)}")

        # the annotations evaluate (they have data only around a stage change or a rollback)
        for name, expr in annotation_exprs():
            assert _query(base, expr)["status"] == "success", name
        # the full alert expressions parse and evaluate; the rules file loaded healthy
        for rule in alert_rules():
            assert _query(base, rule["expr"])["status"] == "success", rule["alert"]
        groups = json.loads(_get(f"{base}/api/v1/rules"))["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == len(alert_rules())
        assert all(r["health"] == "ok" for r in rules), rules
    finally:
        for proc in reversed(procs):
            stop_process_group(proc)
        if os.environ.get("KIMERA_E2E_KEEP_LOGS"):
            print(tmp_path)
