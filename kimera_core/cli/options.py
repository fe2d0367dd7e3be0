"""What every ``kimera`` command shares: the ``--db`` and ``--json`` options, JSON output, the console.

``--db`` takes a DuckDB file or a database server's address (``kimera://HOST:PORT``, from
``kimera db serve``): a file arrives as a ``Path``, an address as a ``DatabaseAddress`` (a
``str`` that keeps its two slashes, which a ``Path`` would fold), and every opener of
``kimera_core.db`` takes either.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from kimera_core.db import connect_waiting
from kimera_core.dbserver.protocol import is_address, parse_address

console = Console(width=None if sys.stdout.isatty() else 120)


class DatabaseAddress(str):
    """A database server's address given as ``--db`` (``kimera://HOST:PORT``).

    A ``str``, so ``kimera_core.db`` opens it; ``exists()`` is True (the server holds the
    file) so a command's "no such file" check passes it through to the open.
    """

    def exists(self) -> bool:
        return True


class DatabaseParam(click.ParamType):
    """``--db``: a DuckDB file (``Path``, not a directory) or a server address."""

    name = "path|kimera://host:port"
    _file = click.Path(dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, (Path, DatabaseAddress)):
            return value
        if is_address(value):
            try:
                return DatabaseAddress(str(parse_address(value)))
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
        return self._file.convert(value, param, ctx)


DB_ENV = "KIMERA_DB"  # the same variable the Dagster resource reads


def db_option(required: bool = True) -> Any:
    """The ``--db`` option (a DuckDB file or a server address, else ``KIMERA_DB``), given
    as ``db_path``."""
    return click.option(
        "--db",
        "db_path",
        required=required,
        envvar=DB_ENV,
        show_envvar=True,
        type=DatabaseParam(),
        help="DuckDB database file, or a database server's address (kimera://HOST:PORT).",
    )


DB_OPTION = db_option()
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
WAIT_OPTION = click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    help="Seconds to wait while another process holds the file, saying so on stderr every "
    "few seconds (0: fail at once).",
)


def emit_json(payload: Any) -> None:
    """Print ``payload`` as indented UTF-8 JSON (non-JSON values through ``str``)."""
    click.echo(json.dumps(payload, indent=2, ensure_ascii=False, default=str))


def counts_table(title: str, label: str, counts: Mapping[str, int]) -> Table:
    """A two-column table: ``label`` (a table, reason or kind) and its row count."""
    table = Table(title=title)
    table.add_column(label)
    table.add_column("rows", justify="right")
    for name, count in counts.items():
        table.add_row(name, f"{count:,}")
    return table


@contextmanager
def open_db(
    path: Path, *, wait: float, read_only: bool = False, create: bool = False
) -> Iterator[Any]:
    """A short connection that waits up to ``wait`` seconds for another process's lock,
    telling stderr at once and every few seconds who holds the file; one-line
    DatabaseOpenError when it gives up (``kimera_core.db.open_waiting``)."""
    with connect_waiting(
        path,
        read_only=read_only,
        create=create,
        timeout=wait,
        on_wait=lambda line: click.echo(f"kimera: {line}", err=True),
    ) as con:
        yield con
