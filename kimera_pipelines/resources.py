"""Resources: the one Kimera DuckDB database, opened through kimera_core's safe open."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import dagster as dg
import duckdb

from kimera_core.db import connect

DEFAULT_DB_PATH = "var/kimera.duckdb"


class KimeraDatabase(dg.ConfigurableResource):
    """The Kimera DuckDB file. Connections are short: DuckDB has one writer process per file."""

    path: str = DEFAULT_DB_PATH

    @contextlib.contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        with connect(self.path, read_only=read_only) as con:
            yield con


def database_from_env() -> KimeraDatabase:
    """The database named by KIMERA_DB, else var/kimera.duckdb."""
    return KimeraDatabase(path=dg.EnvVar("KIMERA_DB").get_value(DEFAULT_DB_PATH) or DEFAULT_DB_PATH)
