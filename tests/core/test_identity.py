"""The Identity model, the legacy records, their conversions and the ISO-8601 timestamps."""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kimera_core.identity import (
    EPOCH_END,
    EPOCH_MIN,
    PY_WHITESPACE,
    ConversionError,
    Geoid,
    Identity,
    Scar,
    epoch_in_range,
    epoch_to_iso,
    geoid_id,
    iso_to_epoch,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PROPERTY = settings(max_examples=200, deadline=None)

# --- strategies ---------------------------------------------------------------------------
SAMPLES = ["Hello world", "  Café crème  ", "مرحبا بالعالم", "🌊 wave 🧠", "ἀλήθεια", "川は", ""]
texts = st.one_of(
    st.sampled_from(SAMPLES),
    st.text(max_size=40),
    st.text(alphabet="abc é\u0627\u0644\u0639\u0631\u0628\u064a\u0629🌊🔥\t\n", max_size=20),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
metas = st.one_of(st.none(), st.dictionaries(texts, json_values, max_size=5), json_values)
tag_lists = st.one_of(st.none(), st.lists(texts, max_size=5))
id_lists = st.one_of(
    st.none(), st.lists(st.text(alphabet="0123456789abcdef_", max_size=20), max_size=5)
)
weights = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False))
# datetime-representable epoch seconds (years 68 to 9892), at full float precision
epoch_floats = st.floats(min_value=-6e10, max_value=2.5e11, allow_nan=False)
timestamps = st.one_of(st.none(), epoch_floats)
ids = st.text(min_size=1, max_size=24)

geoids = st.builds(
    Geoid,
    gid=ids,
    raw=texts,
    echo=st.one_of(st.none(), texts),
    lang_axis=st.one_of(st.none(), st.sampled_from(["en", "fr", "ar", "ja"]), texts),
    context_layers=tag_lists,
    weight=weights,
    meta=metas,
    created_at=timestamps,
    updated_at=timestamps,
    scars=id_lists,
)
scars = st.builds(
    Scar,
    scar_id=ids,
    gid_pair=id_lists,
    weight=weights,
    meta=metas,
    created_at=timestamps,
    updated_at=timestamps,
)

# Timestamps that stress the decimal expansion: tiny, subnormal, negative, long fractions.
HARD_TIMESTAMPS = [
    0.0,
    -0.0,
    0.1,
    -0.1,
    1714564860.25,
    1714564860.123456789,
    1793491199.9999998,
    1e-7,
    -1.5e-7,
    5e-324,
    -5e-324,
    1e-300,
    -1e-30,
    -1.2345678901234567e-20,
    -59999999999.99999,
    249999999999.99997,
]


def sha16(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --- geoid ids ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "lang", "hashed"),
    [
        ("  Hello world ", "en", "en:Hello world"),
        ("Hello world", "en", "en:Hello world"),
        ("  Café crème  ", "fr", "fr:Café crème"),
        ("مرحبا بالعالم\n", "ar", "ar:مرحبا بالعالم"),
        ("🌊 wave", "en", "en:🌊 wave"),
        ("", "en", "en:"),
        ("x", None, "None:x"),
    ],
)
def test_geoid_id_is_sha256_of_lang_and_stripped_text(raw, lang, hashed):
    assert geoid_id(raw, lang) == sha16(hashed)


def test_geoid_id_matches_the_fixture_ids():
    # ids written by the legacy fixture generator, independent of kimera_core
    assert geoid_id("Hello world", "en") == "11b829734a9ba3e8"
    assert geoid_id("  Café crème  ", "fr") == "610018874cf7360f"
    assert geoid_id("مرحبا بالعالم", "ar") == "c7eb3409e93bc8dd"


def test_geoid_id_depends_on_language():
    assert geoid_id("Hello", "en") != geoid_id("Hello", "fr")


def test_geoid_new_sets_id_and_echo_from_stripped_raw():
    geoid = Geoid.new("  Hello world ", "en", created_at=1714564800.5)
    assert geoid.gid == sha16("en:Hello world")
    assert geoid.raw == "  Hello world "
    assert geoid.echo == "Hello world"
    assert geoid.lang_axis == "en"
    assert geoid.updated_at == 1714564800.5  # defaults to created_at


@given(raw=texts, lang=st.sampled_from(["en", "fr", "ar"]))
@PROPERTY
def test_geoid_new_echo_is_raw_stripped(raw, lang):
    geoid = Geoid.new(raw, lang)
    assert geoid.echo == raw.strip()
    assert geoid.gid == sha16(f"{lang}:{raw.strip()}")


# --- legacy <-> identity ------------------------------------------------------------------
def test_geoid_maps_to_identity_fields_per_adr_001():
    geoid = Geoid(
        gid="g1",
        raw=" r ",
        echo="r",
        lang_axis="en",
        context_layers=["t1", "t2"],
        weight=0.5,
        meta={"terms": []},
        created_at=1.0,
        updated_at=2.0,
        scars=["s1"],
    )
    identity = geoid.to_identity()
    assert identity == Identity(
        id="g1",
        identity_type="geoid",
        raw=" r ",
        echo="r",
        lang_axis="en",
        tags=["t1", "t2"],
        weight=0.5,
        related_ids=["s1"],
        meta={"terms": []},
        created_at=1.0,
        updated_at=2.0,
    )


def test_scar_maps_to_identity_fields_per_adr_001():
    scar = Scar("scar_1", ["a", "b"], 0.8, {"relationship_type": "contradicts"}, 1.0, 2.0)
    identity = scar.to_identity()
    assert identity == Identity(
        id="scar_1",
        identity_type="scar",
        weight=0.8,
        related_ids=["a", "b"],
        meta={"relationship_type": "contradicts"},
        created_at=1.0,
        updated_at=2.0,
    )


@given(geoid=geoids)
@PROPERTY
def test_geoid_identity_geoid_round_trip(geoid):
    identity = geoid.to_identity()
    assert identity.identity_type == "geoid"
    assert identity.to_legacy() == geoid


@given(scar=scars)
@PROPERTY
def test_scar_identity_scar_round_trip(scar):
    identity = scar.to_identity()
    assert identity.identity_type == "scar"
    assert identity.to_legacy() == scar


@pytest.mark.parametrize(
    "extra",
    [{"raw": "text"}, {"tags": ["t"]}, {"echo": "e"}, {"lang_axis": "en"}],
)
def test_scar_identity_with_geoid_fields_is_refused(extra):
    identity = Identity(id="s", identity_type="scar", related_ids=["a", "b"], **extra)
    with pytest.raises(ConversionError, match="'s'"):
        identity.to_legacy()


def test_scar_identity_with_empty_tags_converts():
    scar = Identity(id="s", identity_type="scar", tags=[], related_ids=["a", "b"]).to_legacy()
    assert scar == Scar(scar_id="s", gid_pair=["a", "b"])


def test_geoid_identity_without_raw_is_refused():
    with pytest.raises(ConversionError, match="raw"):
        Identity(id="g", identity_type="geoid", raw=None).to_legacy()


def test_conversion_error_is_a_value_error():
    assert issubclass(ConversionError, ValueError)


@pytest.mark.parametrize("identity_type", ["echoform", "Geoid", "", None, "scars"])
def test_identity_rejects_unknown_type(identity_type):
    with pytest.raises(ValueError, match="identity_type"):
        Identity(id="x", identity_type=identity_type)


# --- the P1 JSON document -----------------------------------------------------------------
def identities_from(record_strategy):
    return record_strategy.map(lambda record: record.to_identity())


@given(identity=st.one_of(identities_from(geoids), identities_from(scars)))
@example(identity=Identity(id="g", identity_type="geoid", raw="x", created_at=-1e-30))
@example(identity=Identity(id="s", identity_type="scar", created_at=5e-324, updated_at=-5e-324))
@PROPERTY
def test_identity_json_round_trip_is_lossless(identity):
    text = identity.to_json()
    assert Identity.from_document(text) == identity
    assert Identity.from_document(json.loads(text)) == identity


def test_document_carries_iso_timestamps_and_all_keys():
    identity = Identity(
        id="610018874cf7360f",
        identity_type="geoid",
        raw="  Café crème  ",
        echo="Café crème",
        lang_axis="fr",
        tags=["boisson"],
        weight=0.75,
        related_ids=["11b829734a9ba3e8"],
        meta={"index": 1},
        created_at=1714564860.25,
        updated_at=1714564890.75,
    )
    doc = json.loads(identity.to_json())
    assert doc == {
        "id": "610018874cf7360f",
        "identity_type": "geoid",
        "raw": "  Café crème  ",
        "echo": "Café crème",
        "lang_axis": "fr",
        "tags": ["boisson"],
        "weight": 0.75,
        "related_ids": ["11b829734a9ba3e8"],
        "meta": {"index": 1},
        # 1714564860.25 s = 2024-05-01 12:01:00.25 UTC (as in legacy_expected.json)
        "created_at": "2024-05-01T12:01:00.250000+00:00",
        "updated_at": "2024-05-01T12:01:30.750000+00:00",
    }
    assert "Café" in identity.to_json()  # text is not \u-escaped


def test_from_document_reads_the_p1_fixture_document(legacy_expected):
    row = legacy_expected["tables"]["identities"][0]
    identity = Identity.from_document(row[2])
    assert identity.id == row[0]
    assert identity.identity_type == row[1]
    assert identity.created_at == row[3]
    assert identity.updated_at == row[4]
    assert identity.lang_axis == row[5]
    assert identity.raw == "  Café crème  "


def test_from_document_accepts_numeric_timestamps_and_missing_keys():
    identity = Identity.from_document({"id": "s", "identity_type": "scar", "created_at": 12})
    assert identity.created_at == 12.0
    assert identity.updated_at is None
    assert identity.related_ids is None


@pytest.mark.parametrize("doc", ["[1, 2]", '"text"', "3"])
def test_from_document_rejects_non_objects(doc):
    with pytest.raises(ValueError):
        Identity.from_document(doc)


def test_from_document_rejects_boolean_timestamp():
    with pytest.raises(ValueError):
        Identity.from_document({"id": "s", "identity_type": "scar", "created_at": True})


# --- epoch <-> ISO-8601 -------------------------------------------------------------------
@given(t=epoch_floats)
@PROPERTY
def test_epoch_iso_round_trip_is_exact(t):
    assert iso_to_epoch(epoch_to_iso(t)) == t


@pytest.mark.parametrize("t", HARD_TIMESTAMPS)
def test_epoch_iso_round_trip_is_exact_for_hard_values(t):
    text = epoch_to_iso(t)
    back = iso_to_epoch(text)
    assert back == t
    assert math.copysign(1, back) == math.copysign(1, t) or t == 0


def test_epoch_iso_of_none_is_none():
    assert epoch_to_iso(None) is None
    assert iso_to_epoch(None) is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_epoch_to_iso_rejects_non_finite(bad):
    with pytest.raises(ValueError):
        epoch_to_iso(bad)


# |t| < 2**31 s: every microsecond is a distinct double closer than half a microsecond.
MICROS = 2**31 * 10**6


@given(us=st.integers(min_value=-MICROS, max_value=MICROS))
@example(us=0)
@example(us=-1)
@example(us=1714564860_250000)
@PROPERTY
def test_epoch_to_iso_of_microsecond_values_is_python_isoformat(us):
    t = us / 1e6
    text = epoch_to_iso(t)
    expected = EPOCH + timedelta(microseconds=us)
    assert datetime.fromisoformat(text) == expected
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00", text)
    assert text == expected.isoformat(timespec="microseconds")


def test_epoch_to_iso_golden_values():
    assert epoch_to_iso(0) == "1970-01-01T00:00:00.000000+00:00"
    assert epoch_to_iso(-0.5) == "1969-12-31T23:59:59.500000+00:00"
    assert epoch_to_iso(86400.000001) == "1970-01-02T00:00:00.000001+00:00"
    # 1e-7 needs seven digits; they are kept rather than rounded away
    assert epoch_to_iso(1e-7) == "1970-01-01T00:00:00.0000001+00:00"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", 1714564800.0),
        ("2024-05-01T12:00:00+00:00", 1714564800.0),
        ("2024-05-01T14:00:00+02:00", 1714564800.0),
        ("2024-05-01T14:00:00+0200", 1714564800.0),
        ("2024-05-01T06:30:00-05:30", 1714564800.0),
        ("2024-05-01T12:00:00", 1714564800.0),  # naive = UTC
        ("2024-05-01 12:00:00.25", 1714564800.25),
        ("2024-05-01T12:00:00.5Z", 1714564800.5),
        ("1970-01-01T00:00:00.000001+00:00", 1e-6),
        ("1969-12-31T23:59:59.9+00:00", -0.1),
        ("  2024-05-01T12:00:00Z  ", 1714564800.0),
    ],
)
def test_iso_to_epoch_handles_zones_and_naive_text(text, expected):
    assert iso_to_epoch(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "garbage", "2024-05-01", "12:00:00", "2024-13-01T00:00:00Z", "2024-05-01T12:00:00+2"],
)
def test_iso_to_epoch_rejects_garbage(text):
    with pytest.raises(ValueError):
        iso_to_epoch(text)


# --- the rules the SQL twins copy ----------------------------------------------------------
def test_py_whitespace_is_what_str_strip_removes():
    assert "".join(c for c in map(chr, range(0x110000)) if c.isspace()) == PY_WHITESPACE
    assert (PY_WHITESPACE + "x" + PY_WHITESPACE).strip() == "x"


def test_the_epoch_range_is_what_iso_text_can_carry():
    for t in (EPOCH_MIN, math.nextafter(EPOCH_END, 0)):
        assert epoch_in_range(t) and iso_to_epoch(epoch_to_iso(t)) == t
    for t in (math.nextafter(EPOCH_MIN, -math.inf), EPOCH_END):
        assert not epoch_in_range(t)
        with pytest.raises(OverflowError):
            epoch_to_iso(t)
    assert not epoch_in_range(math.nan)
    assert epoch_to_iso(EPOCH_MIN).startswith("0001-01-01T00:00:00")
