"""The ``kimera`` command line: demo data, database inspection and the legacy summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import duckdb
from rich.console import Console
from rich.table import Table

from kimera_core import __version__
from kimera_core.db import connect, read_header
from kimera_core.errors import KimeraError

console = Console(width=None if sys.stdout.isatty() else 120)

DB_OPTION = click.option(
    "--db",
    "db_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="DuckDB database file.",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


def _emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, ensure_ascii=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kimera")
def cli() -> None:
    """Kimera SWM migration control plane: legacy Geoid/Scar tables into the Identity table.

    Every command takes --db PATH (a DuckDB file) and refuses, with a one-line reason and
    without touching it, a file it cannot open.
    """


@cli.command("demo-data")
@DB_OPTION
@click.option(
    "--geoids",
    type=click.IntRange(min=2),
    default=10_000,
    show_default=True,
    help="Number of legacy geoids.",
)
@click.option(
    "--scars",
    type=click.IntRange(min=0),
    default=5_000,
    show_default=True,
    help="Number of legacy scars (links between geoids).",
)
@click.option(
    "--seed",
    type=int,
    default=42,
    show_default=True,
    help="Random seed: the same seed gives the same database.",
)
@click.option(
    "--broken-share",
    type=click.FloatRange(0, 1),
    default=0.005,
    show_default=True,
    help="Share of rows broken on purpose (malformed meta, empty raw, dangling ids ...).",
)
@click.option(
    "--dual-written-share",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Share of rows P1's dual-write already put in identities.",
)
@click.option("--replace", is_flag=True, help="Overwrite an existing demo database.")
@JSON_OPTION
def demo_data(
    db_path: Path,
    geoids: int,
    scars: int,
    seed: int,
    broken_share: float,
    dual_written_share: float,
    replace: bool,
    as_json: bool,
) -> None:
    """Write a realistic legacy Kimera database (multilingual, with some broken rows)."""
    from kimera_core.demo import generate_demo_data

    report = generate_demo_data(
        db_path,
        geoids=geoids,
        scars=scars,
        seed=seed,
        broken_share=broken_share,
        dual_written_share=dual_written_share,
        replace=replace,
    )
    if as_json:
        _emit_json(
            {
                "path": report.path,
                "tables": report.counts,
                "broken": report.broken,
                "seconds": round(report.seconds, 3),
            }
        )
        return
    table = Table(title=f"Demo legacy database {report.path} ({report.seconds:.1f} s)")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, count in report.counts.items():
        table.add_row(name, f"{count:,}")
    console.print(table)
    if report.broken:
        broken = Table(title="Rows broken on purpose (for quarantine)")
        broken.add_column("kind")
        broken.add_column("rows", justify="right")
        for kind, count in report.broken.items():
            broken.add_row(kind, f"{count:,}")
        console.print(broken)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@cli.command()
@DB_OPTION
@JSON_OPTION
def summary(db_path: Path, as_json: bool) -> None:
    """Rows per legacy table and the entropy distribution by identity type."""
    from kimera_core.stats import legacy_summary

    with connect(db_path, read_only=True) as con:
        result = legacy_summary(con)
    if as_json:
        _emit_json(result.to_dict())
        return
    tables = Table(title=f"Legacy tables in {db_path}")
    tables.add_column("table")
    tables.add_column("rows", justify="right")
    for name, count in result.tables.items():
        tables.add_row(name, f"{count:,}")
    for name in result.missing_tables:
        tables.add_row(name, "[red]missing[/red]")
    console.print(tables)
    dist = Table(title="Entropy (bits) and effective tau (days) by identity type")
    for column in (
        "type",
        "rows",
        "unknown H",
        "mean",
        "p50",
        "p90",
        "p99",
        "max",
        "tau p50",
        "tau p99",
    ):
        dist.add_column(column, justify="right" if column != "type" else "left")
    for d in result.distributions:
        dist.add_row(
            d.identity_type,
            f"{d.count:,}",
            f"{d.unknown:,}",
            _fmt(d.mean),
            _fmt(d.p50),
            _fmt(d.p90),
            _fmt(d.p99),
            _fmt(d.max),
            _fmt(d.tau_p50_days, 2),
            _fmt(d.tau_p99_days, 2),
        )
    console.print(dist)
    if result.distributions:
        hist = Table(title="Entropy histogram (rows with H <= bucket, bits)")
        hist.add_column("<= bits", justify="right")
        for d in result.distributions:
            hist.add_column(d.identity_type, justify="right")
        for label in result.distributions[0].histogram:
            hist.add_row(label, *(f"{d.histogram[label]:,}" for d in result.distributions))
        console.print(hist)


@cli.group()
def db() -> None:
    """Inspect and prepare database files."""


@db.command("info")
@DB_OPTION
@JSON_OPTION
def db_info(db_path: Path, as_json: bool) -> None:
    """Which DuckDB wrote the file, and its tables with row counts."""
    from kimera_core.legacy import missing_tables, table_counts

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
        _emit_json(payload)
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
    from kimera_core.legacy import create_legacy_schema

    with connect(db_path, create=True) as con:
        create_legacy_schema(con)
    console.print(f"{db_path}: legacy layout ready")


# --- commands defined in their own modules (one import + add_command line each) ---------
from kimera_core.cli_verify import verify  # noqa: E402

cli.add_command(verify)
from kimera_core.cli_migrate import migrate_cmd  # noqa: E402

cli.add_command(migrate_cmd, name="migrate")
from kimera_core.cli_backup import backup, restore  # noqa: E402

db.add_command(backup)
db.add_command(restore)
from kimera_core.cli_metrics import metrics_group, workload  # noqa: E402

cli.add_command(metrics_group)
cli.add_command(workload)
from kimera_core.cli_serve import lattice_workload, search_index, serve  # noqa: E402

cli.add_command(serve)
cli.add_command(search_index)
cli.add_command(lattice_workload)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr, never a traceback."""
    try:
        cli.main(args=argv, prog_name="kimera", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
        click.echo(f"kimera: error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("kimera: aborted", err=True)
        sys.exit(130)
    except KimeraError as exc:
        click.echo(f"kimera: error: {exc}", err=True)
        sys.exit(1)
    except duckdb.Error as exc:
        # an operational failure inside DuckDB (out of memory, disk full, I/O): one line, no
        # traceback; every write is transactional, so nothing is half-written
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        click.echo(f"kimera: error: DuckDB: {first}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("kimera: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
