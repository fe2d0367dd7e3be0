"""Repair: keys re-synced from the authoritative store through the dual write, journaled, undone."""

from __future__ import annotations

import shutil

import pytest

from kimera_core.cli import main
from kimera_core.consistency import verify
from kimera_core.db import connect
from kimera_core.demo import generate_demo_data
from kimera_core.legacy import fetch_legacy_identity, read_identity_p1
from kimera_core.migration import migrate
from kimera_core.repair import (
    RepairError,
    RepairReport,
    keys_from_verification,
    plan_repair,
    repair,
    undo_repair,
)
from kimera_core.rollout import set_stage


@pytest.fixture(scope="module")
def migrated_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("repair") / "template.duckdb"
    generate_demo_data(path, geoids=300, scars=120, seed=3, broken_share=0.0)
    with connect(path) as con:
        migrate(con)
    return path


@pytest.fixture
def db(tmp_path, migrated_template):
    path = tmp_path / "kimera.duckdb"
    shutil.copy(migrated_template, path)
    return path


def _geoids(con, n: int) -> list[str]:
    rows = con.execute("SELECT gid FROM legacy_geoids ORDER BY gid LIMIT ?", [n]).fetchall()
    return [r[0] for r in rows]


def _diverge(con) -> dict[str, str]:
    """A legacy-side edit, an identities-side edit and a key dropped from identities."""
    edited_legacy, edited_new, dropped = _geoids(con, 3)
    con.execute("UPDATE legacy_geoids SET raw = 'edited in legacy' WHERE gid = ?", [edited_legacy])
    con.execute(
        'UPDATE identities SET data = json_merge_patch(data, \'{"raw": "edited in new"}\') '
        "WHERE id = ?",
        [edited_new],
    )
    con.execute("DELETE FROM identities WHERE id = ?", [dropped])
    return {"legacy": edited_legacy, "new": edited_new, "dropped": dropped}


def test_before_read_new_legacy_wins_and_the_stores_agree_after(db):
    with connect(db) as con:
        keys = _diverge(con)
        assert not verify(con).consistent
        found, source = keys_from_verification(con)
        assert sorted(found) == sorted(keys.values()) and source.startswith("verification 1 of 1")
        report = repair(con, found, actor="test", source=source)
        assert report.authority == "legacy" and report.ok
        assert sorted(report.stored) == sorted(keys.values()) and report.deleted == []
        assert read_identity_p1(con, keys["legacy"]).raw == "edited in legacy"
        assert read_identity_p1(con, keys["new"]).raw != "edited in new"
        assert read_identity_p1(con, keys["dropped"]) is not None
        assert report.verification.passed and report.still_differing == []
        assert verify(con, record=False).consistent


def test_from_read_new_identities_win_and_a_key_only_in_legacy_goes(db):
    with connect(db) as con:
        keys = _diverge(con)
        set_stage(con, "read-new", actor="test")
        stage, actions = plan_repair(con, list(keys.values()))
        assert stage == "read-new"
        by_key = {a.key: a.action for a in actions}
        assert by_key == {keys["legacy"]: "store", keys["new"]: "store", keys["dropped"]: "delete"}
        report = repair(con, list(keys.values()), actor="test")
        assert report.authority == "new" and report.deleted == [keys["dropped"]]
        assert fetch_legacy_identity(con, keys["new"]).raw == "edited in new"
        assert fetch_legacy_identity(con, keys["legacy"]).raw != "edited in legacy"
        assert fetch_legacy_identity(con, keys["dropped"]) is None
        assert verify(con, record=False).consistent


def test_a_dry_run_plans_and_writes_nothing(db):
    with connect(db) as con:
        keys = _diverge(con)
        before = con.execute("SELECT count(*) FROM dual_write_log").fetchone()[0]
        report = repair(con, list(keys.values()), actor="test", dry_run=True)
        assert report.dry_run and report.stored == [] and report.verification is None
        assert "would re-sync 3 keys" in report.summary()
        assert con.execute("SELECT count(*) FROM dual_write_log").fetchone()[0] == before
        assert read_identity_p1(con, keys["dropped"]) is None


def test_undo_puts_both_stores_back_as_they_were(db):
    with connect(db) as con:
        keys = _diverge(con)
        snapshot = {
            k: (read_identity_p1(con, k), fetch_legacy_identity(con, k)) for k in keys.values()
        }
        report = repair(con, list(keys.values()), actor="test")
        undone = undo_repair(con, report.repair_id)
        assert undone.restored == {"identities": 2, "legacy_geoids": 3, "legacy_scars": 0}
        after = {
            k: (read_identity_p1(con, k), fetch_legacy_identity(con, k)) for k in keys.values()
        }
        assert after == snapshot
        logged = con.execute(
            "SELECT count(*) FROM dual_write_log WHERE operation = 'repair_undo'"
        ).fetchone()[0]
        assert logged == 3
        with pytest.raises(RepairError, match="already undone"):
            undo_repair(con, report.repair_id)


def test_quarantined_keys_are_left_alone(tmp_path):
    path = tmp_path / "q.duckdb"
    generate_demo_data(path, geoids=200, scars=80, seed=9, broken_share=0.05)
    with connect(path) as con:
        migrate(con)
        (key,) = con.execute("SELECT key FROM kimera_quarantine LIMIT 1").fetchone()
        _, actions = plan_repair(con, [key])
    assert [a.action for a in actions] == ["quarantined"]


def test_without_a_verification_or_keys_the_repair_says_why(db):
    with connect(db) as con:
        with pytest.raises(RepairError, match="no verification is recorded"):
            keys_from_verification(con)
        with pytest.raises(RepairError, match="no keys to repair"):
            repair(con, [], actor="test")
        verify(con)
        with pytest.raises(RepairError, match="no verification 5: 1 are recorded"):
            keys_from_verification(con, 5)


def test_a_capped_sample_repairs_every_key_differing_now(db):
    with connect(db) as con:
        keys = _diverge(con)
        verify(con, sample=1)
        found, source = keys_from_verification(con)
    assert sorted(found) == sorted(keys.values()) and "capped" in source


def test_the_report_travels_as_json_and_comes_back_typed(db):
    with connect(db) as con:
        keys = _diverge(con)
        report = repair(con, list(keys.values()), actor="test")
    again = RepairReport.from_dict(report.to_dict())
    assert again.to_dict() == report.to_dict()


def test_the_cli_repairs_from_the_latest_verification_and_undoes(db, capsys):
    with connect(db) as con:
        keys = _diverge(con)
        verify(con)
    main(["repair", "--db", str(db), "--dry-run"])
    out = capsys.readouterr().out
    assert "would re-sync 3 keys from the legacy tables" in out
    main(["repair", "--db", str(db)])
    out = capsys.readouterr().out
    assert "re-synced 3 keys" in out and "repaired keys agree" in out
    repair_id = out.split("repair id ")[1].split()[0]
    main(["repair", "--db", str(db), "--undo", repair_id])
    assert f"undid {repair_id}: 3 keys" in capsys.readouterr().out
    with connect(db, read_only=True) as con:
        assert read_identity_p1(con, keys["dropped"]) is None
