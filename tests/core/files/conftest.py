"""The DuckDB file matrix, generated once per session and per release (duckdb_matrix.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from duckdb_matrix import generate


@pytest.fixture(scope="session")
def duckdb_matrix(tmp_path_factory) -> Callable[[str], Path]:
    """``matrix(version)`` -> the folder holding ``<variant>.duckdb`` (+ ``.wal``) written by
    that DuckDB release; generated on first use, skipped or failed when not installed."""
    root = tmp_path_factory.mktemp("duckdb-matrix")
    made: dict[str, Path] = {}

    def matrix(version: str) -> Path:
        if version not in made:
            generate(version, root / version)
            made[version] = root / version
        return made[version]

    return matrix


@pytest.fixture
def matrix_file(tmp_path, duckdb_matrix) -> Callable[[str, str], Path]:
    """``copy(version, variant)`` -> a private copy (with its ``.wal``) in tmp_path."""

    def copy(version: str, variant: str) -> Path:
        source = duckdb_matrix(version) / f"{variant}.duckdb"
        target = tmp_path / f"{version}-{variant}.duckdb"
        shutil.copyfile(source, target)
        wal = Path(f"{source}.wal")
        if wal.exists():
            shutil.copyfile(wal, f"{target}.wal")
        return target

    return copy
