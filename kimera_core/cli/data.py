"""``kimera demo-data`` and ``kimera summary``: write a demo legacy database, summarise one."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from kimera_core.cli.options import (
    DB_OPTION,
    JSON_OPTION,
    WAIT_OPTION,
    console,
    counts_table,
    emit_json,
    open_db,
)
from kimera_core.demo import generate_demo_data
from kimera_core.stats import legacy_summary


@click.command("demo-data")
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
        emit_json(
            {
                "path": report.path,
                "tables": report.counts,
                "broken": report.broken,
                "seconds": round(report.seconds, 3),
            }
        )
        return
    title = f"Demo legacy database {report.path} ({report.seconds:.1f} s)"
    console.print(counts_table(title, "table", report.counts))
    if report.broken:
        title = "Rows broken on purpose (for quarantine)"
        console.print(counts_table(title, "kind", report.broken))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@click.command()
@DB_OPTION
@JSON_OPTION
@WAIT_OPTION
def summary(db_path: Path, as_json: bool, wait_seconds: float) -> None:
    """Rows per legacy table and the entropy distribution by identity type."""
    with open_db(db_path, wait=wait_seconds, read_only=True) as con:
        result = legacy_summary(con)
    if as_json:
        emit_json(result.to_dict())
        return
    tables = counts_table(f"Tables in {db_path}", "table", result.tables)
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
        hist = Table(title="Entropy histogram (rows per bucket, by its upper edge in bits)")
        hist.add_column("up to (bits)", justify="right")
        for d in result.distributions:
            hist.add_column(d.identity_type, justify="right")
        for label in result.distributions[0].histogram:
            hist.add_row(label, *(f"{d.histogram[label]:,}" for d in result.distributions))
        console.print(hist)
