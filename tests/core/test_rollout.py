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


# --- gating ------------------------------------------------------------------------------------
from kimera_core.rollout import (  # noqa: E402
    CheckEvidence,
    Evidence,
    RolloutGateError,
    advance,
    rollback_reads,
    step_back,
)

REQUIRED = ("count_parity", "field_equality")


def _evidence(run_ok=True, scheduled_ok: bool | None = True, at: float = 0.0) -> Evidence:
    run = tuple(CheckEvidence(n, run_ok, "run-1", at) for n in REQUIRED)
    scheduled = (
        ()
        if scheduled_ok is None
        else tuple(CheckEvidence(n, scheduled_ok, "sched-1", at) for n in REQUIRED)
    )
    return Evidence("run-1", REQUIRED, run, scheduled)


def test_advance_moves_one_stage_and_records_the_evidence(con):
    assert advance(con, "dual-write", _evidence(), actor="ops") == "legacy-only"
    (move,) = stage_history(con)
    assert move["to_stage"] == "dual-write" and "run run-1" in move["reason"]


def test_advance_refuses_a_skip(con):
    with pytest.raises(RolloutGateError, match="one stage at a time"):
        advance(con, "backfilled", _evidence(), actor="ops")


def test_advance_refuses_when_a_run_check_failed_or_is_missing(con):
    with pytest.raises(RolloutGateError, match="field_equality failed in run run-1"):
        advance(con, "dual-write", _evidence(run_ok=False), actor="ops")
    missing = Evidence("run-2", REQUIRED, (CheckEvidence("count_parity", True),))
    with pytest.raises(RolloutGateError, match="field_equality was not evaluated"):
        advance(con, "dual-write", missing, actor="ops")
    assert get_stage(con) == "legacy-only" and stage_history(con) == []


def test_past_verified_needs_passing_consistency_job_checks(con):
    set_stage(con, "verified", actor="ops")
    with pytest.raises(RolloutGateError, match="needs consistency-job evaluations"):
        advance(con, "read-new", _evidence(scheduled_ok=None), actor="ops")
    with pytest.raises(RolloutGateError, match="latest consistency-job evaluation failed"):
        advance(con, "read-new", _evidence(scheduled_ok=False), actor="ops")
    advance(con, "read-new", _evidence(), actor="ops")
    assert get_stage(con) == "read-new"


def test_writes_leave_legacy_only_after_the_soak(con):
    set_stage(con, "read-new", actor="ops")
    with pytest.raises(RolloutGateError, match="soak"):
        advance(con, "write-new", _evidence(at=2e9), actor="ops", soak=3600)
    later = lambda: 4e9  # noqa: E731
    advance(con, "write-new", _evidence(at=3e9), actor="ops", soak=3600, clock=later)
    assert get_stage(con) == "write-new"


def test_step_back_is_always_allowed_and_recorded(con):
    set_stage(con, "write-new", actor="ops")
    assert step_back(con, "ops", "bad latency") == "read-new"
    assert stage_history(con)[-1]["reason"] == "bad latency"
    set_stage(con, "legacy-only", actor="ops")
    with pytest.raises(RolloutError, match="first stage"):
        step_back(con, "ops", "x")


def test_rollback_reads_only_while_legacy_still_receives_writes(con):
    assert rollback_reads(con, "sensor", "checks failed") is None
    set_stage(con, "read-new", actor="ops")
    assert rollback_reads(con, "sensor", "checks failed") == "verified"
    set_stage(con, "write-new", actor="ops")
    with pytest.raises(RolloutError, match="stale"):
        rollback_reads(con, "sensor", "checks failed")


# --- advance_to: the loop both front ends use ----------------------------------------------------
from kimera_core.rollout import AdvanceResult, advance_to, authoritative_store  # noqa: E402


def test_advance_to_moves_through_every_stage_up_to_the_target(con):
    result = advance_to(con, "verified", _evidence(), actor="ops", reason="backfill done")
    assert result == AdvanceResult(
        "legacy-only", "verified", ("dual-write", "backfilled", "verified"), (), "verified"
    )
    assert get_stage(con) == "verified"
    history = stage_history(con)
    assert [h["to_stage"] for h in history] == ["dual-write", "backfilled", "verified"]
    assert all(h["reason"].startswith("backfill done; run run-1") for h in history)


def test_advance_to_without_a_target_moves_one_stage(con):
    result = advance_to(con, None, _evidence(), actor="ops")
    assert result.moved_through == ("dual-write",) and result.stage == "dual-write"


def test_advance_to_stops_at_the_first_gate_that_holds_and_says_why(con):
    set_stage(con, "backfilled", actor="ops")
    result = advance_to(con, "read-new", _evidence(scheduled_ok=False), actor="ops")
    assert result.moved_through == ("verified",)
    assert result.stage == "verified" == get_stage(con)
    assert len(result.held_by) == 1 and "consistency-job evaluation failed" in result.held_by[0]
    assert not result.refused


def test_advance_to_held_at_once_is_refused_and_moves_nothing(con):
    result = advance_to(con, "backfilled", _evidence(run_ok=False), actor="ops")
    assert result.refused and result.moved_through == () and result.stage == "legacy-only"
    assert stage_history(con) == []


def test_advance_to_the_live_stage_does_nothing(con):
    set_stage(con, "verified", actor="ops")
    result = advance_to(con, "verified", _evidence(), actor="ops")
    assert result.moved_through == () and result.held_by == () and not result.refused


def test_advance_to_refuses_a_target_behind_or_unknown(con):
    set_stage(con, "read-new", actor="ops")
    with pytest.raises(RolloutError, match="behind the live stage"):
        advance_to(con, "dual-write", _evidence(), actor="ops")
    with pytest.raises(RolloutError, match="unknown rollout stage"):
        advance_to(con, "half-done", _evidence(), actor="ops")
    assert get_stage(con) == "read-new"


def test_advance_to_the_last_stage_holds_on_the_soak(con):
    set_stage(con, "verified", actor="ops")
    result = advance_to(con, "legacy-retired", _evidence(at=2e9), actor="ops", soak=3600)
    assert result.moved_through == ("read-new",)
    assert any("soak" in reason for reason in result.held_by)
    assert result.to_dict()["stage"] == "read-new"


@pytest.mark.parametrize(
    ("stage", "target", "evidence"),
    [
        ("legacy-only", "verified", _evidence()),
        ("legacy-only", "verified", _evidence(run_ok=False)),
        ("backfilled", "read-new", _evidence(scheduled_ok=False)),
        ("verified", "legacy-retired", _evidence(at=2e9)),
    ],
)
def test_a_dry_run_says_what_the_advance_would_do_and_records_nothing(con, stage, target, evidence):
    set_stage(con, stage, actor="ops")
    history = stage_history(con)
    planned = advance_to(con, target, evidence, actor="ops", soak=3600, dry_run=True)
    assert get_stage(con) == stage and stage_history(con) == history
    assert advance_to(con, target, evidence, actor="ops", soak=3600) == planned


def test_the_store_that_reads_come_from_is_authoritative():
    assert [authoritative_store(s) for s in STAGES] == [
        "legacy",
        "legacy",
        "legacy",
        "legacy",
        "new",
        "new",
        "new",
    ]
