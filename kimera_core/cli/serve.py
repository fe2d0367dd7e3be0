"""``kimera serve`` (the HTTP query API), ``kimera search-index`` and ``kimera lattice-workload``."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import click

from kimera_core.cli.options import DB_OPTION
from kimera_core.db import connect
from kimera_core.errors import KimeraError


def _build_index_if_needed(db_path: Path, force: bool) -> dict:
    from kimera_core import query, textsearch

    if not force:  # a read-only look first: other readers may hold the file
        with connect(db_path, read_only=True) as con:
            status = textsearch.index_status(con, query.read_source(con))
        if status.exists and not status.stale:
            return {"built": False, **status.to_dict()}
    with connect(db_path) as con:
        status = textsearch.build_text_index(con, query.read_source(con))
    return {"built": True, **status.to_dict()}


def _embed(db_path: Path, most: int) -> dict:
    """Embed up to ``most`` geoids without a vector, then rebuild the IVF index over all."""
    from kimera_core import query, semantic

    try:
        encoder = semantic.Encoder()
    except semantic.SemanticUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    with connect(db_path) as con:
        source = query.read_source(con)
        done = 0
        while done < most:
            n = semantic.embed_geoids(con, encoder, source=source, limit=min(512, most - done))
            if n == 0:
                break
            done += n
        vectors = con.execute("SELECT count(*) FROM kimera_embeddings").fetchone()[0]
        index = semantic.build_ivf_index(con) if vectors else None
    return {"embedded": done, "vectors": vectors, "ivf_index": index}


@click.command("search-index")
@DB_OPTION
@click.option("--if-stale", is_flag=True, help="Rebuild only when missing or stale.")
@click.option(
    "--embed",
    type=click.IntRange(min=0),
    default=0,
    help="Also embed up to N geoids that have no vector yet (all-MiniLM-L6-v2, the "
    "[semantic] extra; ~20 texts a second per core) and rebuild the semantic IVF index.",
)
def search_index(db_path: Path, if_stale: bool, embed: int) -> None:
    """(Re)build the BM25 text index from the store the rollout stage reads."""
    try:
        result = _build_index_if_needed(db_path, force=not if_stale)
        if embed:
            result["semantic"] = _embed(db_path, embed)
    except KimeraError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result))


@click.command("serve")
@DB_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--no-index",
    is_flag=True,
    help="Do not (re)build a missing or stale text index before serving.",
)
@click.option("--log-level", default="warning", show_default=True)
def serve(db_path: Path, host: str, port: int, no_index: bool, log_level: str) -> None:
    """Serve the query API (/identities, /search, /search/semantic, /healthz, /metrics).

    The file is opened read-only: stop writers (migrations, workloads) first. Before that,
    the text index is rebuilt if it is missing or stale (which needs a moment of write
    access), unless --no-index. At start the entropy order and the text index are loaded
    into memory (seconds at a million rows; the file cannot change while it is open).
    """
    import uvicorn

    from kimera_core.api import create_app

    if not db_path.exists():
        raise click.ClickException(f"{db_path}: no such file")
    if not no_index:
        try:
            result = _build_index_if_needed(db_path, force=False)
        except KimeraError as exc:
            raise click.ClickException(str(exc)) from exc
        if result["built"]:
            click.echo(f"text index built: {result['documents']:,} documents", err=True)
    try:
        with connect(db_path, read_only=True):
            pass  # fail now, with the one-line reason, rather than in the first request
    except KimeraError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"serving http://{host}:{port} (OpenAPI: /openapi.json, docs: /docs)", err=True)
    uvicorn.run(create_app(db_path), host=host, port=port, log_level=log_level)


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
@click.option(
    "--linger",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Keep serving /metrics this many seconds after the workload ends.",
)
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
    from kimera_core import metrics
    from kimera_core.lattice import run_lattice_workload
    from kimera_core.storage import Storage

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
