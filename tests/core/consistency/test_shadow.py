"""Shadow reads: the legacy answer is served; a sample is compared with the new store."""

from __future__ import annotations

import itertools
import json

import duckdb
import pytest
from test_compare import BASE, copy

from kimera_core.compare import MISSING_IN_NEW
from kimera_core.shadow import ShadowReads, mismatch_summary
from kimera_core.storage import Storage


@pytest.fixture
def con(tmp_path):
    c = duckdb.connect(str(tmp_path / "s.duckdb"))
    yield c
    c.close()


def test_sample_rate_zero_never_runs_the_candidate(con):
    shadow = ShadowReads(con, 0.0)
    calls = []
    for _ in range(50):
        assert shadow.run("fetch", lambda: 1, lambda: calls.append(1)) == 1
    assert calls == [] and shadow.counters.reads == 50 and shadow.counters.sampled == 0


def test_sample_rate_selects_that_share(con):
    ticks = itertools.cycle([i / 10 for i in range(10)])
    shadow = ShadowReads(con, 0.3, rng=lambda: next(ticks))
    for _ in range(100):
        shadow.run("fetch", lambda: BASE, lambda: BASE, "g1")
    assert shadow.counters.sampled == 30 and shadow.counters.matched == 30


def test_mismatch_is_counted_and_recorded_with_id_and_fields(con):
    shadow = ShadowReads(con, 1.0)
    served = shadow.run("fetch", lambda: BASE, lambda: copy(raw="other", weight=0.7), "g1")
    assert served is BASE
    assert shadow.counters.mismatched == 1
    row = con.execute(
        "SELECT identity_id, operation, kind, fields FROM kimera_shadow_mismatches"
    ).fetchone()
    assert row[:3] == ("g1", "fetch", "mismatch")
    assert json.loads(row[3]) == ["raw", "weight"]
    assert mismatch_summary(con)["fields"] == {"raw": 1, "weight": 1}


def test_candidate_exception_never_reaches_the_caller(con):
    shadow = ShadowReads(con, 1.0)

    def broken():
        raise RuntimeError("new store down")

    assert shadow.run("fetch", lambda: BASE, broken, "g1") is BASE
    assert shadow.counters.errors == 1
    row = con.execute("SELECT identity_id, kind, error FROM kimera_shadow_mismatches").fetchone()
    assert row == ("g1", "error", "RuntimeError: new store down")


def test_recording_failure_never_reaches_the_caller(con):
    shadow = ShadowReads(con, 1.0)
    con.execute("DROP TABLE kimera_shadow_mismatches")
    assert shadow.run("fetch", lambda: BASE, lambda: copy(raw="x"), "g1") is BASE
    assert shadow.counters.record_failures == 1


def test_control_exception_is_the_callers(con):
    shadow = ShadowReads(con, 1.0)

    def control():
        raise KeyError("legacy failed")

    with pytest.raises(KeyError):
        shadow.run("fetch", control, lambda: BASE)


def test_list_answers_are_compared_by_id(con):
    shadow = ShadowReads(con, 1.0)
    shadow.run("list", lambda: [BASE, copy(id="g2")], lambda: [BASE])
    row = con.execute("SELECT identity_id, fields FROM kimera_shadow_mismatches").fetchone()
    assert row[0] == "g2" and json.loads(row[1]) == [MISSING_IN_NEW]


def test_storage_shadows_reads_in_dual_write_stage(tmp_path):
    with Storage.open(str(tmp_path / "st.duckdb"), stage="dual-write", shadow_sample=1.0) as s:
        s.store(BASE)
        s.con.execute('UPDATE identities SET data = json_merge_patch(data, \'{"echo": "drift"}\')')
        assert s.fetch("g1").echo == "text"
        assert s.shadow.counters.mismatched == 1
        assert s.list_identities() == [BASE]
        assert mismatch_summary(s.con)["fields"] == {"echo": 2}


def test_storage_does_not_shadow_in_read_new_stage(tmp_path):
    with Storage.open(str(tmp_path / "st.duckdb"), stage="read-new", shadow_sample=1.0) as s:
        s.store(BASE)
        s.fetch("g1")
        assert s.shadow.counters.reads == 0
