"""``make run``'s headless pipeline: every job in order, the rollout as far as the gates allow."""

from kimera_core.migration import MigrationReport
from kimera_pipelines.headless import run_pipeline


def test_the_headless_pipeline_runs_every_job_and_says_what_held_the_rollout(instance, database):
    out = run_pipeline(instance, database, target="legacy-retired")
    assert out["ok"]
    migration = out["migration"]
    assert isinstance(migration, MigrationReport) and migration.balanced
    assert out["report"].endswith("entropy_report.md")
    assert out["stage"] == "read-new"  # the soak holds writes on legacy
    assert any("soak" in reason for reason in out["held_by"])
