"""promtool: the rules file is valid, its unit tests pass, and every exposition is clean."""

from __future__ import annotations

import subprocess
import time

import pytest
import yaml
from prometheus_client import generate_latest
from support.servers import require_binary

from kimera_core import metrics
from kimera_core.gates import Gate
from kimera_core.identity import Identity
from kimera_core.metrics import pushed
from kimera_core.migration import MigrationCounts, MigrationReport
from kimera_core.report import EntropyStatistics
from kimera_core.stats import Distribution
from kimera_core.storage import Storage
from observability.exprs import ALERTS, ROOT


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    promtool = require_binary("promtool", "prometheus")
    return subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_check_rules_is_clean():
    done = _promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout


def test_rule_unit_tests_pass():
    done = _promtool("test", "rules", str(ROOT / "dashboards" / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_not_firing():
    tests = yaml.safe_load((ROOT / "dashboards" / "alerts_test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for test in tests:
        for case in test["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert firing == names and quiet == names
    for rule in rules:
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.fixture
def storage(tmp_path):
    with Storage.open(str(tmp_path / "s.duckdb"), stage="dual-write", shadow_sample=1.0) as s:
        yield s


def test_app_exposition_is_clean(storage):
    storage.store(Identity(id="g1", identity_type="geoid", raw="x", created_at=1.0))
    storage.fetch("g1")
    done = _promtool("check", "metrics", stdin=generate_latest(metrics.REGISTRY).decode())
    assert done.returncode == 0, done.stdout + done.stderr


def test_pushed_snapshot_expositions_are_clean():
    now = time.time()
    distribution = Distribution(
        "geoid", 4, 1, 1.0, 1.0, 2.0, 2.0, 0.0, 2.0, 15.4, 15.4, 16.8, {"0": 1, "1": 1, "2": 1}
    )
    counts = MigrationCounts(read=5, inserted=5)
    report = MigrationReport("run", False, False, 8, counts, 5)
    gate = Gate("count_parity", True, "per type, legacy rows - quarantined = identities rows",
                {}, [], 0)  # fmt: skip
    snapshots = [
        pushed.job_snapshot("migration_job", pushed.JobRuns(
            {"success": 3, "failure": 1}, "success", 2.5, now, now)),
        pushed.entropy_snapshot(EntropyStatistics([distribution], [], now)),
        pushed.migration_snapshot(pushed.MigrationProgress(report, 2, 4, True, now), now),
        pushed.consistency_snapshot([gate], now, now),
        pushed.rollout_snapshot("dual-write", now),
        pushed.heartbeat_snapshot(2, now),
    ]  # fmt: skip
    for snapshot in snapshots:
        text = generate_latest(snapshot.registry()).decode()
        done = _promtool("check", "metrics", stdin=text)
        assert done.returncode == 0, text + done.stdout + done.stderr
