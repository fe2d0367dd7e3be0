"""``kimera metrics serve`` and ``kimera workload``: the write path's /metrics endpoint.

``metrics serve`` exposes ``kimera_core.metrics.REGISTRY`` over HTTP for an application that
embeds the storage API in this process; ``workload`` drives the storage API (stores, fetches,
searches, lists, deletes, a share of writes that fail) at a steady rate while serving the
same endpoint, so dashboards and alerts can be proven against real numbers.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from kimera_core import metrics
from kimera_core.cli.options import DB_OPTION
from kimera_core.identity import Identity, geoid_id
from kimera_core.rollout import STAGES

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

LANGS = ("en", "fr", "ar", "es", "de", "ja")
WORDS = ("entropy", "lattice", "scar", "geoid", "résonance", "تناقض", "echo", "矛盾", "tau")


@dataclass
class WorkloadReport:
    """What a workload did, by operation and outcome."""

    seconds: float = 0.0
    operations: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, operation: str, outcome: str) -> None:
        by_outcome = self.operations.setdefault(operation, {"success": 0, "failure": 0})
        by_outcome[outcome] += 1


def _geoid(rng: random.Random, now: float) -> Identity:
    lang = rng.choice(LANGS)
    raw = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + f" {rng.random():.9f}"
    # term count 1..8 with random intensities spreads entropy over 0..3 bits
    terms = [
        {"symbol": rng.choice(WORDS), "role": "x", "intensity": round(rng.uniform(0.05, 1), 3)}
        for _ in range(rng.randint(1, 8))
    ]
    age = rng.uniform(0, 30 * 86400)
    return Identity(
        id=geoid_id(raw, lang),
        identity_type="geoid",
        raw=raw,
        echo=raw.strip(),
        lang_axis=lang,
        tags=rng.sample(WORDS, rng.randint(0, 3)),
        weight=round(rng.uniform(0.1, 2), 3),
        meta={"terms": terms},
        created_at=now - age,
        updated_at=now - age / 2,
    )


def _scar(rng: random.Random, ids: list[str], now: float) -> Identity:
    related = rng.sample(ids, min(len(ids), rng.choice((2, 2, 2, 3, 4))))
    return Identity(
        id=f"scar_{rng.getrandbits(64):016x}",
        identity_type="scar",
        weight=round(rng.uniform(0.1, 1.5), 3),
        related_ids=related,
        meta={"relationship_type": rng.choice(("contradicts", "supports"))},
        created_at=now,
        updated_at=now,
    )


def run_workload(
    storage: Any,
    *,
    seconds: float,
    rate: float,
    seed: int = 7,
    failure_share: float = 0.0,
    stop: threading.Event | None = None,
) -> WorkloadReport:
    """Drive ``storage`` at ``rate`` operations per second for ``seconds`` (0: until stopped).

    Each tick does one operation: mostly geoid and scar stores and fetches, then searches,
    lists, entropy range queries and deletes. ``failure_share`` of stores carry an invalid
    timestamp, which the storage refuses (a real, counted write failure).
    """
    from kimera_core.storage import StorageError

    rng = random.Random(seed)
    stop = stop or threading.Event()
    report = WorkloadReport()
    ids: list[str] = []
    started = time.monotonic()
    interval = 1.0 / rate
    tick = 0
    while not stop.is_set():
        elapsed = time.monotonic() - started
        if seconds and elapsed >= seconds:
            break
        now = time.time()
        roll = rng.random()
        try:
            if len(ids) < 4 or roll < 0.35:
                item = _geoid(rng, now)
                if rng.random() < failure_share:
                    operation = "store_invalid"
                    item = Identity(**{**_fields(item), "created_at": float("nan")})
                else:
                    operation = "store"
                storage.store(item)
                ids.append(item.id)
            elif roll < 0.5:
                operation = "store"
                item = _scar(rng, [i for i in ids if not i.startswith("scar_")] or ids, now)
                storage.store(item)
                ids.append(item.id)
            elif roll < 0.75:
                operation = "fetch"
                storage.fetch(rng.choice(ids))
            elif roll < 0.85:
                operation = "search"
                storage.search(rng.choice(WORDS), limit=20)
            elif roll < 0.9:
                operation = "list"
                storage.list_identities(rng.choice((None, "geoid", "scar")), limit=20)
            elif roll < 0.95:
                operation = "find_by_entropy"
                low = rng.uniform(0, 2)
                storage.find_by_entropy(low, low + 0.5, limit=20)
            else:
                operation = "delete"
                victim = ids.pop(rng.randrange(len(ids)))
                storage.delete(victim)
            report.count(operation, "success")
        except StorageError:
            report.count(operation, "failure")
        tick += 1
        # steady rate: sleep to the next tick's slot, not a fixed pause after each operation
        delay = started + tick * interval - time.monotonic()
        if delay > 0:
            stop.wait(delay)
    report.seconds = time.monotonic() - started
    return report


def _fields(identity: Identity) -> dict[str, Any]:
    return {name: getattr(identity, name) for name in Identity.__dataclass_fields__}


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


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
    from kimera_core.storage import Storage

    if json_logs:
        metrics.enable_json_logs(sys.stderr)
    with Storage.open(str(db_path)):
        pass
    server, _thread = metrics.serve(host, port)
    stop = threading.Event()
    _stop_on_signals(stop)
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
@click.option(
    "--linger",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Keep serving /metrics this many seconds after the workload ends.",
)
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
    from kimera_core.storage import Storage

    if json_logs:
        metrics.enable_json_logs(sys.stderr)
    stop = threading.Event()
    _stop_on_signals(stop)
    with Storage.open(str(db_path), stage=stage, shadow_sample=shadow_sample) as storage:
        server, _thread = metrics.serve(host, port)
        click.echo(
            f"serving http://{host}:{server.server_port}/metrics; stage {storage.stage}", err=True
        )
        report = run_workload(
            storage, seconds=seconds, rate=rate, seed=seed, failure_share=failure_share, stop=stop
        )
    click.echo(json.dumps({"seconds": round(report.seconds, 3), "operations": report.operations}))
    if linger:
        stop.wait(linger)
    server.shutdown()
