"""CLS lattice resolution: the existing formulas, first and repeat, written through dual-write."""

from __future__ import annotations

import json

import duckdb
import pytest

from kimera_core import lattice
from kimera_core.consistency import verify
from kimera_core.demo import generate_demo_data
from kimera_core.entropy import identity_entropy
from kimera_core.identity import Geoid
from kimera_core.migration import migrate
from kimera_core.rollout import set_stage
from kimera_core.storage import Storage

T0 = 1_790_000_000.0


def _geoid(text: str, intensities: list[float]) -> Geoid:
    terms = [
        {"symbol": f"s{i}", "role": "subject", "intensity": x} for i, x in enumerate(intensities)
    ]
    return Geoid.new(text, "en", tags=["memory"], meta={"terms": terms}, created_at=T0)


@pytest.fixture
def storage():
    with Storage(duckdb.connect(), stage="dual-write", clock=lambda: T0 + 5) as s:
        yield s


def _form(storage: Storage, anchor: str) -> dict:
    return json.loads(storage.con.execute(lattice.FORM_SQL, [anchor]).fetchone()[0])


def test_first_resolution_writes_the_seed_and_one_cls_event(storage):
    a, b = _geoid("the river", [1, 1]), _geoid("a memory", [1, 1, 1, 1])
    h_a, h_b = identity_entropy(a.to_identity()), identity_entropy(b.to_identity())
    assert (h_a, h_b) == (1.0, 2.0)
    total = lattice.lattice_resolve(storage, a, b)
    form = _form(storage, f"{a.gid}_{b.gid}")
    assert form["anchor"] == f"{a.gid}_{b.gid}" and form["domain"] == "cls"
    seed, event = form["terms"]
    assert (seed["symbol"], seed["role"], seed["intensity"]) == ("CLS", "cls_seed", 1.0)
    assert event["symbol"] == "cls_event"
    assert event["event_type"] == "lattice_resolve_initial"
    assert event["intensity"] == pytest.approx(0.1 * (1 + (1.0 + 2.0) / 2))
    assert total == pytest.approx(1.0 + 0.25)
    row = storage.con.execute(
        "SELECT intensity_sum, phase FROM echoforms WHERE anchor = ?", [form["anchor"]]
    ).fetchone()
    assert row == (pytest.approx(1.25), "lattice_active")


def test_both_identities_are_dual_written_with_log_rows(storage):
    a, b = _geoid("left", [2, 1]), _geoid("right", [1])
    lattice.lattice_resolve(storage, a, b)
    con = storage.con
    assert con.execute("SELECT count(*) FROM identities").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM legacy_geoids").fetchone()[0] == 2
    logged = con.execute(
        "SELECT identity_id, status FROM dual_write_log ORDER BY identity_id"
    ).fetchall()
    assert logged == sorted([(a.gid, "success"), (b.gid, "success")])


def test_each_repeat_appends_a_cls_event_and_stores_nothing_new(storage):
    a, b = _geoid("one", [1, 3]), _geoid("two", [5])
    first = lattice.resolve(storage, a, b)
    log_rows = storage.con.execute("SELECT count(*) FROM dual_write_log").fetchone()[0]
    second = lattice.resolve(storage, a.gid, b.gid)  # ids resolve through the storage API
    third = lattice.resolve(storage, a.to_identity(), b)
    assert first.first and not second.first and not third.first
    form = _form(storage, first.anchor)
    events = [t for t in form["terms"] if t["symbol"] == "cls_event"]
    assert [e["event_type"] for e in events] == [
        "lattice_resolve_initial",
        "lattice_resolve_repeat",
        "lattice_resolve_repeat",
    ]
    step = lattice.cls_event_intensity(
        identity_entropy(a.to_identity()), identity_entropy(b.to_identity())
    )
    assert third.intensity_sum == pytest.approx(1.0 + 3 * step)
    assert second.identities_stored == third.identities_stored == 0
    assert storage.con.execute("SELECT count(*) FROM dual_write_log").fetchone()[0] == log_rows


def test_an_unknown_id_is_refused():
    with Storage(duckdb.connect(), stage="dual-write") as s, pytest.raises(KeyError):
        lattice.resolve(s, "missing", "also-missing")


def test_a_lattice_workload_leaves_the_stores_consistent(tmp_path):
    path = tmp_path / "lattice.duckdb"
    generate_demo_data(path, geoids=400, scars=200, seed=3, broken_share=0.0)
    with duckdb.connect(str(path)) as con:
        migrate(con)
        set_stage(con, "dual-write", "test", "lattice workload")
        assert verify(con, record=False).consistent
    with Storage.open(str(path)) as storage:
        report = lattice.run_lattice_workload(storage, pairs=30, repeat_share=0.5, seed=1)
    assert report.failures == 0, report.errors
    assert report.first >= 20 and report.repeats > 0
    with duckdb.connect(str(path)) as con:
        result = verify(con, record=False)
        assert result.consistent, result.to_dict()
        forms = con.execute("SELECT count(*) FROM echoforms WHERE domain = 'cls'").fetchone()[0]
        assert forms == report.first
