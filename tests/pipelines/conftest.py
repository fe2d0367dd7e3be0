"""Fixtures for the Dagster layer: a small demo database per test and an ephemeral instance."""

from __future__ import annotations

import shutil

import dagster as dg
import pytest

from kimera_core.demo import generate_demo_data
from kimera_pipelines.resources import KimeraDatabase


@pytest.fixture(scope="module")
def demo_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipelines") / "template.duckdb"
    generate_demo_data(path, geoids=600, scars=300, seed=5, broken_share=0.02)
    return path


@pytest.fixture
def db_path(tmp_path, demo_template):
    path = tmp_path / "kimera.duckdb"
    shutil.copy(demo_template, path)
    return path


@pytest.fixture
def database(db_path):
    return KimeraDatabase(database=str(db_path), lock_timeout_seconds=5)


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst
