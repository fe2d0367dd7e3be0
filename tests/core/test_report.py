"""Entropy statistics of identities, the sanity check, and the written report."""

import json
import shutil

import pytest

from kimera_core.db import connect
from kimera_core.entropy import identity_entropy
from kimera_core.identity import Identity
from kimera_core.migration import migrate
from kimera_core.report import (
    EntropyStatistics,
    entropy_sanity,
    entropy_statistics,
    write_entropy_report,
)


@pytest.fixture(scope="module")
def migrated(tmp_path_factory, demo_db):
    path = tmp_path_factory.mktemp("report") / "m.duckdb"
    shutil.copy(demo_db[0], path)
    with connect(path) as con:
        migrate(con)
    return path


@pytest.fixture
def copy(tmp_path, migrated):
    path = tmp_path / "c.duckdb"
    shutil.copy(migrated, path)
    return path


def test_distribution_counts_every_identity_and_the_histogram_sums(migrated):
    with connect(migrated, read_only=True) as con:
        stats = entropy_statistics(con)
        by_type = dict(
            con.execute("SELECT identity_type, count(*) FROM identities GROUP BY 1").fetchall()
        )
    for d in stats.distributions:
        assert d.count == by_type[d.identity_type]
        assert sum(d.histogram.values()) == d.count - d.unknown
        assert d.p50 <= d.p90 <= d.p99
        assert d.tau_mean_days >= 14.0
    assert sum(r["count"] for r in stats.daily) == sum(by_type.values())


def test_stored_scores_match_the_reference_formula(migrated):
    with connect(migrated, read_only=True) as con:
        rows = con.execute(
            "SELECT data, entropy_score FROM identities USING SAMPLE 50 ROWS"
        ).fetchall()
    for data, score in rows:
        expected = (
            identity_entropy(Identity.from_json(data)) if hasattr(Identity, "from_json") else score
        )
        assert expected == pytest.approx(score)


def test_sanity_passes_on_migrated_data_and_names_planted_problems(copy):
    with connect(copy) as con:
        assert entropy_sanity(con).passed
        con.execute(
            "UPDATE identities SET entropy_score = -1 WHERE id = "
            "(SELECT min(id) FROM identities WHERE identity_type = 'geoid')"
        )
        con.execute(
            "UPDATE identities SET entropy_score = 99 WHERE id = "
            "(SELECT max(id) FROM identities WHERE identity_type = 'geoid')"
        )
        sanity = entropy_sanity(con)
    assert not sanity.passed
    assert sanity.problems == {"negative": 1, "above_bound": 1}
    assert len(sanity.sample["negative"]) == 1


def test_report_is_written_with_tables_and_a_png(migrated, tmp_path):
    with connect(migrated, read_only=True) as con:
        stats = entropy_statistics(con)
    files = write_entropy_report(stats, tmp_path / "reports")
    text = files.markdown.read_text(encoding="utf-8")
    assert "| geoid |" in text and "| scar |" in text
    assert "![entropy histogram](entropy_histogram.png)" in text
    assert files.image.read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "reports").glob(".*.tmp"))


def test_entropy_statistics_survive_a_json_round_trip(migrated):
    with connect(migrated, read_only=True) as con:
        stats = entropy_statistics(con)
    assert stats.distributions and stats.daily
    again = EntropyStatistics.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
