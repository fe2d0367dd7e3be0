"""The ``kimera`` command line: the root group, its command groups and the error boundary."""

from __future__ import annotations

import sys

import click
import duckdb

from kimera_core import __version__
from kimera_core.cli.data import demo_data, summary
from kimera_core.cli.database import db
from kimera_core.cli.metrics import lattice_workload, metrics_group, workload
from kimera_core.cli.migrate import migrate_cmd
from kimera_core.cli.repair import repair_cmd
from kimera_core.cli.serve import search_index, serve
from kimera_core.cli.verify import verify
from kimera_core.errors import KimeraError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kimera")
def cli() -> None:
    """Kimera SWM migration control plane: legacy Geoid/Scar tables into the Identity table.

    Every command takes --db PATH (a DuckDB file) and refuses, with a one-line reason and
    without touching it, a file it cannot open.
    """


for command in (
    demo_data,
    summary,
    db,
    verify,
    metrics_group,
    workload,
    serve,
    search_index,
    lattice_workload,
):
    cli.add_command(command)
cli.add_command(migrate_cmd, name="migrate")
cli.add_command(repair_cmd, name="repair")


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
