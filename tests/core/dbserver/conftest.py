"""Fixtures of the database server tests: a token, and servers stopped by PID at the end."""

from __future__ import annotations

import secrets

import pytest
from dbserver_proc import DbServer

from kimera_core.db import open_database
from kimera_core.legacy import create_legacy_schema


@pytest.fixture
def token(monkeypatch) -> str:
    """A fresh token, also in KIMERA_DB_TOKEN so this process's clients find it."""
    value = secrets.token_urlsafe(24)
    monkeypatch.setenv("KIMERA_DB_TOKEN", value)
    return value


@pytest.fixture
def servers():
    """Start servers with ``servers(path, token)``; every one is stopped by PID at teardown."""
    started: list[DbServer] = []

    def start(path, token) -> DbServer:
        server = DbServer(path, token)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def served(tmp_path, token, servers) -> DbServer:
    """A server on a new file with the legacy schema."""
    path = tmp_path / "served.duckdb"
    con = open_database(path, create=True)
    create_legacy_schema(con)
    con.close()
    return servers(path, token)
