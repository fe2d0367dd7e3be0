"""The merge rule's document equality (``kimera_same_doc``) against a plain Python reference.

Two documents are the same when their minified JSON is equal (key order counts, whitespace
does not); for a geoid, a ``related_ids`` that is null, missing or ``[]`` on both sides
counts as the same. The macro tests equal texts first and parses only the rest: the
reference below parses always, so a shortcut that answered differently would fail here.
"""

from __future__ import annotations

import json

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimera_core.migration import statements as q

MISSING = object()
keys = st.sampled_from(["id", "raw", "meta", "tags", "weight", "é"])
leaves = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["", "a", "川"]))
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(keys, inner, max_size=2),
    max_leaves=5,
)
related = st.sampled_from([MISSING, None, [], ["a", "b"], ["b", "a"]])
layouts = st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")])


def text(fields: list[tuple[str, object]], rel: object, at: int, layout: tuple[str, str]) -> str:
    items = list(fields)
    if rel is not MISSING:
        items.insert(min(at, len(items)), ("related_ids", rel))
    return json.dumps(dict(items), separators=layout, ensure_ascii=False)


def reference(a: str, b: str, kind: str) -> bool:
    """Minified equality; a geoid's empty related_ids on both sides is left out of it."""
    da, db = json.loads(a), json.loads(b)
    if kind == "geoid" and not da.get("related_ids") and not db.get("related_ids"):
        da.pop("related_ids", None)
        db.pop("related_ids", None)
    return json.dumps(da, separators=(",", ":")) == json.dumps(db, separators=(",", ":"))


@pytest.fixture(scope="module")
def con():
    con = duckdb.connect()
    con.execute(q.SAME_DOC_MACRO)
    yield con
    con.close()


@settings(max_examples=200, deadline=None)
@given(
    fields=st.lists(st.tuples(keys, values), max_size=4, unique_by=lambda kv: kv[0]),
    rel_a=related,
    rel_b=related,
    at_a=st.integers(0, 4),
    at_b=st.integers(0, 4),
    layout_a=layouts,
    layout_b=layouts,
    change=st.one_of(st.none(), st.tuples(st.integers(0, 3), values)),
    kind=st.sampled_from(["geoid", "scar"]),
)
def test_same_doc_matches_the_reference(
    con, fields, rel_a, rel_b, at_a, at_b, layout_a, layout_b, change, kind
):
    other = list(fields)
    if change is not None and other:
        index, value = change
        other[index % len(other)] = (other[index % len(other)][0], value)
    a = text(fields, rel_a, at_a, layout_a)
    b = text(other, rel_b, at_b, layout_b)
    got = con.execute("SELECT kimera_same_doc(?::JSON, ?::JSON, ?)", [a, b, kind]).fetchone()[0]
    assert got == reference(a, b, kind), (a, b, kind)


@pytest.mark.parametrize("kind", ["geoid", "scar"])
def test_equal_texts_are_the_same_and_a_changed_value_is_not(con, kind):
    doc = '{"id":"g1","related_ids":[],"meta":{"a":1}}'
    sql = "SELECT kimera_same_doc(?::JSON, ?::JSON, ?)"
    assert con.execute(sql, [doc, doc, kind]).fetchone()[0] is True
    assert con.execute(sql, [doc, doc.replace("1}", "2}"), kind]).fetchone()[0] is False
    spaced = '{"id": "g1", "related_ids": [], "meta": {"a": 1}}'
    assert con.execute(sql, [doc, spaced, kind]).fetchone()[0] is True
