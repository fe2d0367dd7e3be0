"""``kimera metrics serve``, ``workload`` and ``lattice-workload``: the write path's /metrics.

``metrics serve`` exposes ``kimera_core.metrics.REGISTRY`` over HTTP for an application that
embeds the storage API in this process; ``workload`` (``kimera_core.workload``) and
``lattice-workload`` (``kimera_core.lattice``) drive the storage API while serving the same
endpoint, so dashboards and alerts can be proven against real numbers. Each command parses
its options, opens the storage, calls one core function and prints its report as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import click

from kimera_core import metrics
from kimera_core.cli.options import DB_OPTION
from kimera_core.errors import KimeraError
from kimera_core.lattice import run_lattice_workload
from kimera_core.rollout import STAGES
from kimera_core.storage import Storage
from kimera_core.workload import run_workload, stop_on_signals

HOST_OPTION = click.option(
    "--host",
    default=metrics.DEFAULT_METRICS_HOST,
    show_default=True,
    help="Address the /metrics endpoint listens on (loopback unless you mean otherwise).",
)
PORT_OPTION = click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=metrics.DEFAULT_METRICS_PORT,
    show_default=True,
    help="Port of the /metrics endpoint.",
)
LOG_OPTION = click.option(
    "--json-logs/--no-json-logs",
    default=False,
    show_default=True,
    help="Write the kimera.entropy and kimera.storage JSON lines to stderr.",
)
LINGER_OPTION = click.option(
    "--linger",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Keep serving /metrics this many seconds after the workload ends.",
)


@click.group("metrics")
def metrics_group() -> None:
    """The application's Prometheus /metrics endpoint."""


@metrics_group.command("serve")
@DB_OPTION
@HOST_OPTION
@PORT_OPTION
@LOG_OPTION
def serve(db_path: Path, host: str, port: int, json_logs: bool) -> None:
    """Serve /metrics for the storage API over the database at --db until interrupted.

    The storage is opened once (so the live rollout stage and every series are exported)
    and closed again: DuckDB allows one writer process per file.
    """
    if json_logs:
        metrics.enable_json_logs(sys.stderr)
    with Storage.open(str(db_path)):
        pass
    server, _thread = metrics.serve(host, port)
    stop = stop_on_signals()
    click.echo(f"serving http://{host}:{server.server_port}/metrics", err=True)
    stop.wait()
    server.shutdown()


@click.command("workload")
@DB_OPTION
@click.option(
    "--seconds",
    type=click.FloatRange(min=0),
    default=60,
    show_default=True,
    help="How long to run (0: until interrupted).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.1),
    default=50,
    show_default=True,
    help="Operations per second.",
)
@click.option(
    "--stage",
    type=click.Choice(STAGES),
    default=None,
    help="Route as this rollout stage (not recorded); default: the database's live stage.",
)
@click.option(
    "--failure-share",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of stores sent with an invalid timestamp, which the storage refuses.",
)
@click.option(
    "--shadow-sample",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Share of reads shadowed on the new store in the dual-write stages.",
)
@click.option("--seed", type=int, default=7, show_default=True)
@LINGER_OPTION
@HOST_OPTION
@PORT_OPTION
@LOG_OPTION
def workload(
    db_path: Path,
    seconds: float,
    rate: float,
    stage: str | None,
    failure_share: float,
    shadow_sample: float,
    seed: int,
    linger: float,
    host: str,
    port: int,
    json_logs: bool,
) -> None:
    """Write and read identities through the storage API while serving /metrics."""
    if json_logs:
        metrics.enable_json_logs(sys.stderr)
    stop = stop_on_signals()
    with Storage.open(str(db_path), stage=stage, shadow_sample=shadow_sample) as storage:
        server, _thread = metrics.serve(host, port)
        click.echo(
            f"serving http://{host}:{server.server_port}/metrics; stage {storage.stage}", err=True
        )
        report = run_workload(
            storage, seconds=seconds, rate=rate, seed=seed, failure_share=failure_share, stop=stop
        )
    click.echo(json.dumps(report.to_dict()))
    if linger:
        stop.wait(linger)
    server.shutdown()


@click.command("lattice-workload")
@DB_OPTION
@click.option("--pairs", type=click.IntRange(1, 1_000_000), default=200, show_default=True)
@click.option(
    "--repeat-share",
    type=click.FloatRange(0, 1),
    default=0.3,
    show_default=True,
    help="Share of steps that also re-resolve an earlier pair (a repeat cls_event).",
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve /metrics on 127.0.0.1 at this port while the workload runs.",
)
@LINGER_OPTION
def lattice_workload(
    db_path: Path,
    pairs: int,
    repeat_share: float,
    seed: int,
    metrics_port: int | None,
    linger: float,
) -> None:
    """Resolve scar-linked geoid pairs on the CLS lattice through the storage API.

    Writes go where the rollout stage says (dual-write in the dual-write stages, with
    dual_write_log rows and write-path metrics); run `kimera verify` afterwards.
    """
    server = None
    try:
        with Storage.open(str(db_path)) as storage:
            if metrics_port is not None:
                server, _thread = metrics.serve("127.0.0.1", metrics_port)
                click.echo(
                    f"serving http://127.0.0.1:{server.server_port}/metrics; stage {storage.stage}",
                    err=True,
                )
            report = run_lattice_workload(
                storage, pairs=pairs, repeat_share=repeat_share, seed=seed
            )
    except KimeraError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(report.to_dict()))
    if server is not None:
        if linger:
            threading.Event().wait(linger)
        server.shutdown()
    if report.failures:
        sys.exit(1)
