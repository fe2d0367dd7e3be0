"""The whole code location loads, and every asset, check, job and schedule explains itself."""

import dagster as dg

from kimera_pipelines.definitions import defs
from kimera_pipelines.resources import IDENTITIES, ROLLOUT_STAGE
from pipelines.helpers import REQUIRED_CHECKS

GROUPS = {"legacy", "identities", "entropy", "rollout"}


def test_definitions_are_loadable():
    dg.Definitions.validate_loadable(defs)


def test_every_domain_contributes_and_names_are_kept():
    repo = defs.get_repository_def()
    assert {job.name for job in repo.get_all_jobs() if not job.name.startswith("__")} == {
        "observe_legacy_job",
        "migration_job",
        "rollback_migration_job",
        "consistency_check_job",
        "entropy_report_job",
        "advance_rollout_job",
        "step_back_rollout_job",
        "rollback_reads_job",
        "repair_job",
    }
    assert {s.name for s in repo.schedule_defs} == {
        "observe_legacy_hourly",
        "migration_nightly",
        "consistency_hourly",
        "consistency_daily_full",
        "entropy_report_daily",
    }
    assert {s.name for s in repo.sensor_defs} == {
        "auto_rollback_reads",
        "record_run_success",
        "record_run_failure",
        "kimera_push_on_success",
        "kimera_push_on_failure",
        "kimera_metrics_sensor",
    }
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        "legacy_geoids",
        "legacy_scars",
        "echoforms",
        "identities",
        "migration_quarantine",
        "entropy_distribution",
        "effective_tau_distribution",
        "entropy_daily_series",
        "entropy_distribution_report",
        "database_backup",
        "rollout_stage",
        "repair",
    }
    assert {k.name for k in graph.asset_check_keys if k.asset_key == ROLLOUT_STAGE} == (
        REQUIRED_CHECKS
    )
    assert {k.name for k in graph.asset_check_keys if k.asset_key == IDENTITIES} == {
        "migration_reconciliation"
    }
    assert {k.name for k in graph.asset_check_keys if k.asset_key.to_user_string() == "repair"} == {
        "repaired_keys_agree"
    }


def test_every_asset_and_check_has_a_description_kinds_and_owners():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description, key
        assert node.owners == ["team:kimera-migration"], key
        assert "duckdb" in node.kinds, key
    checks = list(graph.asset_check_keys)
    assert len(checks) == len(REQUIRED_CHECKS) + 2  # + migration_reconciliation, repair's own
    for check_key in checks:
        assert graph.get_check_spec(check_key).description, check_key


def test_assets_are_grouped():
    graph = defs.resolve_asset_graph()
    groups = {graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups == GROUPS


def test_every_job_runs_in_process_and_is_described():
    for job in defs.get_repository_def().get_all_jobs():
        if job.name.startswith("__"):
            continue
        assert job.executor_def.name == "in_process", job.name
        assert job.description, job.name


def _checks(job_name: str) -> dict[str, set[str]]:
    graph = defs.resolve_job_def(job_name).asset_layer.asset_graph
    found: dict[str, set[str]] = {}
    for key in graph.asset_check_keys:
        found.setdefault(key.asset_key.to_user_string(), set()).add(key.name)
    return found


def test_job_selections():
    """Each job runs exactly the checks its description promises."""
    assert _checks("migration_job") == {"identities": {"migration_reconciliation"}}
    for job in (
        "consistency_check_job",
        "advance_rollout_job",
        "step_back_rollout_job",
        "rollback_reads_job",
    ):
        assert _checks(job) == {"rollout_stage": REQUIRED_CHECKS}, job
    assert _checks("repair_job") == {"repair": {"repaired_keys_agree"}}


def test_a_migration_from_any_page_runs_no_gate():
    """Dagster runs the checks of the assets it materializes: none of the gates is on identities
    (an asset backfill of identities, from the asset page, runs every check of identities)."""
    graph = defs.resolve_asset_graph()
    assert {k.name for k in graph.get_check_keys_for_assets({IDENTITIES})} == {
        "migration_reconciliation"
    }


def test_migration_job_is_never_retried():
    assert defs.resolve_job_def("migration_job").tags["dagster/max_retries"] == "0"
    assert defs.resolve_job_def("rollback_migration_job").tags["dagster/max_retries"] == "0"


def test_schedules_say_whether_they_run_by_default():
    for schedule in defs.get_repository_def().schedule_defs:
        status = schedule.default_status.value.lower()
        word = "Running by default" if status == "running" else "Stopped by default"
        assert word in schedule.description, schedule.name


def test_resources_are_the_database_and_the_pushgateway():
    assert set(defs.resources) == {"database", "prometheus"}
