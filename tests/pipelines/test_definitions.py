"""The Dagster code location loads and its main job materializes the legacy summary."""

from __future__ import annotations

import dagster as dg
import pytest

from kimera_core.db import connect
from kimera_core.demo import generate_demo_data
from kimera_core.stats import legacy_summary as core_summary
from kimera_pipelines.assets import legacy_summary
from kimera_pipelines.definitions import defs
from kimera_pipelines.resources import KimeraDatabase


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipelines") / "kimera.duckdb"
    generate_demo_data(path, geoids=800, scars=300, seed=3)
    return path


def test_definitions_load_with_main_job():
    repo = defs.get_repository_def()
    assert "kimera_main_job" in {job.name for job in repo.get_all_jobs()}
    job = defs.resolve_job_def("kimera_main_job")
    assert job.executor_def.name == "in_process"
    spec = defs.resolve_assets_def("legacy_summary")
    assert "duckdb" in spec.specs_by_key[dg.AssetKey("legacy_summary")].kinds


def test_legacy_summary_metadata_matches_core(demo_db):
    result = dg.materialize(
        [legacy_summary], resources={"database": KimeraDatabase(path=str(demo_db))}
    )
    assert result.success
    (mat,) = result.asset_materializations_for_node("legacy_summary")
    meta = mat.metadata
    with connect(demo_db, read_only=True) as con:
        expected = core_summary(con)
    assert meta["rows/legacy_geoids"].value == expected.tables["legacy_geoids"] == 800
    assert meta["rows/legacy_scars"].value == 300
    geoid = next(d for d in expected.distributions if d.identity_type == "geoid")
    assert meta["entropy/geoid/count"].value == geoid.count
    assert meta["entropy/geoid/p90"].value == pytest.approx(geoid.p90)
    assert meta["entropy/scar/histogram"].data == next(
        d.histogram for d in expected.distributions if d.identity_type == "scar"
    )


def test_main_job_fails_clearly_on_missing_database(tmp_path):
    missing = tmp_path / "absent.duckdb"
    result = dg.materialize(
        [legacy_summary],
        resources={"database": KimeraDatabase(path=str(missing))},
        raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node("legacy_summary")
    assert "absent.duckdb: no such file" in failure.error.cause.message
    assert not missing.exists()


def test_main_job_migrates_and_reports_the_reconciliation(tmp_path):
    db = tmp_path / "kimera.duckdb"
    generate_demo_data(db, geoids=600, scars=200, seed=9)
    result = defs.resolve_job_def("kimera_main_job").execute_in_process(
        resources={"database": KimeraDatabase(path=str(db))}
    )
    assert result.success
    (mat,) = result.asset_materializations_for_node("identities")
    meta = mat.metadata
    assert meta["balanced"].value is True
    assert meta["read"].value == 800
    assert (
        meta["inserted"].value
        + meta["updated"].value
        + meta["unchanged"].value
        + meta["kept"].value
        + meta["quarantined"].value
    ) == 800
    with connect(db, read_only=True) as con:
        rows = con.execute("SELECT count(*) FROM identities").fetchone()[0]
    assert meta["identities_rows"].value == rows
