"""Entropy statistics (published whole), the written report, and the sanity check."""

from kimera_core.report import EntropyStatistics
from kimera_pipelines.metadata import ENTROPY_STATISTICS
from pipelines.helpers import ALL_BUCKETS, check_results, run_job


def test_entropy_report_is_written_and_attached(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    result = run_job("entropy_report_job", instance, database)
    assert result.success
    meta = result.asset_materializations_for_node("entropy_distribution_report")[0].metadata
    assert "data:image/png;base64," in meta["report"].value
    assert (db_path.parent / "reports" / "entropy_report.md").exists()
    assert (db_path.parent / "reports" / "entropy_histogram.png").read_bytes()[:4] == b"\x89PNG"
    dist = result.asset_materializations_for_node("entropy_distribution")[0].metadata
    assert dist["geoid/count"].value > 0


def test_entropy_statistics_are_published_whole(instance, database):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    result = run_job("entropy_report_job", instance, database)
    meta = result.asset_materializations_for_node("entropy_distribution")[0].metadata
    stats = EntropyStatistics.from_dict(meta[ENTROPY_STATISTICS].data)
    assert stats.to_dict() == meta[ENTROPY_STATISTICS].data
    by_type = {d.identity_type: d for d in stats.distributions}
    assert by_type["geoid"].count == meta["geoid/count"].value
    assert by_type["scar"].p90 == meta["scar/p90"].value
    assert (
        sum(by_type["geoid"].histogram.values())
        == by_type["geoid"].count - by_type["geoid"].unknown
    )


def test_entropy_sanity_passes_on_a_migrated_database(instance, database):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    checks = check_results(run_job("consistency_check_job", instance, database))
    assert checks["entropy_sanity"].passed
    assert checks["entropy_sanity"].metadata["checked"].value > 0
