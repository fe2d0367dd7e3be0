"""``kimera repair``: re-sync the keys a verification found from the authoritative store, or undo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kimera_core.cli.options import (
    DB_OPTION,
    JSON_OPTION,
    WAIT_OPTION,
    console,
    emit_json,
    open_db,
)
from kimera_core.repair import (
    RepairReport,
    keys_from_verification,
    repair,
    undo_repair,
)


@click.command(name="repair")
@DB_OPTION
@JSON_OPTION
@click.option(
    "--keys",
    "keys_text",
    multiple=True,
    metavar="KEY[,KEY...]",
    help="Repair these keys (repeat or separate by commas).",
)
@click.option(
    "--from-verification",
    "verification",
    type=click.IntRange(min=1),
    default=None,
    help="Repair the keys recorded verification N found (1 = the first; default: the latest).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be done; write nothing (read-only).")
@click.option("--undo", "undo_id", metavar="REPAIR_ID", help="Put back what a repair changed.")
@click.option("--actor", default="cli", show_default=True, help="Who repairs (journaled).")
@WAIT_OPTION
def repair_cmd(
    db_path: Path,
    as_json: bool,
    keys_text: tuple[str, ...],
    verification: int | None,
    dry_run: bool,
    undo_id: str | None,
    actor: str,
    wait_seconds: float,
) -> None:
    """Re-sync keys from the store reads come from (legacy before read-new, identities after).

    Each key is written again through the dual-write path (or deleted from both stores when
    the authoritative one lacks it), journaled, then an incremental verification runs.
    Exit 1 when a key was refused or still differs.
    """
    if undo_id:
        with open_db(db_path, wait=wait_seconds) as con:
            undone = undo_repair(con, undo_id)
        if as_json:
            emit_json({"repair_id": undone.repair_id, "restored": undone.restored})
        else:
            rows = ", ".join(f"{t} {n:,}" for t, n in undone.restored.items())
            console.print(
                f"undid {undone.repair_id}: {len(undone.keys):,} keys, rows put back: {rows}"
            )
        return
    if keys_text and verification is not None:
        raise click.UsageError("give --keys or --from-verification, not both")
    keys = [k.strip() for text in keys_text for k in text.split(",") if k.strip()]
    with open_db(db_path, wait=wait_seconds, read_only=dry_run) as con:
        source = "keys given"
        if not keys:
            keys, source = keys_from_verification(con, verification)
        report = repair(con, keys, actor=actor, source=source, dry_run=dry_run)
    if as_json:
        emit_json(report.to_dict())
    else:
        _print(report)
    if not report.dry_run and not report.ok:
        sys.exit(1)


def _print(report: RepairReport) -> None:
    style = "green" if report.ok else "red"
    console.print(f"[bold {style}]{report.summary()}[/bold {style}]", highlight=False)
    console.print(f"  from {report.source}; repair id {report.repair_id}", markup=False)
    for action in report.actions:
        console.print(f"  {action.key}: {action.action} ({action.reason})", markup=False)
    for key, reason in report.refused.items():
        console.print(f"  refused {key}: {reason}", markup=False)
    if not report.dry_run:
        console.print(f"  undo: kimera repair --db PATH --undo {report.repair_id}", markup=False)
