"""The legacy tables are observed: rows, last updated_at, checksum as the data version."""

import dagster as dg

from pipelines.helpers import run_job


def test_legacy_tables_are_observed(instance, database):
    result = run_job("observe_legacy_job", instance, database)
    assert result.success
    record = instance.get_latest_data_version_record(dg.AssetKey("legacy_geoids"))
    assert record is not None
    meta = record.asset_observation.metadata
    assert meta["rows"].value == 600 and len(meta["checksum"].value) == 32
