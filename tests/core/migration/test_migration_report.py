"""The migration's typed report: per-partition counts, and from_dict as to_dict's exact inverse."""

from __future__ import annotations

import json
import shutil
from dataclasses import astuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimera_core.db import connect
from kimera_core.migration import (
    MigrationCounts,
    MigrationReport,
    PartitionCounts,
    migrate,
)


@pytest.fixture
def demo_copy(tmp_path, demo_db):
    path = tmp_path / "kimera.duckdb"
    shutil.copy(demo_db[0], path)
    return path


def round_trips(report: MigrationReport) -> None:
    data = report.to_dict()
    again = MigrationReport.from_dict(json.loads(json.dumps(data)))
    assert again == report
    assert again.to_dict() == data


def summed(partitions: list[PartitionCounts]) -> MigrationCounts:
    total = MigrationCounts()
    for partition in partitions:
        total.add(partition.counts)
    return total


def test_a_run_reports_each_partition_and_round_trips(demo_copy):
    with connect(demo_copy) as con:
        report = migrate(con, partitions=3)
        recorded = con.execute(
            "SELECT kind, bucket, read, inserted, updated, unchanged, kept, quarantined "
            "FROM kimera_migration_partitions WHERE run_id = ? ORDER BY kind, bucket",
            [report.run_id],
        ).fetchall()
    assert [(p.kind, p.bucket) for p in report.partition_counts] == [
        (kind, b) for kind in ("geoid", "scar") for b in range(3)
    ]
    assert summed(report.partition_counts) == report.counts
    listed = sorted((p.kind, p.bucket, *astuple(p.counts)) for p in report.partition_counts)
    assert listed == [tuple(r) for r in recorded]
    assert all(p.counts.balanced and not p.skipped for p in report.partition_counts)
    round_trips(report)


def test_a_resumed_run_lists_the_partitions_done_before(demo_copy):
    def crash_after_two(done, total, kind, bucket, counts):
        if done == 2:
            raise RuntimeError("crash")

    with connect(demo_copy) as con:
        with pytest.raises(RuntimeError):
            migrate(con, partitions=2, on_partition=crash_after_two)
        report = migrate(con)
    assert [p.skipped for p in report.partition_counts] == [True, True, False, False]
    assert report.partitions_skipped == 2
    assert summed(report.partition_counts) == report.counts
    round_trips(report)


def test_a_dry_run_reports_each_partition(demo_copy):
    with connect(demo_copy) as con:
        report = migrate(con, partitions=2, dry_run=True)
    assert len(report.partition_counts) == 4
    assert summed(report.partition_counts) == report.counts
    round_trips(report)


def test_to_dict_keeps_the_published_shape(demo_copy):
    with connect(demo_copy) as con:
        data = migrate(con, partitions=1).to_dict()
    assert data["counts"]["changes"] == data["counts"]["inserted"] + data["counts"]["updated"]
    assert data["counts"]["already_present"] == (
        data["counts"]["unchanged"] + data["counts"]["kept"]
    )
    assert data["balanced"] is True and data["rows_per_second"] > 0
    assert data["partition_counts"][0]["counts"]["changes"] >= 0


COUNTS = st.builds(MigrationCounts, *[st.integers(0, 10**12)] * 6)
REPORTS = st.builds(
    MigrationReport,
    run_id=st.text(max_size=20),
    dry_run=st.booleans(),
    resumed=st.booleans(),
    partitions=st.integers(1, 4096),
    counts=COUNTS,
    legacy_rows=st.integers(0, 10**12),
    quarantine_reasons=st.dictionaries(st.text(max_size=30), st.integers(0, 10**9)),
    warnings=st.dictionaries(st.text(max_size=30), st.integers(0, 10**9)),
    partitions_skipped=st.integers(0, 8192),
    seconds=st.floats(0, 1e6, allow_nan=False),
    identities_checksum=st.fixed_dictionaries(
        {"rows": st.integers(0, 10**12), "checksum": st.text(max_size=32)}
    ),
    status=st.sampled_from(["completed", "unbalanced", "dry-run"]),
    partition_counts=st.lists(
        st.builds(
            PartitionCounts,
            st.sampled_from(["geoid", "scar"]),
            st.integers(0, 4095),
            COUNTS,
            st.booleans(),
        ),
        max_size=8,
    ),
)


@settings(max_examples=200, deadline=None)
@given(REPORTS)
def test_from_dict_inverts_to_dict(report):
    round_trips(report)


@given(COUNTS)
def test_counts_from_dict_inverts_to_dict(counts):
    assert MigrationCounts.from_dict(counts.to_dict()) == counts
