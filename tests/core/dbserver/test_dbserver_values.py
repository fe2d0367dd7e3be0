"""Values through the server are the values of an embedded connection: type and value, exactly.

Each example binds one generated value as a parameter, casts it to a DuckDB type the
project uses, and reads it back twice: from an embedded in-memory DuckDB connection and
through a real ``kimera db serve`` process. The two results must be the same Python type
and the same value by ``same`` (written here, independent of the codec: NaN equals NaN,
-0.0 is not 0.0, aware datetimes keep their zone); when the embedded side raises, the server
must raise the same DuckDB error class.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
from decimal import Decimal

import duckdb
import pytest
from dbserver_proc import DbServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimera_core.db import open_database

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
EDGE_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, -1.7976931348623157e308]
FLOATS = st.sampled_from(EDGE_FLOATS) | st.floats(allow_nan=True, allow_infinity=True)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)

# (DuckDB type, strategy of Python values to bind): the types the project's SQL uses.
TYPES: list[tuple[str, st.SearchStrategy]] = [
    ("BOOLEAN", st.booleans()),
    ("INTEGER", st.integers(-(2**31), 2**31 - 1)),
    ("BIGINT", st.integers(-(2**63), 2**63 - 1)),
    ("UBIGINT", st.integers(0, 2**64 - 1)),
    ("HUGEINT", st.integers(-(2**127) + 1, 2**127 - 1)),
    ("DOUBLE", FLOATS),
    ("FLOAT", st.floats(width=32)),
    ("VARCHAR", TEXT),
    ("JSON", JSON_VALUES.map(json.dumps)),
    ("BLOB", st.binary(max_size=40)),
    ("DATE", st.dates()),
    ("TIME", st.times()),
    ("TIMESTAMP", st.datetimes()),
    (
        "TIMESTAMPTZ",
        st.datetimes(min_value=dt.datetime(1900, 1, 2), timezones=st.sampled_from([dt.UTC, None])),
    ),
    ("INTERVAL", st.timedeltas(min_value=dt.timedelta(days=-9999), max_value=dt.timedelta(9999))),
    ("UUID", st.uuids()),
    ("DECIMAL(18,3)", st.decimals(-(10**14), 10**14, places=3, allow_nan=False)),
    ("DOUBLE[]", st.lists(st.none() | FLOATS, max_size=5)),
    ("VARCHAR[]", st.lists(st.none() | TEXT, max_size=5)),
    ("FLOAT[3]", st.lists(st.floats(width=32), min_size=3, max_size=3)),
    ("STRUCT(a INTEGER, b VARCHAR)", st.fixed_dictionaries({"a": st.integers(-99, 99), "b": TEXT})),
    ("MAP(VARCHAR, BIGINT)", st.dictionaries(TEXT, st.integers(-(2**63), 2**63 - 1), max_size=4)),
]


def same(a, b) -> bool:
    """Same Python type and value, recursively; NaN is NaN, -0.0 is not 0.0, zones count."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (dt.datetime, dt.time)):
        return a == b and a.utcoffset() == b.utcoffset() and str(a.tzinfo) == str(b.tzinfo)
    return a == b


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(embedded in-memory connection, connection through a real server)."""
    token = secrets.token_urlsafe(24)
    path = tmp_path_factory.mktemp("values") / "values.duckdb"
    open_database(path, create=True).close()
    server = DbServer(path, token)
    server.start()
    saved = os.environ.get("KIMERA_DB_TOKEN")
    os.environ["KIMERA_DB_TOKEN"] = token
    embedded = duckdb.connect()
    remote = open_database(server.address)
    try:
        yield embedded, remote
    finally:
        remote.close()
        embedded.close()
        server.stop()
        if saved is None:
            os.environ.pop("KIMERA_DB_TOKEN", None)
        else:
            os.environ["KIMERA_DB_TOKEN"] = saved


def _run(con, sql: str, params):
    try:
        return "ok", con.execute(sql, params).fetchall()
    except duckdb.Error as exc:
        return "error", type(exc).__name__


@pytest.mark.parametrize(("sql_type", "values"), TYPES, ids=[t for t, _ in TYPES])
def test_a_bound_value_reads_back_as_an_embedded_connection_reads_it(both, sql_type, values):
    embedded, remote = both
    sql = f"SELECT ?::{sql_type} AS v, [?::{sql_type}, NULL] AS l"

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(values)
    def check(value):
        expected = _run(embedded, sql, [value, value])
        got = _run(remote, sql, [value, value])
        assert expected[0] == got[0], (expected, got)
        if expected[0] == "ok":
            assert same(expected[1], got[1]), (expected[1], got[1])
        else:
            assert expected[1] == got[1]

    check()


def test_the_reference_tells_apart_what_the_codec_must_keep():
    # the reference itself can fail: these pairs differ in type, sign or zone
    assert not same(0.0, -0.0) and not same(1, 1.0) and not same([1], (1,))
    assert same(float("nan"), float("nan")) and same(Decimal("1.0"), Decimal("1.00"))
    aware = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    assert not same(aware, aware.replace(tzinfo=None))
    assert not same(aware, aware.astimezone(dt.timezone(dt.timedelta(hours=1))))


def test_named_parameters_executemany_and_description_match(both):
    embedded, remote = both
    for con in (embedded, remote):
        con.execute("CREATE OR REPLACE TEMP TABLE kv (k VARCHAR, v HUGEINT)")
        con.executemany("INSERT INTO kv VALUES (?, ?)", [["a", 2**100], ["b", None]])
    sql = "SELECT k, v FROM kv WHERE k = $key OR v IS NULL ORDER BY k"
    assert same(
        embedded.execute(sql, {"key": "a"}).fetchall(), remote.execute(sql, {"key": "a"}).fetchall()
    )
    assert [d[0] for d in remote.execute(sql, {"key": "a"}).description] == ["k", "v"]
    assert remote.fetchmany(1) == [("a", 2**100)] and remote.fetchone() == ("b", None)
    assert remote.fetchone() is None
