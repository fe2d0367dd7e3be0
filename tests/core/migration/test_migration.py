"""The migration engine against real DuckDB files: merge rule, quarantine, idempotence,
resume after a crash or kill -9, dry run, rollback and the P1 read path."""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from support.legacy_rows import insert_geoids, store_identity_p1

from kimera_core.checksum import table_checksum
from kimera_core.db import connect
from kimera_core.demo import generate_demo_data
from kimera_core.entropy import identity_entropy
from kimera_core.errors import KimeraError
from kimera_core.identity import Geoid, Identity, geoid_id
from kimera_core.legacy import (
    create_legacy_schema,
    geoid_from_row,
    read_identity_p1,
    secondary_indexes,
)
from kimera_core.migration import (
    IDENTITY_COLUMNS,
    migrate,
    quarantine_summary,
    rollback,
    run_history,
)

KIMERA = str(Path(sys.executable).parent / "kimera")
T0 = 1_790_000_000.0


def identities_checksum(con):
    return table_checksum(con, "identities", IDENTITY_COLUMNS)


def geoid(text, lang="en", **kw):
    return Geoid.new(text, lang, tags=kw.pop("tags", ["a", "b"]), created_at=T0, **kw)


GOOD_A = geoid("good a")
GOOD_B = geoid("good b")


@pytest.fixture
def demo_path(demo_db):
    return demo_db[0]


@pytest.fixture
def demo_copy(tmp_path, demo_path):
    path = tmp_path / "kimera.duckdb"
    shutil.copy(demo_path, path)
    return path


@pytest.fixture
def empty_db(tmp_path):
    """A legacy database holding just two good geoids."""
    path = tmp_path / "small.duckdb"
    with connect(path, create=True) as con:
        create_legacy_schema(con)
        insert_geoids(con, [GOOD_A, GOOD_B])
    return path


# --- reconciliation and idempotence ----------------------------------------------------
def test_migration_balances_and_a_second_run_changes_nothing(demo_copy):
    with connect(demo_copy) as con:
        first = migrate(con, partitions=4)
        after_first = identities_checksum(con)
        second = migrate(con, partitions=4)
        after_second = identities_checksum(con)
        legacy = con.execute(
            "SELECT (SELECT count(*) FROM legacy_geoids) + (SELECT count(*) FROM legacy_scars)"
        ).fetchone()[0]
    assert first.balanced and first.legacy_rows == legacy == first.counts.read
    assert first.counts.inserted > 0 and first.counts.quarantined > 0
    assert second.counts.changes == 0
    assert second.counts.unchanged == first.counts.changes + first.counts.already_present
    assert second.counts.quarantined == first.counts.quarantined
    assert after_first == after_second
    assert second.status == "completed"


def test_identities_hold_every_valid_legacy_row_exactly_once(demo_copy):
    with connect(demo_copy) as con:
        before = set(r[0] for r in con.execute("SELECT id FROM identities").fetchall())
        report = migrate(con)
        after = [r[0] for r in con.execute("SELECT id FROM identities").fetchall()]
        quarantined = set(
            r[0]
            for r in con.execute(
                "SELECT key FROM kimera_quarantine WHERE run_id = ?", [report.run_id]
            ).fetchall()
        )
    assert len(after) == len(set(after)) == len(before) + report.counts.inserted
    # a quarantined legacy row never creates an identity; one P1 had already written stays
    assert (set(after) - before) & quarantined == set()
    assert before <= set(after)


def test_p1_read_rebuilds_every_migrated_row(demo_copy):
    with connect(demo_copy) as con:
        migrate(con)
        legacy = {
            row[0]: geoid_from_row(row)
            for row in con.execute(
                "SELECT gid, raw, echo, lang_axis, tags, weight, meta, created_at, updated_at "
                "FROM legacy_geoids"
            ).fetchall()
        }
        rows = con.execute(
            "SELECT id, identity_type, created_at, updated_at, entropy_score FROM identities"
        ).fetchall()
        checked = 0
        for identity_id, identity_type, created_at, updated_at, _ in rows:
            identity = read_identity_p1(con, identity_id)
            assert identity.id == identity_id and identity.identity_type == identity_type
            # the document's ISO timestamps carry the exact DOUBLE of the columns
            assert identity.created_at == created_at and identity.updated_at == updated_at
            if identity_type == "geoid":
                expected = legacy[identity_id].to_identity()
                assert identity.raw == expected.raw and identity.echo == expected.echo
                assert identity.tags == expected.tags and identity.meta == expected.meta
                assert identity.weight == expected.weight
                checked += 1
    assert checked > 1000


def test_entropy_score_is_the_reference_entropy(demo_copy):
    with connect(demo_copy) as con:
        migrate(con)
        rows = con.execute("SELECT data, entropy_score FROM identities").fetchall()
    for data, score in rows:
        expected = identity_entropy(Identity.from_document(data))
        if expected is None:
            assert score is None
        else:
            assert math.isclose(score, expected, rel_tol=0, abs_tol=1e-9)


# --- the merge rule --------------------------------------------------------------------
def test_merge_newer_wins_and_identical_rows_are_left_alone(empty_db):
    same, older_identity, newer_identity, tie = (geoid(f"text {i}") for i in range(4))
    with connect(empty_db) as con:
        insert_geoids(con, [same, older_identity, newer_identity, tie])
        # identical: what the migration itself would write
        store_identity_p1(con, same.to_identity(), 1.0)
        # the application wrote an older version: the legacy row wins
        stale = Identity(
            **{**_fields(older_identity.to_identity()), "raw": "stale", "updated_at": T0 - 100}
        )
        store_identity_p1(con, stale, 0.0)
        # the application wrote a newer version: it is kept
        fresh = Identity(
            **{**_fields(newer_identity.to_identity()), "raw": "fresh", "updated_at": T0 + 100}
        )
        store_identity_p1(con, fresh, 0.0)
        # same updated_at, different content: the identity is kept (tie goes to the new store)
        tied = Identity(**{**_fields(tie.to_identity()), "raw": "tied"})
        store_identity_p1(con, tied, 0.0)
        before_same = con.execute("SELECT * FROM identities WHERE id = ?", [same.gid]).fetchone()
        report = migrate(con)
        assert report.counts.unchanged == 1
        assert report.counts.updated == 1
        assert report.counts.kept == 2
        assert report.counts.inserted == 2  # the fixture's two good geoids
        assert (
            con.execute("SELECT * FROM identities WHERE id = ?", [same.gid]).fetchone()
            == before_same
        )
        assert read_identity_p1(con, older_identity.gid).raw == older_identity.raw
        assert read_identity_p1(con, newer_identity.gid).raw == "fresh"
        assert read_identity_p1(con, tie.gid).raw == "tied"


def _fields(identity: Identity) -> dict:
    return {name: getattr(identity, name) for name in Identity.__slots__}


# --- quarantine: one row per reason ----------------------------------------------------
def _raw_legacy_db(path: Path, json_type: str = "JSON") -> None:
    """The legacy layout, optionally with TEXT instead of JSON columns and no keys (old files)."""
    with duckdb.connect(str(path)) as con:
        key = "" if json_type == "TEXT" else " PRIMARY KEY"
        con.execute(f"""CREATE TABLE legacy_geoids (gid TEXT{key}, raw TEXT NOT NULL, echo TEXT,
            lang_axis TEXT, tags {json_type}, weight DOUBLE, meta {json_type},
            created_at DOUBLE, updated_at DOUBLE)""")
        con.execute(f"""CREATE TABLE legacy_scars (id TEXT{key}, weight DOUBLE,
            related_ids {json_type}, meta {json_type}, created_at DOUBLE, updated_at DOUBLE)""")
        create_legacy_schema(con)
        insert_geoids(con, [GOOD_A, GOOD_B])


def _add_geoid(con, gid, raw="x", tags='["t"]', weight=1.0, meta="{}", created=T0, updated=T0):
    con.execute(
        "INSERT INTO legacy_geoids VALUES (?, ?, ?, 'en', ?, ?, ?, ?, ?)",
        [gid, raw, raw.strip() if raw else raw, tags, weight, meta, created, updated],
    )


def _add_scar(con, sid, related, weight=0.5, meta='{"relationship_type": "x"}', created=T0):
    con.execute(
        "INSERT INTO legacy_scars VALUES (?, ?, ?, ?, ?, ?)",
        [sid, weight, related, meta, created, created],
    )


GEOID_CASES = {
    "null_or_empty_key": dict(gid=""),
    "key_in_both_tables": dict(gid="shared_key"),
    "non_object_meta": dict(meta='["terms"]'),
    "non_list_tags": dict(tags='"a,b"'),
    "empty_raw": dict(raw="   "),
    "non_finite_weight": dict(weight=float("nan")),
    "non_finite_intensity": dict(meta='{"terms": [{"intensity": NaN}, {"intensity": 1}]}'),
    "non_finite_timestamp": dict(created=float("inf")),
    "missing_timestamps": dict(created=None, updated=None),
}

SCAR_CASES = {
    "related_ids_not_list": '"a,b"',
    "too_few_related_ids": json.dumps([GOOD_A.gid]),
    "related_ids_not_strings": json.dumps([GOOD_A.gid, 7]),
    "dangling_related_id": json.dumps([GOOD_A.gid, "no_such_geoid"]),
    "related_geoid_quarantined": None,  # links a geoid that is itself quarantined
    "non_finite_weight": None,
}


def test_every_quarantine_reason_is_recorded_with_the_original_row(empty_db):
    with connect(empty_db) as con:
        for reason, kw in GEOID_CASES.items():
            _add_geoid(con, **{"gid": f"g_{reason}", **kw})
        _add_scar(con, "shared_key", json.dumps([GOOD_A.gid, GOOD_B.gid]))
        for reason, related in SCAR_CASES.items():
            if reason == "related_geoid_quarantined":
                related = json.dumps([GOOD_A.gid, "g_empty_raw"])
            if reason == "non_finite_weight":
                _add_scar(
                    con, f"s_{reason}", json.dumps([GOOD_A.gid, GOOD_B.gid]), weight=float("inf")
                )
                continue
            _add_scar(con, f"s_{reason}", related)
        # an identity of the other type under a legacy geoid's key
        _add_geoid(con, "g_type_conflict", raw="conflict")
        store_identity_p1(
            con,
            Identity(
                "g_type_conflict", "scar", related_ids=["a", "b"], created_at=T0, updated_at=T0
            ),
            0.0,
        )
        report = migrate(con)
        assert report.balanced
        rows = con.execute(
            "SELECT source_table, key, reason, original FROM kimera_quarantine WHERE run_id = ?",
            [report.run_id],
        ).fetchall()
    found = {(table, key): (reason, json.loads(original)) for table, key, reason, original in rows}
    for reason in GEOID_CASES:
        key = (
            ""
            if reason == "null_or_empty_key"
            else ("shared_key" if reason == "key_in_both_tables" else f"g_{reason}")
        )
        got_reason, original = found[("legacy_geoids", key)]
        assert got_reason == reason, (key, got_reason)
        assert original["gid"] == key  # the original row is kept whole
    assert found[("legacy_geoids", "g_type_conflict")][0] == "identity_type_conflict"
    assert found[("legacy_scars", "shared_key")][0] == "key_in_both_tables"
    for reason in SCAR_CASES:
        assert found[("legacy_scars", f"s_{reason}")][0] == reason
    # the good rows migrated, nothing else did
    assert report.counts.inserted == 2
    assert report.counts.quarantined == len(rows)


def test_text_columns_with_invalid_json_and_duplicate_keys_are_quarantined(tmp_path):
    path = tmp_path / "old.duckdb"
    _raw_legacy_db(path, json_type="TEXT")
    with connect(path) as con:
        _add_geoid(con, "g_bad_meta", meta="{bad")
        _add_geoid(con, "g_bad_tags", tags="[1,")
        _add_geoid(con, "g_dup", raw="one")
        _add_geoid(con, "g_dup", raw="two")
        _add_scar(con, "s_bad_rel", "[oops")
        report = migrate(con)
        reasons = dict(
            con.execute(
                "SELECT key || '/' || hash(original), reason FROM kimera_quarantine"
            ).fetchall()
        )
        by_key = {}
        for k, reason in reasons.items():
            by_key.setdefault(k.split("/")[0], set()).add(reason)
    assert by_key["g_bad_meta"] == {"invalid_json_meta"}
    assert by_key["g_bad_tags"] == {"invalid_json_tags"}
    assert by_key["g_dup"] == {"duplicate_key"}  # both copies, neither wins silently
    assert by_key["s_bad_rel"] == {"invalid_json_related_ids"}
    assert report.counts.quarantined == 5 and report.balanced


def test_warnings_migrate_the_row(empty_db):
    with connect(empty_db) as con:
        _add_geoid(con, "g_null_weight", weight=None)
        report = migrate(con)
        assert read_identity_p1(con, "g_null_weight").weight is None
    assert report.warnings["legacy_geoids:null_weight"] == 1
    assert report.warnings["legacy_geoids:gid_not_derived_from_text"] >= 1


# --- dry run ---------------------------------------------------------------------------
def test_dry_run_writes_nothing_and_predicts_the_real_run(demo_copy):
    with connect(demo_copy) as con:
        tables_before = con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        before = identities_checksum(con)
        dry = migrate(con, dry_run=True, partitions=4)
        assert (
            con.execute("SELECT table_name FROM information_schema.tables").fetchall()
            == tables_before
        )
        assert identities_checksum(con) == before
        real = migrate(con, partitions=4)
    assert dry.counts == real.counts
    assert dry.quarantine_reasons == real.quarantine_reasons


# --- crash and resume ------------------------------------------------------------------
class Crash(Exception):
    pass


def test_a_crashed_run_resumes_and_converges(tmp_path, demo_path):
    reference = tmp_path / "reference.duckdb"
    crashed = tmp_path / "crashed.duckdb"
    shutil.copy(demo_path, reference)
    shutil.copy(demo_path, crashed)
    with connect(reference) as con:
        migrate(con, partitions=6)
        expected = identities_checksum(con)

    def crash_after(n):
        def hook(done, total, kind, bucket, counts):
            if done == n:
                raise Crash

        return hook

    with connect(crashed) as con, pytest.raises(Crash):
        migrate(con, partitions=6, on_partition=crash_after(5))
    with connect(crashed) as con:
        report = migrate(con)  # resumes with the run's own partition count
        assert report.resumed and report.partitions_skipped == 5
        assert report.balanced
        assert identities_checksum(con) == expected


def test_resuming_with_other_partitions_is_refused(empty_db):
    with connect(empty_db) as con:
        with pytest.raises(Crash):
            migrate(con, partitions=3, on_partition=lambda *a: (_ for _ in ()).throw(Crash()))
        with pytest.raises(KimeraError, match="--partitions 3"):
            migrate(con, partitions=5)


def test_rows_added_to_a_done_partition_unbalance_the_resumed_run(empty_db):
    with connect(empty_db) as con:
        with pytest.raises(Crash):
            migrate(
                con,
                partitions=1,
                on_partition=lambda d, *a: (_ for _ in ()).throw(Crash()) if d == 1 else None,
            )
        insert_geoids(con, [geoid("arrived during the run")])
        report = migrate(con)
        assert not report.balanced and report.status == "unbalanced"
        again = migrate(con)  # a fresh run picks the new row up
        assert again.balanced and again.counts.inserted == 1


@pytest.mark.slow
def test_kill_9_at_random_points_converges_to_the_uninterrupted_state(tmp_path):
    source = tmp_path / "source.duckdb"
    generate_demo_data(source, geoids=40_000, scars=20_000, seed=5, broken_share=0.01)
    reference = tmp_path / "reference.duckdb"
    shutil.copy(source, reference)
    start = time.perf_counter()
    subprocess.run(
        [KIMERA, "migrate", "--db", str(reference), "--partitions", "16", "--json"],
        check=True,
        capture_output=True,
    )
    full = time.perf_counter() - start
    with connect(reference, read_only=True) as con:
        expected = identities_checksum(con)

    victim = tmp_path / "victim.duckdb"
    shutil.copy(source, victim)
    rng = random.Random(20261125)
    kills = 0
    for _attempt in range(12):
        started = time.perf_counter()
        proc = subprocess.Popen(
            [KIMERA, "migrate", "--db", str(victim), "--partitions", "16", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(rng.uniform(0.05, max(full, 0.1)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        _, err = proc.communicate()
        assert proc.returncode == 0, err
        if kills == 0:
            # it finished before the first kill (the machine got faster than the reference
            # run, shared with other jobs): start again from the source, killing sooner
            full = (time.perf_counter() - started) / 2
            shutil.copy(source, victim)
            continue
        break
    else:
        subprocess.run(
            [KIMERA, "migrate", "--db", str(victim), "--json"], capture_output=True, check=True
        )
    assert kills >= 1, "no kill landed mid-run; the test did not test anything"
    with connect(victim, read_only=True) as con:
        assert identities_checksum(con) == expected
        # the secondary indexes dropped for the load are back, whatever run a kill interrupted
        assert set(secondary_indexes(con, "identities")) == {
            "idx_identities_entropy",
            "idx_identities_type",
            "idx_identities_updated_at",
        }
        assert con.execute(
            "SELECT count(*) FROM kimera_migration_runs WHERE dropped_indexes IS NOT NULL"
        ).fetchone() == (0,)
        assert (
            con.execute("SELECT count(*) - count(DISTINCT id) FROM identities").fetchone()[0] == 0
        )
    # whatever run finished last, the database reconciles
    check = subprocess.run(
        [KIMERA, "migrate", "--db", str(victim), "--json"], capture_output=True, check=True
    )
    assert json.loads(check.stdout)["counts"]["changes"] == 0
    assert json.loads(check.stdout)["balanced"]


# --- rollback --------------------------------------------------------------------------
def test_rollback_restores_the_exact_pre_migration_identities(demo_copy):
    with connect(demo_copy) as con:
        before = identities_checksum(con)
        migrate(con, partitions=4)
        migrate(con, partitions=4)
        assert identities_checksum(con) != before
        report = rollback(con)
        assert identities_checksum(con) == before
        assert report.left_modified == 0 and len(report.runs) == 2
        assert con.execute("SELECT count(*) FROM kimera_quarantine").fetchone()[0] == 0
        statuses = {
            r[0] for r in con.execute("SELECT status FROM kimera_migration_runs").fetchall()
        }
    assert statuses == {"rolled_back"}


def test_rollback_restores_updated_rows_and_leaves_application_writes(empty_db):
    older = geoid("was older in identities")
    with connect(empty_db) as con:
        insert_geoids(con, [older])
        stale = Identity(**{**_fields(older.to_identity()), "raw": "stale", "updated_at": T0 - 5})
        store_identity_p1(con, stale, 0.0)
        before = identities_checksum(con)
        report = migrate(con)
        assert report.counts.updated == 1 and report.counts.inserted == 2
        # the application then rewrites one migrated identity
        changed = read_identity_p1(con, GOOD_A.gid)
        store_identity_p1(con, Identity(**{**_fields(changed), "raw": "edited by app"}), 0.0)
        rb = rollback(con)
        assert rb.restored == 1 and rb.deleted == 1 and rb.left_modified == 1
        assert rb.left_modified_sample == [GOOD_A.gid]
        assert read_identity_p1(con, older.gid).raw == "stale"
        assert read_identity_p1(con, GOOD_A.gid).raw == "edited by app"
        assert read_identity_p1(con, GOOD_B.gid) is None
        con.execute("DELETE FROM identities WHERE id = ?", [GOOD_A.gid])
        assert identities_checksum(con) == before


def test_quarantine_summary_lists_reasons_with_keys(empty_db):
    with connect(empty_db) as con:
        _add_geoid(con, "g_empty", raw="")
        migrate(con)
        summary = quarantine_summary(con)
    assert summary["total"] == 1
    assert summary["reasons"]["legacy_geoids:empty_raw"]["sample_keys"] == ["g_empty"]


# --- CLI -------------------------------------------------------------------------------
def test_cli_migrate_json_status_quarantine_and_rollback(demo_copy):
    out = subprocess.run(
        [KIMERA, "migrate", "--db", str(demo_copy), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["balanced"] and report["counts"]["inserted"] > 0
    assert report["counts"]["read"] == (
        report["counts"]["changes"]
        + report["counts"]["already_present"]
        + report["counts"]["quarantined"]
    )
    status = json.loads(
        subprocess.run(
            [KIMERA, "migrate", "status", "--db", str(demo_copy), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert status[0]["run_id"] == report["run_id"] and status[0]["status"] == "completed"
    q = json.loads(
        subprocess.run(
            [KIMERA, "migrate", "quarantine", "--db", str(demo_copy), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert q["total"] == report["counts"]["quarantined"]
    rb = json.loads(
        subprocess.run(
            [KIMERA, "migrate", "rollback", "--db", str(demo_copy), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert rb["deleted"] == report["counts"]["inserted"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["migrate", "--partitions", "0", "--db", "x.duckdb"], "--partitions"),
        (["migrate"], "--db"),
        (["migrate", "rollback", "--db", "missing.duckdb"], "no such file"),
        (["migrate", "rollback", "--run", "nope", "--db", "{db}"], "no migration run"),
    ],
)
def test_cli_migrate_errors_are_one_line(demo_copy, args, message):
    args = [a.replace("{db}", str(demo_copy)) for a in args]
    result = subprocess.run([KIMERA, *args], capture_output=True, text=True)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kimera: error:") and message in lines[0]


def test_geoid_ids_of_demo_data_are_deterministic():
    assert geoid_id(" x ", "en") == geoid_id("x", "en")


# --- catalog lookups see this database only --------------------------------------------
def test_catalog_lookups_ignore_attached_databases(tmp_path):
    other = tmp_path / "other.duckdb"
    with duckdb.connect(str(other)) as con:
        create_legacy_schema(con)  # keyed tables, JSON columns, migration tables below
        migrate(con)
    old = tmp_path / "old.duckdb"
    _raw_legacy_db(old, json_type="TEXT")  # no primary keys, TEXT columns
    with connect(old) as con:
        con.execute(f"ATTACH '{other}' AS other (READ_ONLY)")
        assert run_history(con) == []  # other's runs are not this database's
        _add_geoid(con, "g_dup", raw="one")
        _add_geoid(con, "g_dup", raw="two")
        _add_geoid(con, "g_bad", meta="{bad")
        report = migrate(con)
    # other's primary key and JSON columns did not switch off this file's checks
    assert report.quarantine_reasons == {
        "legacy_geoids:duplicate_key": 2,
        "legacy_geoids:invalid_json_meta": 1,
    }
