"""The comparison rules (kimera_core.compare): each field's rule, the tolerances, JSON values,
and the verifier's SQL stating the same rules (the same pairs give the same fields)."""

from __future__ import annotations

import json

import pytest

from kimera_core.compare import (
    COMPARED_FIELDS,
    FIELD_RULES,
    JSON_FIELDS,
    MISSING_IN_LEGACY,
    MISSING_IN_NEW,
    TIME_FIELDS,
    Tolerance,
    compare_reads,
    differing_fields,
    json_equal,
)
from kimera_core.consistency import verify
from kimera_core.identity import Identity
from kimera_core.storage import Storage

BASE = Identity(
    id="g1",
    identity_type="geoid",
    raw="text",
    echo="text",
    lang_axis="en",
    tags=["a"],
    weight=0.5,
    meta={"x": 1, "y": [1, 2]},
    created_at=10.0,
    updated_at=20.0,
)
SCAR = Identity(
    id="s1",
    identity_type="scar",
    weight=0.25,
    related_ids=["g1"],
    meta={"k": 1},
    created_at=1_700_000_000.25,
    updated_at=1_700_000_001.5,
)


def copy(base=BASE, **kw):
    fields = {f: getattr(base, f) for f in base.__slots__}
    fields.update(kw)
    return Identity(**fields)


# A geoid whose type changed in identities: compare keys the geoid related_ids rule on the
# legacy type (NULL = [] on both sides), the SQL on each side's own type (so NULL != []).
TYPE_CHANGED = (BASE, {}, {"identity_type": "scar"}, ["identity_type"])
# (base, legacy changes, new changes, the fields that differ)
PAIRS = [
    (BASE, {}, {"weight": 0.5 + 1e-12}, []),
    (BASE, {}, {"weight": 0.5 + 1e-6}, ["weight"]),
    (BASE, {}, {"created_at": 10.0 + 5e-7}, []),
    (BASE, {}, {"created_at": 10.0 + 5e-6}, ["created_at"]),
    (BASE, {}, {"meta": {"y": [1, 2], "x": 1.0}}, []),
    (BASE, {}, {"meta": {"x": 1, "y": [2, 1]}}, ["meta"]),
    (BASE, {}, {"meta": {"x": True, "y": [1, 2]}}, ["meta"]),
    (BASE, {"tags": []}, {"tags": None}, ["tags"]),
    (BASE, {}, {"related_ids": []}, []),
    (BASE, {}, {"related_ids": ["s1"]}, ["related_ids"]),
    TYPE_CHANGED,
    (BASE, {}, {"raw": "Text"}, ["raw"]),
    (BASE, {}, {"echo": None}, ["echo"]),
    (BASE, {}, {"raw": "other", "updated_at": 21.0}, ["raw", "updated_at"]),
    (SCAR, {"related_ids": None}, {"related_ids": []}, ["related_ids"]),
    (SCAR, {}, {"related_ids": ["g1", "g2"]}, ["related_ids"]),
    (SCAR, {}, {"weight": 0.26}, ["weight"]),
    (SCAR, {}, {"meta": {"k": 1.0}}, []),
    (SCAR, {}, {"meta": {"k": "1"}}, ["meta"]),
]


@pytest.mark.parametrize(("base", "legacy", "new", "expected"), PAIRS)
def test_field_rules(base, legacy, new, expected):
    assert differing_fields(copy(base, **legacy), copy(base, **new)) == expected


def test_scar_related_ids_null_and_empty_differ():
    legacy = Identity(id="s", identity_type="scar", related_ids=None)
    assert differing_fields(legacy, Identity(id="s", identity_type="scar", related_ids=[])) == [
        "related_ids"
    ]


def test_tolerance_is_a_parameter():
    loose = Tolerance(weight_relative=1e-3, seconds=1.0)
    assert differing_fields(BASE, copy(weight=0.5004, created_at=10.5), loose) == []


def test_json_equal_is_by_value():
    assert json_equal({"a": 1, "b": 2}, {"b": 2, "a": 1.0})
    assert not json_equal([1, 2], [2, 1])
    assert not json_equal(1, True)
    assert not json_equal("1", 1)


def test_every_compared_field_has_one_rule():
    assert tuple(FIELD_RULES) == COMPARED_FIELDS
    assert {n for n, r in FIELD_RULES.items() if r == "json"} == JSON_FIELDS
    assert {n for n, r in FIELD_RULES.items() if r == "seconds"} == TIME_FIELDS
    assert {n for n, r in FIELD_RULES.items() if r == "relative"} == {"weight"}


def test_missing_sides():
    assert differing_fields(BASE, None) == [MISSING_IN_NEW]
    assert differing_fields(None, BASE) == [MISSING_IN_LEGACY]
    assert differing_fields(None, None) == []


def test_list_answers_are_compared_by_id():
    found = compare_reads([BASE, copy(id="g2")], [copy(raw="x"), copy(id="g3")])
    assert found == {"g1": ["raw"], "g2": [MISSING_IN_NEW], "g3": [MISSING_IN_LEGACY]}
    assert compare_reads(BASE, copy()) == {}


def test_tolerance_round_trips_as_a_dict():
    assert Tolerance(1e-3, 2.0).to_dict() == {"weight_relative": 1e-3, "seconds": 2.0}


def _verifier_fields(tmp_path, pairs):
    """Each (legacy, new) pair stored as legacy (its legacy side) and identities (its new
    side's document); the fields the verifier's SQL names per id."""
    with Storage.open(str(tmp_path / "c.duckdb"), stage="dual-write") as s:
        s.store_batch([legacy for legacy, _ in pairs])
        for _, new in pairs:
            s.con.execute(
                "UPDATE identities SET data = ?, identity_type = ? WHERE id = ?",
                [json.dumps(new.to_document()), new.identity_type, new.id],
            )
        report = verify(s.con, sample=len(pairs), record=False)
    return {m["id"]: m["fields"] for m in report.field_mismatches.sample}


def _pairs(cases):
    return [
        (copy(base, id=f"{base.id}-{i}", **legacy), copy(base, id=f"{base.id}-{i}", **new))
        for i, (base, legacy, new, _) in enumerate(cases)
    ]


def test_the_verifier_sql_gives_the_fields_compare_gives(tmp_path):
    pairs = _pairs([p for p in PAIRS if p is not TYPE_CHANGED])
    found = _verifier_fields(tmp_path, pairs)
    for legacy, new in pairs:
        assert found.get(legacy.id, []) == differing_fields(legacy, new), legacy.id


def test_a_changed_type_gives_the_same_fields(tmp_path):
    """issue 11: the SQL takes the related_ids rule from the legacy side's type, as compare
    does (it named related_ids too, and the test was an expected failure)."""
    ((legacy, new),) = _pairs([TYPE_CHANGED])
    assert _verifier_fields(tmp_path, [(legacy, new)]).get(legacy.id) == ["identity_type"]
