"""What every ``kimera`` command shares: the ``--db`` and ``--json`` options, JSON output, the console."""

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

console = Console(width=None if sys.stdout.isatty() else 120)


def db_option(required: bool = True) -> Any:
    """The ``--db PATH`` option (a DuckDB file), given to the command as ``db_path``."""
    return click.option(
        "--db",
        "db_path",
        required=required,
        type=click.Path(dir_okay=False, path_type=Path),
        help="DuckDB database file.",
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
