"""The HTTP query API (FastAPI): identities by id, entropy, text and relation; health; metrics.

``create_app(db_path)`` opens the DuckDB file once, read-only, and serves each request on its
own cursor (DuckDB cursors of one database are safe to use from several threads). DuckDB
lets several processes open a file read-only, but none of them while a process holds it
read-write, and no writer while readers hold it: start the API after migrations and
workloads, or give it the connection of a process that writes (``create_app(con=...)``).

Every parameter is bounded and validated; errors are JSON objects ``{"error", "message"}``
(with ``details`` for invalid parameters); no request text becomes SQL (kimera_core.query
binds every value). A number that is not finite (``nan``, ``inf``, ``1e999``) or a text with a
lone surrogate, in a parameter or inside a cursor, is a 400 ``bad_request`` naming it;
cursors carry the OpenAPI format ``CURSOR_FORMAT`` so that fuzzers can be given a strategy
for them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from time import perf_counter
from typing import Annotated, Any

import duckdb
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from kimera_core import __version__, metrics, query, semantic, textsearch
from kimera_core.db import open_database
from kimera_core.rollout import get_stage, routing

LOG = logging.getLogger("kimera.api")
MAX_ID_CHARS = 128
MAX_FILTER_CHARS = 64
# The OpenAPI string format of page cursors (base64url JSON made by query.encode_cursor).
CURSOR_FORMAT = "kimera-cursor"
# Validation errors that are a malformed value, not a missing or out-of-range one: a 400.
BAD_REQUEST_ERRORS = frozenset({"finite_number"})

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "A parameter is out of range or malformed (JSON error)."},
    404: {"description": "No identity with this id (JSON error)."},
    422: {"description": "A parameter failed validation (JSON error with details)."},
    503: {
        "description": "The text index, the embeddings or the [semantic] extra are missing "
        "(JSON error)."
    },
}

Limit = Annotated[int, Query(ge=1, le=query.MAX_LIMIT, description="Page size (1 to 500).")]


def _cursor_format(schema: dict[str, Any]) -> None:
    """Mark the string variant of a cursor parameter's schema with ``CURSOR_FORMAT``."""
    for variant in schema.get("anyOf", [schema]):
        if variant.get("type") == "string":
            variant["format"] = CURSOR_FORMAT


Cursor = Annotated[
    str | None,
    Query(
        alias="cursor",
        max_length=512,
        description="The next_cursor of the previous page.",
        json_schema_extra=_cursor_format,
    ),
]
Entropy = Annotated[
    float | None,
    Query(ge=0, le=1e6, allow_inf_nan=False, description="Entropy bound (bits), finite."),
]
TextQuery = Annotated[
    str,
    Query(
        min_length=1,
        max_length=query.MAX_QUERY_CHARS,
        description="A text (any language; accents and case are folded for /search).",
    ),
]
IdentityId = Annotated[
    str, PathParam(min_length=1, max_length=MAX_ID_CHARS, description="Identity id.")
]


class ApiError(Exception):
    """An error answered as JSON with a status, a short code and a message."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


def _answer(content: dict[str, Any]) -> JSONResponse:
    """A 200 answer of plain JSON values (``Page.to_dict`` / ``Hit.to_dict``), encoded once.

    Returning the response skips FastAPI's ``jsonable_encoder``, which walks every value of
    an already plain answer again: 2.6 ms of CPU for a 50-identity page, as much as reading
    the page's rows. The bytes are the same (Starlette's ``JSONResponse`` encodes both ways).
    """
    return JSONResponse(content)


def _error(status: int, error: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, **extra}, status_code=status)


def create_app(
    db_path: str | Path | None = None, *, con: duckdb.DuckDBPyConnection | None = None
) -> FastAPI:
    """The API over the DuckDB file at ``db_path`` (read-only) or over an open connection."""
    if (db_path is None) == (con is None):
        raise ValueError("give exactly one of db_path and con")
    state: dict[str, Any] = {"con": con, "owned": con is None, "snapshot": None, "encoder": None}
    lock = threading.Lock()
    encoder_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        if state["con"] is None:
            state["con"] = open_database(str(db_path), read_only=True)
        if query.is_read_only(state["con"]):  # nothing can change it: index it in memory
            state["snapshot"] = query.ReadSnapshot(state["con"])
            state["snapshot"].warm()
        try:
            yield
        finally:
            state["snapshot"] = None
            if state["owned"] and state["con"] is not None:
                state["con"].close()
                state["con"] = None

    app = FastAPI(
        title="Kimera identity query API",
        version=__version__,
        description=(
            "Find Kimera identities (geoids and scars) by id, entropy range, text and "
            "relation. Reads follow the rollout stage: the legacy tables before read-new, "
            "the identities table from read-new on."
        ),
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )

    @contextmanager
    def cursor() -> Iterator[duckdb.DuckDBPyConnection]:
        base = state["con"]
        if base is None:
            raise ApiError(503, "unavailable", "the database is not open")
        with lock:  # creating a cursor touches the shared connection
            cur = base.cursor()
        try:
            yield cur
        finally:
            cur.close()

    def snapshot() -> query.ReadSnapshot | None:
        return state["snapshot"]

    def source() -> str | None:
        snap = state["snapshot"]
        return None if snap is None else snap.source

    def timed(operation: str, cur: duckdb.DuckDBPyConnection, call: Callable[[], Any]) -> Any:
        snap = state["snapshot"]
        write_mode = routing(snap.stage if snap is not None else get_stage(cur)).write
        t0 = perf_counter()
        try:
            return call()
        except Exception:
            metrics.IDENTITY_OPERATION_ERRORS.labels(operation, metrics.ANY_TYPE, write_mode).inc()
            raise
        finally:
            metrics.IDENTITY_OPERATION_SECONDS.labels(
                operation, metrics.ANY_TYPE, write_mode
            ).observe(perf_counter() - t0)

    # --- errors as JSON ------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.message)

    @app.exception_handler(query.QueryError)
    async def query_error(request: Request, exc: query.QueryError) -> JSONResponse:
        return _error(400, "bad_request", str(exc))

    @app.exception_handler(textsearch.TextIndexMissing)
    async def no_index(request: Request, exc: textsearch.TextIndexMissing) -> JSONResponse:
        return _error(503, "text_index_missing", str(exc))

    @app.exception_handler(semantic.SemanticUnavailable)
    async def no_model(request: Request, exc: semantic.SemanticUnavailable) -> JSONResponse:
        return _error(503, "semantic_unavailable", str(exc))

    @app.exception_handler(semantic.EmbeddingsMissing)
    async def no_vectors(request: Request, exc: semantic.EmbeddingsMissing) -> JSONResponse:
        return _error(503, "embeddings_missing", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"parameter": ".".join(str(p) for p in e.get("loc", ())[1:]), "problem": e["msg"]}
            for e in exc.errors()
        ]
        message = "; ".join(f"{d['parameter']}: {d['problem']}" for d in details)
        if any(e.get("type") in BAD_REQUEST_ERRORS for e in exc.errors()):
            return _error(400, "bad_request", message, details=details)
        return _error(422, "invalid_parameter", message or "invalid request", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        LOG.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal_error", "the server failed to answer; see its log")

    # --- endpoints ---------------------------------------------------------------------
    @app.get("/healthz", summary="Liveness and what the API reads")
    def healthz() -> dict[str, Any]:
        with cursor() as cur:
            stage = get_stage(cur)
            source = query.read_source(cur)
            status = textsearch.index_status(cur, source)
        return {"status": "ok", "stage": stage, "source": source, "text_index": status.to_dict()}

    @app.get(
        "/identities/{identity_id}",
        summary="One identity by id, with its entropy",
        response_model=dict[str, Any],
    )
    def get_identity(identity_id: IdentityId) -> JSONResponse:
        with cursor() as cur:
            hit = timed("fetch", cur, lambda: query.get_identity(cur, identity_id, source=source()))
        if hit is None:
            raise ApiError(404, "not_found", f"no identity with id {identity_id!r}")
        return _answer(hit.to_dict())

    @app.get(
        "/identities",
        summary="Identities by entropy range, highest entropy first",
        response_model=dict[str, Any],
    )
    def find_by_entropy(
        min_entropy: Entropy = None,
        max_entropy: Entropy = None,
        identity_type: Annotated[
            str | None, Query(pattern="^(geoid|scar)$", description="geoid or scar.")
        ] = None,
        lang: Annotated[str | None, Query(max_length=MAX_FILTER_CHARS)] = None,
        tag: Annotated[str | None, Query(max_length=MAX_FILTER_CHARS)] = None,
        limit: Limit = query.DEFAULT_LIMIT,
        cursor_: Cursor = None,
    ) -> JSONResponse:
        with cursor() as cur:
            page = timed(
                "find_by_entropy",
                cur,
                lambda: query.find_identities_by_entropy(
                    cur,
                    min_entropy,
                    max_entropy,
                    identity_type=identity_type,
                    lang=lang,
                    tag=tag,
                    limit=limit,
                    cursor=cursor_,
                    snapshot=snapshot(),
                ),
            )
        return _answer(page.to_dict())

    @app.get(
        "/identities/{identity_id}/related",
        summary="The scars that touch an identity",
        response_model=dict[str, Any],
    )
    def related(
        identity_id: IdentityId, limit: Limit = query.DEFAULT_LIMIT, cursor_: Cursor = None
    ) -> JSONResponse:
        with cursor() as cur:
            if query.get_identity(cur, identity_id, source=source()) is None:
                raise ApiError(404, "not_found", f"no identity with id {identity_id!r}")
            page = timed(
                "list",
                cur,
                lambda: query.find_related(
                    cur, identity_id, limit=limit, cursor=cursor_, source=source()
                ),
            )
        return _answer(page.to_dict())

    @app.get(
        "/search",
        summary="Geoids ranked by BM25 relevance to a text",
        response_model=dict[str, Any],
    )
    def search(
        q: TextQuery,
        lang: Annotated[str | None, Query(max_length=MAX_FILTER_CHARS)] = None,
        limit: Annotated[int, Query(ge=1, le=100, description="Page size (1 to 100).")] = 20,
        offset: Annotated[int, Query(ge=0, le=query.MAX_OFFSET)] = 0,
    ) -> JSONResponse:
        return searched(
            q,
            lambda cur: query.search_text(
                cur, q, lang=lang, limit=limit, offset=offset, snapshot=snapshot()
            ),
        )

    def searched(q: str, call: Callable[[duckdb.DuckDBPyConnection], query.Page]) -> JSONResponse:
        if not q.strip():
            raise ApiError(400, "bad_request", "q must contain a word")
        with cursor() as cur:
            return _answer(timed("search", cur, lambda: call(cur)).to_dict())

    class LockedEncoder:
        """The model, loaded on first use, one text at a time (it is CPU-bound anyway)."""

        def encode(self, texts: list[str]) -> Any:
            with encoder_lock:
                if state["encoder"] is None:
                    state["encoder"] = semantic.Encoder()  # SemanticUnavailable: a 503
                return state["encoder"].encode(texts)

    @app.get(
        "/search/semantic",
        summary="Geoids nearest in meaning to a text (all-MiniLM-L6-v2)",
        response_model=dict[str, Any],
    )
    def search_semantic(
        q: TextQuery,
        limit: Annotated[
            int,
            Query(ge=1, le=query.MAX_SEMANTIC_LIMIT, description="How many (1 to 50)."),
        ] = 10,
    ) -> JSONResponse:
        return searched(
            q,
            lambda cur: query.search_semantic(
                cur, LockedEncoder(), q, limit=limit, source=source()
            ),
        )

    @app.get("/metrics", summary="Prometheus metrics of this process", response_class=Response)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app
