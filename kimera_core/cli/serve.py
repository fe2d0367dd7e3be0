"""``kimera serve`` (the HTTP query API) and ``kimera search-index`` (its search indexes).

Which index to build and when is decided in the core (``query.ensure_text_index``: build
the BM25 index of the store the rollout stage reads when it is missing or stale, looking
read-only first; ``query.embed_read_store`` for the semantic vectors); these commands parse,
call it and print.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import uvicorn

from kimera_core import query
from kimera_core.api import create_app
from kimera_core.cli.options import DB_OPTION
from kimera_core.db import connect
from kimera_core.errors import KimeraError
from kimera_core.semantic import SemanticUnavailable


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
        result = query.ensure_text_index(db_path, force=not if_stale).to_dict()
        if embed:
            result["semantic"] = query.embed_read_store(db_path, most=embed).to_dict()
    except (KimeraError, SemanticUnavailable) as exc:
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
    if not db_path.exists():
        raise click.ClickException(f"{db_path}: no such file")
    try:
        if not no_index:
            index = query.ensure_text_index(db_path)
            if index.built:
                click.echo(f"text index built: {index.status.documents:,} documents", err=True)
        with connect(db_path, read_only=True):
            pass  # fail now, with the one-line reason, rather than in the first request
    except KimeraError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"serving http://{host}:{port} (OpenAPI: /openapi.json, docs: /docs)", err=True)
    uvicorn.run(create_app(db_path), host=host, port=port, log_level=log_level)
