"""Shared fixtures: the expected contents of the legacy fixture files and a demo database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def legacy_expected() -> dict:
    """tests/fixtures/legacy_expected.json, parsed."""
    return json.loads((FIXTURES / "legacy_expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def demo_params() -> dict:
    """Parameters of the session's demo database (a broken share large enough for every kind)."""
    return {"geoids": 3000, "scars": 1500, "seed": 7, "broken_share": 0.02}


@pytest.fixture(scope="session")
def demo_db(tmp_path_factory, demo_params):
    """(path, DemoReport) of a demo database generated once per session; do not write to it."""
    from kimera_core.demo import generate_demo_data

    path = tmp_path_factory.mktemp("demo") / "demo.duckdb"
    report = generate_demo_data(path, **demo_params)
    return path, report
