"""A real `kimera serve` on a free port over a migrated copy of the demo database."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import httpx
import pytest
from support.servers import free_port, stop_process_group, wait_until

from kimera_core import semantic
from kimera_core.migration import migrate
from kimera_core.rollout import set_stage

EMBEDDED_GEOIDS = 40


@pytest.fixture(scope="session")
def api_db(demo_db, tmp_path_factory) -> Path:
    """A migrated copy of the demo database in read-new; with the [semantic] extra, the
    first EMBEDDED_GEOIDS English geoids embedded (and a semantic-less copy otherwise)."""
    path = tmp_path_factory.mktemp("api") / "api.duckdb"
    shutil.copy(demo_db[0], path)
    with duckdb.connect(str(path)) as con:
        migrate(con)
        set_stage(con, "read-new", "test", "API tests read identities")
        try:
            encoder = semantic.Encoder()
        except semantic.SemanticUnavailable:
            return path  # /search/semantic answers 503 semantic_unavailable
        rows = con.execute(
            "SELECT id, data->>'$.raw' FROM identities WHERE identity_type = 'geoid' "
            "AND lang_axis = 'en' AND (data->>'$.raw') <> '' ORDER BY id LIMIT ?",
            [EMBEDDED_GEOIDS],
        ).fetchall()
        semantic.store_embeddings(con, [r[0] for r in rows], encoder.encode([r[1] for r in rows]))
    return path


@contextmanager
def serving(path: Path, log: Path) -> Iterator[str]:
    """A real `kimera serve` of ``path`` on a free port (its output in ``log``): its URL."""
    port = free_port()
    kimera = Path(sys.executable).parent / "kimera"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(kimera), "serve", "--db", str(path), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: proc.poll() is None and httpx.get(f"{url}/healthz").status_code == 200,
            timeout=60,
            interval=0.2,
            what=f"kimera serve ({log.read_text()[-500:] if log.exists() else ''})",
        )
        yield url
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="session")
def api_url(api_db, tmp_path_factory):
    with serving(api_db, tmp_path_factory.mktemp("api-log") / "serve.log") as url:
        yield url


@pytest.fixture(scope="session")
def legacy_api(api_db, tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """(path, URL) of a real `kimera serve` of a copy of the API database in verified (reads
    from the legacy tables; serve builds the text index from legacy before it opens)."""
    path = tmp_path_factory.mktemp("api-legacy") / "legacy.duckdb"
    shutil.copy(api_db, path)
    with duckdb.connect(str(path)) as con:
        set_stage(con, "verified", "test", "API tests read legacy")
    with serving(path, path.with_suffix(".log")) as url:
        yield path, url
