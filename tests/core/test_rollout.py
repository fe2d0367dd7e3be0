"""The rollout stage model: stored stage, history, default from KIMERA_ID_DUAL_WRITE, routing."""

from __future__ import annotations

import pytest

from kimera_core.db import open_database
from kimera_core.rollout import (
    STAGES,
    RolloutError,
    get_stage,
    routing,
    set_stage,
    stage_history,
)


@pytest.fixture
def con(tmp_path):
    con = open_database(tmp_path / "r.duckdb", create=True)
    yield con
    con.close()


def test_default_stage_without_flag_is_legacy_only(con, monkeypatch):
    monkeypatch.delenv("KIMERA_ID_DUAL_WRITE", raising=False)
    assert get_stage(con) == "legacy-only"


def test_dual_write_flag_keeps_its_p1_meaning(con, monkeypatch):
    monkeypatch.setenv("KIMERA_ID_DUAL_WRITE", "1")
    assert get_stage(con) == "dual-write"


def test_recorded_stage_wins_over_the_flag(con, monkeypatch):
    monkeypatch.setenv("KIMERA_ID_DUAL_WRITE", "1")
    set_stage(con, "read-new", actor="ops", reason="verified last night")
    assert get_stage(con) == "read-new"


def test_set_stage_records_history_with_previous_stage(con, monkeypatch):
    monkeypatch.delenv("KIMERA_ID_DUAL_WRITE", raising=False)
    assert set_stage(con, "dual-write", actor="alice", reason="start") == "legacy-only"
    assert set_stage(con, "backfilled", actor="bob") == "dual-write"
    history = stage_history(con)
    assert [(h["from_stage"], h["to_stage"], h["actor"]) for h in history] == [
        ("legacy-only", "dual-write", "alice"),
        ("dual-write", "backfilled", "bob"),
    ]
    assert history[0]["reason"] == "start"
    assert con.execute("SELECT count(*) FROM kimera_rollout_state").fetchone()[0] == 1


def test_any_move_is_allowed_and_recorded(con):
    set_stage(con, "legacy-retired", actor="ops")
    set_stage(con, "legacy-only", actor="ops", reason="rollback")
    assert get_stage(con) == "legacy-only"
    assert len(stage_history(con)) == 2


def test_unknown_stage_is_refused(con):
    with pytest.raises(RolloutError, match="unknown rollout stage"):
        set_stage(con, "half-done", actor="ops")
    with pytest.raises(RolloutError):
        routing("nope")


def test_stage_change_needs_an_actor(con):
    with pytest.raises(RolloutError, match="actor"):
        set_stage(con, "dual-write", actor="")


@pytest.mark.parametrize(
    ("stage", "write", "read", "shadow"),
    [
        ("legacy-only", "legacy", "legacy", False),
        ("dual-write", "both", "legacy", True),
        ("backfilled", "both", "legacy", True),
        ("verified", "both", "legacy", True),
        ("read-new", "both", "new", False),
        ("write-new", "new", "new", False),
        ("legacy-retired", "new", "new", False),
    ],
)
def test_routing_of_each_stage(stage, write, read, shadow):
    route = routing(stage)
    assert (route.write, route.read, route.shadow) == (write, read, shadow)


def test_stages_are_in_rollout_order():
    assert STAGES[0] == "legacy-only" and STAGES[-1] == "legacy-retired"
    assert len(STAGES) == 7


def test_read_only_file_without_tables_reports_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("KIMERA_ID_DUAL_WRITE", raising=False)
    path = tmp_path / "ro.duckdb"
    open_database(path, create=True).close()
    con = open_database(path, read_only=True)
    try:
        assert get_stage(con) == "legacy-only"
        assert stage_history(con) == []
    finally:
        con.close()
