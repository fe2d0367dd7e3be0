"""The verifier's report: from_dict is the exact inverse of to_dict (also through JSON), the
verdict follows the reasons, and counts read as English ('1 row', '2 keys')."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from kimera_core.consistency import (
    Finding,
    VerificationReport,
    count_of,
    n_keys,
    n_rows,
    verify,
)
from kimera_core.consistency.report import verdict_reasons
from kimera_core.identity import Identity
from kimera_core.storage import Storage

KEY = st.text(min_size=1, max_size=6)
SMALL = st.integers(0, 10**6)
FINDING = st.builds(
    Finding,
    SMALL,
    st.lists(st.fixed_dictionaries({"id": KEY, "fields": st.lists(KEY, max_size=3)}), max_size=3),
)
COUNTS = st.dictionaries(st.sampled_from(["geoid", "scar", "total"]), SMALL)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | KEY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=3),
    max_leaves=8,
)
REPORT = st.builds(
    VerificationReport,
    mode=st.sampled_from(["full", "incremental"]),
    started_at=st.floats(0, 2e9),
    seconds=st.floats(0, 1e4),
    since=st.none() | st.floats(0, 2e9),
    keys_checked=st.none() | SMALL,
    counts=st.fixed_dictionaries({"legacy": COUNTS, "new": COUNTS, "difference": COUNTS}),
    null_keys=st.fixed_dictionaries({"legacy": SMALL, "new": SMALL}),
    duplicate_keys=FINDING,
    missing_in_new=FINDING,
    missing_in_legacy=FINDING,
    field_mismatches=FINDING,
    mismatches_by_field=st.dictionaries(KEY, SMALL, max_size=4),
    checksums=st.dictionaries(KEY, JSONISH, max_size=4),
    tolerance=st.fixed_dictionaries(
        {"weight_relative": st.floats(0, 1), "seconds": st.floats(0, 1)}
    ),
    reasons=st.lists(st.text(max_size=20), max_size=3),
)


@given(REPORT)
def test_from_dict_inverts_to_dict_through_json(report):
    d = report.to_dict()
    back = VerificationReport.from_dict(json.loads(json.dumps(d)))
    assert back == report
    assert back.to_dict() == d


def test_a_real_report_round_trips(tmp_path):
    with Storage.open(str(tmp_path / "r.duckdb"), stage="dual-write") as s:
        s.store_batch([Identity(id=f"g{i}", identity_type="geoid", raw="r") for i in range(20)])
        s.con.execute("UPDATE legacy_geoids SET raw = 'x' WHERE gid = 'g3'")
        s.con.execute("DELETE FROM identities WHERE id = 'g4'")
        report = verify(s.con)
        recorded = s.con.execute("SELECT findings FROM kimera_verifications").fetchone()[0]
    assert not report.consistent
    assert VerificationReport.from_dict(json.loads(recorded)) == report
    assert report.reasons == verdict_reasons(report)


def test_the_verdict_follows_the_reasons():
    report = VerificationReport(mode="full", started_at=0.0)
    assert report.consistent and report.to_dict()["verdict"] == "consistent"
    report.reasons.append("something")
    assert report.verdict == "inconsistent" and report.to_dict()["consistent"] is False


def test_counts_read_as_english():
    assert [n_rows(0), n_rows(1), n_rows(2), n_rows(1234)] == [
        "0 rows",
        "1 row",
        "2 rows",
        "1,234 rows",
    ]
    assert [n_keys(1), n_keys(3)] == ["1 key", "3 keys"]
    assert count_of(1, "key in legacy", "keys in legacy") == "1 key in legacy"
    assert count_of(2, "key in legacy", "keys in legacy") == "2 keys in legacy"


def test_reasons_say_one_key_not_one_keys():
    report = VerificationReport(
        mode="full",
        started_at=0.0,
        counts={"legacy": {}, "new": {}, "difference": {}},
        duplicate_keys=Finding(1),
        missing_in_new=Finding(1),
        missing_in_legacy=Finding(2),
        field_mismatches=Finding(1),
    )
    assert verdict_reasons(report) == [
        "1 duplicate key",
        "1 key in legacy but not in identities",
        "2 keys in identities but not in legacy",
        "1 row whose mapped fields differ",
    ]
