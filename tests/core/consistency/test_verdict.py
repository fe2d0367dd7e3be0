"""One verdict that understands the migration, the columns' agreement with the document, and
evidence an operator can act on: judged on a migrated demo database with its quarantine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from kimera_core.consistency import verify
from kimera_core.db import open_database
from kimera_core.gates import CONSISTENCY_GATES, GateReport, gate_markdown, judge_gates
from kimera_core.migration import migrate
from kimera_core.rollout import set_stage

KIMERA = Path(sys.executable).parent / "kimera"


def kimera(*args):
    return subprocess.run(
        [str(KIMERA), *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def migrated_demo(demo_db, tmp_path_factory):
    """The session's demo database migrated, with its quarantine (as `make run` leaves it)."""
    path = tmp_path_factory.mktemp("verdict") / "migrated.duckdb"
    shutil.copy(demo_db[0], path)
    with open_database(path) as con:
        report = migrate(con)
    assert report.counts.quarantined > 0
    return path


@pytest.fixture
def path(migrated_demo, tmp_path):
    copy = tmp_path / "v.duckdb"
    shutil.copy(migrated_demo, copy)
    return copy


@pytest.fixture
def con(path):
    c = open_database(path)
    yield c
    c.close()


def judged(con, **kw) -> GateReport:
    result = judge_gates(con, record=False, **kw)
    assert result.consistent == result.verification.consistent  # one verdict
    assert [g.name for g in result.gates] == list(CONSISTENCY_GATES)
    return result


def a_key(con, sql: str) -> str:
    return con.execute(sql + " ORDER BY 1 LIMIT 1").fetchone()[0]


MIGRATED_GEOID = (
    "SELECT gid FROM legacy_geoids WHERE gid IN (SELECT id FROM identities) "
    "AND gid NOT IN (SELECT key FROM kimera_quarantine WHERE key IS NOT NULL)"
)


def test_quarantined_rows_are_explained_exceptions_listed_by_reason(con):
    result = judged(con)
    report = result.verification
    assert result.consistent, report.reasons
    quarantined = con.execute(
        "SELECT count(*) FROM kimera_quarantine WHERE key NOT IN (SELECT id FROM identities)"
    ).fetchone()[0]
    assert report.quarantined.total == quarantined == sum(report.quarantine_reasons.values())
    assert report.counts["quarantined"]["total"] == quarantined
    assert report.quarantined.evidence and all(e.note for e in report.quarantined.evidence)
    coverage = result.gate("key_coverage_legacy_to_new")
    assert coverage.passed and coverage.exceptions >= quarantined
    assert report.checksums["rows_compared_row_level"] == 0  # excluded up front


def test_strict_counts_the_exceptions_as_failures(con):
    result = judged(con, strict=True)
    assert not result.consistent
    assert not result.gate("key_coverage_legacy_to_new").passed
    assert any(r.startswith("strict: ") for r in result.verification.reasons)


def test_kimera_verify_says_consistent_and_why_rows_are_quarantined(path):
    result = kimera("verify", "--db", path, "--no-record")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CONSISTENT" in result.stdout and "rows in quarantine (" in result.stdout
    strict = kimera("verify", "--db", path, "--no-record", "--strict", "--json")
    assert strict.returncode == 1
    report = json.loads(strict.stdout)
    assert report["verdict"] == "inconsistent" and report["strict"] is True
    assert {g["name"] for g in report["gates"]} == set(CONSISTENCY_GATES)


def test_a_legacy_key_neither_migrated_nor_quarantined_fails(con):
    key = a_key(con, MIGRATED_GEOID)
    con.execute("DELETE FROM identities WHERE id = ?", [key])
    result = judged(con)
    gate = result.gate("key_coverage_legacy_to_new")
    assert not gate.passed and gate.offending == 1 and gate.sample == [key]
    (evidence,) = gate.evidence
    assert evidence.id == key and evidence.fields[0].right is None
    assert key in evidence.fields[0].left
    assert "kimera migrate" in gate.next_step


def test_a_quarantined_key_identities_holds_differently_is_a_failure(con):
    key = a_key(
        con,
        "SELECT gid FROM legacy_geoids WHERE gid IN (SELECT key FROM kimera_quarantine) "
        "AND gid NOT IN (SELECT id FROM legacy_scars) AND raw <> ''",
    )
    con.execute(
        "INSERT INTO identities VALUES (?, 'geoid', json_object('id', ?, 'identity_type', "
        "'geoid', 'raw', 'not the legacy text'), 0, 0, NULL, 0)",
        [key, key],
    )
    result = judged(con)
    assert not result.consistent
    gate = result.gate("field_equality")
    assert not gate.passed and key in [s["id"] for s in gate.sample]


def test_a_planted_legacy_edit_names_key_field_and_both_values(con):
    key = a_key(con, MIGRATED_GEOID)
    con.execute("UPDATE legacy_geoids SET raw = 'planted edit' WHERE gid = ?", [key])
    result = judged(con)
    gate = result.gate("field_equality")
    assert not gate.passed and gate.offending == 1
    (evidence,) = gate.evidence
    fields = {f.field: f for f in evidence.fields}
    assert fields["raw"].left == '"planted edit"' and fields["raw"].right != fields["raw"].left
    assert gate.authoritative == "legacy" and "legacy is authoritative" in gate.next_step
    markdown = gate_markdown(gate)
    assert "| key | field | legacy | identities | note |" in markdown
    assert key in markdown and "planted edit" in markdown and "Next step:" in markdown


def test_the_authoritative_side_follows_the_stage(con):
    set_stage(con, "read-new", actor="test", reason="reads from identities")
    key = a_key(con, MIGRATED_GEOID)
    con.execute("UPDATE legacy_geoids SET raw = 'planted edit' WHERE gid = ?", [key])
    gate = judged(con).gate("field_equality")
    assert gate.authoritative == "identities" and "identities is authoritative" in gate.next_step


def test_a_row_the_merge_rule_kept_is_legacy_stale_with_its_direction(con):
    key = a_key(con, MIGRATED_GEOID)
    con.execute(
        'UPDATE identities SET data = json_merge_patch(data, \'{"raw": "newer text"}\'), '
        "updated_at = updated_at + 60 WHERE id = ?",
        [key],
    )
    con.execute(
        "UPDATE identities SET data = json_merge_patch(data, json_object('updated_at', "
        "strftime(make_timestamp(CAST(updated_at * 1000000 AS BIGINT)), "
        "'%Y-%m-%dT%H:%M:%S.%f+00:00'))) WHERE id = ?",
        [key],
    )
    assert migrate(con).counts.kept == 1  # identities is newer: the merge rule keeps it
    result = judged(con)
    report = result.verification
    assert result.consistent, report.reasons
    assert report.legacy_stale.total == 1 and report.field_mismatches.total == 0
    (evidence,) = report.legacy_stale.evidence
    assert "identities newer" in evidence.note
    assert {f.field for f in evidence.fields} == {"raw", "updated_at"}
    field = result.gate("field_equality")
    assert (
        field.passed and field.exceptions == 1 and "copy identities into legacy" in field.next_step
    )
    assert not judged(con, strict=True).gate("field_equality").passed


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ("updated_at = updated_at + 5", "updated_at"),
        ("lang_axis = 'xx'", "lang_axis"),
        ("entropy_score = entropy_score + 1", "entropy_score"),
        ("identity_type = 'scar'", "identity_type"),
    ],
)
def test_a_column_that_disagrees_with_its_document_fails_column_agreement(con, change, column):
    key = a_key(con, MIGRATED_GEOID + " AND lang_axis IS NOT NULL")
    con.execute(f"UPDATE identities SET {change} WHERE id = ?", [key])
    for run in ("cold", "warm"):  # the warm run takes the count from the digest cache
        result = judged(con)
        gate = result.gate("column_agreement")
        assert not gate.passed and gate.offending == 1, run
        (evidence,) = gate.evidence
        assert evidence.id == key and [f.field for f in evidence.fields] == [column]
        assert evidence.fields[0].left != evidence.fields[0].right
        assert gate.sides == ("column", "document")
    assert f"{column} 1" in result.verification.reasons[-1]


def test_one_offending_row_reads_as_one_row(con):
    key = a_key(con, MIGRATED_GEOID)
    con.execute("UPDATE identities SET lang_axis = 'xx' WHERE id = ?", [key])
    report = verify(con, record=False)
    assert "1 identities row whose columns disagree with its document" in report.reasons[0]


def test_could_not_run_exits_two_never_one(path, tmp_path):
    not_duckdb = tmp_path / "text.duckdb"
    not_duckdb.write_text("not a database")
    assert kimera("verify", "--db", not_duckdb).returncode == 2
    assert kimera("verify", "--db", path, "--sample", "-1").returncode == 2
    holder = duckdb.connect(str(path))  # another process holds the write lock
    try:
        locked = subprocess.run(
            [str(KIMERA), "verify", "--db", str(path), "--wait", "0"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
    finally:
        holder.close()
    assert locked.returncode == 2 and locked.stderr.startswith("kimera: error:")
    assert "Traceback" not in locked.stderr


def test_a_held_file_is_waited_for_aloud_and_verified_when_let_go(path, tmp_path):
    hold = 4.0  # another process holds the file this long, then exits
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True);"
            " time.sleep(float(sys.argv[2])); c.close()",
            str(path),
            str(hold),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        waited = subprocess.run(
            [str(KIMERA), "verify", "--db", str(path), "--no-record", "--wait", "60"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
    finally:
        holder.wait(timeout=60)
    said = waited.stderr.splitlines()
    assert said and said[0].startswith("kimera: waiting for the database: held by PID ")
    assert f"PID {holder.pid}" in said[0]
    assert waited.returncode == 0, waited.stderr
