"""The consistency gates: one verdict per gate with the count of what holds it, and a typed
report that survives JSON."""

from __future__ import annotations

import json

import pytest

from kimera_core.gates import (
    CONSISTENCY_GATES,
    Gate,
    GateReport,
    judge_gates,
)
from kimera_core.identity import Identity
from kimera_core.migration.schema import ensure_schema
from kimera_core.storage import Storage

GEOIDS = [f"g{i:02d}" for i in range(12)]
SCARS = ["s1", "s2"]


@pytest.fixture
def con(tmp_path):
    """A dual-written database: 12 geoids and 2 scars, consistent, never migrated."""
    with Storage.open(str(tmp_path / "gates.duckdb"), stage="dual-write") as s:
        s.store_batch(
            [Identity(id=g, identity_type="geoid", raw=f"text {g}", tags=["t"]) for g in GEOIDS]
            + [Identity(id=k, identity_type="scar", weight=0.5, related_ids=["g00"]) for k in SCARS]
        )
        yield s.con


def offending(result: GateReport) -> dict[str, int]:
    return {g.name: g.offending for g in result.gates}


def quarantine(con, run_id: str, status: str, key: str) -> None:
    ensure_schema(con)
    con.execute(
        "INSERT INTO kimera_migration_runs (run_id, started_at, status, partitions, "
        "duckdb_version) VALUES (?, 0, ?, 1, 'test')",
        [run_id, status],
    )
    con.execute(
        "INSERT INTO kimera_quarantine (run_id, source_table, key, reason, reasons, original, "
        "row_hash, quarantined_at) VALUES (?, 'legacy_geoids', ?, 'bad', '[\"bad\"]', '{}', "
        "hash(?), 0)",
        [run_id, key, key],
    )


def test_a_consistent_database_passes_every_gate_with_nothing_offending(con):
    result = judge_gates(con)
    assert [g.name for g in result.gates] == list(CONSISTENCY_GATES)
    assert result.passed and result.verification.consistent
    assert offending(result) == dict.fromkeys(CONSISTENCY_GATES, 0)


def test_three_differing_rows_make_field_equality_offending_three(con):
    con.execute("UPDATE legacy_geoids SET raw = 'edited' WHERE gid IN ('g01', 'g02', 'g03')")
    result = judge_gates(con)
    gate = result.gate("field_equality")
    assert not gate.passed and gate.offending == 3
    assert gate.summary == "3 rows whose mapped fields differ"
    assert [s["id"] for s in gate.sample] == ["g01", "g02", "g03"]
    assert {g.name for g in result.gates if not g.passed} == {"field_equality"}


def test_one_differing_row_is_one_row(con):
    con.execute("UPDATE legacy_geoids SET raw = 'edited' WHERE gid = 'g04'")
    gate = judge_gates(con).gate("field_equality")
    assert gate.offending == 1 and gate.summary == "1 row whose mapped fields differ"


def test_unexplained_and_quarantined_keys_are_counted_apart(con):
    con.execute("DELETE FROM identities WHERE id IN ('g05', 'g06', 'g07')")
    quarantine(con, "run-1", "completed", "g05")  # explained
    quarantine(con, "run-0", "rolled_back", "g06")  # its run was undone: not an explanation
    result = judge_gates(con)
    assert offending(result) == {
        "count_parity": 2,  # geoid: legacy 12 - quarantined 1 != identities 9
        "key_coverage_legacy_to_new": 2,
        "key_coverage_new_to_legacy": 0,
        "field_equality": 0,
        "reconciliation": 2,
        "column_agreement": 0,
    }
    coverage = result.gate("key_coverage_legacy_to_new")
    assert coverage.sample == ["g06", "g07"]
    assert coverage.summary == "2 legacy keys neither in identities nor quarantined"


def test_one_unexplained_key_is_one_key(con):
    con.execute("DELETE FROM identities WHERE id = 'g08'")
    gate = judge_gates(con).gate("key_coverage_legacy_to_new")
    assert gate.summary == "1 legacy key neither in identities nor quarantined"


def test_keys_only_in_identities_offend_new_to_legacy(con):
    con.execute("DELETE FROM legacy_scars WHERE id IN ('s1', 's2')")
    con.execute("DELETE FROM legacy_geoids WHERE gid = 'g09'")
    result = judge_gates(con)
    gate = result.gate("key_coverage_new_to_legacy")
    assert gate.offending == 3 and gate.summary == "3 identities keys in no legacy table"
    assert result.gate("count_parity").offending == 3  # geoid 1 + scar 2


def test_a_gate_passes_exactly_when_nothing_offends(con):
    con.execute("UPDATE legacy_geoids SET raw = 'edited' WHERE gid = 'g10'")
    con.execute("DELETE FROM identities WHERE id = 'g11'")
    con.execute("DELETE FROM legacy_scars WHERE id = 's2'")
    for gate in judge_gates(con).gates:
        assert gate.passed == (gate.offending == 0), gate


def test_the_gate_report_survives_json(con):
    con.execute("UPDATE legacy_geoids SET raw = 'edited' WHERE gid IN ('g01', 'g02', 'g03')")
    result = judge_gates(con, record=False)
    back = GateReport.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result
    assert back.to_dict() == result.to_dict()
    assert not back.passed and back.to_dict()["passed"] is False
    gate = result.gates[0]
    assert Gate.from_dict(json.loads(json.dumps(gate.to_dict()))) == gate
