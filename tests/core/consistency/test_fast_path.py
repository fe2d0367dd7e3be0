"""The fast path is proven: its findings are those of the full comparison, on generated rows.

The fast digest (``consistency.expected``) calls a segment consistent, with no column
disagreement, when its legacy rows hash as the identities rows the migration writes for them
and the stored identities rows hash the same. Here hypothesis generates legacy rows (text that
looks like numbers, unicode, big integers, NaN and infinite weights, JSON written minified or
indented, epochs the ISO text cannot hold), migrates them set-based with the P1 spelling and
the bulk entropy, then edits some rows on either side: edits that change a value (a character
of the document, a column, a legacy weight, a deleted identity) and edits that keep it but
change the bytes (a space in the document, ``5e-1`` for ``0.5``, an entropy or a timestamp
within tolerance). One database holds every row; it is verified with the fast path (cold and
warm) and with every segment compared by the normalised digests (``fast_path=False``), and
the findings must be identical. The run must also have taken the fast path for most segments,
or it would prove nothing.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import duckdb
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.clean_migration import migrate_documents
from test_differential import JSON_VALUE, TEXT

from kimera_core.consistency import verify
from kimera_core.entropy import entropy_table_sql
from kimera_core.legacy import create_legacy_schema

ROWS_PER_EXAMPLE = 40
EXAMPLES = int(os.environ.get("KIMERA_FAST_PATH_EXAMPLES", "120"))
# mostly whole microseconds (as real timestamps are, and as the ISO text holds them exactly),
# else any double: such rows have no expected form and are compared the slow way
EPOCH = st.one_of(
    st.integers(-(2 * 10**15), 41 * 10**14).map(lambda us: us / 1e6),
    st.integers(-(2 * 10**15), 41 * 10**14).map(lambda us: us / 1e6),
    st.integers(-(2 * 10**15), 41 * 10**14).map(lambda us: us / 1e6),
    st.floats(-2e9, 4.1e9),
    st.sampled_from([0.0, 1700000000.1234567, 1e-7, 3e11, math.nan, math.inf]),
)
WEIGHT = st.none() | st.floats(allow_nan=True) | st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e300])
TERMS = st.lists(
    st.fixed_dictionaries(
        {"symbol": TEXT, "intensity": st.floats(allow_nan=True) | st.integers(-3, 3) | TEXT}
    ),
    max_size=4,
)
META = JSON_VALUE | st.fixed_dictionaries({"terms": TERMS}, optional={"x": JSON_VALUE})
# (where, SQL) edits; {k}: the key, bound as a parameter
EDITS: dict[str, tuple[str, str]] = {
    "raw char": ("identities", "UPDATE identities SET data = replace(data, '\"raw\":\"', '\"raw\":\"#') WHERE id = $k"),
    "space": ("identities", "UPDATE identities SET data = replace(data, '\"weight\":', '\"weight\": ') WHERE id = $k"),
    "weight 5e-1": ("identities", "UPDATE identities SET data = replace(data, '\"weight\":0.5,', '\"weight\":5e-1,') WHERE id = $k"),
    "entropy near": ("identities", "UPDATE identities SET entropy_score = entropy_score * (1 + 1e-12) WHERE id = $k"),
    "entropy far": ("identities", "UPDATE identities SET entropy_score = coalesce(entropy_score, 0) + 1 WHERE id = $k"),
    "entropy null": ("identities", "UPDATE identities SET entropy_score = NULL WHERE id = $k"),
    "lang column": ("identities", "UPDATE identities SET lang_axis = 'xx' WHERE id = $k"),
    "type column": ("identities", "UPDATE identities SET identity_type = CASE identity_type WHEN 'geoid' THEN 'scar' ELSE 'geoid' END WHERE id = $k"),
    "created near": ("identities", "UPDATE identities SET created_at = created_at + 2e-7 WHERE id = $k"),
    "created far": ("identities", "UPDATE identities SET created_at = created_at + 1 WHERE id = $k"),
    "deleted": ("identities", "DELETE FROM identities WHERE id = $k"),
    "legacy weight": ("legacy", "UPDATE {table} SET weight = weight * (1 + 1e-12) WHERE {key} = $k"),
    "legacy weight far": ("legacy", "UPDATE {table} SET weight = coalesce(weight, 0) + 1 WHERE {key} = $k"),
    "legacy meta": ("legacy", "UPDATE {table} SET meta = '{{\"edited\": true}}' WHERE {key} = $k"),
}  # fmt: skip
EDIT = st.sampled_from([None, None]) | st.sampled_from(sorted(EDITS))


@st.composite
def legacy_row(draw, key: str) -> dict[str, Any]:
    kind = draw(st.sampled_from(["geoid", "geoid", "scar"]))
    indent = draw(st.sampled_from([None, None, None, 1]))
    row: dict[str, Any] = {
        "key": key,
        "kind": kind,
        "weight": draw(WEIGHT),
        "meta": draw(st.none() | META.map(lambda m: json.dumps(m, indent=indent))),
        "created_at": draw(EPOCH),
        "updated_at": draw(EPOCH),
        "edit": draw(EDIT),
    }
    if kind == "geoid":
        row |= {
            "raw": draw(TEXT),
            "echo": draw(st.none() | TEXT),
            "lang_axis": draw(st.none() | st.sampled_from(["en", "fr", "ar"]) | TEXT),
            "tags": draw(st.none() | st.just("[]") | JSON_VALUE.map(json.dumps)),
        }
    else:
        related = draw(st.none() | st.lists(TEXT, max_size=3) | JSON_VALUE)
        row["related_ids"] = None if related is None else json.dumps(related)
    return row


GEOID_FIELDS = ("raw", "echo", "lang_axis", "tags", "weight", "meta", "created_at", "updated_at")
SCAR_FIELDS = ("weight", "related_ids", "meta", "created_at", "updated_at")
NUMBERS = {"weight", "created_at", "updated_at"}


def _store(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> None:
    """Legacy rows, migrated set-based with the bulk entropy, then the edits applied."""
    create_legacy_schema(con, indexes=False)
    for table, kind, fields in (
        ("legacy_geoids", "geoid", GEOID_FIELDS),
        ("legacy_scars", "scar", SCAR_FIELDS),
    ):
        mine = [r for r in rows if r["kind"] == kind]
        arrow = pa.table(
            {
                "key": pa.array([r["key"] for r in mine], pa.string()),
                **{
                    f: pa.array([r[f] for r in mine], pa.float64() if f in NUMBERS else pa.string())
                    for f in fields
                },
            }
        )
        con.register("kimera_rows", arrow)
        con.execute(f"INSERT INTO {table} SELECT * FROM kimera_rows")
        con.unregister("kimera_rows")
    migrate_documents(con)
    # the migration writes a geoid's related_ids as [] (the clean migration as null)
    con.execute(
        "UPDATE identities SET data = replace(data, '\"related_ids\":null,', '\"related_ids\":[],') "
        "WHERE identity_type = 'geoid'"
    )
    for kind, table, key in (("geoid", "legacy_geoids", "gid"), ("scar", "legacy_scars", "id")):
        con.execute(
            f"UPDATE identities i SET entropy_score = e.entropy "
            f"FROM ({entropy_table_sql(kind, table, key)}) e WHERE i.id = e.key",
            [1.0, 0.1],
        )
    for r in rows:
        if r["edit"] is None:
            continue
        side, sql = EDITS[r["edit"]]
        if side == "legacy":
            table, key = (
                ("legacy_geoids", "gid") if r["kind"] == "geoid" else ("legacy_scars", "id")
            )
            sql = sql.format(table=table, key=key)
        con.execute(sql, {"k": r["key"]})


def findings(report) -> dict[str, Any]:
    """Everything a verification reports but its timings, sums and cache bookkeeping."""
    d = report.to_dict()
    levels = [{k: v for k, v in lv.items() if k != "seconds"} for lv in d["checksums"]["levels"]]
    drop = ("seconds", "started_at", "checksums")
    return {k: v for k, v in d.items() if k not in drop} | {
        "levels": levels,
        "compared": d["checksums"]["rows_compared_row_level"],
    }


def test_the_fast_path_and_the_full_comparison_agree(tmp_path):
    rows: list[dict[str, Any]] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def generated(data):
        example = len(rows) // ROWS_PER_EXAMPLE
        # drawn whole first: an example hypothesis abandons midway (data too large) must not
        # leave part of its rows behind, or the next example would reuse its keys
        drawn = [data.draw(legacy_row(f"k{example}-{n}")) for n in range(ROWS_PER_EXAMPLE)]
        rows.extend(drawn)

    generated()
    con = duckdb.connect(str(tmp_path / "fast.duckdb"))
    try:
        _store(con, rows)
        full = verify(con, sample=len(rows), record=False, fast_path=False)
        cold = verify(con, sample=len(rows), record=False)
        warm = verify(con, sample=len(rows), record=False)
    finally:
        con.close()
    assert findings(cold) == findings(full)
    assert findings(warm) == findings(full)
    cache = cold.checksums["digest_cache"]
    # the fast path decided a good share of the segments, or this test proves nothing
    assert cache["segments_suspect"] < 0.75 * len(rows), cache
    assert warm.checksums["digest_cache"]["reused"] == warm.checksums["digest_cache"]["segments"]
    # and the edits were seen
    assert not full.consistent
    assert full.column_mismatches.total > 0 and full.field_mismatches.total > 0
