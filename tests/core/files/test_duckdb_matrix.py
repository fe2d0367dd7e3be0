"""Every file the existing Kimera wrote, with every DuckDB release from 0.9.2 to 1.4.4, opens.

Either it opens with the venv's DuckDB and reads back exactly, or the refusal names the
release that wrote it and ``kimera db upgrade --db PATH``, and that upgrade gives a copy that
opens and reads back exactly, the original byte-identical (duckdb_matrix.py for the files).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import duckdb
import pytest
from duckdb_matrix import (
    OLD_DUCKDB_VERSIONS,
    VARIANTS,
    expected_rows,
    read_rows,
    refused_by_current,
)

import kimera_core.upgrade as upgrade_module
from kimera_core.db import connect, open_database, read_header
from kimera_core.errors import DatabaseOpenError
from kimera_core.legacy import LEGACY_TABLES
from kimera_core.upgrade import (
    UpgradeError,
    inspect_file,
    upgrade_file,
    upgraded_copy_path,
    wal_of,
)

CASES = [(v, variant) for v in OLD_DUCKDB_VERSIONS for variant in VARIANTS]
REFUSED = [case for case in CASES if refused_by_current(*case)]
OPENED = [case for case in CASES if not refused_by_current(*case)]
FIXTURES = Path(__file__).parents[2] / "fixtures"


def ids(case):
    return "-".join(case)


def fingerprint(path: Path) -> tuple[str, str | None]:
    wal = wal_of(path)
    return (
        hashlib.sha256(path.read_bytes()).hexdigest(),
        hashlib.sha256(wal.read_bytes()).hexdigest() if wal.exists() else None,
    )


def assert_reads_back(con, variant: str) -> None:
    for table in LEGACY_TABLES:
        assert read_rows(con, table) == expected_rows(variant, table), table


def test_the_matrix_covers_every_release_and_both_outcomes():
    assert OLD_DUCKDB_VERSIONS[0] == "0.9.2" and OLD_DUCKDB_VERSIONS[-1] == "1.4.4"
    assert {"1.0.0", "1.1.3", "1.2.2", "1.3.2"} <= set(OLD_DUCKDB_VERSIONS)
    assert any(v.startswith("0.10.") for v in OLD_DUCKDB_VERSIONS)
    assert len(VARIANTS) == 10 and sum(v.endswith("_wal") for v in VARIANTS) == 5
    assert len(REFUSED) == 8 and ("0.9.2", "full") in OPENED and ("0.9.2", "full_wal") in OPENED


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_the_file_is_what_the_old_release_wrote(matrix_file, case):
    version, variant = case
    path = matrix_file(version, variant)
    header = read_header(path)
    assert header.library_version == f"v{version}"
    assert header.storage_version == 64
    assert header.metadata_from_duckdb_09 is (version == "0.9.2")
    assert wal_of(path).exists() is variant.endswith("_wal")


@pytest.mark.parametrize("case", OPENED, ids=ids)
def test_the_file_opens_and_reads_back_exactly(matrix_file, case):
    version, variant = case
    path = matrix_file(version, variant)
    before = fingerprint(path)
    with connect(path, read_only=True) as con:
        assert_reads_back(con, variant)
    assert fingerprint(path) == before


@pytest.mark.parametrize("case", REFUSED, ids=ids)
def test_the_refusal_names_the_writer_and_the_next_command(matrix_file, case):
    version, variant = case
    path = matrix_file(version, variant)
    before = fingerprint(path)
    for read_only in (True, False):
        with pytest.raises(DatabaseOpenError) as info:
            open_database(path, read_only=read_only)
        message = str(info.value)
        assert "\n" not in message
        assert f"DuckDB v{version}" in message
        assert "ExtractIndexStorageInfo" in message
        assert f"`kimera db upgrade --db {path}`" in message
        assert fingerprint(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name] + ([wal_of(path).name] if before[1] else [])
    )


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_info_reads_the_header_and_counts_only_what_opens(matrix_file, case):
    version, variant = case
    path = matrix_file(version, variant)
    before = fingerprint(path)
    info = inspect_file(path)
    assert info.header.library_version == f"v{version}"
    assert (info.wal_bytes is not None) is variant.endswith("_wal")
    if refused_by_current(version, variant):
        assert not info.opens and info.tables is None
        assert "ExtractIndexStorageInfo" in info.problem
        assert info.next_command == f"kimera db upgrade --db {path}"
    else:
        assert info.opens and info.problem is None and info.next_command is None
        assert info.tables == {t: len(expected_rows(variant, t)) for t in LEGACY_TABLES}
        assert info.missing_legacy_tables == []
    assert fingerprint(path) == before


@pytest.mark.parametrize("case", REFUSED, ids=ids)
def test_upgrade_gives_a_copy_that_opens_and_keeps_the_original(matrix_file, case):
    version, variant = case
    path = matrix_file(version, variant)
    before = fingerprint(path)
    report = upgrade_file(path)
    assert report.needed and report.upgraded_with == "1.4.4" and not report.replaced
    assert (report.original_sha256, report.original_wal_sha256) == before
    assert fingerprint(path) == before
    copy = upgraded_copy_path(path)
    assert report.copy == str(copy) and not wal_of(copy).exists()
    assert {name: d["rows"] for name, d in report.tables.items()} == {
        f"main.{t}": len(expected_rows(variant, t)) for t in LEGACY_TABLES
    }
    assert len(report.catalog["indexes"]) == 5
    assert read_header(copy).library_version == f"v{version}"  # the creator stays
    assert not read_header(copy).metadata_from_duckdb_09
    with duckdb.connect(str(copy), read_only=True) as con:
        assert_reads_back(con, variant)
    # the copy takes writes, and its sequence continues after the last log id
    scratch = copy.with_name("scratch.duckdb")
    shutil.copyfile(copy, scratch)
    with duckdb.connect(str(scratch)) as con:
        ids_now = len(expected_rows(variant, "dual_write_log"))
        assert con.execute("SELECT nextval('dual_write_log_seq')").fetchone()[0] == ids_now + 1
        con.execute("DELETE FROM echoforms")
        con.execute("CHECKPOINT")


@pytest.mark.parametrize("case", [("1.4.4", "pre_p1"), ("0.9.2", "full_wal")], ids=ids)
def test_upgrade_of_a_file_that_opens_does_nothing(matrix_file, case):
    path = matrix_file(*case)
    before = fingerprint(path)
    siblings = sorted(p.name for p in path.parent.iterdir())
    report = upgrade_file(path, replace=True)
    assert not report.needed and report.copy is None and not report.replaced
    assert fingerprint(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == siblings


def test_replace_keeps_the_original_as_a_backup(matrix_file):
    path = matrix_file("0.9.2", "no_lattice_wal")
    before = fingerprint(path)
    report = upgrade_file(path, replace=True)
    assert report.replaced and report.copy is None
    backup = Path(report.backup)
    assert backup.name == "0.9.2-no_lattice_wal.pre-upgrade.duckdb"
    assert fingerprint(backup) == before  # the original and its .wal, byte-identical
    assert not wal_of(path).exists() and not upgraded_copy_path(path).exists()
    with connect(path, read_only=True) as con:
        assert_reads_back(con, "no_lattice_wal")
    assert not upgrade_file(path).needed  # a second upgrade finds nothing to do


def test_a_second_backup_gets_its_own_name(matrix_file):
    first = matrix_file("0.9.2", "empty")
    upgrade_file(first, replace=True)
    shutil.copyfile(first.with_name("0.9.2-empty.pre-upgrade.duckdb"), first)
    report = upgrade_file(first, replace=True)
    assert Path(report.backup).name == "0.9.2-empty.pre-upgrade-2.duckdb"


def test_a_copy_that_differs_is_removed_and_the_upgrade_refused(matrix_file, monkeypatch):
    path = matrix_file("0.9.2", "no_lattice")
    before = fingerprint(path)
    real = upgrade_module._run_worker

    def tampered(release, original, copy):
        result = real(release, original, copy)
        result["original"]["tables"]["main.legacy_geoids"]["checksum"] = "0" * 32
        return result

    monkeypatch.setattr(upgrade_module, "_run_worker", tampered)
    with pytest.raises(UpgradeError, match=r"main\.legacy_geoids.*copy removed"):
        upgrade_file(path, replace=True)
    assert fingerprint(path) == before
    assert not upgraded_copy_path(path).exists()
    assert not any("pre-upgrade" in p.name for p in path.parent.iterdir())


def test_without_duckdb_14_the_upgrade_says_how_to_install_it(matrix_file, monkeypatch, tmp_path):
    path = matrix_file("0.9.2", "empty")
    before = fingerprint(path)
    monkeypatch.setenv("KIMERA_DUCKDB_VERSIONS", str(tmp_path / "nothing-here"))
    with pytest.raises(UpgradeError, match=r"pip install --no-deps --target .*duckdb==1\.4\.4"):
        upgrade_file(path)
    assert fingerprint(path) == before
    assert not upgraded_copy_path(path).exists()


@pytest.mark.parametrize(("gz", "from_09"), [("0.9.2", True), ("0.10.3", False), ("1.5.6", False)])
def test_the_header_tells_a_duckdb_09_checkpoint_apart(tmp_path, gz, from_09):
    # the committed fixtures: this test needs no old DuckDB installed
    path = tmp_path / "f.duckdb"
    with (FIXTURES / f"legacy_duckdb_{gz}.duckdb.gz").open("rb") as fh:
        path.write_bytes(gzip.decompress(fh.read()))
    header = read_header(path)
    assert header.metadata_from_duckdb_09 is from_09
    assert header.library_version == f"v{gz}" and header.iteration == 1
    assert header.source_id and header.source_id.isalnum()
