"""``kimera db``: inspect, prepare and upgrade database files, back them up and restore them;
serve one to other processes (``serve``) and ask a server how it is (``status``)."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
from pathlib import Path

import click
import duckdb

from kimera_core.cli.backup import backup, restore
from kimera_core.cli.options import DB_OPTION, JSON_OPTION, DatabaseAddress, console, emit_json
from kimera_core.db import connect
from kimera_core.dbserver.protocol import TokenError, read_token, token_file, write_token_file
from kimera_core.dbserver.server import DatabaseServer
from kimera_core.errors import KimeraError
from kimera_core.legacy import create_legacy_schema
from kimera_core.upgrade import UpgradeReport, inspect_file, upgrade_file


@click.group()
def db() -> None:
    """Inspect and prepare database files."""


@db.command("info")
@DB_OPTION
@JSON_OPTION
def db_info(db_path: Path, as_json: bool) -> None:
    """Which DuckDB wrote the file, and its tables with row counts when it opens.

    Reads the header without opening the database; a DuckDB file that does not open is
    described (why, and the command that repairs it), not refused.
    """
    info = inspect_file(db_path)
    if as_json:
        emit_json(info.to_dict())
        return
    console.print(f"[bold]{db_path}[/bold]: written by {info.written_by}")
    if info.header.metadata_from_duckdb_09:
        console.print("  last checkpoint: DuckDB 0.9 (its catalog and index layout)")
    if info.wal_bytes is not None:
        console.print(f"  write-ahead log: {info.wal_bytes:,} bytes pending in {db_path}.wal")
    if not info.opens:
        console.print(f"  [red]does not open[/red]: {info.problem}", soft_wrap=True)
        if info.next_command:
            console.print(f"  next: {info.next_command}", soft_wrap=True)
        return
    for name, count in (info.tables or {}).items():
        console.print(f"  {name:<16} {count:>12,}")
    for name in info.missing_legacy_tables or []:
        console.print(f"  {name:<16} [red]missing[/red]")


@db.command("init")
@DB_OPTION
def db_init(db_path: Path) -> None:
    """Create the legacy Kimera tables in a new or existing file (idempotent)."""
    with connect(db_path, create=True) as con:
        create_legacy_schema(con)
    console.print(f"{db_path}: legacy layout ready")


@db.command("upgrade")
@DB_OPTION
@click.option(
    "--replace",
    is_flag=True,
    help="After the checks pass, keep the original as NAME.pre-upgrade.duckdb and put the "
    "upgraded copy in its place.",
)
@JSON_OPTION
def db_upgrade(db_path: Path, replace: bool, as_json: bool) -> None:
    """Rewrite a copy of a file this DuckDB refuses with DuckDB 1.4, and check it.

    The copy (NAME.upgraded.duckdb) must hold every table with the same row count and
    checksum as the original read by DuckDB 1.4, and open with this DuckDB. The original
    stays byte-identical unless --replace is given (docs/files.md).
    """
    report = upgrade_file(db_path, replace=replace)
    if as_json:
        emit_json(report.to_dict())
        return
    _print_upgrade(report)


def _print_upgrade(report: UpgradeReport) -> None:
    path = report.path
    if not report.needed:
        console.print(
            f"{path}: opens with DuckDB {report.opened_with} already; nothing to upgrade",
            soft_wrap=True,
        )
        return
    console.print(
        f"[bold]{path}[/bold] (written by {report.written_by}) rewritten by DuckDB "
        f"{report.upgraded_with}, checked with DuckDB {report.opened_with} "
        f"in {report.seconds:.1f} s",
        soft_wrap=True,
    )
    for name, digest in report.tables.items():
        console.print(f"  {name:<22} {digest['rows']:>12,} rows  checksum {digest['checksum']}")
    console.print(f"  original sha256 {report.original_sha256} (unchanged)")
    if report.replaced:
        console.print(f"Replaced: {path} is the upgraded file; the original is {report.backup}")
        return
    console.print(f"Upgraded copy: {report.copy} (the original is untouched)", soft_wrap=True)
    console.print(f"next: kimera db upgrade --db {path} --replace", soft_wrap=True)


@db.command("serve")
@DB_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=5544,
    show_default=True,
    help="TCP port (0: any free port; the first line printed names it).",
)
@click.option(
    "--checkpoint-threshold",
    default=None,
    help="WAL size at which DuckDB checkpoints by itself (e.g. 256MB; DuckDB's default 16MB). "
    "A checkpoint holds every client's commit while it runs; a larger WAL takes longer to "
    "replay after a crash.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="DuckDB worker threads for the whole server (default: one per core). Fewer than "
    "the cores leaves a core to the live clients while a migration or verification runs.",
)
@click.option(
    "--trace",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Diagnostics: append one line per request to this file (client pid, operation, "
    "SQL head, when it was received, ran and answered, its CPU).",
)
def db_serve(
    db_path: Path,
    host: str,
    port: int,
    checkpoint_threshold: str | None,
    threads: int | None,
    trace: Path | None,
) -> None:
    """Own the database file and serve it to other processes until SIGTERM or Ctrl-C.

    Prints the server's address (kimera://HOST:PORT) as the first line on stdout: pass it
    as --db to any kimera command, or as KIMERA_DB to Dagster. Clients authenticate with the
    token in KIMERA_DB_TOKEN or the token file (KIMERA_DB_TOKEN_FILE, default
    ~/.config/kimera/db-token, mode 0600); with neither, a new token is written to that
    file. Each client gets its own transaction; a client that goes away mid-transaction is
    rolled back. Exits 3 when DuckDB invalidates the database (restart it: the WAL is
    replayed). docs/deployment.md.
    """
    if isinstance(db_path, DatabaseAddress):
        raise click.ClickException(f"{db_path}: serve takes a database file, not an address")
    if not db_path.exists():
        raise click.ClickException(
            f"{db_path}: no such file (create it with `kimera db init --db {db_path}`)"
        )
    stopping = threading.Event()
    server: DatabaseServer | None = None

    def stop(signum: int, frame: object) -> None:
        if server is not None and not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.stop, daemon=True).start()

    try:
        token = read_token()
        if token is None:
            token = secrets.token_urlsafe(32)
            write_token_file(token_file(), token)
            click.echo(f"kimera: new token written to {token_file()} (mode 0600)", err=True)
        server = DatabaseServer(
            db_path,
            token,
            host=host,
            port=port,
            checkpoint_threshold=checkpoint_threshold,
            threads=threads,
            log=lambda line: click.echo(line, err=True),
            trace=trace,
        )
        address = server.start()
    except (KimeraError, OSError, duckdb.Error) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None
    # installed before the address is printed: a client that reads it may stop us at once
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(str(address))
    sys.stdout.flush()
    click.echo(f"serving {db_path} at {address} (pid {os.getpid()})", err=True)
    server.serve_forever()
    server.wait_stopped(60)  # stop() runs in its own thread: let it close the file first
    if server.fatal_error:
        click.echo(
            f"kimera: DuckDB invalidated {db_path} ({server.fatal_error}); start the server "
            "again: it replays the write-ahead log (every acknowledged COMMIT)",
            err=True,
        )
    else:
        click.echo("stopped: clients closed, file checkpointed", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # The file is closed; skip the interpreter's teardown, where DuckDB's threads were seen
    # to abort the process ("terminate called without an active exception") after a stop.
    os._exit(3 if server.fatal_error else 0)


@db.command("status")
@DB_OPTION
@JSON_OPTION
def db_status(db_path: Path, as_json: bool) -> None:
    """A database server's health: its file, pid, DuckDB release, uptime and clients."""
    if not isinstance(db_path, DatabaseAddress):
        raise click.ClickException(
            f"{db_path}: a file, not a server address; `kimera db info` describes a file"
        )
    try:
        with connect(db_path) as con:
            status = con.status()  # type: ignore[attr-defined]
    except (KimeraError, TokenError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_json(status)
        return
    console.print(
        f"[bold]{db_path}[/bold]: {'healthy' if status['healthy'] else 'stopping'}, serving "
        f"{status['database']} (pid {status['pid']}, DuckDB {status['duckdb']}, up "
        f"{status['uptime_seconds']:,.0f} s)",
        soft_wrap=True,
    )
    console.print(f"  clients: {status['clients']}")
    for client in status["client_list"]:
        console.print(f"    {client['peer']}  pid {client['pid']}  {client['program']}")


db.add_command(backup)
db.add_command(restore)
