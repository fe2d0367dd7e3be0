"""The storage API: routing by stage, atomic dual writes under injected faults, the log, stats."""

from __future__ import annotations

import json
import math
import threading

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kimera_core.storage as storage_module
from kimera_core.checksum import table_checksum
from kimera_core.db import connect
from kimera_core.entropy import identity_entropy
from kimera_core.identity import Identity
from kimera_core.legacy import read_identity_p1
from kimera_core.storage import (
    WRITE_STEPS,
    DualWriteError,
    Storage,
    StorageError,
    get_dual_write_stats,
    identities_to_arrow,
)

STORES = ("identities", "legacy_geoids", "legacy_scars", "dual_write_log")


def geoid(i: int, **kw) -> Identity:
    fields = {
        "id": f"g{i:04d}",
        "identity_type": "geoid",
        "raw": f" text {i} ",
        "echo": f"text {i}",
        "lang_axis": "en",
        "tags": ["memory", "art"],
        "weight": 0.25 + i / 1000,
        "meta": {"terms": [{"symbol": "a", "intensity": 1.0}, {"symbol": "b", "intensity": 3}]},
        "created_at": 1_790_000_000.123456 + i,
        "updated_at": 1_790_000_100.5 + i,
    }
    fields.update(kw)
    return Identity(**fields)


def scar(i: int, **kw) -> Identity:
    fields = {
        "id": f"scar_{i:04d}",
        "identity_type": "scar",
        "weight": 0.5,
        "related_ids": [f"g{i:04d}", f"g{i + 1:04d}"],
        "meta": {"relationship_type": "contradicts"},
        "created_at": 1_790_000_000.0 + i,
        "updated_at": 1_790_000_001.0 + i,
    }
    fields.update(kw)
    return Identity(**fields)


@pytest.fixture
def storage(tmp_path):
    s = Storage.open(str(tmp_path / "s.duckdb"), stage="dual-write", shadow_sample=0.0)
    yield s
    s.close()


def checksums(con):
    return {t: table_checksum(con, t) for t in STORES[:3]}


def log_rows(con):
    return con.execute(
        "SELECT identity_id, operation, status, details FROM dual_write_log ORDER BY log_id"
    ).fetchall()


def test_dual_write_stores_both_and_logs_success(storage):
    stored = storage.store(geoid(1))
    con = storage.con
    assert read_identity_p1(con, "g0001") == stored
    legacy = con.execute("SELECT raw, tags::VARCHAR, weight FROM legacy_geoids").fetchone()
    assert legacy[0] == " text 1 " and json.loads(legacy[1]) == ["memory", "art"]
    entropy = con.execute("SELECT entropy_score FROM identities").fetchone()[0]
    assert entropy == pytest.approx(identity_entropy(stored))
    (row,) = log_rows(con)
    assert row[:3] == ("g0001", "store", "success")
    assert json.loads(row[3]) == {"identity_type": "geoid", "stores": ["identities", "legacy"]}


def test_scar_goes_to_legacy_scars(storage):
    storage.store(scar(1))
    assert storage.con.execute("SELECT id, related_ids::VARCHAR FROM legacy_scars").fetchone()[
        0
    ] == ("scar_0001")
    assert storage.fetch("scar_0001") == scar(1)


def test_store_fills_missing_timestamps(storage):
    storage._clock = lambda: 1_800_000_000.25
    stored = storage.store(geoid(1, created_at=None, updated_at=None))
    assert stored.updated_at == 1_800_000_000.25 and stored.created_at == stored.updated_at
    only_created = storage.store(geoid(2, created_at=None, updated_at=5.0))
    assert only_created.created_at == 5.0


def test_store_again_replaces_in_both_stores(storage):
    storage.store(geoid(1))
    storage.store(geoid(1, raw="changed", weight=0.9))
    con = storage.con
    assert con.execute("SELECT count(*), min(raw) FROM legacy_geoids").fetchone() == (1, "changed")
    assert read_identity_p1(con, "g0001").weight == 0.9
    assert [r[2] for r in log_rows(con)] == ["success", "success"]


@pytest.mark.parametrize("existing", [False, True], ids=["new-key", "existing-key"])
@pytest.mark.parametrize("step", WRITE_STEPS)
def test_injected_failure_leaves_both_stores_exactly_as_before(tmp_path, step, existing):
    calls = []

    def fault(name):
        calls.append(name)
        if name == step and armed:
            raise RuntimeError(f"injected at {name}")

    armed = False
    s = Storage.open(str(tmp_path / "f.duckdb"), stage="dual-write", fault=fault)
    try:
        s.store(geoid(1))
        if existing:
            s.store(geoid(2))
        before = checksums(s.con)
        log_before = len(log_rows(s.con))
        armed = True
        with pytest.raises(DualWriteError, match=f"failed at {step}") as info:
            s.store(geoid(2, raw="new text"))
        assert isinstance(info.value.__cause__, RuntimeError)
        assert checksums(s.con) == before
        rows = log_rows(s.con)
        assert len(rows) == log_before + 1
        assert rows[-1][:3] == ("g0002", "store", "failed")
        details = json.loads(rows[-1][3])
        assert details["step"] == step and "injected" in details["error"]
        # the connection is usable and not left inside a transaction
        armed = False
        s.store(geoid(3))
        assert s.fetch("g0003") is not None
    finally:
        s.close()


@pytest.mark.parametrize("created", [1_790_000_000.5, 1e-7], ids=["sql-iso", "python-iso"])
@pytest.mark.parametrize("step", WRITE_STEPS)
def test_injected_failure_in_a_batch_leaves_stores_as_before(tmp_path, step, created):
    armed = {"on": False}

    def fault(name):
        if armed["on"] and name == step:
            raise OSError("disk on fire")

    s = Storage.open(str(tmp_path / "b.duckdb"), stage="dual-write", fault=fault)
    try:
        s.store_batch([geoid(i) for i in range(5)])
        before = checksums(s.con)
        armed["on"] = True
        with pytest.raises(DualWriteError):
            s.store_batch([geoid(i, raw="x", created_at=created) for i in range(3, 9)] + [scar(1)])
        assert checksums(s.con) == before
        failed = s.con.execute(
            "SELECT count(*) FROM dual_write_log WHERE status = 'failed'"
        ).fetchone()[0]
        assert failed == 7
        # the connection is usable and not left inside a transaction
        armed["on"] = False
        assert s.store_batch([geoid(20, created_at=created)]) == 1
        assert read_identity_p1(s.con, "g0020").created_at == created
    finally:
        s.close()


def test_refused_identity_touches_nothing_and_is_logged(storage):
    before = checksums(storage.con)
    with pytest.raises(StorageError, match="legacy_scars cannot hold"):
        storage.store(scar(1, raw="text on a scar"))
    assert checksums(storage.con) == before
    assert log_rows(storage.con)[-1][2] == "failed"


def test_batch_matches_single_writes(tmp_path):
    items = [geoid(i) for i in range(50)] + [scar(i) for i in range(20)]
    items.append(geoid(99, tags=None, meta=None, weight=None, created_at=1.0 / 3))
    single = Storage.open(str(tmp_path / "a.duckdb"), stage="dual-write")
    batch = Storage.open(str(tmp_path / "b.duckdb"), stage="dual-write")
    try:
        for item in items:
            single.store(item)
        assert batch.store_batch(items) == len(items)
        for item in items:
            assert read_identity_p1(batch.con, item.id) == read_identity_p1(single.con, item.id)
        query = "SELECT id, entropy_score FROM identities ORDER BY id"
        for (a, ea), (b, eb) in zip(
            single.con.execute(query).fetchall(), batch.con.execute(query).fetchall(), strict=True
        ):
            assert a == b and (ea == pytest.approx(eb, abs=1e-12) or (ea is None and eb is None))
        for table in ("legacy_geoids", "legacy_scars"):
            assert table_checksum(single.con, table) == table_checksum(batch.con, table)
    finally:
        single.close()
        batch.close()


def test_batch_timestamps_round_trip_exactly(storage):
    odd = [1.0 / 3, 1e-7, -0.5, 1_790_000_000.1234567, 5e9 + 0.25, 1_790_000_000.5]
    storage.store_batch([geoid(i, created_at=t, updated_at=t) for i, t in enumerate(odd)])
    for i, t in enumerate(odd):
        assert read_identity_p1(storage.con, f"g{i:04d}").created_at == t


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_batch_with_a_non_finite_timestamp_is_refused(storage, bad):
    storage.store_batch([geoid(1)])
    before = checksums(storage.con)
    with pytest.raises(StorageError, match="1 rows whose created_at or updated_at is not a finite"):
        storage.store_batch([geoid(2), geoid(3, updated_at=bad)])
    assert checksums(storage.con) == before
    assert [r[2] for r in log_rows(storage.con)] == ["success", "failed", "failed"]


def test_batch_fallback_timestamps_match_single_writes(tmp_path):
    # epochs the SQL macros cannot write (pre-1970 with 7 digits, >= 1e11 s, an exponent)
    odd = [-0.1234567, -86_400.000000123, 1e11 + 0.5, 1e-7]
    items = [geoid(i, created_at=t, updated_at=odd[0]) for i, t in enumerate(odd)]
    with (
        Storage.open(str(tmp_path / "a.duckdb"), stage="dual-write") as single,
        Storage.open(str(tmp_path / "b.duckdb"), stage="dual-write") as batch,
    ):
        for item in items:
            single.store(item)
        batch.store_batch(items)
        query = "SELECT id, data FROM identities ORDER BY id"
        written = batch.con.execute(query).fetchall()
        assert len(written) == len(items)
        for (key, doc), (key_1, doc_1) in zip(
            written, single.con.execute(query).fetchall(), strict=True
        ):
            assert key == key_1 and json.loads(doc) == json.loads(doc_1)


@pytest.mark.parametrize("late", [1e13, -1e12])
def test_a_timestamp_without_iso_text_is_refused_in_batches_and_single_writes(storage, late):
    storage.store_batch([geoid(1)])
    before = checksums(storage.con)
    with pytest.raises(StorageError, match="outside the years 1 to 9999"):
        storage.store_batch([geoid(2), geoid(3, created_at=late)])
    with pytest.raises(StorageError, match="refused"):
        storage.store(geoid(4, updated_at=late))
    assert checksums(storage.con) == before
    # one failed row per identity of the refused batch, then the single write's
    assert [r[2] for r in log_rows(storage.con)] == ["success", "failed", "failed", "failed"]


def test_legacy_only_writes_refuse_what_the_migration_would_quarantine(tmp_path):
    # the same rule in every stage: a legacy row the migration would refuse is not written
    with Storage.open(str(tmp_path / "l.duckdb"), stage="legacy-only") as storage:
        with pytest.raises(StorageError, match="timestamp_out_of_range"):
            storage.store_batch([geoid(1, created_at=1e13, updated_at=1e13)])
        with pytest.raises(StorageError, match="timestamp_out_of_range"):
            storage.store(geoid(2, created_at=1e13, updated_at=1e13))
        assert storage.con.execute("SELECT count(*) FROM legacy_geoids").fetchone() == (0,)
        assert [r[2] for r in log_rows(storage.con)] == ["failed", "failed"]


def test_batch_replaces_existing_rows(storage):
    storage.store_batch([geoid(i) for i in range(3)])
    storage.store_batch([geoid(i, raw="again") for i in range(2, 5)])
    con = storage.con
    assert con.execute("SELECT count(*) FROM identities").fetchone()[0] == 5
    assert con.execute("SELECT count(*) FROM legacy_geoids WHERE raw = 'again'").fetchone()[0] == 3


def test_batch_with_duplicate_ids_is_refused(storage):
    with pytest.raises(StorageError, match="duplicate ids"):
        storage.store_batch([geoid(1), geoid(1)])
    assert storage.con.execute("SELECT count(*) FROM identities").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("stage", "in_new", "in_legacy"),
    [("legacy-only", 0, 1), ("dual-write", 1, 1), ("read-new", 1, 1), ("write-new", 1, 0)],
)
def test_stage_decides_where_writes_go(tmp_path, stage, in_new, in_legacy):
    s = Storage.open(str(tmp_path / "st.duckdb"), stage=stage)
    try:
        s.store(geoid(1))
        s.store_batch([geoid(2)])
        assert s.con.execute("SELECT count(*) FROM identities").fetchone()[0] == 2 * in_new
        assert s.con.execute("SELECT count(*) FROM legacy_geoids").fetchone()[0] == 2 * in_legacy
        stores = json.loads(log_rows(s.con)[0][3])["stores"]
        assert stores == [n for n, on in (("identities", in_new), ("legacy", in_legacy)) if on]
    finally:
        s.close()


def test_stage_decides_where_reads_come_from(tmp_path):
    path = str(tmp_path / "r.duckdb")
    with Storage.open(path, stage="dual-write") as s:
        s.store(geoid(1))
        s.con.execute("UPDATE legacy_geoids SET raw = 'legacy says'")
        assert s.fetch("g0001").raw == "legacy says"
    with Storage.open(path, stage="read-new") as s:
        assert s.fetch("g0001").raw == " text 1 "


def test_delete_removes_from_written_stores_and_logs(storage):
    storage.store(geoid(1))
    storage.store(scar(1))
    assert storage.delete("g0001") is True
    assert storage.delete("scar_0001") is True
    assert storage.delete("nothing") is False
    con = storage.con
    assert con.execute("SELECT count(*) FROM identities").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM legacy_geoids").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM legacy_scars").fetchone()[0] == 0
    assert [r[1] for r in log_rows(con)][-3:] == ["delete", "delete", "delete"]


def test_list_find_and_search_agree_on_both_read_sources(tmp_path):
    path = str(tmp_path / "q.duckdb")
    items = [geoid(i) for i in range(30)] + [scar(i) for i in range(10)]
    with Storage.open(path, stage="dual-write") as s:
        s.store_batch(items)
        legacy = (
            s.list_identities(limit=100),
            s.list_identities("scar", after_id="scar_0003", limit=3),
            s.find_by_entropy(0.5, 2.0),
            s.search("TEXT 1"),
        )
    with Storage.open(path, stage="read-new") as s:
        new = (
            s.list_identities(limit=100),
            s.list_identities("scar", after_id="scar_0003", limit=3),
            s.find_by_entropy(0.5, 2.0),
            s.search("TEXT 1"),
        )
    assert [i.id for i in legacy[1]] == ["scar_0004", "scar_0005", "scar_0006"]
    assert len(legacy[0]) == 40
    assert {i.id for i in legacy[3]} == {f"g{i:04d}" for i in (1, *range(10, 20))}
    assert len(legacy[2]) == 40 and legacy[2][0].identity_type == "geoid"
    for a, b in zip(legacy, new, strict=True):
        assert [i.id for i in a] == [i.id for i in b]


def test_search_treats_wildcards_literally(storage):
    storage.store(geoid(1, raw="100% sure"))
    storage.store(geoid(2, raw="1000 sure"))
    assert [i.id for i in storage.search("0%")] == ["g0001"]


def test_stats_cover_the_whole_log(tmp_path):
    armed = {"on": False}

    def fault(name):
        if armed["on"] and name == "before_commit":
            raise RuntimeError("boom")

    with Storage.open(str(tmp_path / "x.duckdb"), stage="dual-write", fault=fault) as s:
        for i in range(25):
            s.store(geoid(i))
        armed["on"] = True
        for i in range(3):
            with pytest.raises(DualWriteError):
                s.store(geoid(100 + i))
        armed["on"] = False
        s.delete("g0000")
        stats = get_dual_write_stats(s.con)
    assert stats["total"] == 29
    assert stats["successes"] == 26 and stats["failures"] == 3
    assert math.isclose(stats["success_rate"], 26 / 29)
    assert stats["stores"]["identities"] == {"success": 26, "failed": 3}
    assert stats["stores"]["legacy"] == {"success": 26, "failed": 3}
    assert stats["operations"]["delete"] == {"success": 1, "failed": 0}
    assert stats["last_failure_at"] is not None


def test_stats_read_p1_rows(demo_db):
    path, _ = demo_db
    with connect(path, read_only=True) as con:
        stats = get_dual_write_stats(con)
        total = con.execute("SELECT count(*) FROM dual_write_log").fetchone()[0]
    assert stats["total"] == total and stats["successes"] + stats["failures"] == total
    assert stats["stores"]["identities"]["success"] == stats["successes"]


def test_empty_log_has_no_success_rate(storage):
    assert get_dual_write_stats(storage.con)["success_rate"] is None


# --- values carried exactly or refused (docs/migration.md) --------------------------------
NAN, INF = math.nan, math.inf
REFUSED = {
    "weight NaN": (dict(weight=NAN), "non_finite_weight"),
    "weight inf": (dict(weight=INF), "non_finite_weight"),
    "intensity NaN": (dict(meta={"terms": [{"intensity": NAN}]}), "non_finite_intensity"),
    "intensity 10**400": (dict(meta={"terms": [{"intensity": 10**400}]}), "non_finite_intensity"),
    "meta inf": (dict(meta={"nested": [1, -INF]}), "non_finite_number"),
    "tags NaN": (dict(tags=["a", NAN]), "non_finite_number"),
    "epoch in ms": (
        dict(created_at=1730000000123.0, updated_at=1730000000123.0),
        "timestamp_out_of_range",
    ),
    "past 9999": (dict(updated_at=2.6e11), "timestamp_out_of_range"),
    "NaN time": (dict(created_at=NAN), "non_finite_timestamp"),
    "ideographic space": (dict(raw="\u3000", echo=""), "empty_raw"),
    "blank raw": (dict(raw=" \n\t", echo=""), "empty_raw"),
    "lone surrogate": (dict(raw="broken \ud800 text"), "invalid_text"),
}


@pytest.mark.parametrize("stage", ["legacy-only", "dual-write", "write-new"])
@pytest.mark.parametrize(("change", "reason"), list(REFUSED.values()), ids=list(REFUSED))
def test_a_value_the_migration_refuses_is_refused_by_store(tmp_path, stage, change, reason):
    with Storage.open(str(tmp_path / "v.duckdb"), stage=stage, shadow_sample=0.0) as storage:
        before = checksums(storage.con)
        with pytest.raises(StorageError, match=reason):
            storage.store(geoid(1, **change))
        assert checksums(storage.con) == before
        ((identity_id, operation, status, details),) = log_rows(storage.con)
        assert (identity_id, operation, status) == ("g0001", "store", "failed")
        assert reason in json.loads(details)["error"]


@pytest.mark.parametrize(("change", "reason"), list(REFUSED.values()), ids=list(REFUSED))
def test_a_value_the_migration_refuses_is_refused_by_store_batch(storage, change, reason):
    before = checksums(storage.con)
    with pytest.raises(StorageError):
        storage.store_batch([geoid(1), geoid(2, **change)])
    assert checksums(storage.con) == before
    # one failed row per identity of the batch; nothing written
    assert [(r[0], r[2]) for r in log_rows(storage.con)] == [
        ("g0001", "failed"),
        ("g0002", "failed"),
    ]


def test_a_refused_document_is_never_written_as_invalid_json(storage):
    for i, (change, _) in enumerate(REFUSED.values()):
        with pytest.raises(StorageError):
            storage.store(geoid(i, **change))
    assert storage.con.execute("SELECT count(*) FROM identities").fetchone() == (0,)


@pytest.mark.parametrize("edge", [-62135596800.0, 253402300799.999])
def test_the_first_and_last_representable_epochs_are_carried_exactly(storage, edge):
    storage.store(geoid(1, created_at=edge, updated_at=edge))
    storage.store_batch([geoid(2, created_at=edge, updated_at=edge)])
    for key in ("g0001", "g0002"):
        assert read_identity_p1(storage.con, key).created_at == edge


def test_whitespace_follows_python_strip(storage):
    # raw ending in a line feed or tab is text: stored as is
    for i, raw in enumerate(["line\n", "tab\t", "\u3000x\u3000"]):
        storage.store(geoid(i, raw=raw, echo=raw.strip()))
        assert read_identity_p1(storage.con, f"g{i:04d}").raw == raw


@pytest.mark.parametrize("stage", ["legacy-only", "dual-write"])
@pytest.mark.parametrize("how", ["store", "store_batch"])
def test_a_type_change_removes_the_old_legacy_row_in_the_same_write(tmp_path, stage, how):
    with Storage.open(str(tmp_path / "t.duckdb"), stage=stage, shadow_sample=0.0) as storage:
        storage.store(scar(1))
        retyped = geoid(1, id="scar_0001")
        storage.store(retyped) if how == "store" else storage.store_batch([retyped])
        con = storage.con
        assert con.execute("SELECT count(*) FROM legacy_scars").fetchone() == (0,)
        assert con.execute("SELECT gid FROM legacy_geoids").fetchall() == [("scar_0001",)]
        if stage == "dual-write":
            assert con.execute("SELECT id, identity_type FROM identities").fetchall() == [
                ("scar_0001", "geoid")
            ]
        # and back: the geoid row goes when the id is a scar again
        storage.store(scar(1)) if how == "store" else storage.store_batch([scar(1)])
        assert con.execute("SELECT count(*) FROM legacy_geoids").fetchone() == (0,)
        assert con.execute("SELECT id FROM legacy_scars").fetchall() == [("scar_0001",)]


def test_a_type_change_rolled_back_keeps_the_old_row(tmp_path):
    def fault(step):
        if step == "before_commit":
            raise RuntimeError("injected")

    with Storage.open(str(tmp_path / "f.duckdb"), stage="dual-write") as storage:
        storage.store(scar(1))
    with Storage.open(str(tmp_path / "f.duckdb"), stage="dual-write", fault=fault) as storage:
        with pytest.raises(DualWriteError):
            storage.store(geoid(1, id="scar_0001"))
        con = storage.con
        assert con.execute("SELECT id FROM legacy_scars").fetchall() == [("scar_0001",)]
        assert con.execute("SELECT count(*) FROM legacy_geoids").fetchone() == (0,)


def test_a_batch_with_malformed_json_is_refused_with_its_reason(storage):
    batch = identities_to_arrow([geoid(1), geoid(2)])
    meta = batch.column_names.index("meta")
    batch = batch.set_column(meta, "meta", pa.array(['{"terms": []}', '{"terms": [']))
    before = checksums(storage.con)
    with pytest.raises(StorageError, match="malformed JSON"):
        storage.store_arrow(batch)
    assert checksums(storage.con) == before
    assert [(r[0], r[2]) for r in log_rows(storage.con)] == [
        ("g0001", "failed"),
        ("g0002", "failed"),
    ]


# An intensity's JSON text as a client may send it in a batch: finite, or not as a double.
INTENSITY_TEXTS = st.one_of(
    st.sampled_from(["NaN", "-Infinity", "Infinity", "1e308", "1e309", "-1E+400", "1.5e-400"]),
    st.integers(min_value=-(10**330), max_value=10**330).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.builds(lambda m, e: f"{m}e{e}", st.integers(-99, 99), st.integers(-400, 400)),
)


def python_number(text: str) -> tuple[bool, bool]:
    """The plain reference, Python's JSON reading of a number: (a float that is not finite,
    not finite as a double at all: such a float or an integer beyond the double range)."""
    value = json.loads(text)
    if isinstance(value, float):
        return not math.isfinite(value), not math.isfinite(value)
    try:
        float(value)
    except OverflowError:
        return False, True
    return False, False


@pytest.fixture(scope="module")
def batch_storage(tmp_path_factory):
    path = tmp_path_factory.mktemp("numbers") / "n.duckdb"
    with Storage.open(str(path), stage="dual-write", shadow_sample=0.0) as storage:
        yield storage


@settings(max_examples=80, deadline=None)
@given(
    intensities=st.lists(INTENSITY_TEXTS, min_size=1, max_size=3),
    elsewhere=st.one_of(st.none(), INTENSITY_TEXTS),
    key=st.uuids(),
)
def test_a_batch_names_exactly_the_value_rules_its_numbers_break(
    batch_storage, intensities, elsewhere, key
):
    """meta.terms is checked only where the meta text hints at a non-finite number: a batch
    is refused for non_finite_intensity and non_finite_number exactly as Python reads them."""
    terms = ", ".join(f'{{"symbol": "s{i}", "intensity": {t}}}' for i, t in enumerate(intensities))
    other = "" if elsewhere is None else f', "other": [{elsewhere}]'
    batch = identities_to_arrow([geoid(1, id=str(key))])
    meta = pa.array([f'{{"terms": [{terms}]{other}}}'])
    batch = batch.set_column(batch.column_names.index("meta"), "meta", meta)
    read = [python_number(t) for t in [*intensities, *([elsewhere] if elsewhere else [])]]
    bad_number = any(bad_float for bad_float, _ in read)
    bad_intensity = any(not_double for _, not_double in read[: len(intensities)])
    if not (bad_number or bad_intensity):
        assert batch_storage.store_arrow(batch) == 1
        return
    with pytest.raises(StorageError) as refused:
        batch_storage.store_arrow(batch)
    message = str(refused.value)
    assert ("non_finite_intensity" in message) == bad_intensity, message
    assert ("non_finite_number" in message) == bad_number, message


def test_a_write_conflicting_with_a_concurrent_transaction_runs_again_and_succeeds(storage):
    """Beside another transaction holding the row (a served migration partition), DuckDB
    aborts the write at once; it runs again until the holder commits, and nothing fails."""
    storage.store(geoid(1))
    holder = storage.con.cursor()  # a second transaction context on the same database
    holder.execute("BEGIN TRANSACTION")
    holder.execute("DELETE FROM legacy_geoids WHERE gid = ?", [geoid(1).id])  # holds the row
    released = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    released.start()
    try:
        storage.store(geoid(1, weight=2.0))
    finally:
        released.join()
        holder.close()
    con = storage.con
    assert con.execute(
        "SELECT weight FROM legacy_geoids WHERE gid = ?", [geoid(1).id]
    ).fetchone() == (2.0,)
    assert [r[2] for r in log_rows(con)] == ["success", "success"]


def test_a_conflict_that_outlasts_the_retry_window_fails_and_is_logged(storage, monkeypatch):
    monkeypatch.setattr(storage_module, "CONFLICT_RETRY_SECONDS", 0.2)
    storage.store(geoid(1))
    holder = storage.con.cursor()
    holder.execute("BEGIN TRANSACTION")
    holder.execute("DELETE FROM legacy_geoids WHERE gid = ?", [geoid(1).id])  # holds the row
    try:
        with pytest.raises(DualWriteError, match="onflict"):
            storage.store(geoid(1, weight=2.0))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [r[2] for r in log_rows(storage.con)] == ["success", "failed"]
