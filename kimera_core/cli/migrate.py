"""``kimera migrate``: run, resume, inspect and roll back the legacy-to-identities migration."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kimera_core.cli.options import (
    DB_OPTION,
    WAIT_OPTION,
    console,
    counts_table,
    db_option,
    emit_json,
    open_db,
)
from kimera_core.migration import (
    MigrationCounts,
    MigrationReport,
    migrate,
    quarantine_summary,
    rollback,
    run_history,
)

EXIT_UNBALANCED = 3


def _print_report(report: MigrationReport) -> None:
    c = report.counts
    title = (
        "Migration dry run (nothing written)" if report.dry_run else f"Migration {report.run_id}"
    )
    if report.resumed:
        title += f" (resumed; {report.partitions_skipped} partitions already done)"
    table = Table(title=title)
    for column in (
        "read",
        "inserted",
        "updated",
        "unchanged",
        "kept (newer)",
        "quarantined",
        "seconds",
        "rows/s",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        f"{c.read:,}",
        f"{c.inserted:,}",
        f"{c.updated:,}",
        f"{c.unchanged:,}",
        f"{c.kept:,}",
        f"{c.quarantined:,}",
        f"{report.seconds:.2f}",
        f"{report.rows_per_second:,.0f}",
    )
    console.print(table)
    verdict = "[green]balanced[/green]" if report.balanced else "[red]NOT BALANCED[/red]"
    console.print(
        f"Reconciliation: legacy rows {report.legacy_rows:,} = migrated {c.changes:,} + already "
        f"present {c.already_present:,} + quarantined {c.quarantined:,}: {verdict}"
    )
    if report.rows_skipped:
        console.print(
            f"Judged again: {c.read - report.rows_skipped:,} rows; {report.rows_skipped:,} "
            "unchanged since the last full run counted by its judgement"
        )
    if report.quarantine_reasons:
        title = "Quarantined by reason ('kimera migrate quarantine' for keys)"
        console.print(counts_table(title, "table:reason", report.quarantine_reasons))
    if report.warnings:
        console.print(counts_table("Migrated with a warning", "table:warning", report.warnings))
    if report.identities_checksum:
        ck = report.identities_checksum
        console.print(f"identities: {ck['rows']:,} rows, checksum {ck['checksum']}")


@click.group(invoke_without_command=True)
@db_option(required=False)
@click.option("--dry-run", is_flag=True, help="Compute every count, write nothing.")
@click.option(
    "--partitions",
    type=click.IntRange(1, 4096),
    default=None,
    help="Hash buckets per table (default: one per 250,000 rows; a resumed run keeps its own).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@WAIT_OPTION
@click.pass_context
def migrate_cmd(
    ctx: click.Context,
    db_path: Path | None,
    dry_run: bool,
    partitions: int | None,
    as_json: bool,
    wait_seconds: float,
) -> None:
    """Backfill identities from legacy_geoids and legacy_scars (resumes an unfinished run).

    Exits 3 when legacy rows != migrated + already present + quarantined.
    """
    if ctx.invoked_subcommand is not None:
        return
    if db_path is None:
        raise click.UsageError("Missing option '--db'.", ctx=ctx)
    show_progress = not as_json and sys.stderr.isatty()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rows]:,} rows"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not show_progress,
    )
    task = progress.add_task("migrating", total=None, rows=0)
    seen = MigrationCounts()

    def on_partition(
        done: int, total: int, kind: str, bucket: int, counts: MigrationCounts
    ) -> None:
        seen.add(counts)
        progress.update(
            task, total=total, completed=done, rows=seen.read, description=f"{kind} bucket {bucket}"
        )

    with progress, open_db(db_path, wait=wait_seconds) as con:
        report = migrate(con, partitions=partitions, dry_run=dry_run, on_partition=on_partition)
    if as_json:
        emit_json(report.to_dict())
    else:
        _print_report(report)
    if not report.balanced:
        ctx.exit(EXIT_UNBALANCED)


@migrate_cmd.command("rollback")
@DB_OPTION
@click.option("--run", "run_id", default=None, help="Roll back this run only (default: all).")
@click.option(
    "--force",
    is_flag=True,
    help=(
        "Roll back even while reads come from identities: only after moving reads back to "
        "legacy failed; see docs/runbook.md."
    ),
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@WAIT_OPTION
def rollback_cmd(
    db_path: Path, run_id: str | None, force: bool, as_json: bool, wait_seconds: float
) -> None:
    """Undo what migration runs inserted or updated; identities the application changed since stay.

    Refused while the rollout stage reads from identities (read-new and later).
    """
    with open_db(db_path, wait=wait_seconds) as con:
        report = rollback(con, run_id, force=force)
    if as_json:
        emit_json(report.to_dict())
        return
    console.print(
        f"Rolled back {len(report.runs)} run(s): deleted {report.deleted:,} inserted identities, "
        f"restored {report.restored:,} updated ones."
    )
    if report.left_modified:
        console.print(
            f"[yellow]Left {report.left_modified:,} identities the application changed after "
            f"the migration[/yellow], e.g. {', '.join(report.left_modified_sample[:5])}"
        )
    ck = report.identities_checksum
    console.print(f"identities: {ck['rows']:,} rows, checksum {ck['checksum']}")


@migrate_cmd.command("status")
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@WAIT_OPTION
def status_cmd(db_path: Path, as_json: bool, wait_seconds: float) -> None:
    """Recent migration runs: status, partitions done, counts, identities checksum."""
    with open_db(db_path, wait=wait_seconds, read_only=True) as con:
        runs = run_history(con)
    if as_json:
        emit_json(runs)
        return
    if not runs:
        console.print("No migration run yet.")
        return
    table = Table(title=f"Migration runs in {db_path}")
    for column in ("run", "status", "partitions", "read", "changes", "quarantined", "checksum"):
        table.add_column(column)
    for r in runs:
        counts = r["counts"] or {}
        table.add_row(
            r["run_id"],
            r["status"],
            f"{r['partitions_done']}/{r['partitions_total']}",
            str(counts.get("read", "-")),
            str(counts.get("changes", "-")),
            str(counts.get("quarantined", "-")),
            r["identities_checksum"] or "-",
        )
    console.print(table)


@migrate_cmd.command("quarantine")
@DB_OPTION
@click.option("--run", "run_id", default=None, help="A run id (default: the latest).")
@click.option(
    "--sample",
    type=click.IntRange(0, 1000),
    default=5,
    show_default=True,
    help="Keys to show per reason.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@WAIT_OPTION
def quarantine_cmd(
    db_path: Path, run_id: str | None, sample: int, as_json: bool, wait_seconds: float
) -> None:
    """Quarantined legacy rows by reason, with sample keys (docs/migration.md explains each)."""
    with open_db(db_path, wait=wait_seconds, read_only=True) as con:
        summary = quarantine_summary(con, run_id, sample)
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"Quarantine of run {summary['run_id']}: {summary['total']:,} rows")
    table.add_column("table:reason")
    table.add_column("rows", justify="right")
    table.add_column("sample keys")
    for reason, info in summary["reasons"].items():
        table.add_row(reason, f"{info['rows']:,}", ", ".join(map(str, info["sample_keys"])))
    console.print(table)
