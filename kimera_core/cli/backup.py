"""``kimera db backup`` and ``kimera db restore``: thin click wrappers over kimera_core.backup."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from kimera_core.backup import backup_database, restore_database
from kimera_core.cli.options import DB_OPTION, JSON_OPTION, console, emit_json


@click.command("backup")
@DB_OPTION
@click.option(
    "--to",
    "to_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="New or empty directory to write the backup into.",
)
@JSON_OPTION
def backup(db_path: Path, to_dir: Path, as_json: bool) -> None:
    """Write a consistent backup (Parquet export + manifest of row counts and checksums)."""
    manifest = backup_database(db_path, to_dir)
    if as_json:
        emit_json(manifest.to_dict() | {"path": manifest.path})
        return
    table = Table(title=f"Backup of {db_path} in {to_dir}")
    table.add_column("table")
    table.add_column("rows", justify="right")
    table.add_column("checksum")
    for name, entry in manifest.tables.items():
        table.add_row(name, f"{entry.rows:,}", entry.checksum)
    console.print(table)
    for name, seq in manifest.sequences.items():
        console.print(f"sequence {name}: last value {seq.get('last_value')}")
    console.print(
        f"[green]backup complete[/green]: {len(manifest.tables)} tables, "
        f"{len(manifest.files)} files, DuckDB {manifest.duckdb_version}"
    )


@click.command("restore")
@click.option(
    "--from",
    "from_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Backup directory written by 'kimera db backup'.",
)
@DB_OPTION
@click.option("--force", is_flag=True, help="Replace an existing database file.")
@JSON_OPTION
def restore(from_dir: Path, db_path: Path, force: bool, as_json: bool) -> None:
    """Restore a backup into --db, verified against its manifest before anything is replaced."""
    report = restore_database(from_dir, db_path, force=force)
    if as_json:
        emit_json(report.to_dict())
        return
    table = Table(title=f"Restored {from_dir} into {db_path} ({report.seconds:.1f} s)")
    table.add_column("table")
    table.add_column("rows", justify="right")
    table.add_column("checksum")
    table.add_column("manifest")
    for check in report.tables:
        table.add_row(
            check.table,
            f"{check.actual.rows:,}",
            check.actual.hex,
            "[green]match[/green]" if check.ok else "[red]MISMATCH[/red]",
        )
    console.print(table)
    for name, value in report.sequences.items():
        console.print(f"sequence {name}: next value {value}")
    action = "replaced" if report.replaced else "created"
    console.print(f"[green]restore verified[/green]: {db_path} {action}")
