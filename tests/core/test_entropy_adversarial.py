"""Adversarial review (s4) of the bulk geoid entropy: the DuckDB SQL against a plain reference.

Session s4 changed ``geoid_entropy_sql`` to read meta.terms' intensities by one
``json_extract(meta, '$.terms[*].intensity')`` and judge each intensity by its JSON text. These
tests try to break that: meta.terms as an object, a string, null or nested lists; intensities
as ``true``, ``1E2``, ``-0.0``, subnormals, integers beyond uint64 and beyond the double range,
raw ``1e400``; non-minified text (spaces, newlines, tabs around values); unicode keys and
escaped keys; tags that are strings of lists or objects. The reference below is written from
KIMERA_LEGACY.md ("Entropy and decay"): Python's ``json.loads``, ``isinstance(v, (int, float))``
and ``v > 0``, with exact fractions for the probabilities; the one documented deviation
(docs/entropy.md: a non-finite intensity, or an integer beyond the double range, is ignored)
is applied explicitly. Lenient JSON that Python rejects (trailing commas, NaN, duplicate keys)
is a known xfail in test_entropy.py and is not generated here.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from typing import Any

import duckdb
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kimera_core.entropy import geoid_entropy_json, geoid_entropy_sql, geoid_shannon_sql

DOUBLE_MAX = 1.7976931348623157e308
TAGS4 = '["a", "b", "c", "d"]'


# --- the reference: KIMERA_LEGACY.md's words, nothing from the product ---------------------
def _read(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # unreadable text is an absent value
        return None


def _counts(value: Any) -> bool:
    if not isinstance(value, (int, float)) or not value > 0:
        return False
    # docs/entropy.md: infinite intensities and integers beyond the double range are ignored
    if isinstance(value, float):
        return math.isfinite(value)
    return value <= DOUBLE_MAX


def reference_entropy(meta_text: str | None, tags_text: str | None) -> float:
    meta = _read(meta_text) or {}
    tags = _read(tags_text) or []
    terms = meta.get("terms") if isinstance(meta, dict) else None
    if isinstance(terms, list):
        values = [
            Fraction(t["intensity"])
            for t in terms
            if isinstance(t, dict) and "intensity" in t and _counts(t["intensity"])
        ]
        if not values:
            return 0.0
        total = sum(values)
        h = 0.0
        for v in values:
            p = float(v / total)
            if p > 0:
                h -= p * math.log2(p)
        return h
    n = len(tags) if isinstance(tags, list) else 0
    return math.log2(n) if n > 1 else 0.0


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def bulk(rows: list[tuple[str | None, str | None]], column_type: str) -> list[float | None]:
    """The bulk SQL over a table whose meta/tags columns are ``column_type`` (VARCHAR or JSON)."""
    with duckdb.connect() as con:
        con.execute(
            f"CREATE TABLE g (gid VARCHAR, meta {column_type}, tags {column_type})"  # noqa: S608
        )
        con.executemany(
            "INSERT INTO g VALUES (?, ?, ?)",
            [[f"g{i:04d}", m, t] for i, (m, t) in enumerate(rows)],
        )
        got = dict(con.execute(geoid_entropy_sql("g")).fetchall())
    return [got[f"g{i:04d}"] for i in range(len(rows))]


def bulk_from_terms(rows: list[tuple[str | None, str | None]]) -> list[float | None]:
    """geoid_shannon_sql (the migration's and the column check's form) over meta.terms as the
    migration extracts it: json_extract of the parsed meta, tags' length when a list."""
    with duckdb.connect() as con:
        con.execute("CREATE TABLE g (gid VARCHAR, meta VARCHAR, tags VARCHAR)")
        con.executemany(
            "INSERT INTO g VALUES (?, ?, ?)",
            [[f"g{i:04d}", m, t] for i, (m, t) in enumerate(rows)],
        )
        con.execute(
            "CREATE TABLE g_in AS SELECT gid AS key, "
            "TRY(json_extract(TRY(json(meta)), '$.terms')) AS terms_j, "
            "TRY(CASE WHEN json_type(TRY(json(tags))) = 'ARRAY' "
            "THEN json_array_length(TRY(json(tags))) END) AS n_tags FROM g"
        )
        got = dict(con.execute(geoid_shannon_sql("g_in")).fetchall())
    return [got[f"g{i:04d}"] for i in range(len(rows))]


def json_type_accepts(text: str | None) -> bool:
    if text is None:
        return True
    with duckdb.connect() as con:
        try:
            con.execute("SELECT ?::JSON", [text])
        except duckdb.Error:
            return False
    return True


# --- a JSON text strategy: any value, non-minified text, raw number spellings ----------------
RAW = "\u0001RAW:"
RAW_NUMBERS = [
    "1e400",
    "-1e400",
    "1E2",
    "1e-400",
    "1.0e-320",
    "4.9e-324",
    "-0.0",
    "-0",
    "0e0",
    "1.0",
    "2E+1",
    "18446744073709551616",
    "9" * 400,
    "-" + "9" * 400,
    "1180591620717411303424",
    "0.1",
]
raw_number = st.sampled_from(RAW_NUMBERS).map(lambda tok: f"{RAW}{tok}\u0001")

scalar_json = st.one_of(
    st.booleans(),
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["1", "0.5", "true", "", "[1]", "intensity"]),
    raw_number,
)
json_value = st.recursive(
    scalar_json,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["intensity", "x", "terms"]), inner, max_size=3),
    ),
    max_leaves=8,
)
intensity_key = st.sampled_from(
    ["intensity", "intensity", "intensity", "Intensity", "intensité", "intensity ", "intens"]
)
term = st.one_of(
    st.builds(lambda k, v: {k: v, "symbol": "s"}, intensity_key, json_value),
    st.builds(lambda v: {"intensity": v}, scalar_json),
    json_value,
)
terms_value = st.one_of(
    st.lists(term, max_size=6),
    st.builds(lambda v: {"intensity": v}, scalar_json),  # an object holding "intensity"
    st.lists(st.lists(term, max_size=2), max_size=2),  # nested lists
    json_value,
)
meta_value = st.one_of(
    st.builds(lambda ts: {"terms": ts, "source": "x"}, terms_value),
    st.builds(lambda ts: {"source": {"terms": ts}}, terms_value),  # terms one level down
    st.builds(lambda ts: [{"terms": ts}], terms_value),  # meta a list
    st.sampled_from([None, False, 0, "", [], {}, {"terms": None}]),
    json_value,
)
tags_value = st.one_of(
    st.lists(st.sampled_from(["t", "u", 1, None]), max_size=6),
    st.lists(st.just("t"), max_size=6).map(json.dumps),  # a string holding a list
    st.dictionaries(st.sampled_from(["a", "b", "c"]), st.just(1), max_size=3),
    st.sampled_from([None, False, 0, "", [], {}, 3]),
)
layout = st.sampled_from(
    [
        {"separators": (",", ":")},
        {},
        {"indent": 2},
        {"indent": "\t"},
        {"separators": (" ,  ", " :\n ")},
        {"ensure_ascii": False},
    ]
)


def to_text(value: Any, fmt: dict) -> str:
    """json.dumps with the given layout; RAW markers become their bare number tokens."""
    text = json.dumps(value, **fmt)
    return re.sub(r'"(?:\\u0001|\x01)RAW:([^"\\\x01]*)(?:\\u0001|\x01)"', r"\1", text)


present = st.sampled_from([True, True, True, False])  # False: SQL NULL
rows_strategy = st.lists(
    st.tuples(present, meta_value, layout, present, tags_value, layout).map(
        lambda r: (
            to_text(r[1], r[2]) if r[0] else None,
            to_text(r[4], r[5]) if r[3] else None,
        )
    ),
    min_size=1,
    max_size=12,
)

EXAMPLES = [
    ('{"terms": {"intensity": 5}}', TAGS4),
    ('{"terms": {"a": {"intensity": 1}, "b": {"intensity": 3}}}', TAGS4),
    ('{"terms": [[{"intensity": 1}], {"intensity": 1}, {"intensity": 3}]}', TAGS4),
    ('{"terms": [{"intensity":  1 }, {"intensity":\n3}]}', TAGS4),
    ('{ "terms" : [ { "intensity" : 1 } , { "intensity" : 3 } ] }', TAGS4),
    ('{"terms": [{"intensity": 1}, {"intensity": 3}, {"intensity": 1e400}]}', TAGS4),
    ('{"terms": [{"intensity": 1}, {"intensity": 3}, {"intensity": ' + "9" * 400 + "}]}", TAGS4),
    ('{"terms": [{"intensity": 1}, {"intensity": 1.0e-320}]}', TAGS4),
    ('{"terms": [{"intensity": 4.9e-324}, {"intensity": 1e-323}]}', TAGS4),
    ('{"terms": [{"intensity": 1E2}, {"intensity": 1}, {"intensity": -0.0}]}', TAGS4),
    ('{"terms": [{"intensity": true}, {"intensity": false}, {"intensity": 1}]}', TAGS4),
    ('{"terms": [{"intensity": "1"}, {"intensity": null}, {"intensity": [1]}]}', TAGS4),
    ('{"terms": [{"intensity": 18446744073709551616}, {"intensity": 1}]}', TAGS4),
    ('{"terms": [{"Intensity": 1}, {"intensity": 1}, {"intensity": 2}]}', TAGS4),
    ('{"terms": [{"int\\u0065nsity": 1}, {"intensity": 1}]}', TAGS4),
    ('{"t\\u0065rms": [{"intensity": 1}, {"intensity": 1}]}', TAGS4),
    ('{"terms": [{"intensity": 1, "x": {"intensity": 5}}, {"intensity": 1}]}', TAGS4),
    ('{"terms": "[{\\"intensity\\": 1}, {\\"intensity\\": 1}]"}', TAGS4),
    ('"{\\"terms\\": [{\\"intensity\\": 1}, {\\"intensity\\": 1}]}"', TAGS4),
    ('[{"terms": [{"intensity": 1}, {"intensity": 1}]}]', TAGS4),
    ('{"terms": [1, "a", null, []]}', TAGS4),
    ('{"terms": [{"intensity": 1}, {"intensity": 3}], "x": "\\u0000"}', TAGS4),
    ('{"terms": null}', '"[\\"a\\", \\"b\\"]"'),
    ('{"terms": 5}', '{"a": 1, "b": 2}'),
    ("{}", '[\n  "a",\n  "b",\n  "c"\n]'),
]


def _check(rows: list[tuple[str | None, str | None]], column_type: str) -> None:
    if column_type == "JSON":
        rows = [r for r in rows if json_type_accepts(r[0]) and json_type_accepts(r[1])]
        if not rows:
            return
    got = bulk(rows, column_type)
    wrong = [
        (meta, tags, reference_entropy(meta, tags), value)
        for (meta, tags), value in zip(rows, got, strict=True)
        if not close(value, reference_entropy(meta, tags))
    ]
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("column_type", ["VARCHAR", "JSON"])
@pytest.mark.parametrize(("meta", "tags"), EXAMPLES)
def test_bulk_equals_reference_on_awkward_examples(meta, tags, column_type):
    _check([(meta, tags)], column_type)
    assert close(geoid_entropy_json(meta, tags), reference_entropy(meta, tags))


@pytest.mark.parametrize("column_type", ["VARCHAR", "JSON"])
@given(rows=rows_strategy)
@example(rows=EXAMPLES)
@settings(max_examples=300, deadline=None)
def test_bulk_equals_reference_on_generated_json(rows, column_type):
    _check(rows, column_type)


@given(rows=rows_strategy)
@example(rows=EXAMPLES)
@settings(max_examples=300, deadline=None)
def test_terms_form_equals_reference_on_generated_json(rows):
    rows = [r for r in rows if json_type_accepts(r[0]) and json_type_accepts(r[1])]
    got = bulk_from_terms(rows)
    wrong = [
        (meta, tags, reference_entropy(meta, tags), value)
        for (meta, tags), value in zip(rows, got, strict=True)
        if not close(value, reference_entropy(meta, tags))
    ]
    assert not wrong, wrong[:3]


@given(rows=rows_strategy)
@settings(max_examples=300, deadline=None)
def test_scalar_equals_reference_on_generated_json(rows):
    for meta, tags in rows:
        assert close(geoid_entropy_json(meta, tags), reference_entropy(meta, tags)), (meta, tags)


# --- found in review: the two forms disagree where Python's and DuckDB's parsers disagree ----
DEEP = "[" * 1200 + "]" * 1200


def test_deeply_nested_meta_is_stored_by_the_json_type():
    meta = '{"terms": [{"intensity": 1}, {"intensity": 3}], "x": ' + DEEP + "}"
    assert json_type_accepts(meta)  # a legacy meta JSON column can hold it


@pytest.mark.xfail(
    strict=True,
    reason="Python's json.loads raises RecursionError beyond ~1000 levels, so the scalar form "
    "reads such meta as absent (tags' formula: 2.0) while the bulk SQL reads its terms (0.811)",
)
@pytest.mark.parametrize("column_type", ["VARCHAR", "JSON"])
def test_deeply_nested_meta_gives_the_same_entropy_in_both_forms(column_type):
    meta = '{"terms": [{"intensity": 1}, {"intensity": 3}], "x": ' + DEEP + "}"
    assert close(bulk([(meta, TAGS4)], column_type)[0], geoid_entropy_json(meta, TAGS4))


@pytest.mark.xfail(
    strict=True,
    reason="a lone surrogate escape (\\ud800) is valid for Python's json.loads (scalar: terms, "
    "0.811) but DuckDB rejects the text (bulk: meta absent, tags' formula 2.0); a VARCHAR "
    "batch can carry it, the legacy JSON column cannot",
)
def test_lone_surrogate_escape_gives_the_same_entropy_in_both_forms():
    meta = '{"terms": [{"intensity": 1}, {"intensity": 3}], "s": "\\ud800"}'
    assert not json_type_accepts(meta)
    assert close(bulk([(meta, TAGS4)], "VARCHAR")[0], geoid_entropy_json(meta, TAGS4))
