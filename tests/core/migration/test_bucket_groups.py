"""Consecutive buckets of the smaller legacy table judged in one transaction (``engine._groups``,
as a served run does):
each bucket is still recorded as its own partition, with the counts and checksum an ungrouped
run records, and a group fails or commits whole."""

from __future__ import annotations

import shutil

import pytest

from kimera_core.checksum import table_checksum
from kimera_core.db import connect
from kimera_core.migration import IDENTITY_COLUMNS, engine, migrate

PARTITIONS = 8
PARTITION_ROWS = """
SELECT kind, bucket, read, inserted, updated, unchanged, kept, quarantined, identities_rows,
       identities_checksum
FROM kimera_migration_partitions ORDER BY kind, bucket
"""
QUARANTINE = "SELECT source_table, key, reason FROM kimera_quarantine ORDER BY ALL"


class Boom(Exception):
    pass


def _state(con):
    return (
        con.execute(PARTITION_ROWS).fetchall(),
        table_checksum(con, "identities", IDENTITY_COLUMNS),
        con.execute(QUARANTINE).fetchall(),
    )


@pytest.fixture(autouse=True)
def grouped_embedded(monkeypatch):
    """Group as a served run does (the served path: tests/core/dbserver)."""
    monkeypatch.setattr(engine, "GROUP_EMBEDDED", True)


@pytest.fixture
def two_copies(tmp_path, demo_db):
    paths = [tmp_path / "grouped.duckdb", tmp_path / "alone.duckdb"]
    for path in paths:
        shutil.copy(demo_db[0], path)
    return paths


def test_grouped_buckets_record_what_one_transaction_per_bucket_records(two_copies, monkeypatch):
    grouped, alone = two_copies
    transactions: list[tuple[str, list[int]]] = []
    migrate_partition = engine._migrate_partition

    def spy(con, run_id, kind, group, *args):
        transactions.append((kind, list(group)))
        return migrate_partition(con, run_id, kind, group, *args)

    monkeypatch.setattr(engine, "_migrate_partition", spy)
    with connect(grouped) as con:
        report = migrate(con, partitions=PARTITIONS)
        assert report.balanced
        geoids, scars = con.execute(engine.q.TABLE_ROWS_SQL).fetchone()
        # the reference: each bucket's legacy rows, counted apart from the engine's grouping
        by_bucket = {
            (kind, int(bucket)): rows
            for kind, bucket, rows in con.execute(
                "SELECT 'scar', hash(id) % ? AS b, count(*) FROM legacy_scars GROUP BY b "
                "UNION ALL SELECT 'geoid', hash(gid) % ?, count(*) FROM legacy_geoids GROUP BY 2",
                [PARTITIONS, PARTITIONS],
            ).fetchall()
        }
        grouped_state = _state(con)
    size = geoids // scars
    assert size >= 2, "the demo must have fewer scars than geoids"
    assert [g for k, g in transactions if k == "geoid"] == [[b] for b in range(PARTITIONS)]
    scar_groups = [g for k, g in transactions if k == "scar"]
    assert scar_groups == [
        list(range(b, min(b + size, PARTITIONS))) for b in range(0, PARTITIONS, size)
    ]
    recorded = {(r[0], r[1]): r[2] for r in grouped_state[0]}
    assert recorded == {key: by_bucket.get(key, 0) for key in recorded}
    assert len(recorded) == 2 * PARTITIONS

    monkeypatch.setattr(engine, "_joins", lambda *args: False)  # one bucket a transaction
    transactions.clear()
    with connect(alone) as con:
        assert migrate(con, partitions=PARTITIONS).balanced
        alone_state = _state(con)
    assert all(len(g) == 1 for _, g in transactions) and len(transactions) == 2 * PARTITIONS
    assert grouped_state == alone_state


def test_a_group_that_fails_records_none_of_its_buckets_and_the_run_resumes(
    two_copies, monkeypatch
):
    failing, reference = two_copies
    with connect(reference) as con:
        migrate(con, partitions=PARTITIONS)
        expected = table_checksum(con, "identities", IDENTITY_COLUMNS)
    record = engine._record_partition
    recorded: list[tuple[str, int]] = []

    def second_scar_bucket_fails(con, run_id, kind, bucket, counts, checksum):
        if kind == "scar" and bucket == 1:  # the second bucket of the first scar group
            raise Boom
        recorded.append((kind, bucket))
        return record(con, run_id, kind, bucket, counts, checksum)

    monkeypatch.setattr(engine, "_record_partition", second_scar_bucket_fails)
    with connect(failing) as con, pytest.raises(Boom):
        migrate(con, partitions=PARTITIONS)
    assert ("scar", 0) in recorded  # recorded in the transaction, then rolled back with it
    monkeypatch.setattr(engine, "_record_partition", record)
    with connect(failing) as con:
        done = con.execute(
            "SELECT kind, bucket FROM kimera_migration_partitions ORDER BY kind, bucket"
        ).fetchall()
        assert done == [("geoid", b) for b in range(PARTITIONS)]
        report = migrate(con)
        assert report.resumed and report.partitions_skipped == PARTITIONS and report.balanced
        assert table_checksum(con, "identities", IDENTITY_COLUMNS) == expected
