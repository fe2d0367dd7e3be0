"""A real `kimera serve` on a free port over a migrated copy of the demo database."""

from __future__ import annotations

import shutil
import subprocess
import sys
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


@pytest.fixture(scope="session")
def api_url(api_db, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("api-log") / "serve.log"
    kimera = Path(sys.executable).parent / "kimera"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(kimera), "serve", "--db", str(api_db), "--port", str(port)],
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
