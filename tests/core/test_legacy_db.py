"""The legacy layout, the P1 read path, and opening (or refusing) DuckDB files safely."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.legacy_rows import (
    insert_geoids,
    insert_scars,
    iter_geoids,
    iter_scars,
    store_identity_p1,
)

from kimera_core.db import connect, open_database, read_header
from kimera_core.errors import DatabaseOpenError, KimeraError
from kimera_core.identity import Geoid, Identity, Scar
from kimera_core.legacy import (
    LEGACY_IDENTITIES_ENTROPY_SQL,
    LEGACY_IDENTITY_FIELDS,
    P1_READ_IDENTITY_SQL,
    create_legacy_schema,
    fetch_legacy_identity,
    geoid_to_row,
    identity_from_legacy_row,
    missing_tables,
    read_identity_p1,
    scar_to_row,
    secondary_indexes,
    table_counts,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ALL_FIXTURES = sorted(FIXTURES.glob("legacy_duckdb_*.duckdb.gz"))
TOO_NEW = FIXTURES / "legacy_duckdb_2.0.1.duckdb.gz"
READABLE = [p for p in ALL_FIXTURES if p != TOO_NEW]
NEWEST_READABLE = FIXTURES / "legacy_duckdb_1.5.6.duckdb.gz"


def version_of(gz: Path) -> str:
    return gz.name.removeprefix("legacy_duckdb_").removesuffix(".duckdb.gz")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gunzip(gz: Path, dest: Path) -> Path:
    with gzip.open(gz, "rb") as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out)
    return dest


def wal_of(path: Path) -> Path:
    return Path(f"{path}.wal")


# The layout of KIMERA_LEGACY.md, written out: (column, type, nullable) in order.
# TEXT is DuckDB's VARCHAR; PRIMARY KEY columns are NOT NULL.
EXPECTED_COLUMNS = {
    "legacy_geoids": [
        ("gid", "VARCHAR", False),
        ("raw", "VARCHAR", False),
        ("echo", "VARCHAR", True),
        ("lang_axis", "VARCHAR", True),
        ("tags", "JSON", True),
        ("weight", "DOUBLE", True),
        ("meta", "JSON", True),
        ("created_at", "DOUBLE", True),
        ("updated_at", "DOUBLE", True),
    ],
    "legacy_scars": [
        ("id", "VARCHAR", False),
        ("weight", "DOUBLE", True),
        ("related_ids", "JSON", True),
        ("meta", "JSON", True),
        ("created_at", "DOUBLE", True),
        ("updated_at", "DOUBLE", True),
    ],
    "echoforms": [
        ("anchor", "VARCHAR", False),
        ("blob", "JSON", True),
        ("created_at", "DOUBLE", True),
        ("updated_at", "DOUBLE", True),
        ("domain", "VARCHAR", True),
        ("phase", "VARCHAR", True),
        ("intensity_sum", "DOUBLE", True),
    ],
    "identities": [
        ("id", "VARCHAR", False),
        ("identity_type", "VARCHAR", False),
        ("data", "JSON", False),
        ("created_at", "DOUBLE", False),
        ("updated_at", "DOUBLE", False),
        ("lang_axis", "VARCHAR", True),
        ("entropy_score", "DOUBLE", True),
    ],
    "dual_write_log": [
        ("log_id", "INTEGER", False),
        ("timestamp", "DOUBLE", False),
        ("identity_id", "VARCHAR", False),
        ("operation", "VARCHAR", False),
        ("status", "VARCHAR", False),
        ("details", "JSON", True),
    ],
}
EXPECTED_PRIMARY_KEYS = {
    "legacy_geoids": ["gid"],
    "legacy_scars": ["id"],
    "echoforms": ["anchor"],
    "identities": ["id"],
    "dual_write_log": ["log_id"],
}
EXPECTED_INDEXES = {
    ("identities", "updated_at"),
    ("identities", "identity_type"),
    ("identities", "entropy_score"),
    ("echoforms", "updated_at"),
    ("echoforms", "domain"),
}


def columns_of(con):
    rows = con.execute(
        "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
    ).fetchall()
    out: dict[str, list] = {}
    for table, column, dtype, nullable in rows:
        out.setdefault(table, []).append((column, dtype, nullable == "YES"))
    return out


def indexes_of(con):
    rows = con.execute("SELECT table_name, expressions FROM duckdb_indexes()").fetchall()
    return {(table, expr.strip("[]").replace("'", "").replace('"', "")) for table, expr in rows}


def catalog_dump(con):
    return (
        columns_of(con),
        sorted(indexes_of(con)),
        con.execute("SELECT sequence_name FROM duckdb_sequences() ORDER BY 1").fetchall(),
    )


# --- the layout ---------------------------------------------------------------------------
def test_create_legacy_schema_matches_the_documented_layout(tmp_path):
    with connect(tmp_path / "fresh.duckdb", create=True) as con:
        create_legacy_schema(con)
        assert columns_of(con) == EXPECTED_COLUMNS
        tables = con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()
        assert sorted(t for (t,) in tables) == sorted(EXPECTED_COLUMNS)
        pks = con.execute(
            "SELECT table_name, constraint_column_names FROM duckdb_constraints() "
            "WHERE constraint_type = 'PRIMARY KEY'"
        ).fetchall()
        assert dict(pks) == EXPECTED_PRIMARY_KEYS
        assert con.execute("SELECT sequence_name FROM duckdb_sequences()").fetchall() == [
            ("dual_write_log_seq",)
        ]
        assert indexes_of(con) == EXPECTED_INDEXES
        assert missing_tables(con) == []
        assert table_counts(con) == dict.fromkeys(EXPECTED_COLUMNS, 0)


def test_create_legacy_schema_is_idempotent_and_keeps_rows(tmp_path):
    with connect(tmp_path / "fresh.duckdb", create=True) as con:
        create_legacy_schema(con)
        before = catalog_dump(con)
        con.execute(
            "INSERT INTO dual_write_log (timestamp, identity_id, operation, status) "
            "VALUES (1.0, 'a', 'store', 'success')"
        )
        create_legacy_schema(con)
        assert catalog_dump(con) == before
        assert table_counts(con)["dual_write_log"] == 1


def test_dual_write_log_ids_come_from_the_sequence(tmp_path):
    with connect(tmp_path / "fresh.duckdb", create=True) as con:
        create_legacy_schema(con)
        for ident in ("a", "b", "c"):
            con.execute(
                "INSERT INTO dual_write_log (timestamp, identity_id, operation, status) "
                "VALUES (1.0, ?, 'store', 'success')",
                [ident],
            )
        ids = con.execute("SELECT log_id FROM dual_write_log ORDER BY log_id").fetchall()
        assert ids == [(1,), (2,), (3,)]


def test_legacy_constraints_are_enforced(tmp_path):
    with connect(tmp_path / "fresh.duckdb", create=True) as con:
        create_legacy_schema(con)
        with pytest.raises(duckdb.ConstraintException):
            con.execute("INSERT INTO legacy_geoids (gid, raw) VALUES ('g', NULL)")
        with pytest.raises(duckdb.ConversionException):
            con.execute("INSERT INTO legacy_geoids (gid, raw, meta) VALUES ('g', 'x', '{bad')")


def test_missing_tables_lists_what_a_database_lacks(tmp_path):
    with connect(tmp_path / "partial.duckdb", create=True) as con:
        con.execute("CREATE TABLE legacy_geoids (gid TEXT)")
        assert missing_tables(con) == ["legacy_scars", "echoforms", "identities", "dual_write_log"]
        assert table_counts(con) == {"legacy_geoids": 0}


def _own_indexes(con):
    rows = con.execute(
        "SELECT table_name, expressions FROM duckdb_indexes() "
        "WHERE database_name = current_database()"
    ).fetchall()
    return {(table, expr.strip("[]").replace("'", "").replace('"', "")) for table, expr in rows}


def test_an_attached_database_does_not_pass_for_this_one(tmp_path):
    # the catalog functions list every attached database, each with its own schema 'main'
    other = tmp_path / "other.duckdb"
    with connect(other, create=True) as con:
        create_legacy_schema(con)
    with connect(tmp_path / "fresh.duckdb", create=True) as con:
        con.execute(f"ATTACH '{other}' AS other (READ_ONLY)")
        assert missing_tables(con) == list(EXPECTED_COLUMNS)
        assert table_counts(con) == {}
        create_legacy_schema(con)
        assert _own_indexes(con) == EXPECTED_INDEXES
        assert set(secondary_indexes(con, "identities")) == {
            "idx_identities_updated_at",
            "idx_identities_type",
            "idx_identities_entropy",
        }
        assert missing_tables(con) == []


_CREATE_TABLE = re.compile(r"CREATE (?:OR REPLACE )?TABLE (?:IF NOT EXISTS )?(\w+)\s*(?:\(|AS\b)")


def test_docs_schema_lists_every_table_the_code_creates():
    created = {
        name
        for path in (ROOT / "kimera_core").rglob("*.py")
        for name in _CREATE_TABLE.findall(path.read_text(encoding="utf-8"))
    }
    assert {"legacy_geoids", "kimera_text_postings", "kimera_embedding_lists"} <= created
    documented = set(re.findall(r"`(\w+)`", (ROOT / "docs" / "schema.md").read_text("utf-8")))
    assert sorted(created - documented) == []


# --- the legacy tables read as identities -------------------------------------------------
def test_the_legacy_read_rebuilds_geoids_and_scars_with_their_entropy(tmp_path):
    geoid = Geoid(
        gid="g1",
        raw="Café",
        echo="Café",
        lang_axis="fr",
        context_layers=["a", "b"],
        weight=0.5,
        meta={"terms": [{"intensity": 1}, {"intensity": 1}]},
        created_at=1.5,
        updated_at=2.5,
    )
    scar = Scar(scar_id="s1", gid_pair=["g1", "g2"], weight=2.0, created_at=3.0, updated_at=4.0)
    with connect(tmp_path / "legacy.duckdb", create=True) as con:
        create_legacy_schema(con)
        insert_geoids(con, [geoid])
        insert_scars(con, [scar])
        assert fetch_legacy_identity(con, "g1") == geoid.to_identity()
        assert fetch_legacy_identity(con, "s1") == scar.to_identity()
        assert fetch_legacy_identity(con, "nope") is None
        rows = con.execute(
            f"SELECT {LEGACY_IDENTITY_FIELDS}, entropy FROM ({LEGACY_IDENTITIES_ENTROPY_SQL}) "
            "ORDER BY id"
        ).fetchall()
    assert [identity_from_legacy_row(r) for r in rows] == [
        geoid.to_identity(),
        scar.to_identity(),
    ]
    assert [r[-1] for r in rows] == [pytest.approx(1.0), pytest.approx(2.0)]  # bits
    assert geoid_to_row(geoid)[0] == "g1" and scar_to_row(scar)[0] == "s1"


# --- the P1 read path ---------------------------------------------------------------------
FIXED = Identity(
    id="610018874cf7360f",
    identity_type="geoid",
    raw="  Café crème  ",
    echo="Café crème",
    lang_axis="fr",
    tags=["boisson", "français"],
    weight=0.75,
    related_ids=["11b829734a9ba3e8"],
    meta={"terms": [{"symbol": "a", "intensity": 0.5}], "note": "مرحبا 🌊"},
    created_at=1714564860.123456789,
    updated_at=1714564890.75,
)


def test_p1_read_path_rebuilds_the_stored_identity(tmp_path):
    with connect(tmp_path / "p1.duckdb", create=True) as con:
        create_legacy_schema(con)
        store_identity_p1(con, FIXED, 1.0)
        assert read_identity_p1(con, FIXED.id) == FIXED
        # the P1 application's own statement, written out here as P1 runs it
        (data,) = con.execute("SELECT data FROM identities WHERE id = ?", [FIXED.id]).fetchone()
        assert Identity.from_document(json.loads(data)) == FIXED
        row = con.execute(
            "SELECT identity_type, created_at, updated_at, lang_axis, entropy_score "
            "FROM identities WHERE id = ?",
            [FIXED.id],
        ).fetchone()
        assert row == ("geoid", FIXED.created_at, FIXED.updated_at, "fr", 1.0)


def test_p1_read_sql_is_the_documented_statement():
    assert P1_READ_IDENTITY_SQL == "SELECT data FROM identities WHERE id = ?"


def test_p1_read_of_unknown_id_is_none(tmp_path):
    with connect(tmp_path / "p1.duckdb", create=True) as con:
        create_legacy_schema(con)
        assert read_identity_p1(con, "nope") is None


def test_p1_store_replaces_an_existing_identity(tmp_path):
    with connect(tmp_path / "p1.duckdb", create=True) as con:
        create_legacy_schema(con)
        store_identity_p1(con, FIXED, 1.0)
        changed = Identity(**{**{f: getattr(FIXED, f) for f in FIXED.__slots__}, "weight": 0.1})
        store_identity_p1(con, changed, 2.0)
        assert read_identity_p1(con, FIXED.id) == changed
        assert table_counts(con)["identities"] == 1


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
json_like = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
)
stored_identities = st.builds(
    Identity,
    id=st.text(min_size=1, max_size=20),
    identity_type=st.sampled_from(["geoid", "scar"]),
    raw=st.one_of(st.none(), st.text(max_size=30)),
    lang_axis=st.one_of(st.none(), st.sampled_from(["en", "fr", "ar"])),
    tags=st.one_of(st.none(), st.lists(st.text(max_size=8), max_size=4)),
    weight=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
    related_ids=st.one_of(st.none(), st.lists(st.text(max_size=16), max_size=4)),
    meta=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), json_like, max_size=4)),
    created_at=st.floats(min_value=-6e10, max_value=2.5e11),
    updated_at=st.floats(min_value=-6e10, max_value=2.5e11),
)


@pytest.fixture(scope="module")
def p1_con(tmp_path_factory):
    con = open_database(tmp_path_factory.mktemp("p1") / "p1.duckdb", create=True)
    create_legacy_schema(con)
    yield con
    con.close()


@given(identity=stored_identities)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_p1_store_then_read_round_trips(p1_con, identity):
    store_identity_p1(p1_con, identity, None)
    assert read_identity_p1(p1_con, identity.id) == identity


# --- the fixture files --------------------------------------------------------------------
def expected_rows(expected, version, table):
    rows = expected["tables"][table] + expected["versions"][version]["extra_rows"].get(table, [])
    key = expected["columns"][table].index(expected["order_by"][table])
    return sorted((list(r) for r in rows), key=lambda r: r[key])


def read_tables(con, expected):
    out = {}
    for table, columns in expected["columns"].items():
        order = expected["order_by"][table]
        sql = f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}"  # noqa: S608 - fixture names
        out[table] = [list(r) for r in con.execute(sql).fetchall()]
    return out


@pytest.mark.parametrize("gz", READABLE, ids=version_of)
@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
def test_fixture_opens_and_reads_as_expected(tmp_path, legacy_expected, gz, read_only):
    version = version_of(gz)
    path = gunzip(gz, tmp_path / f"{version}.duckdb")
    assert sha256(path) == legacy_expected["versions"][version]["db_sha256"]  # intact fixture
    with connect(path, read_only=read_only) as con:
        tables = read_tables(con, legacy_expected)
        for table in legacy_expected["columns"]:
            assert tables[table] == expected_rows(legacy_expected, version, table), table
        assert missing_tables(con) == []
        assert {t for t, _ in indexes_of(con)} == {"identities", "echoforms"}
        assert len(indexes_of(con)) == 5
        assert con.execute("SELECT count(*) FROM duckdb_sequences()").fetchone()[0] == 1
    assert not wal_of(path).exists()


@pytest.mark.parametrize("gz", READABLE, ids=version_of)
def test_fixture_records_read_as_geoids_and_scars(tmp_path, legacy_expected, gz):
    version = version_of(gz)
    path = gunzip(gz, tmp_path / f"{version}.duckdb")
    with connect(path, read_only=True) as con:
        geoids = list(iter_geoids(con, batch_size=2))
        scars = list(iter_scars(con))
    want_geoids = [
        Geoid(gid, raw, echo, lang, json.loads(tags), weight, json.loads(meta), created, updated)
        for gid, raw, echo, lang, tags, weight, meta, created, updated in expected_rows(
            legacy_expected, version, "legacy_geoids"
        )
    ]
    want_scars = [
        Scar(sid, json.loads(related), weight, json.loads(meta), created, updated)
        for sid, weight, related, meta, created, updated in expected_rows(
            legacy_expected, version, "legacy_scars"
        )
    ]
    assert geoids == want_geoids
    assert scars == want_scars
    assert any(g.raw != g.echo for g in geoids)  # the padded French text survives as is


@pytest.mark.parametrize("gz", READABLE, ids=version_of)
def test_read_only_open_leaves_fixture_byte_identical(tmp_path, gz):
    path = gunzip(gz, tmp_path / "f.duckdb")
    before = sha256(path)
    con = open_database(path, read_only=True)
    con.execute("SELECT count(*) FROM legacy_geoids").fetchall()
    con.execute("SELECT * FROM identities").fetchall()
    con.close()
    assert sha256(path) == before
    assert not wal_of(path).exists()


@pytest.mark.parametrize("gz", ALL_FIXTURES, ids=version_of)
def test_read_header_reports_the_creating_version(tmp_path, legacy_expected, gz):
    version = version_of(gz)
    path = gunzip(gz, tmp_path / "f.duckdb")
    before = sha256(path)
    header = read_header(path)
    assert header.library_version == f"v{version}"
    assert (
        header.library_version
        == legacy_expected["versions"][version]["header"]["main"]["library_version_str"]
    )
    # 2.0.1 writes the sentinel 999 in the main header and 69 in the database header
    assert header.storage_version == (69 if version == "2.0.1" else 64)
    assert f"v{version}" in header.written_by
    assert sha256(path) == before


def test_p1_document_in_fixture_reads_back(tmp_path, legacy_expected):
    path = gunzip(NEWEST_READABLE, tmp_path / "f.duckdb")
    row = legacy_expected["tables"]["identities"][0]
    with connect(path, read_only=True) as con:
        identity = read_identity_p1(con, row[0])
    assert identity is not None
    assert (identity.id, identity.identity_type, identity.created_at, identity.updated_at) == (
        row[0],
        row[1],
        row[3],
        row[4],
    )


# --- files that cannot be opened ----------------------------------------------------------
def make_too_new(tmp_path):
    return gunzip(TOO_NEW, tmp_path / "too_new.duckdb")


def make_text(tmp_path):
    path = tmp_path / "notes.duckdb"
    path.write_text("id,name\n1,not a database\n", encoding="utf-8")
    return path


def make_empty(tmp_path):
    path = tmp_path / "empty.duckdb"
    path.write_bytes(b"")
    return path


def make_truncated_100(tmp_path):
    path = tmp_path / "truncated.duckdb"
    path.write_bytes(gunzip(NEWEST_READABLE, tmp_path / "full.duckdb").read_bytes()[:100])
    return path


def make_truncated_4096(tmp_path):
    path = tmp_path / "truncated4k.duckdb"
    path.write_bytes(gunzip(NEWEST_READABLE, tmp_path / "full.duckdb").read_bytes()[:4096])
    return path


def make_gzip(tmp_path):
    return Path(shutil.copy(NEWEST_READABLE, tmp_path / "still_compressed.duckdb.gz"))


def make_sqlite_like(tmp_path):
    path = tmp_path / "app.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + bytes(4080))
    return path


def make_too_old(tmp_path):
    # a readable file whose header claims storage format 51 (DuckDB 0.8)
    data = bytearray(gunzip(NEWEST_READABLE, tmp_path / "full.duckdb").read_bytes())
    data[12:20] = struct.pack("<Q", 51)
    data[52:84] = bytes(32)  # 0.8 wrote no library version
    path = tmp_path / "old.duckdb"
    path.write_bytes(bytes(data))
    return path


def make_directory(tmp_path):
    path = tmp_path / "adir.duckdb"
    path.mkdir()
    return path


def make_missing(tmp_path):
    return tmp_path / "does_not_exist.duckdb"


BAD_FILES = {
    "duckdb_2.0.1": (make_too_new, r"v2\.0\.1.*cannot read|newer"),
    "text": (make_text, r"not a DuckDB"),
    "empty": (make_empty, r"empty"),
    "truncated_100_bytes": (make_truncated_100, r"cannot open|truncated|damaged"),
    "truncated_4096_bytes": (make_truncated_4096, r"cannot open|truncated|damaged"),
    "gzip": (make_gzip, r"not a DuckDB"),
    "sqlite": (make_sqlite_like, r"not a DuckDB"),
    "storage_51": (make_too_old, r"older than DuckDB 0\.9"),
    "directory": (make_directory, r"directory"),
    "missing": (make_missing, r"no such file"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
def test_unopenable_file_is_refused_and_untouched(tmp_path, kind, read_only):
    make, cause = BAD_FILES[kind]
    path = make(tmp_path)
    before = sha256(path) if path.is_file() else None
    siblings = sorted(p.name for p in tmp_path.iterdir())

    with pytest.raises(DatabaseOpenError) as info:
        open_database(path, read_only=read_only)

    message = str(info.value)
    assert str(path) in message
    assert re.search(cause, message), message
    assert "\n" not in message  # one line for the CLI
    assert isinstance(info.value, KimeraError)
    if before is not None:
        assert sha256(path) == before
    if kind == "directory":
        assert list(path.iterdir()) == []
    if kind == "missing":
        assert not path.exists()
    assert not wal_of(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings  # nothing created


def test_too_new_file_message_names_the_version_and_what_to_do(tmp_path):
    path = make_too_new(tmp_path)
    with pytest.raises(DatabaseOpenError) as info:
        open_database(path, read_only=True)
    message = str(info.value)
    assert "v2.0.1" in message
    assert duckdb.__version__ in message
    assert "EXPORT DATABASE" in message


@pytest.mark.parametrize("make", [make_text, make_empty, make_directory, make_missing])
def test_read_header_refuses_non_duckdb_files(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(DatabaseOpenError, match="duckdb|DuckDB|directory|no such file"):
        read_header(path)


def test_create_makes_a_new_database_and_its_parent(tmp_path):
    path = tmp_path / "new" / "dir" / "db.duckdb"
    with connect(path, create=True) as con:
        assert con.execute("SELECT 42").fetchone() == (42,)
    assert read_header(path).storage_version in range(64, 69)


def test_create_read_only_refuses_without_creating(tmp_path):
    path = tmp_path / "never.duckdb"
    with pytest.raises(DatabaseOpenError, match="no such file"):
        open_database(path, read_only=True, create=True)
    assert not path.exists()


def test_connect_closes_the_connection(tmp_path):
    with connect(tmp_path / "c.duckdb", create=True) as con:
        pass
    with pytest.raises(duckdb.ConnectionException):
        con.execute("SELECT 1")


# --- a file held by another process -------------------------------------------------------
HOLD_LOCK = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1])
    con.execute("CREATE TABLE IF NOT EXISTS held (x INTEGER)")
    print("ready", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def locked_db(tmp_path):
    path = tmp_path / "locked.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.poll() is not None else line
        yield path
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
def test_file_locked_by_another_process_is_refused(locked_db, read_only):
    before = sha256(locked_db)
    with pytest.raises(DatabaseOpenError) as info:
        open_database(locked_db, read_only=read_only)
    message = str(info.value)
    assert str(locked_db) in message
    assert "another process" in message
    assert sha256(locked_db) == before


@pytest.mark.parametrize("gz", READABLE, ids=version_of)
def test_create_legacy_schema_adds_no_index_to_a_p1_file(tmp_path, gz):
    # the fixtures name their indexes differently from ours; none may be duplicated
    path = gunzip(gz, tmp_path / "p1.duckdb")
    with duckdb.connect(str(path)) as con:
        before = con.execute("SELECT count(*) FROM duckdb_indexes()").fetchone()[0]
        create_legacy_schema(con)
        after = con.execute("SELECT count(*) FROM duckdb_indexes()").fetchone()[0]
    assert before == after == 5
