"""Scars only after their geoids: buckets migrated one run each, in any order, end as one run.

A scar whose geoid's bucket has not run waits in quarantine (``related_geoid_pending``) and
is judged again by the next run of any bucket; the waiting ones are not forgiven by
``settled_quarantine_keys_sql`` (what the gates may count as accounted for).
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

from kimera_core.checksum import table_checksum
from kimera_core.db import connect
from kimera_core.demo import generate_demo_data
from kimera_core.migration import (
    IDENTITY_COLUMNS,
    WAITING_KIND,
    migrate,
    migrate_buckets,
    rollback,
    settled_quarantine_keys_sql,
    waiting_scars,
)

BUCKETS = 8


@pytest.fixture(scope="module")
def clean_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("waiting") / "clean.duckdb"
    generate_demo_data(path, geoids=300, scars=150, seed=11, broken_share=0, dual_written_share=0)
    return path


@pytest.fixture
def clean_db(tmp_path, clean_template):
    path = tmp_path / "k.duckdb"
    shutil.copy(clean_template, path)
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, clean_template):
    """identities' checksum and the quarantine after one ``migrate`` over every bucket."""
    path = tmp_path_factory.mktemp("full") / "k.duckdb"
    shutil.copy(clean_template, path)
    with connect(path) as con:
        report = migrate(con, partitions=BUCKETS)
        return table_checksum(con, "identities", IDENTITY_COLUMNS), report.counts.quarantined


def current_scar_reasons(con):
    return dict(
        con.execute(
            "SELECT reason, count(*) FROM kimera_quarantine WHERE cleared_by IS NULL "
            "AND source_table = 'legacy_scars' GROUP BY ALL"
        ).fetchall()
    )


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_one_run_per_bucket_in_any_order_ends_as_one_full_run(clean_db, full_run, order):
    buckets = list(range(BUCKETS))
    if order == "descending":
        buckets.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(buckets)
    reports = []
    with connect(clean_db) as con:
        for bucket in buckets:
            reports.append(migrate_buckets(con, [bucket], partitions=BUCKETS))
            assert reports[-1].balanced
        checksum = table_checksum(con, "identities", IDENTITY_COLUMNS)
        assert current_scar_reasons(con) == {}
        assert waiting_scars(con) == 0
    # scars waited on the way (scar work came before some of their geoids) ...
    assert any(r.quarantine_reasons.get("legacy_scars:related_geoid_pending") for r in reports)
    assert reports[0].waiting > 0
    # ... and none was refused for good: the same identities as one run over every bucket
    assert full_run == (checksum, 0)
    assert reports[-1].waiting == 0


def test_a_waiting_scar_is_not_settled_and_is_judged_again_after_its_geoid(clean_db):
    with connect(clean_db) as con:
        first = migrate_buckets(con, [0], partitions=BUCKETS)
        waiting = first.waiting
        assert waiting > 0
        assert first.quarantine_reasons["legacy_scars:related_geoid_pending"] == waiting
        settled = {r[0] for r in con.execute(settled_quarantine_keys_sql(con)).fetchall()}
        pending = {
            r[0]
            for r in con.execute(
                "SELECT key FROM kimera_quarantine WHERE reason = 'related_geoid_pending'"
            ).fetchall()
        }
        assert pending and not pending & settled
        # the next run of another bucket judges bucket 0's waiting scars again
        second = migrate_buckets(con, [1], partitions=BUCKETS)
        rejudged = [p for p in second.partition_counts if p.kind == WAITING_KIND]
        assert [p.bucket for p in rejudged] == [0]
        assert rejudged[0].counts.read == waiting
        assert second.balanced  # its legacy rows include the waiting scars it judged again
        # the rows of the first run are superseded by the second run's judgement
        superseded = con.execute(
            "SELECT count(*) FROM kimera_quarantine WHERE run_id = ? AND cleared_by = ?",
            [first.run_id, second.run_id],
        ).fetchone()[0]
        assert superseded == waiting


def test_a_retry_of_one_bucket_changes_nothing(clean_db):
    with connect(clean_db) as con:
        for bucket in range(BUCKETS):
            migrate_buckets(con, [bucket], partitions=BUCKETS)
        before = table_checksum(con, "identities", IDENTITY_COLUMNS)
        again = migrate_buckets(con, [5], partitions=BUCKETS)
        assert table_checksum(con, "identities", IDENTITY_COLUMNS) == before
    assert again.counts.changes == 0 and again.waiting == 0
    assert [p.kind for p in again.partition_counts] == ["geoid", "scar"]


def test_rolling_back_the_run_that_judged_again_makes_the_scars_wait_again(clean_db):
    with connect(clean_db) as con:
        first = migrate_buckets(con, [2], partitions=BUCKETS)
        for bucket in (b for b in range(BUCKETS) if b != 2):
            migrate_buckets(con, [bucket], partitions=BUCKETS)
        assert waiting_scars(con) == 0
        rollback(con)  # every run, newest first
        assert current_scar_reasons(con) == {}
        assert con.execute("SELECT count(*) FROM identities").fetchone() == (0,)
        again = migrate_buckets(con, [2], partitions=BUCKETS)
    assert again.waiting == first.waiting


def test_a_scar_of_a_repaired_geoid_follows_when_the_geoid_bucket_runs(clean_db):
    with connect(clean_db) as con:
        gid, related = con.execute(
            "SELECT g.gid, s.id FROM legacy_scars s, legacy_geoids g "
            "WHERE g.gid = json_extract_string(s.related_ids, '$[0]') ORDER BY s.id LIMIT 1"
        ).fetchone()
        raw = con.execute("SELECT raw FROM legacy_geoids WHERE gid = ?", [gid]).fetchone()[0]
        con.execute("UPDATE legacy_geoids SET raw = ' ' WHERE gid = ?", [gid])
        full = migrate(con, partitions=BUCKETS)
        assert full.quarantine_reasons["legacy_scars:related_geoid_quarantined"] >= 1
        assert full.waiting == 0  # quarantined for a repair, not waiting for work
        con.execute("UPDATE legacy_geoids SET raw = ? WHERE gid = ?", [raw, gid])
        bucket = con.execute("SELECT hash(?) % ?", [gid, BUCKETS]).fetchone()[0]
        fixed = migrate_buckets(con, [int(bucket)], partitions=BUCKETS)
        assert fixed.balanced
        reasons = con.execute(
            "SELECT reasons FROM kimera_quarantine WHERE key = ? AND cleared_by IS NULL",
            [related],
        ).fetchall()
        present = con.execute("SELECT count(*) FROM identities WHERE id = ?", [related]).fetchone()
    assert [json.loads(r[0]) for r in reasons] == [] and present == (1,)
