"""The ``kimera`` command line, run as a user runs it: the installed executable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

KIMERA = Path(sys.executable).parent / "kimera"


def kimera(*args, cwd=None):
    return subprocess.run(
        [str(KIMERA), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_executable_is_installed():
    assert KIMERA.exists()


def test_top_level_help_lists_the_commands():
    result = kimera("--help")
    assert result.returncode == 0
    assert "demo-data" in result.stdout
    assert "summary" in result.stdout
    assert result.stderr == ""


def test_demo_data_help_describes_its_options():
    result = kimera("demo-data", "--help")
    assert result.returncode == 0
    for option in ("--geoids", "--scars", "--seed", "--db", "--json", "--replace"):
        assert option in result.stdout, option
    words = " ".join(result.stdout.split()).lower()  # help text is wrapped to the terminal
    assert "number of legacy geoids" in words
    assert "number of legacy scars" in words
    assert "same seed gives the same database" in words
    assert "duckdb database file" in words


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a database\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["demo-data", "--db", "{tmp}/x.duckdb", "--geoids", "x"], "--geoids"),
        (["demo-data", "--db", "{tmp}/x.duckdb", "--geoids", "1"], "--geoids"),
        (["demo-data", "--geoids", "10"], "--db"),
        (["no-such-command"], "no-such-command"),
        (["summary", "--db", "{tmp}/nonexistent.duckdb"], "no such file"),
        (["summary", "--db", "{text}"], "not a DuckDB"),
        (["summary"], "--db"),
    ],
)
def test_user_errors_are_one_line_on_stderr(tmp_path, text_file, args, needle):
    args = [a.format(tmp=tmp_path, text=text_file) for a in args]
    before = text_file.read_bytes()
    result = kimera(*args)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kimera: error:")
    assert needle in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert text_file.read_bytes() == before
    assert not (tmp_path / "x.duckdb").exists()
    assert not (tmp_path / "nonexistent.duckdb").exists()


def test_demo_data_refuses_an_existing_file(tmp_path, text_file):
    result = kimera("demo-data", "--db", text_file, "--geoids", "10", "--scars", "5")
    assert result.returncode != 0
    assert result.stderr.startswith("kimera: error:")
    assert "already exists" in result.stderr
    assert text_file.read_text(encoding="utf-8") == "not a database\n"


@pytest.fixture(scope="module")
def cli_demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "demo.duckdb"
    result = kimera(
        "demo-data", "--db", path, "--geoids", 500, "--scars", 200, "--seed", 3, "--json"
    )
    assert result.returncode == 0, result.stderr
    return path, json.loads(result.stdout)


def test_demo_data_json_report(cli_demo):
    path, report = cli_demo
    assert report["path"] == str(path)
    assert report["tables"]["legacy_geoids"] == 500
    assert report["tables"]["legacy_scars"] == 200
    assert set(report["tables"]) == {
        "legacy_geoids",
        "legacy_scars",
        "echoforms",
        "identities",
        "dual_write_log",
    }
    assert isinstance(report["broken"], dict)
    assert report["seconds"] >= 0


def test_summary_json_matches_the_database(cli_demo):
    path, report = cli_demo
    result = kimera("summary", "--db", path, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tables"] == report["tables"]
    assert summary["missing_tables"] == []
    by_type = {d["identity_type"]: d for d in summary["distributions"]}
    assert set(by_type) == {"geoid", "scar"}
    assert by_type["geoid"]["count"] == 500
    assert by_type["scar"]["count"] == 200
    for dist in by_type.values():
        histogram = dist["histogram"]
        assert list(histogram)[-1] == "+Inf"
        assert sum(histogram.values()) == dist["count"] - dist["unknown"]
        assert 0 <= dist["min"] <= dist["p50"] <= dist["p90"] <= dist["p99"] <= dist["max"]
        # tau_eff = 14 days * (1 + 0.1 H): never below 14 days for H >= 0
        assert dist["tau_p50_days"] >= 14.0
    assert by_type["geoid"]["unknown"] == 0  # geoid entropy is always defined


def test_summary_table_output(cli_demo):
    path, _ = cli_demo
    result = kimera("summary", "--db", path)
    assert result.returncode == 0, result.stderr
    assert "legacy_geoids" in result.stdout
    assert "500" in result.stdout


def test_summary_does_not_change_the_file(cli_demo):
    path, _ = cli_demo
    before = path.read_bytes()
    assert kimera("summary", "--db", path, "--json").returncode == 0
    assert path.read_bytes() == before
    assert not Path(f"{path}.wal").exists()


def test_top_level_help_lists_every_command_group():
    listed = kimera("--help").stdout
    for command in (
        "db",
        "demo-data",
        "lattice-workload",
        "metrics",
        "migrate",
        "search-index",
        "serve",
        "summary",
        "verify",
        "workload",
    ):
        assert f"  {command} " in listed, command


# --- kimera db ----------------------------------------------------------------------------
def test_db_init_then_info_shows_the_empty_legacy_layout(tmp_path):
    path = tmp_path / "new.duckdb"
    result = kimera("db", "init", "--db", path)
    assert result.returncode == 0, result.stderr
    assert "legacy layout ready" in result.stdout
    info = json.loads(kimera("db", "info", "--db", path, "--json").stdout)
    assert info["path"] == str(path) and info["written_by"].startswith("DuckDB v")
    assert info["tables"] == dict.fromkeys(
        ["legacy_geoids", "legacy_scars", "echoforms", "identities", "dual_write_log"], 0
    )
    assert info["missing_legacy_tables"] == []
    text = kimera("db", "info", "--db", path)
    assert text.returncode == 0 and "legacy_geoids" in text.stdout


def test_db_info_names_missing_tables_without_touching_the_file(tmp_path):
    path = tmp_path / "partial.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE legacy_geoids (gid TEXT)")
    before = path.read_bytes()
    info = json.loads(kimera("db", "info", "--db", path, "--json").stdout)
    assert info["tables"] == {"legacy_geoids": 0}
    assert info["missing_legacy_tables"] == [
        "legacy_scars",
        "echoforms",
        "identities",
        "dual_write_log",
    ]
    text = kimera("db", "info", "--db", path)
    assert text.returncode == 0 and "missing" in text.stdout
    assert path.read_bytes() == before
    assert not Path(f"{path}.wal").exists()


# --- kimera search-index and serve --------------------------------------------------------
def test_search_index_builds_once_then_only_when_stale(cli_demo, tmp_path):
    path = tmp_path / "index.duckdb"
    path.write_bytes(cli_demo[0].read_bytes())
    first = kimera("search-index", "--db", path)
    assert first.returncode == 0, first.stderr
    built = json.loads(first.stdout)
    assert built["built"] is True and built["source"] == "legacy" and not built["stale"]
    assert built["documents"] > 0
    again = json.loads(kimera("search-index", "--db", path, "--if-stale").stdout)
    assert again["built"] is False and again["built_at"] == built["built_at"]
    forced = json.loads(kimera("search-index", "--db", path).stdout)
    assert forced["built"] is True


@pytest.mark.parametrize(
    "args",
    [
        ["search-index", "--db", "{tmp}/missing.duckdb"],
        ["serve", "--db", "{tmp}/missing.duckdb"],
        ["lattice-workload", "--db", "{text}"],
    ],
)
def test_read_path_commands_refuse_a_bad_file_in_one_line(tmp_path, text_file, args):
    result = kimera(*[a.format(tmp=tmp_path, text=text_file) for a in args])
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("kimera: error:")
    assert not (tmp_path / "missing.duckdb").exists()


def test_lattice_workload_resolves_pairs_and_prints_counts(cli_demo, tmp_path):
    path = tmp_path / "lattice.duckdb"
    path.write_bytes(cli_demo[0].read_bytes())
    result = kimera("lattice-workload", "--db", path, "--pairs", 5, "--repeat-share", 1)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["first"] == 5 and report["failures"] == 0
    assert report["resolutions"] == report["first"] + report["repeats"]
