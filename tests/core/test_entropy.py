"""Entropy and adaptive-tau decay: hand-computed values, properties, and scalar = bulk."""

from __future__ import annotations

import json
import math
import random

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from migration.legacy_reference import existing_geoid_entropy, existing_scar_entropy

from kimera_core.entropy import (
    TAU_0_SECONDS,
    TAU_K,
    bulk_geoid_entropy,
    bulk_scar_entropy,
    decay_factor,
    effective_tau,
    geoid_entropy,
    geoid_entropy_json,
    identity_entropy,
    scar_entropy,
    scar_entropy_json,
    shannon_entropy,
    term_entropy,
)
from kimera_core.identity import Identity
from kimera_core.legacy import create_legacy_schema

PROPERTY = settings(max_examples=200, deadline=None)
H_1_3 = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # 0.8112781244591328
TAU_0 = 14 * 24 * 3600


def terms(*intensities):
    return [{"symbol": f"s{i}", "role": "x", "intensity": v} for i, v in enumerate(intensities)]


def close(a, b, tol=1e-9):
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


@pytest.fixture
def con():
    connection = duckdb.connect()
    yield connection
    connection.close()


def bulk_geoid_one(con, meta_text, tags_text):
    con.execute("CREATE OR REPLACE TEMP TABLE one_geoid (gid VARCHAR, meta VARCHAR, tags VARCHAR)")
    con.execute("INSERT INTO one_geoid VALUES ('g', ?, ?)", [meta_text, tags_text])
    return bulk_geoid_entropy(con, "one_geoid").to_pylist()[0]["entropy"]


def bulk_scar_one(con, related_text, weight):
    con.execute(
        "CREATE OR REPLACE TEMP TABLE one_scar (id VARCHAR, related_ids VARCHAR, weight DOUBLE)"
    )
    con.execute("INSERT INTO one_scar VALUES ('s', ?, ?)", [related_text, weight])
    return bulk_scar_entropy(con, "one_scar").to_pylist()[0]["entropy"]


# --- hand-computed geoid entropy ----------------------------------------------------------
def test_constants():
    assert TAU_0_SECONDS == 1_209_600 == TAU_0
    assert TAU_K == 0.1


@pytest.mark.parametrize(
    ("intensities", "expected"),
    [
        ([1, 1], 1.0),
        ([1, 1, 1, 1], 2.0),
        ([0.5, 0.5, 0.5, 0.5], 2.0),
        ([1, 3], H_1_3),
        ([0.25, 0.75], H_1_3),
        ([7], 0.0),
        ([1, 1, 2], 1.5),  # -(2 * .25 log2 .25 + .5 log2 .5)
        ([1e308, 1e308], 1.0),  # no overflow of the sum
    ],
)
def test_term_entropy_golden_values(intensities, expected):
    assert math.isclose(term_entropy(terms(*intensities)), expected, abs_tol=1e-12)
    assert math.isclose(shannon_entropy(intensities), expected, abs_tol=1e-12)


def test_golden_one_three_value_is_the_documented_number():
    assert math.isclose(H_1_3, 0.8112781244591328, abs_tol=1e-15)


def test_empty_terms_list_wins_over_tags():
    assert geoid_entropy({"terms": []}, ["a", "b", "c", "d"]) == 0.0


def test_terms_without_usable_intensity_give_zero_even_with_tags():
    assert geoid_entropy({"terms": terms(0, -1, None)}, ["a", "b", "c", "d"]) == 0.0


@pytest.mark.parametrize(
    ("meta", "tags", "expected"),
    [
        ({"source": "x"}, ["a", "b", "c", "d"], 2.0),
        ({"source": "x"}, ["a", "b"], 1.0),
        ({"source": "x"}, ["a"], 0.0),
        ({"source": "x"}, [], 0.0),
        (None, ["a", "b", "c", "d"], 2.0),
        ("not an object", ["a", "b", "c", "d"], 2.0),
        (["terms", 1, 2], ["a", "b", "c", "d"], 2.0),
        ({"terms": {"a": {"intensity": 1}}}, ["a", "b", "c", "d"], 2.0),  # terms not a list
        ({"terms": "a,b"}, ["a", "b"], 1.0),
        ({"source": "x"}, "a,b,c,d", 0.0),  # tags not a list
        ({"source": "x"}, None, 0.0),
        (None, None, 0.0),
    ],
)
def test_tags_fallback(meta, tags, expected):
    assert geoid_entropy(meta, tags) == expected


IGNORED = {
    "zero": 0,
    "zero_float": 0.0,
    "negative": -0.5,
    "none": None,
    "string": "0.5",
    "false": False,
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "int_beyond_double": 10**400,
    "object": {"value": 1},
    "list": [1, 2],
}


@pytest.mark.parametrize("value", list(IGNORED.values()), ids=list(IGNORED))
def test_unusable_intensity_is_ignored(value):
    meta = {"terms": [*terms(1, 1), {"symbol": "z", "intensity": value}]}
    assert geoid_entropy(meta, ["a", "b", "c", "d"]) == 1.0


def test_true_counts_as_one_as_in_the_existing_python():
    # isinstance(True, (int, float)) and True > 0: a JSON true is an intensity of 1
    meta = {"terms": [*terms(1, 1), {"symbol": "z", "intensity": True}]}
    assert geoid_entropy(meta, []) == geoid_entropy({"terms": terms(1, 1, 1)}, []) == math.log2(3)


def test_true_counts_as_one_in_both_forms(con):
    meta = '{"terms": [{"intensity": 1}, {"intensity": true}, {"intensity": false}]}'
    assert geoid_entropy_json(meta, None) == 1.0
    assert close(bulk_geoid_one(con, meta, None), 1.0, 1e-12)


def test_missing_intensity_and_non_object_terms_are_ignored():
    meta = {"terms": [*terms(1, 3), {"symbol": "no intensity"}, 5, "x", None, [{"intensity": 2}]]}
    assert math.isclose(geoid_entropy(meta, []), H_1_3, abs_tol=1e-12)


# The same cases as JSON text, with the literal tokens Python's json reads and writes.
IGNORED_JSON_LITERALS = [
    "0",
    "0.0",
    "-0.0",
    "-0.5",
    "null",
    '"0.5"',
    "false",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    str(10**400),
    '{"value": 1}',
    "[1, 2]",
]


@pytest.mark.parametrize("literal", IGNORED_JSON_LITERALS)
def test_unusable_intensity_literal_is_ignored_by_both_forms(con, literal):
    meta = (
        '{"terms": [{"intensity": 1}, {"intensity": 1}, {"symbol": "z", "intensity": '
        + literal
        + "}]}"
    )
    tags = '["a", "b", "c", "d"]'
    assert geoid_entropy_json(meta, tags) == 1.0
    assert close(bulk_geoid_one(con, meta, tags), 1.0, 1e-12)


@pytest.mark.parametrize(
    ("meta", "tags", "expected"),
    [
        ('{"terms": [{"intensity": 1}, {"intensity": 3}]}', None, H_1_3),
        ('{"terms": []}', '["a", "b", "c", "d"]', 0.0),
        ('{"source": "x"}', '["a", "b", "c", "d"]', 2.0),
        ('"{\\"terms\\": [{\\"intensity\\": 1}]}"', '["a", "b", "c", "d"]', 2.0),  # a JSON string
        ("[1, 2, 3]", '["a", "b"]', 1.0),
        (None, None, 0.0),
        ("{bad", '["a", "b"]', 1.0),  # text that is not JSON counts as absent
        ('{"terms": [{"intensity": 1}, {"intensity": 1}]}', "{bad", 1.0),
    ],
)
def test_json_forms_golden_values(con, meta, tags, expected):
    assert math.isclose(geoid_entropy_json(meta, tags), expected, abs_tol=1e-12)
    assert close(bulk_geoid_one(con, meta, tags), expected, 1e-12)


# --- hand-computed scar entropy -----------------------------------------------------------
@pytest.mark.parametrize(
    ("related", "weight", "expected"),
    [
        (["a"], 0.8, 0.0),
        ([], 0.8, 0.0),
        (None, 0.8, 0.0),
        ("a,b", 0.8, 0.0),  # not a list
        ({"a": "b"}, 0.8, 0.0),
        (["a"], None, 0.0),  # at most one id: 0 whatever the weight
        (["a", "b"], 0.5, 0.5),
        (["a", "b", "c", "d"], 1.0, 2.0),
        (["a", "b", "c", "d"], 0.25, 0.5),
        (["a", "b"], 0, 0.0),
        (["a", "b"], -1.0, -1.0),
        (["a", "b"], None, 1.0),  # a missing weight is 1.0, as the existing model reads it
        (["a", "b", "c", "d"], None, 2.0),
        (["a", "b"], math.nan, None),
        (["a", "b"], math.inf, None),
        (["a", "b"], -math.inf, None),
        (["a", "b"], True, 1.0),  # a bool is an int
        (["a", "b"], False, 0.0),
        (["a", "b"], 10**400, None),
        (["a", "b"], "0.5", None),
    ],
)
def test_scar_entropy_golden_values(related, weight, expected):
    assert scar_entropy(related, weight) == expected


@pytest.mark.parametrize(
    ("related", "weight", "expected"),
    [
        ('["a"]', 0.8, 0.0),
        ('["a", "b"]', 0.5, 0.5),
        ('["a", "b", "c", "d"]', 1.0, 2.0),
        ('["a", "b"]', None, 1.0),
        ('["a", "b"]', math.nan, None),
        ('["a", "b"]', math.inf, None),
        ('"a,b"', 0.8, 0.0),
        ("null", 0.8, 0.0),
        (None, 0.8, 0.0),
        ("[bad", 0.8, 0.0),
    ],
)
def test_scar_json_forms_golden_values(con, related, weight, expected):
    assert scar_entropy_json(related, weight) == expected
    assert close(bulk_scar_one(con, related, weight), expected, 1e-12)


def test_identity_entropy_dispatches_on_type():
    geoid = Identity(id="g", identity_type="geoid", raw="x", meta={"terms": terms(1, 3)})
    scar = Identity(id="s", identity_type="scar", related_ids=["a", "b"], weight=0.5)
    assert math.isclose(identity_entropy(geoid), H_1_3, abs_tol=1e-12)
    assert identity_entropy(scar) == 0.5


# --- tau and decay ------------------------------------------------------------------------
def test_effective_tau_golden_values():
    assert effective_tau(0) == 1_209_600
    assert effective_tau(2) == pytest.approx(1_451_520.0, rel=1e-12)  # 1209600 * 1.2
    assert effective_tau(None) == 1_209_600
    assert effective_tau(1, tau_0=100, k=0.5) == pytest.approx(150.0, rel=1e-12)


def test_decay_factor_golden_values():
    tau = effective_tau(1.0)
    assert decay_factor(0, tau) == 1.0
    assert decay_factor(tau, tau) == pytest.approx(math.exp(-1), rel=1e-12)
    assert decay_factor(2 * TAU_0, TAU_0) == pytest.approx(math.exp(-2), rel=1e-12)
    assert decay_factor(-3600, tau) == 1.0  # clock skew counts as age 0
    assert decay_factor(100.0, 0) == 0.0
    assert decay_factor(100.0, -5.0) == 0.0
    assert decay_factor(0.0, 0.0) == 0.0


@pytest.mark.parametrize(("age", "tau"), [(math.nan, 1.0), (1.0, math.nan)])
def test_decay_factor_rejects_nan(age, tau):
    with pytest.raises(ValueError):
        decay_factor(age, tau)


# --- properties ---------------------------------------------------------------------------
positive = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False)
unusable = st.sampled_from(list(IGNORED.values()))
intensity_values = st.one_of(positive, unusable)
# (value, usable?) pairs, so the bound does not re-implement the usability rule
flagged_values = st.one_of(positive.map(lambda v: (v, True)), unusable.map(lambda v: (v, False)))


@given(pairs=st.lists(flagged_values, max_size=30))
@PROPERTY
def test_entropy_is_between_zero_and_log2_of_usable_terms(pairs):
    h = term_entropy(terms(*(v for v, _ in pairs)))
    n = sum(usable for _, usable in pairs)
    assert h >= 0.0
    assert h <= (math.log2(n) if n > 1 else 0.0) + 1e-12


@given(data=st.data(), values=st.lists(intensity_values, max_size=20))
@PROPERTY
def test_entropy_is_invariant_under_permutation(data, values):
    shuffled = data.draw(st.permutations(values))
    assert math.isclose(term_entropy(terms(*values)), term_entropy(terms(*shuffled)), abs_tol=1e-12)


factors = st.one_of(
    st.sampled_from([10.0**k for k in range(-3, 4)]),
    st.floats(min_value=1e-3, max_value=1e3),
)


@given(
    values=st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=20),
    factor=factors,
)
@PROPERTY
def test_entropy_is_invariant_under_positive_scaling(values, factor):
    scaled = [v * factor for v in values]
    assert math.isclose(term_entropy(terms(*values)), term_entropy(terms(*scaled)), abs_tol=1e-9)


entropies = st.floats(min_value=0, max_value=50)


@given(h1=entropies, h2=entropies, k=st.floats(min_value=1e-6, max_value=10))
@PROPERTY
def test_tau_is_monotone_in_entropy(h1, h2, k):
    lo, hi = sorted((h1, h2))
    assert effective_tau(lo, k=k) <= effective_tau(hi, k=k)
    assert effective_tau(lo, k=k) >= TAU_0  # never below tau_0 for H >= 0


@given(
    age=st.floats(min_value=0, max_value=10 * 365 * 86400), h=st.floats(min_value=0, max_value=10)
)
@PROPERTY
def test_decay_factor_is_in_unit_interval(age, h):
    value = decay_factor(age, effective_tau(h))
    assert 0.0 < value <= 1.0


@given(
    age1=st.floats(min_value=0, max_value=1e9),
    age2=st.floats(min_value=0, max_value=1e9),
    h=st.floats(min_value=0, max_value=10),
)
@PROPERTY
def test_decay_factor_decreases_with_age(age1, age2, h):
    lo, hi = sorted((age1, age2))
    tau = effective_tau(h)
    assert decay_factor(hi, tau) <= decay_factor(lo, tau)


# --- scalar and bulk agree ----------------------------------------------------------------
INTENSITY_LITERALS = [
    "1",
    "2",
    "0.5",
    "3.25",
    "100",
    "1e-300",
    "5e-324",
    "1e308",
    "0",
    "0.0",
    "-0.0",
    "-1.5",
    "null",
    '"0.5"',
    '""',
    "true",
    "false",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    str(10**400),
    str(2**64 + 1),
    str(2**63),
    str(10**30),
    '{"a": 1}',
    "[1, 2]",
]
JUNK_TERMS = ["1", '"x"', "null", "true", '[{"intensity": 2}]', '{"intensity": {"intensity": 1}}']
NON_LIST_TERMS = ['{"a": {"intensity": 1}}', '"abc"', "null", "3", "true"]
NON_OBJECT_META = ["[1, 2]", '["terms", 1, 2]', "3", '"just text"', "null", "true", "[]"]


def random_intensity(rng):
    roll = rng.random()
    if roll < 0.4:
        return json.dumps(rng.uniform(0.001, 1000))
    if roll < 0.5:
        return str(rng.randint(1, 50))
    return rng.choice(INTENSITY_LITERALS)


def random_term(rng):
    roll = rng.random()
    if roll < 0.8:
        return f'{{"symbol": "s{rng.randint(0, 9)}", "role": "x", "intensity": {random_intensity(rng)}}}'
    if roll < 0.9:
        return '{"symbol": "no intensity", "role": "x"}'
    return rng.choice(JUNK_TERMS)


def random_meta(rng):
    roll = rng.random()
    junk = '"nested": {"a": [1, {"b": null}, [NaN, Infinity]]}'
    if roll < 0.55:
        body = ", ".join(random_term(rng) for _ in range(rng.randint(0, 8)))
        parts = [f'"terms": [{body}]', '"source": "ingest"']
        if rng.random() < 0.3:
            parts.append(junk)
        rng.shuffle(parts)
        return "{" + ", ".join(parts) + "}"
    if roll < 0.65:
        return '{"source": "user", "confidence": 0.5}'
    if roll < 0.72:
        return '{"terms": ' + rng.choice(NON_LIST_TERMS) + "}"
    if roll < 0.80:
        return rng.choice(NON_OBJECT_META)
    if roll < 0.87:  # an object serialised twice: a JSON string
        return json.dumps('{"terms": [{"intensity": 1}, {"intensity": 2}]}')
    if roll < 0.93:
        return None
    return '{"terms": []}'


def random_tags(rng):
    roll = rng.random()
    if roll < 0.75:
        return json.dumps([f"tag{j}" for j in range(rng.randint(0, 6))])
    if roll < 0.85:
        return rng.choice(['"a,b,c"', '{"a": 1}', "5", "null", "[[1, 2], [3]]", "[]"])
    return None


def random_related(rng):
    roll = rng.random()
    if roll < 0.8:
        return json.dumps([f"{rng.getrandbits(64):016x}" for _ in range(rng.randint(0, 5))])
    if roll < 0.9:
        return rng.choice(['"a,b"', '{"a": "b"}', "3", "null", "[]", '[null, null, ["x"]]'])
    return None


def random_weight(rng):
    roll = rng.random()
    if roll < 0.7:
        return rng.uniform(0, 1)
    return rng.choice([None, math.nan, math.inf, -math.inf, -0.5, 0.0, 1e300, 5e-324, 1.0])


@pytest.fixture(scope="module")
def random_rows():
    rng = random.Random(20240501)
    geoid_rows = [(f"g{i:05d}", random_meta(rng), random_tags(rng)) for i in range(3000)]
    scar_rows = [(f"s{i:05d}", random_related(rng), random_weight(rng)) for i in range(3000)]
    return geoid_rows, scar_rows


def test_random_rows_cover_the_awkward_cases(random_rows):
    geoid_rows, scar_rows = random_rows
    metas = [m for _, m, _ in geoid_rows if m is not None]
    for token in ("NaN", "Infinity", "-Infinity", "1e400", str(10**400), '"0.5"', "true"):
        assert any(token in m for m in metas), token
    assert any(m is None for _, m, _ in geoid_rows)
    assert any(t is None for _, _, t in geoid_rows)
    assert any(w is None for _, _, w in scar_rows)
    assert any(w is not None and math.isnan(w) for _, _, w in scar_rows)


def geoid_table(rows):
    return pa.table(
        {
            "gid": [r[0] for r in rows],
            "meta": pa.array([r[1] for r in rows], pa.string()),
            "tags": pa.array([r[2] for r in rows], pa.string()),
        }
    )


def scar_table(rows):
    return pa.table(
        {
            "id": [r[0] for r in rows],
            "related_ids": pa.array([r[1] for r in rows], pa.string()),
            "weight": pa.array([r[2] for r in rows], pa.float64()),
        }
    )


def assert_geoids_agree(result, rows):
    by_key = {row["key"]: row for row in result.to_pylist()}
    assert len(by_key) == len(rows) == result.num_rows
    mismatches = []
    for gid, meta, tags in rows:
        expected = geoid_entropy_json(meta, tags)
        got = by_key[gid]
        if not close(got["entropy"], expected) or not close(
            got["tau_eff"], effective_tau(expected), 1e-12
        ):
            mismatches.append((gid, meta, tags, expected, got))
    assert not mismatches, mismatches[:5]


def assert_scars_agree(result, rows):
    by_key = {row["key"]: row for row in result.to_pylist()}
    assert len(by_key) == len(rows) == result.num_rows
    mismatches = []
    for sid, related, weight in rows:
        expected = scar_entropy_json(related, weight)
        got = by_key[sid]
        if not close(got["entropy"], expected) or not close(
            got["tau_eff"], effective_tau(expected), 1e-12
        ):
            mismatches.append((sid, related, weight, expected, got))
    assert not mismatches, mismatches[:5]


def test_bulk_geoid_entropy_equals_scalar_on_an_arrow_batch(con, random_rows):
    geoid_rows, _ = random_rows
    batch = geoid_table(geoid_rows)
    con.register("geoid_batch", batch)
    assert_geoids_agree(bulk_geoid_entropy(con, "geoid_batch"), geoid_rows)


def test_bulk_geoid_entropy_equals_scalar_on_the_legacy_table(con, random_rows):
    geoid_rows, _ = random_rows
    create_legacy_schema(con)
    con.register("geoid_batch", geoid_table(geoid_rows))
    con.execute(
        "INSERT INTO legacy_geoids (gid, raw, tags, meta) SELECT gid, 'x', tags, meta FROM geoid_batch"
    )
    assert con.execute("SELECT count(*) FROM legacy_geoids").fetchone()[0] == len(geoid_rows)
    assert_geoids_agree(bulk_geoid_entropy(con), geoid_rows)


def test_bulk_scar_entropy_equals_scalar_on_an_arrow_batch(con, random_rows):
    _, scar_rows = random_rows
    con.register("scar_batch", scar_table(scar_rows))
    assert_scars_agree(bulk_scar_entropy(con, "scar_batch"), scar_rows)


def test_bulk_scar_entropy_equals_scalar_on_the_legacy_table(con, random_rows):
    _, scar_rows = random_rows
    create_legacy_schema(con)
    con.register("scar_batch", scar_table(scar_rows))
    con.execute(
        "INSERT INTO legacy_scars (id, weight, related_ids) SELECT id, weight, related_ids FROM scar_batch"
    )
    result = bulk_scar_entropy(con)
    assert_scars_agree(result, scar_rows)
    # unknown entropy (non-finite weight with two or more ids) is SQL NULL
    assert any(row["entropy"] is None for row in result.to_pylist())


def test_bulk_uses_custom_tau_parameters(con):
    con.execute("CREATE TEMP TABLE s (id VARCHAR, related_ids VARCHAR, weight DOUBLE)")
    con.execute(
        "INSERT INTO s VALUES ('a', '[\"x\", \"y\", \"z\", \"w\"]', 1.0), ('b', '[]', NULL)"
    )
    rows = {r["key"]: r for r in bulk_scar_entropy(con, "s", tau_0=100.0, k=0.5).to_pylist()}
    assert rows["a"]["tau_eff"] == pytest.approx(200.0)  # 100 * (1 + 0.5 * 2)
    assert rows["b"]["tau_eff"] == pytest.approx(100.0)


@pytest.mark.parametrize("name", ["legacy_geoids; DROP TABLE x", "a b", "1abc", '"q"', ""])
def test_bulk_refuses_non_identifier_sources(con, name):
    with pytest.raises(ValueError, match="identifier"):
        bulk_geoid_entropy(con, name)


json_intensity = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(INTENSITY_LITERALS),
)
json_meta = st.one_of(
    st.none(),
    st.sampled_from(NON_OBJECT_META),
    st.lists(json_intensity, max_size=6).map(
        lambda vs: '{"terms": [' + ", ".join(f'{{"intensity": {v}}}' for v in vs) + "]}"
    ),
)
json_tags = st.one_of(st.none(), st.lists(st.text(max_size=3), max_size=6).map(json.dumps))


@given(rows=st.lists(st.tuples(json_meta, json_tags), min_size=1, max_size=20))
@settings(max_examples=100, deadline=None)
def test_bulk_geoid_entropy_equals_scalar_property(rows):
    keyed = [(f"g{i}", meta, tags) for i, (meta, tags) in enumerate(rows)]
    with duckdb.connect() as connection:
        connection.register("batch", geoid_table(keyed))
        assert_geoids_agree(bulk_geoid_entropy(connection, "batch"), keyed)


@given(
    rows=st.lists(
        st.tuples(
            st.one_of(st.none(), st.lists(st.just("id"), max_size=5).map(json.dumps)),
            st.one_of(st.none(), st.floats()),
        ),
        min_size=1,
        max_size=20,
    )
)
@settings(max_examples=100, deadline=None)
def test_bulk_scar_entropy_equals_scalar_property(rows):
    keyed = [(f"s{i}", related, weight) for i, (related, weight) in enumerate(rows)]
    with duckdb.connect() as connection:
        connection.register("batch", scar_table(keyed))
        assert_scars_agree(bulk_scar_entropy(connection, "batch"), keyed)


# JSON that DuckDB's JSON type stores (so a legacy file can hold it) but Python's json rejects
# or reads differently: the two forms then disagree. See the report accompanying these tests.
@pytest.mark.xfail(strict=True, reason="bulk and scalar JSON parsers differ on lenient JSON")
@pytest.mark.parametrize(
    "meta",
    [
        '{"terms": [{"intensity": 1}, {"intensity": 1},]}',  # trailing comma
        '{"terms": [{"intensity": 1}, {"intensity": nan}]}',  # lowercase nan
        '{"terms": [{"intensity": 1, "intensity": 3}, {"intensity": 1}]}',  # duplicate key
    ],
)
def test_bulk_and_scalar_agree_on_json_that_duckdb_accepts(con, meta):
    con.execute("SELECT ?::JSON", [meta])  # DuckDB's JSON type accepts the text
    tags = '["a", "b", "c", "d"]'
    assert close(bulk_geoid_one(con, meta, tags), geoid_entropy_json(meta, tags))


# --- the existing Kimera's Python, as the reference ----------------------------------------
# intensities the existing Python reads: bools, ints of any size within the double range,
# floats, numeric strings, nulls, zero and negatives; no NaN/inf (those rows are refused)
python_intensity = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=10**200, max_value=10**300),
    st.floats(min_value=-1e300, max_value=1e300, allow_nan=False),
    st.floats(min_value=0, max_value=1e-300),
    st.sampled_from(["0.5", "1", "", None]),
)
python_term = st.one_of(
    st.builds(lambda v: {"symbol": "s", "intensity": v}, python_intensity),
    st.just({"symbol": "no intensity"}),
    st.sampled_from([1, "x", None, [{"intensity": 2}]]),
)
FALSE_JSON = [None, False, 0, 0.0, "", [], {}]
python_meta = st.one_of(
    st.sampled_from(FALSE_JSON),
    st.lists(python_term, max_size=6).map(lambda ts: {"terms": ts, "source": "x"}),
    st.sampled_from([{"source": "x"}, {"terms": None}, {"terms": {"a": 1}}]),
)
python_tags = st.one_of(st.sampled_from(FALSE_JSON), st.lists(st.just("t"), max_size=6))


@given(rows=st.lists(st.tuples(python_meta, python_tags), min_size=1, max_size=20))
@settings(max_examples=150, deadline=None)
def test_scalar_and_bulk_geoid_entropy_are_the_existing_python(rows):
    keyed = [
        (f"g{i}", None if m is None else json.dumps(m), None if t is None else json.dumps(t))
        for i, (m, t) in enumerate(rows)
    ]
    with duckdb.connect() as connection:
        connection.register("batch", geoid_table(keyed))
        bulk = {r["key"]: r["entropy"] for r in bulk_geoid_entropy(connection, "batch").to_pylist()}
    for (gid, meta_text, tags_text), (meta, tags) in zip(keyed, rows, strict=True):
        expected = existing_geoid_entropy(meta, tags)
        assert close(geoid_entropy(meta, tags), expected), (meta, tags)
        assert close(geoid_entropy_json(meta_text, tags_text), expected), (meta, tags)
        assert close(bulk[gid], expected), (meta, tags)


@given(
    rows=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(FALSE_JSON), st.lists(st.just("g"), max_size=5)),
            st.one_of(st.none(), st.floats(min_value=-1e300, max_value=1e300, allow_nan=False)),
        ),
        min_size=1,
        max_size=20,
    )
)
@settings(max_examples=150, deadline=None)
def test_scalar_and_bulk_scar_entropy_are_the_existing_python(rows):
    keyed = [(f"s{i}", json.dumps(r), w) for i, (r, w) in enumerate(rows)]
    with duckdb.connect() as connection:
        connection.register("batch", scar_table(keyed))
        bulk = {r["key"]: r["entropy"] for r in bulk_scar_entropy(connection, "batch").to_pylist()}
    for (sid, _text, weight), (related, _) in zip(keyed, rows, strict=True):
        expected = existing_scar_entropy(related, weight)
        assert close(scar_entropy(related, weight), expected), (related, weight)
        assert close(bulk[sid], expected), (related, weight)


@pytest.mark.parametrize("empty_meta", [None, "null", "{}", "[]", "false", '""', "0"])
def test_sql_null_json_null_and_empty_meta_give_the_same_entropy(con, empty_meta):
    tags = '["a", "b", "c", "d"]'
    assert geoid_entropy_json(empty_meta, tags) == 2.0
    assert close(bulk_geoid_one(con, empty_meta, tags), 2.0, 1e-12)
