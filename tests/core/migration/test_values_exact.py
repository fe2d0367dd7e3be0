"""Values carried exactly or refused, by the same rules on the migration and the dual write.

Every input either comes back exactly (the P1 document read back, ``Identity.from_document``)
or is refused with the reason docs/migration.md gives: a quarantine row of the migration, a
``StorageError`` and a ``failed`` dual_write_log row of the storage API. The expected reasons
come from an independent reference (legacy_reference.py), the same for both paths.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from legacy_reference import (
    YEAR_1,
    YEAR_10000,
    existing_geoid_entropy,
    existing_scar_entropy,
    structure_reasons,
    value_reasons,
)
from support.legacy_rows import insert_geoids

from kimera_core.db import connect
from kimera_core.identity import Geoid, Identity, geoid_id
from kimera_core.legacy import create_legacy_schema, read_identity_p1
from kimera_core.migration import migrate
from kimera_core.storage import Storage, StorageError

T0 = 1_790_000_000.25
NAN, INF = math.nan, math.inf
PROPERTY = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# --- generated values -------------------------------------------------------------------
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x85\xa0\u1680\u2003\u2028\u3000"
texts = st.text(alphabet=st.sampled_from("ab é川🌊" + WHITESPACE), max_size=8)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -(10**30), 0, -0.0, 0.5, 1e-320, 1e300, True, False]),
    st.floats(allow_nan=True, allow_infinity=True),
)
json_leaves = st.one_of(st.none(), numbers, texts)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
intensities = st.one_of(
    numbers, st.sampled_from(["0.5", None, NAN, INF, -INF, 10**400, True, 2**64 + 1])
)
terms = st.lists(
    st.one_of(
        st.builds(lambda v: {"symbol": "s", "intensity": v}, intensities),
        st.just({"symbol": "none"}),
        st.just("junk"),
    ),
    max_size=5,
)
FALSE_VALUES = [None, False, 0, "", [], {}]
metas = st.one_of(
    st.sampled_from(FALSE_VALUES),
    st.builds(lambda t, extra: {"terms": t, "extra": extra}, terms, json_values),
    st.dictionaries(texts, json_values, max_size=3),
    st.sampled_from([[1, 2], "text", 3, True]),  # not an object: non_object_meta
)
tag_values = st.one_of(
    st.sampled_from(FALSE_VALUES),
    st.lists(texts, max_size=4),
    st.lists(st.one_of(texts, numbers), max_size=3),
    st.sampled_from(["a,b", {"a": 1}]),  # not a list: non_list_tags
)
epochs = st.one_of(
    st.floats(min_value=-6e10, max_value=2.5e11),
    st.sampled_from(
        [
            T0,
            1730000000123.0,  # milliseconds
            -1730000000123.0,
            YEAR_1,
            math.nextafter(YEAR_1, -INF),
            math.nextafter(YEAR_10000, 0),
            YEAR_10000,
            1e300,
            NAN,
            INF,
            -INF,
        ]
    ),
)
times = st.tuples(st.one_of(st.none(), epochs), st.one_of(st.none(), epochs))
weights = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
# SQL NULL (not given) or a JSON value
given_json = st.one_of(st.just((False, None)), st.tuples(st.just(True), json_values))


def dumps(given_flag, value):
    return json.dumps(value, ensure_ascii=False) if given_flag else None


# --- the migration ----------------------------------------------------------------------
geoid_rows = st.lists(
    st.fixed_dictionaries(
        {
            "raw": texts,
            "lang": st.sampled_from(["en", "ja", None]),
            "meta": st.one_of(st.just((False, None)), st.tuples(st.just(True), metas)),
            "tags": st.one_of(st.just((False, None)), st.tuples(st.just(True), tag_values)),
            "weight": weights,
            "times": times,
        }
    ),
    min_size=1,
    max_size=12,
)
scar_rows = st.lists(
    st.fixed_dictionaries(
        {
            "picks": st.lists(st.integers(min_value=0, max_value=20), max_size=3),
            "meta": st.one_of(st.just((False, None)), st.tuples(st.just(True), metas)),
            "weight": weights,
            "times": times,
        }
    ),
    max_size=8,
)


def expected_geoid_reasons(row):
    (meta_given, meta), (tags_given, tags) = row["meta"], row["tags"]
    return structure_reasons(meta_given, meta, tags_given, tags) | value_reasons(
        "geoid",
        raw=row["raw"],
        weight=row["weight"],
        meta=meta,
        json_fields=(tags,),
        created=row["times"][0],
        updated=row["times"][1],
    )


def relation_reasons(related, legacy_gids, refused_gids):
    reasons = {"too_few_related_ids"} if len(related) < 2 else set()
    if any(g not in legacy_gids for g in related):
        reasons.add("dangling_related_id")
    if any(g in refused_gids for g in related):
        reasons.add("related_geoid_quarantined")
    return reasons


def doc_of(con, key):
    row = con.execute(
        "SELECT data, created_at, updated_at, entropy_score FROM identities WHERE id = ?", [key]
    ).fetchone()
    return None if row is None else (Identity.from_document(row[0]), *row[1:])


@given(geoids=geoid_rows, scars=scar_rows)
@PROPERTY
def test_every_legacy_row_migrates_exactly_or_is_quarantined_with_its_reason(
    tmp_path_factory, geoids, scars
):
    path = tmp_path_factory.mktemp("values") / "legacy.duckdb"
    by_gid = {}
    for row in geoids:
        by_gid.setdefault(geoid_id(row["raw"], row["lang"]), row)
    gids = sorted(by_gid)
    with connect(path, create=True) as con:
        create_legacy_schema(con)
        for gid, row in by_gid.items():
            con.execute(
                "INSERT INTO legacy_geoids VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    gid,
                    row["raw"],
                    row["raw"].strip(),
                    row["lang"],
                    dumps(*row["tags"]),
                    row["weight"],
                    dumps(*row["meta"]),
                    *row["times"],
                ],
            )
        scar_related = {}
        for i, row in enumerate(scars):
            related = [gids[p] if p < len(gids) else f"dangling{p}" for p in row["picks"]]
            scar_related[f"scar{i}"] = related
            con.execute(
                "INSERT INTO legacy_scars VALUES (?, ?, ?, ?, ?, ?)",
                [
                    f"scar{i}",
                    row["weight"],
                    json.dumps(related),
                    dumps(*row["meta"]),
                    *row["times"],
                ],
            )
        report = migrate(con)
        quarantined = {
            key: set(json.loads(reasons))
            for key, reasons in con.execute(
                "SELECT key, reasons FROM kimera_quarantine WHERE run_id = ?", [report.run_id]
            ).fetchall()
        }
        assert report.balanced

        refused = set()
        for gid, row in by_gid.items():
            expected = expected_geoid_reasons(row)
            if expected:
                refused.add(gid)
                assert quarantined.get(gid) == expected, (row, quarantined.get(gid))
                assert doc_of(con, gid) is None
                continue
            assert gid not in quarantined, (row, quarantined[gid])
            (_, meta), (_, tags) = row["meta"], row["tags"]
            created, updated = row["times"]
            created, updated = (
                (created if created is not None else updated),
                (updated if updated is not None else created),
            )
            identity, c_col, u_col, entropy = doc_of(con, gid)
            assert identity == Identity(
                id=gid,
                identity_type="geoid",
                raw=row["raw"],
                echo=row["raw"].strip(),
                lang_axis=row["lang"],
                tags=tags,
                weight=row["weight"],
                related_ids=[],
                meta=meta,
                created_at=created,
                updated_at=updated,
            )
            assert (c_col, u_col) == (created, updated)
            assert close(entropy, existing_geoid_entropy(meta, tags)), row

        for i, row in enumerate(scars):
            key, related = f"scar{i}", scar_related[f"scar{i}"]
            meta_given, meta = row["meta"]
            expected = (
                structure_reasons(meta_given, meta, False, None)
                | value_reasons(
                    "scar",
                    weight=row["weight"],
                    meta=meta,
                    created=row["times"][0],
                    updated=row["times"][1],
                )
                | relation_reasons(related, set(gids), refused)
            )
            if expected:
                assert quarantined.get(key) == expected, (row, related, quarantined.get(key))
                continue
            assert key not in quarantined
            created, updated = row["times"]
            identity, _, _, entropy = doc_of(con, key)
            assert identity == Identity(
                id=key,
                identity_type="scar",
                weight=row["weight"],
                related_ids=related,
                meta=meta,
                created_at=created if created is not None else updated,
                updated_at=updated if updated is not None else created,
            )
            assert close(entropy, existing_scar_entropy(related, row["weight"])), row


# --- the storage API --------------------------------------------------------------------
surrogate_texts = st.one_of(texts, st.sampled_from(["broken \ud800", "\udfff"]))
identities = st.builds(
    lambda kind, raw, tags, related, meta, weight, t: Identity(
        id=f"{kind}-{abs(hash((raw, repr(meta), repr(t)))) % 10**9}",
        identity_type=kind,
        raw=raw if kind == "geoid" else None,
        echo=raw.strip() if kind == "geoid" else None,
        lang_axis="en" if kind == "geoid" else None,
        tags=tags if kind == "geoid" else None,
        related_ids=related if kind == "scar" else None,
        meta=meta,
        weight=weight,
        created_at=t[0] if t[0] is not None else T0,
        updated_at=t[1] if t[1] is not None else T0,
    ),
    st.sampled_from(["geoid", "scar"]),
    surrogate_texts,
    tag_values,
    st.lists(st.sampled_from(["g1", "g2", "g3"]), min_size=2, max_size=3),
    metas,
    weights,
    times,
)


def expected_write_reasons(identity):
    lone = any(
        isinstance(s, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in s)
        for s in (identity.raw, identity.echo)
    )
    reasons = structure_reasons(True, identity.meta, True, identity.tags) | value_reasons(
        identity.identity_type,
        raw=identity.raw,
        weight=identity.weight,
        meta=identity.meta,
        json_fields=(identity.tags, identity.related_ids),
        created=identity.created_at,
        updated=identity.updated_at,
    )
    return reasons | ({"invalid_text"} if lone else set())


def failed_rows(con, key):
    return [
        json.loads(d)["error"]
        for (d,) in con.execute(
            "SELECT details FROM dual_write_log WHERE identity_id = ? AND status = 'failed'", [key]
        ).fetchall()
    ]


@given(items=st.lists(identities, min_size=1, max_size=8, unique_by=lambda i: i.id))
@PROPERTY
def test_every_storage_write_reads_back_exactly_or_is_refused_with_its_reason(
    tmp_path_factory, items
):
    path = tmp_path_factory.mktemp("writes") / "w.duckdb"
    with Storage.open(str(path), stage="dual-write", shadow_sample=0.0) as storage:
        con = storage.con
        for item in items:  # single writes
            expected = expected_write_reasons(item)
            if expected:
                with pytest.raises(StorageError) as refused:
                    storage.store(item)
                assert f"({', '.join(sorted(expected))})" in _sorted_reasons(str(refused.value))
                assert failed_rows(con, item.id), item
                assert read_identity_p1(con, item.id) is None
            else:
                storage.store(item)
                assert read_identity_p1(con, item.id) == item
                assert storage.fetch(item.id) is not None
        # the same identities as one batch: all or nothing, by the same rules
        renamed = [_renamed(i) for i in items]
        if any(expected_write_reasons(i) for i in renamed):
            with pytest.raises(StorageError):
                storage.store_batch(renamed)
            assert all(failed_rows(con, i.id) for i in renamed)
            assert all(read_identity_p1(con, i.id) is None for i in renamed)
        else:
            storage.store_batch(renamed)
            assert all(read_identity_p1(con, i.id) == i for i in renamed)


def _renamed(identity):
    return Identity(
        **{**{f: getattr(identity, f) for f in identity.__slots__}, "id": "b" + identity.id}
    )


def _sorted_reasons(message):
    """The message's '(reason, reason)' with the reasons sorted, for a set comparison."""
    inner = message[message.index("(") + 1 : message.index(")")]
    return f"({', '.join(sorted(inner.split(', ')))})"


# --- the cases, one by one ------------------------------------------------------
@pytest.fixture
def legacy_db(tmp_path):
    path = tmp_path / "k.duckdb"
    with connect(path, create=True) as con:
        create_legacy_schema(con)
    return path


def _geoid(con, gid, raw="text", meta="{}", tags="[]", weight=1.0, created=T0, updated=T0):
    con.execute(
        "INSERT INTO legacy_geoids VALUES (?, ?, ?, 'en', ?, ?, ?, ?, ?)",
        [gid, raw, raw.strip(), tags, weight, meta, created, updated],
    )


@pytest.mark.parametrize("epoch", [1730000000123.0, 2.6e11, -1e12])
def test_an_epoch_without_iso_text_is_quarantined_never_a_null_document_time(legacy_db, epoch):
    with connect(legacy_db) as con:
        _geoid(con, "g_ms", created=epoch, updated=epoch)
        report = migrate(con)
        assert report.quarantine_reasons == {"legacy_geoids:timestamp_out_of_range": 1}
        assert con.execute("SELECT count(*) FROM identities").fetchone() == (0,)
        nulls = con.execute(
            "SELECT count(*) FROM identities WHERE data->>'$.created_at' IS NULL"
        ).fetchone()
        assert nulls == (0,)


@pytest.mark.parametrize("epoch", [YEAR_1, math.nextafter(YEAR_10000, 0), 1e11, -1e-7])
def test_every_representable_epoch_is_carried_exactly(legacy_db, epoch):
    with connect(legacy_db) as con:
        _geoid(con, "g_edge", created=epoch, updated=epoch)
        migrate(con)
        identity = read_identity_p1(con, "g_edge")
    assert identity.created_at == identity.updated_at == epoch


def test_rows_made_by_geoid_new_migrate_without_whitespace_warnings(legacy_db):
    rows = [
        Geoid.new(raw, "en", created_at=T0)
        for raw in ("line\n", "tab\t", "\u2003em space", "nbsp\xa0", "sep\x1c", "é\u3000")
    ]
    blank = Geoid.new("\u3000", "ja", created_at=T0)
    with connect(legacy_db) as con:
        insert_geoids(con, [*rows, blank])
        report = migrate(con)
        for g in rows:
            assert read_identity_p1(con, g.gid).raw == g.raw
    assert report.warnings == {}
    assert report.quarantine_reasons == {"legacy_geoids:empty_raw": 1}


@pytest.mark.parametrize("empty", [None, "null", "{}", "[]", "false", '""', "0"])
def test_null_and_empty_meta_and_tags_migrate_alike(legacy_db, empty):
    with connect(legacy_db) as con:
        con.execute(
            "INSERT INTO legacy_geoids VALUES ('g', 'text', 'text', 'en', ?, 1.0, ?, ?, ?)",
            [empty, empty, T0, T0],
        )
        report = migrate(con)
        identity = read_identity_p1(con, "g")
        entropy = con.execute("SELECT entropy_score FROM identities").fetchone()[0]
    assert report.counts.inserted == 1 and report.counts.quarantined == 0
    assert identity.meta == (None if empty is None else json.loads(empty))
    assert entropy == 0.0


def test_a_scar_without_weight_has_the_entropy_of_weight_one(legacy_db):
    with connect(legacy_db) as con:
        _geoid(con, "a")
        _geoid(con, "b")
        _geoid(con, "c")
        con.execute(
            'INSERT INTO legacy_scars VALUES (\'s\', NULL, \'["a", "b", "c", "a"]\', NULL, ?, ?)',
            [T0, T0],
        )
        report = migrate(con)
        entropy = con.execute("SELECT entropy_score FROM identities WHERE id = 's'").fetchone()[0]
    assert report.warnings["legacy_scars:null_weight"] == 1
    assert entropy == 2.0  # log2(4) * 1.0


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ('{"terms": [{"intensity": 1}], "nested": {"x": [1, NaN]}}', "non_finite_number"),
        ('{"x": -Infinity}', "non_finite_number"),
        ('{"x": 1e999}', "non_finite_number"),
        ('{"terms": [{"intensity": ' + str(10**400) + "}]}", "non_finite_intensity"),
        ('{"terms": [{"intensity": 1e999}]}', "non_finite_intensity"),
    ],
)
def test_numbers_json_cannot_carry_are_quarantined(legacy_db, meta, reason):
    with connect(legacy_db) as con:
        _geoid(con, "g", meta=meta)
        report = migrate(con)
    assert report.quarantine_reasons == {f"legacy_geoids:{reason}": 1}


def test_big_integers_and_lookalike_strings_are_carried_exactly(legacy_db):
    meta = {"big": 10**400, "words": ["NaN", "Infinity", "info"], "n": -(2**70)}
    with connect(legacy_db) as con:
        _geoid(con, "g", meta=json.dumps(meta))
        migrate(con)
        assert read_identity_p1(con, "g").meta == meta
