"""The code location loads, and every asset, check, job and schedule explains itself."""

import dagster as dg

from kimera_pipelines.definitions import defs

GROUPS = {"legacy", "identities", "entropy", "rollout"}


def test_definitions_are_loadable():
    dg.Definitions.validate_loadable(defs)


def test_every_asset_and_check_has_a_description_kinds_and_owners():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description, key
        assert node.owners == ["team:kimera-migration"], key
        assert "duckdb" in node.kinds, key
    checks = list(graph.asset_check_keys)
    assert len(checks) == 7
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


def test_migration_job_is_never_retried():
    assert defs.resolve_job_def("migration_job").tags["dagster/max_retries"] == "0"


def test_schedules_say_whether_they_run_by_default():
    for schedule in defs.get_repository_def().schedule_defs:
        status = schedule.default_status.value.lower()
        word = "Running by default" if status == "running" else "Stopped by default"
        assert word in schedule.description, schedule.name
