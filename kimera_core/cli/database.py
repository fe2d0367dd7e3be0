"""``kimera db``: inspect and prepare database files, back them up and restore them."""

from __future__ import annotations

from pathlib import Path

import click

from kimera_core.cli.backup import backup, restore
from kimera_core.cli.options import DB_OPTION, JSON_OPTION, console, emit_json
from kimera_core.db import connect, read_header
from kimera_core.legacy import create_legacy_schema, missing_tables, table_counts


@click.group()
def db() -> None:
    """Inspect and prepare database files."""


@db.command("info")
@DB_OPTION
@JSON_OPTION
def db_info(db_path: Path, as_json: bool) -> None:
    """Which DuckDB wrote the file, and its tables with row counts."""
    header = read_header(db_path)
    with connect(db_path, read_only=True) as con:
        counts = table_counts(con)
        missing = missing_tables(con)
    payload = {
        "path": str(db_path),
        "written_by": header.written_by,
        "storage_version": header.storage_version,
        "tables": counts,
        "missing_legacy_tables": missing,
    }
    if as_json:
        emit_json(payload)
        return
    console.print(f"[bold]{db_path}[/bold]: written by {header.written_by}")
    for name, count in counts.items():
        console.print(f"  {name:<16} {count:>12,}")
    for name in missing:
        console.print(f"  {name:<16} [red]missing[/red]")


@db.command("init")
@DB_OPTION
def db_init(db_path: Path) -> None:
    """Create the legacy Kimera tables in a new or existing file (idempotent)."""
    with connect(db_path, create=True) as con:
        create_legacy_schema(con)
    console.print(f"{db_path}: legacy layout ready")


db.add_command(backup)
db.add_command(restore)
