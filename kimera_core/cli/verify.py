"""``kimera verify``: prove the legacy tables and identities agree, or say why not.

The verdict is ``gates.judge_gates``'s, the one the Dagster checks and the rollout read.
Exit status: 0 consistent (explained exceptions listed), 1 inconsistent, 2 could not run (a
bad argument, a file that is missing, unreadable, not a DuckDB database or locked by another
process): an error never reads as a verdict.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import duckdb
from rich.markup import escape
from rich.table import Table

from kimera_core.cli.options import DB_OPTION, JSON_OPTION, WAIT_OPTION, console, emit_json, open_db
from kimera_core.consistency import DEFAULT_SAMPLE, VerificationReport, count_of
from kimera_core.consistency.report import EXCEPTIONS, FAILURES, Finding, exception_lines
from kimera_core.errors import KimeraError
from kimera_core.gates import GateReport, judge_gates

EXIT_CONSISTENT, EXIT_INCONSISTENT, EXIT_ERROR = 0, 1, 2


@click.command()
@DB_OPTION
@JSON_OPTION
@WAIT_OPTION
@click.option(
    "--sample",
    type=click.IntRange(min=0),
    default=DEFAULT_SAMPLE,
    show_default=True,
    help="Offending keys shown (with both stores' values) per kind of problem.",
)
@click.option(
    "--incremental",
    is_flag=True,
    help="Check only keys changed since the last recorded verification (full if none, or if "
    "that one was inconsistent).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Count explained exceptions (rows in quarantine, legacy stale) as failures.",
)
@click.option(
    "--record/--no-record",
    default=True,
    show_default=True,
    help="Append the verdict to kimera_verifications (--no-record opens the file read-only).",
)
@click.option(
    "--cache/--no-cache",
    default=True,
    show_default=True,
    help=(
        "Reuse cached digests of key segments whose rows are unchanged (every row is still "
        "read and fingerprinted) and, unless read-only, cache the new ones; --no-cache "
        "digests every row and writes no cache."
    ),
)
def verify(
    db_path: Path,
    as_json: bool,
    sample: int,
    incremental: bool,
    strict: bool,
    record: bool,
    cache: bool,
    wait_seconds: float,
) -> None:
    """Compare legacy_geoids/legacy_scars with identities: exit 0 when they agree (explained
    exceptions listed), 1 when they do not, 2 when the check could not run."""
    try:
        with open_db(db_path, wait=wait_seconds, read_only=not record) as con:
            judged = judge_gates(
                con,
                incremental=incremental,
                sample=sample,
                record=record,
                strict=strict,
                cache=cache,
            )
    except (KimeraError, duckdb.Error, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        prefix = "DuckDB: " if isinstance(exc, duckdb.Error) else ""
        click.echo(f"kimera: error: {prefix}{first}", err=True)
        sys.exit(EXIT_ERROR)
    if as_json:
        emit_json({**judged.verification.to_dict(), "gates": [g.to_dict() for g in judged.gates]})
    else:
        _print(judged)
    sys.exit(EXIT_CONSISTENT if judged.consistent else EXIT_INCONSISTENT)


def _print(judged: GateReport) -> None:
    report = judged.verification
    style = "green" if judged.consistent else "red"
    console.print(
        f"[bold {style}]{judged.verdict.upper()}[/bold {style}] "
        f"({report.mode}{', strict' if report.strict else ''}, {report.seconds:.2f} s; stage "
        f"{report.stage}: reads come from {report.authoritative})"
    )
    _print_counts(report)
    gates = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in ("gate", "", "offending", "exceptions", "summary"):
        gates.add_column(column, overflow="fold")
    for gate in judged.gates:
        gates.add_row(
            gate.name,
            "[green]pass[/green]" if gate.passed else "[red]FAIL[/red]",
            f"{gate.offending:,}",
            f"{gate.exceptions:,}",
            escape(gate.summary),
        )
    console.print(gates)
    for note in report.notes:
        console.print(f"  note: {note}", markup=False)
    for line in exception_lines(report):
        console.print(f"  explained: {line}", markup=False)
    for reason in report.reasons:
        console.print(f"  - {reason}", markup=False)
    for kind in FAILURES + EXCEPTIONS:
        finding: Finding = getattr(report, kind)
        if finding.total:
            _print_finding(kind, finding, failing=kind in FAILURES or report.strict)


def _print_counts(report: VerificationReport) -> None:
    counts = report.counts
    quarantined = counts.get("quarantined", {})
    for kind in sorted(set(counts["legacy"]) | set(counts["new"])):
        console.print(
            f"  {kind:<8} legacy {counts['legacy'].get(kind, 0):>12,}  "
            f"quarantined {quarantined.get(kind, 0):>8,}  "
            f"identities {counts['new'].get(kind, 0):>12,}  "
            f"difference {counts['difference'].get(kind, 0):>+8,}"
        )
    if report.keys_checked is not None:
        console.print(f"  keys changed since the last verification: {report.keys_checked:,}")
    cache = report.checksums.get("digest_cache")
    if cache:
        digested = count_of(cache["rows_digested"], "row digested", "rows digested")
        if cache.get("segments_suspect"):
            # the fast digests disagreed there: those rows were parsed and compared by value
            digested += (
                f" ({count_of(cache['segments_suspect'], 'suspect segment', 'suspect segments')}"
                f", {count_of(cache['rows_normalised'], 'row', 'rows')} parsed)"
            )
        console.print(
            f"  digest cache: {cache['reused']:,} of "
            f"{count_of(cache['segments'], 'segment', 'segments')} reused, {digested}"
            + (
                f", {count_of(cache['rejected'], 'entry', 'entries')} rejected"
                if cache["rejected"]
                else ""
            )
            + (f", {cache['written']:,} written" if cache["written"] else "")
            if cache["enabled"]
            else f"  digest cache off: {digested}"
        )


def _print_finding(kind: str, finding: Finding, failing: bool) -> None:
    label = "[red]failing[/red]" if failing else "[yellow]explained[/yellow]"
    shown = len(finding.evidence)
    console.print(
        f"\n  {label} {kind}: {finding.total:,}"
        + (f" (first {shown:,}, by key)" if shown < finding.total else "")
    )
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in ("key", "field", *finding.sides, "note"):
        table.add_column(column, overflow="fold")
    for item in finding.evidence:
        for values in item.fields or [None]:
            table.add_row(
                escape(item.id),
                values.field if values else "",
                _shown(values.left) if values else "",
                _shown(values.right) if values else "",
                escape(item.note),
            )
    console.print(table)
    if finding.next_step:
        console.print(f"  next step: {finding.next_step}", markup=False)


def _shown(text: str | None) -> str:
    return "(absent)" if text is None else escape(text)
