"""``kimera verify``: prove the legacy tables and identities agree, or say why not (exit 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kimera_core.cli.options import DB_OPTION, JSON_OPTION, console, emit_json
from kimera_core.consistency import DEFAULT_SAMPLE, VerificationReport
from kimera_core.consistency import verify as run_verify
from kimera_core.db import connect


@click.command()
@DB_OPTION
@JSON_OPTION
@click.option(
    "--sample",
    type=click.IntRange(min=0),
    default=DEFAULT_SAMPLE,
    show_default=True,
    help="Offending keys shown per kind of problem.",
)
@click.option(
    "--incremental",
    is_flag=True,
    help="Check only keys changed since the last recorded verification (full if none).",
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
    db_path: Path, as_json: bool, sample: int, incremental: bool, record: bool, cache: bool
) -> None:
    """Compare legacy_geoids/legacy_scars with identities; exit 1 when they disagree."""
    with connect(db_path, read_only=not record) as con:
        report = run_verify(con, incremental=incremental, sample=sample, record=record, cache=cache)
    if as_json:
        emit_json(report.to_dict())
    else:
        _print(report)
    if not report.consistent:
        sys.exit(1)


def _print(report: VerificationReport) -> None:
    style = "green" if report.consistent else "red"
    console.print(
        f"[bold {style}]{report.verdict.upper()}[/bold {style}] "
        f"({report.mode}, {report.seconds:.2f} s)"
    )
    counts = report.counts
    for kind in sorted(set(counts["legacy"]) | set(counts["new"])):
        console.print(
            f"  {kind:<8} legacy {counts['legacy'].get(kind, 0):>12,}  "
            f"identities {counts['new'].get(kind, 0):>12,}  "
            f"difference {counts['difference'].get(kind, 0):>+10,}"
        )
    if report.keys_checked is not None:
        console.print(f"  keys changed since the last verification: {report.keys_checked:,}")
    checksums = report.checksums
    if "legacy" in checksums:
        console.print(
            f"  checksum legacy {checksums['legacy']['checksum']}  "
            f"identities {checksums['new']['checksum']}"
        )
    cache = checksums.get("digest_cache")
    if cache:
        console.print(
            f"  digest cache: {cache['reused']:,} of {cache['segments']:,} segments reused, "
            f"{cache['rows_digested']:,} rows digested"
            + (f", {cache['rejected']:,} entries rejected" if cache["rejected"] else "")
            + (f", {cache['written']:,} written" if cache["written"] else "")
            if cache["enabled"]
            else f"  digest cache off: {cache['rows_digested']:,} rows digested"
        )
    for reason in report.reasons:
        console.print(f"  - {reason}", markup=False)
    for kind in ("missing_in_new", "missing_in_legacy", "duplicate_keys", "field_mismatches"):
        finding = getattr(report, kind)
        if finding.total:
            console.print(f"  {kind} ({finding.total:,}; first {len(finding.sample)}):")
            for item in finding.sample:
                console.print(f"    {item}", markup=False)
