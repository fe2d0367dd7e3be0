"""One comparator, proven: the verifier's SQL, the shadow reads and an independent reference agree.

Hypothesis generates pairs of a legacy row and the P1 document identities holds for it: the
document written faithfully, or mutated in ways that keep the value (keys reordered, 1 for
1.0, -0.0 for 0.0, another UTC offset, more fraction digits) or change it (a big integer off
by one, a number for text, "None" for NULL, a float past the tolerance, text that does not
parse). Each batch of pairs is stored in one DuckDB file and verified once (the bulk SQL
path, digests and all), read back the way shadow reads read (``compare.differing_fields`` on
the legacy reader's and P1's reader's identities), and judged by ``reference_fields`` below,
written plainly from the rules in docs/consistency.md and sharing no code with
``kimera_core.compare``. All three must name the same differing fields for every pair.

Hypothesis draws ``EXAMPLES`` examples of ``PAIRS_PER_EXAMPLE`` pairs (its buffer holds about
sixty rich pairs per example); each example's shadow and reference verdicts are compared at
once, and every pair of every example is then verified by SQL in one database, in one run
(its cost is mostly fixed). CI: 200 x 50 = 10,000 pairs; ``KIMERA_DIFFERENTIAL_EXAMPLES=2000``
runs 100,000 locally.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimera_core.compare import differing_fields
from kimera_core.consistency import verify
from kimera_core.identity import DOCUMENT_KEYS, Identity, epoch_to_iso
from kimera_core.legacy import (
    GEOID_COLUMNS,
    SCAR_COLUMNS,
    create_legacy_schema,
    geoid_from_row,
    scar_from_row,
)

PAIRS_PER_EXAMPLE = 50
EXAMPLES = int(os.environ.get("KIMERA_DIFFERENTIAL_EXAMPLES", "200"))
WEIGHT_RELATIVE = 1e-9
SECONDS = 1e-6
FIELDS = DOCUMENT_KEYS[1:]  # every field but the key


# --- the independent reference --------------------------------------------------------------
def _number(x: Any) -> bool:
    return type(x) in (int, float)


def _as_fraction(x: int | float) -> Fraction | None:
    return None if isinstance(x, float) and not math.isfinite(x) else Fraction(x)


def ref_json_same(a: Any, b: Any) -> bool:
    """JSON values equal: types strict (bool apart from numbers), numbers by exact value
    (NaN equals NaN), objects as key sets, arrays in order."""
    if a is None or b is None:
        return a is None and b is None
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    if _number(a) and _number(b):
        fa, fb = _as_fraction(a), _as_fraction(b)
        if fa is not None and fb is not None:
            return fa == fb
        if fa is not None or fb is not None:
            return False
        return (a != a and b != b) or a == b  # both NaN, or the same infinity
    if type(a) is dict and type(b) is dict:
        return set(a) == set(b) and all(ref_json_same(a[k], b[k]) for k in a)
    if type(a) is list and type(b) is list:
        return len(a) == len(b) and all(ref_json_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is str and type(b) is str and a == b


ISO = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|([+-])(\d\d):?(\d\d))?"
)


def ref_epoch(text: str) -> float | None:
    """Epoch seconds of ISO-8601 text (naive = UTC), the exact decimal rounded once; None
    when it is not a timestamp of the calendar."""
    m = ISO.fullmatch(text.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    try:
        base = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        return None
    seconds = Fraction((base - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1))
    if m.group(7):
        seconds += Fraction(int(m.group(7)), 10 ** len(m.group(7)))
    if m.group(9):
        sign = -1 if m.group(9) == "-" else 1
        seconds -= sign * (int(m.group(10)) * 3600 + int(m.group(11)) * 60)
    return float(seconds)


def _double(x: Any) -> float:
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def ref_close(legacy: float | None, value: Any, tolerance: float, relative: bool) -> bool:
    """A legacy double against a document number (already a float, or None)."""
    if legacy is None or value is None:
        return legacy is None and value is None
    a, b = legacy, value
    if a != a or b != b:
        return a != a and b != b
    if a == b:
        return True
    if math.isinf(a) or math.isinf(b):
        return False
    return abs(a - b) <= tolerance * (max(1.0, abs(a)) if relative else 1.0)


def ref_doc_number(value: Any) -> tuple[bool, float | None]:
    """(usable, the document member as a double): a bool or a string is not a number."""
    if value is None:
        return True, None
    if _number(value):
        return True, _double(value)
    return False, None


def ref_doc_time(value: Any) -> tuple[bool, float | None]:
    if type(value) is str:
        parsed = ref_epoch(value)
        return parsed is not None, parsed
    return ref_doc_number(value)


def reference_fields(kind: str, legacy: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    """The fields on which a legacy row (values as stored; JSON columns as text) and a
    document differ, written plainly from docs/consistency.md."""
    out = []
    if kind != doc.get("identity_type"):
        out.append("identity_type")
    for name in ("raw", "echo", "lang_axis"):
        a, b = legacy.get(name), doc.get(name)
        if not ((a is None and b is None) or (type(b) is str and a == b)):
            out.append(name)
    for name in ("tags", "weight", "related_ids", "meta", "created_at", "updated_at"):
        a, b = legacy.get(name), doc.get(name)
        if name == "weight":
            usable, value = ref_doc_number(b)
            same = usable and ref_close(a, value, WEIGHT_RELATIVE, relative=True)
        elif name in ("created_at", "updated_at"):
            # the migration writes a missing timestamp as the row's other one
            if a is None:
                a = legacy.get("updated_at" if name == "created_at" else "created_at")
            usable, value = ref_doc_time(b)
            same = usable and ref_close(a, value, SECONDS, relative=False)
        elif name == "related_ids" and kind == "geoid":
            same = b is None or b == []
        else:
            same = ref_json_same(None if a is None else json.loads(a), b)
        if not same:
            out.append(name)
    return out


# --- generated pairs ------------------------------------------------------------------------
KEY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=6) | st.sampled_from(
    ["a.b", "a", '"', "\\", "", "$", "[0]", "terms", "1", "é"]
)
NUMBER_LIKE = st.sampled_from(["2024", "1.0", "-0", "None", "null", "true", " 1", "1e3", "NaN"])
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12) | NUMBER_LIKE
BIG = st.integers(min_value=-(2**80), max_value=2**80) | st.sampled_from(
    [2**53, 2**53 + 1, 2**64 + 1, -(2**63) - 1, 10**30, 10**400]
)
SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | BIG
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, 1.0, 0.1, 1e300, 5e-324])
    | TEXT
)
JSON_VALUE = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEY_TEXT, inner, max_size=4),
    max_leaves=8,
)
EPOCH = st.floats(-2e9, 4.1e9) | st.sampled_from(
    [0.0, -0.5, 1700000000.1234567, 1700000000.123456, 1e-7]
)


def _reordered(value: Any) -> Any:
    if type(value) is dict:
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    if type(value) is list:
        return [_reordered(x) for x in value]
    return value


def _retyped(value: Any) -> Any:
    """The same value written another way: integral floats as ints and back, -0.0 as 0."""
    if type(value) is dict:
        return {k: _retyped(v) for k, v in value.items()}
    if type(value) is list:
        return [_retyped(x) for x in value]
    if type(value) is float and math.isfinite(value) and value == int(value) and abs(value) < 2**60:
        return int(value)
    if type(value) is int and abs(value) < 2**53:
        return float(value)
    return value


def _bumped(value: Any) -> Any:
    """A different value: the first number off by one (integers) or one step (floats)."""
    if type(value) is dict:
        for k, v in value.items():
            changed = _bumped(v)
            if changed is not v:
                return {**value, k: changed}
        return {**value, "added": 1}
    if type(value) is list:
        return [*value, 0] if not value else [_bumped(value[0]), *value[1:]]
    if type(value) is int:
        return value + 1
    if type(value) is float:
        return math.nextafter(value, math.inf) if math.isfinite(value) else 0.0
    if type(value) is str:
        return value + " "
    return 0 if value is None else [value]


def _iso_variant(t: float, offset_minutes: int, separator: str) -> str:
    """The instant t as ISO text at another UTC offset (the same fraction digits)."""
    iso = epoch_to_iso(t)
    whole, frac = iso[:19], iso[20:-6]
    local = datetime.fromisoformat(whole) + timedelta(minutes=offset_minutes)
    sign = "-" if offset_minutes < 0 else "+"
    hours, minutes = divmod(abs(offset_minutes), 60)
    return (
        local.strftime(f"%Y-%m-%d{separator}%H:%M:%S") + f".{frac}{sign}{hours:02d}:{minutes:02d}"
    )


TIME_MUTATIONS = st.sampled_from(
    ["same", "offset", "number", "digits", "near", "far", "garbage", "null", "hour24"]
)


@st.composite
def doc_time(draw, t: float | None) -> Any:
    """A document timestamp for legacy epoch t: the same instant written another way, or not."""
    if t is None or not math.isfinite(t):
        return draw(st.sampled_from([None, "NaN", 0.0])) if t is None else t
    how = draw(TIME_MUTATIONS)
    if how == "offset":
        return _iso_variant(
            t, draw(st.sampled_from([-330, -60, 60, 330, 0])), draw(st.sampled_from("T "))
        )
    if how == "number":
        return t
    if how == "digits":
        return epoch_to_iso(t)[:-6] + "000Z"
    if how in ("near", "far"):
        step = SECONDS * draw(st.sampled_from([0.5, 0.999999, 1.0, 1.000001, 2.0]))
        moved = t + (step if how == "near" else 1.0 + step) * draw(st.sampled_from([1, -1]))
        return epoch_to_iso(moved) if draw(st.booleans()) else moved
    if how == "garbage":
        return draw(
            st.sampled_from(["yesterday", "2024-02-30T00:00:00", "", "0000-01-01T00:00:00"])
        )
    if how == "null":
        return None
    if how == "hour24":
        return epoch_to_iso(t)[:11] + "24:00:00+00:00"
    return epoch_to_iso(t)


@st.composite
def pair(draw, key: str) -> tuple[str, str, dict[str, Any], str]:
    """(id, kind, legacy row values as stored, the document's JSON text)."""
    kind = draw(st.sampled_from(["geoid", "scar"]))
    created = draw(st.none() | EPOCH | st.sampled_from([math.nan]))
    updated = draw(st.none() | EPOCH)
    weight = draw(st.none() | st.floats(allow_nan=True) | st.sampled_from([0.0, -0.0, 1.0, 0.5]))
    meta = draw(JSON_VALUE)
    legacy: dict[str, Any] = {
        "weight": weight,
        "meta": json.dumps(meta, indent=draw(st.sampled_from([None, 1]))),
        "created_at": created,
        "updated_at": updated,
    }
    if kind == "geoid":
        legacy |= {
            "raw": draw(TEXT),
            "echo": draw(st.none() | TEXT),
            "lang_axis": draw(st.none() | TEXT),
            "tags": draw(st.none() | st.just("[]") | JSON_VALUE.map(json.dumps)),
        }
        related = None
    else:
        related = draw(st.none() | st.lists(TEXT, max_size=3) | JSON_VALUE)
        legacy["related_ids"] = None if related is None else json.dumps(related)
    doc: dict[str, Any] = {
        "id": key,
        "identity_type": kind,
        "raw": legacy.get("raw"),
        "echo": legacy.get("echo"),
        "lang_axis": legacy.get("lang_axis"),
        "tags": None if legacy.get("tags") is None else json.loads(legacy["tags"]),
        "weight": weight,
        "related_ids": [] if kind == "geoid" else related,
        "meta": meta,
        "created_at": draw(doc_time(created)),
        "updated_at": draw(doc_time(updated)),
    }
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        doc[name] = draw(mutation(name, doc[name]))
    if draw(st.booleans()):  # a member left out reads as null (P1's reader)
        doc = {
            k: v for k, v in doc.items() if draw(st.integers(0, 30)) or k in ("id", "identity_type")
        }
    return key, kind, legacy, json.dumps(doc, ensure_ascii=draw(st.booleans()))


@st.composite
def mutation(draw, name: str, value: Any) -> Any:
    if name == "identity_type":
        return draw(st.sampled_from(["geoid", "scar"]))
    if name in ("raw", "echo", "lang_axis"):
        return draw(
            st.sampled_from(
                [None, 2024, value, f"{value} ", str(value).strip() if value else value]
            )
            | TEXT
        )
    if name == "weight":
        if _number(value) and math.isfinite(value):
            factor = draw(st.sampled_from([0.5, 0.999999, 1.0, 1.000001, 2.0]))
            near = value + WEIGHT_RELATIVE * max(1.0, abs(value)) * factor
            return draw(
                st.sampled_from(
                    [
                        near,
                        int(value) if value == int(value) else value,
                        "None",
                        str(value),
                        True,
                        -value,
                    ]
                )
            )
        return draw(st.sampled_from(["None", None, 0.0, -0.0, True]))
    if name in ("tags", "meta", "related_ids"):
        return draw(
            st.sampled_from([_reordered(value), _retyped(value), _bumped(value), None, "None"])
            | JSON_VALUE
        )
    return draw(st.sampled_from([None, "2024-01-01T00:00:00Z", 0, True, "x"]))


GEOID_FIELDS = ("raw", "echo", "lang_axis", "tags", "weight", "meta", "created_at", "updated_at")
SCAR_FIELDS = ("weight", "related_ids", "meta", "created_at", "updated_at")
NUMBERS = {"weight", "created_at", "updated_at"}


def _table(keys: list[str], rows: list[dict[str, Any]], fields: tuple[str, ...]) -> pa.Table:
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            **{
                f: pa.array([r[f] for r in rows], pa.float64() if f in NUMBERS else pa.string())
                for f in fields
            },
        }
    )


def _store(path, pairs) -> duckdb.DuckDBPyConnection:
    """The pairs as legacy rows and identities rows of a new database file (bulk inserts)."""
    con = duckdb.connect(str(path))
    create_legacy_schema(con, indexes=False)
    for table, kind, fields in (
        ("legacy_geoids", "geoid", GEOID_FIELDS),
        ("legacy_scars", "scar", SCAR_FIELDS),
    ):
        mine = [p for p in pairs if p[1] == kind]
        con.register("kimera_pairs", _table([p[0] for p in mine], [p[2] for p in mine], fields))
        con.execute(f"INSERT INTO {table} SELECT * FROM kimera_pairs")
        con.unregister("kimera_pairs")
    # the type column carries the document's type (a disagreement between the two is
    # column_agreement's finding, not field_equality's)
    docs = pa.table(
        {
            "key": [p[0] for p in pairs],
            "kind": [json.loads(p[3])["identity_type"] for p in pairs],
            "doc": [p[3] for p in pairs],
        }
    )
    con.register("kimera_docs", docs)
    con.execute("INSERT INTO identities SELECT key, kind, doc, 0, 0, NULL, NULL FROM kimera_docs")
    con.unregister("kimera_docs")
    return con


def _legacy_identity(kind: str, key: str, row: dict[str, Any]) -> Identity:
    """The legacy reader's identity of a row as stored (JSON columns as text)."""
    if kind == "geoid":
        names = GEOID_COLUMNS.split(", ")
        return geoid_from_row(tuple(key if c == "gid" else row[c] for c in names)).to_identity()
    names = SCAR_COLUMNS.split(", ")
    return scar_from_row(tuple(key if c == "id" else row[c] for c in names)).to_identity()


def check_shadow(pairs) -> None:
    """The shadow read's comparison (compare.differing_fields on the legacy reader's and P1's
    reader's identities) names the reference's fields; where P1's reader refuses the
    document, the reference finds a difference."""
    for key, kind, legacy, doc in pairs:
        expected = reference_fields(kind, legacy, json.loads(doc))
        try:
            new = Identity.from_document(doc)
        except (ValueError, TypeError, KeyError, OverflowError):
            assert expected, (key, legacy, doc)
            continue
        found = differing_fields(_legacy_identity(kind, key, legacy), new)
        assert found == expected, (key, legacy, doc)


def check_sql(path, pairs) -> None:
    """The verifier's verdict, one run over every pair stored in one database, names the
    reference's fields for each."""
    con = _store(path, pairs)
    try:
        report = verify(con, sample=len(pairs), record=False, cache=False)
    finally:
        con.close()
    assert report.missing_in_new.total == report.missing_in_legacy.total == 0
    found = report.field_mismatches.sample + report.legacy_stale.sample
    sql = {s["id"]: s["fields"] for s in found}
    for key, kind, legacy, doc in pairs:
        expected = reference_fields(kind, legacy, json.loads(doc))
        assert sql.get(key, []) == expected, (key, legacy, doc)


def check(tmp_path, pairs) -> None:
    check_shadow(pairs)
    check_sql(tmp_path / "pairs.duckdb", pairs)


def test_sql_shadow_and_reference_agree_on_every_pair(tmp_path):
    batch: list[tuple[str, str, dict[str, Any], str]] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def generated(data):
        example = len(batch) // PAIRS_PER_EXAMPLE + 1
        pairs = [data.draw(pair(f"e{example}-{n}")) for n in range(PAIRS_PER_EXAMPLE)]
        check_shadow(pairs)
        batch.extend(pairs)

    generated()
    assert len(batch) >= EXAMPLES * PAIRS_PER_EXAMPLE
    check_sql(tmp_path / "pairs.duckdb", batch)


# --- the issue's inputs ---------------------------------------------------------------------
GEOID = {"raw": "r", "echo": "r", "lang_axis": "en", "tags": "[]", "weight": 0.5,
         "created_at": 1700000000.5, "updated_at": 1700000000.5}  # fmt: skip


def _doc(key: str, legacy: dict[str, Any], **changes: Any) -> str:
    doc = {"id": key, "identity_type": "geoid", "related_ids": [],
           **{k: json.loads(v) if k in ("tags", "meta") else v for k, v in legacy.items()}}  # fmt: skip
    for name in ("created_at", "updated_at"):
        doc[name] = epoch_to_iso(doc[name])
    return json.dumps({**doc, **changes})


@pytest.mark.parametrize(
    ("legacy_changes", "doc_changes", "expected"),
    [
        # an integer beyond 2**53 that a float-based writer rounded: compared exactly
        ({"meta": '{"ext_id": 9007199254740993}'}, {"meta": {"ext_id": 9007199254740992}}, ["meta"]),
        # a number for text: a failed cast no longer turns both into the same thing
        ({"raw": "2024", "echo": "2024"}, {"raw": 2024}, ["raw"]),
        # "None" written for a missing weight: not a number, never NULL
        ({"weight": None}, {"weight": "None"}, ["weight"]),
        # -0.0 and 0.0 are the same number, in meta and in weight
        ({"meta": '{"bias": 0.0}'}, {"meta": {"bias": -0.0}}, []),
        ({"weight": 0.0}, {"weight": -0.0}, []),
        # 1 and 1.0 too; keys in another order
        ({"meta": '{"a": 1, "b": [1.0]}'}, {"meta": {"b": [1], "a": 1.0}}, []),
        # integers beyond 64 bits, equal and not
        ({"meta": '{"c": 123456789012345678901234567890}'}, {"meta": {"c": 123456789012345678901234567890}}, []),
        ({"meta": '{"c": 18446744073709551617}'}, {"meta": {"c": 18446744073709551616}}, ["meta"]),
        # null, a missing member and "None" all differ inside a value
        ({"meta": '{"x": null}'}, {"meta": {}}, ["meta"]),
        ({"meta": '{"x": null}'}, {"meta": {"x": "None"}}, ["meta"]),
    ],
)  # fmt: skip
def test_the_issue_inputs(tmp_path, legacy_changes, doc_changes, expected):
    legacy = {**GEOID, "meta": "{}", **legacy_changes}
    pairs = [("g1", "geoid", legacy, _doc("g1", legacy, **doc_changes))]
    assert reference_fields("geoid", legacy, json.loads(pairs[0][3])) == expected
    check(tmp_path, pairs)


def test_a_duplicate_member_keeps_its_last_value_as_json_loads_reads_it(tmp_path):
    legacy = {**GEOID, "meta": '{"k": 1}'}
    same = _doc("g1", legacy).replace('"meta": {"k": 1}', '"meta": {"k": 2, "k": 1}')
    other = _doc("g2", legacy).replace('"meta": {"k": 1}', '"meta": {"k": 1, "k": 2}')
    check(tmp_path, [("g1", "geoid", legacy, same), ("g2", "geoid", legacy, other)])
    assert reference_fields("geoid", legacy, json.loads(other)) == ["meta"]
