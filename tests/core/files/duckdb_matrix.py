"""The fixture matrix: the existing Kimera layout written by every DuckDB release from 0.9.2 on.

Files are generated at test time, not committed: each pinned release is a wheel installed
by ``make setup`` with ``pip install --target var/duckdb-versions/<v> duckdb==<v>`` (the
tests never download), and make_duckdb_matrix.py runs under it in a subprocess
(``PYTHONPATH`` = that folder, ``python -P -s``). The layout is ``kimera_core.legacy``'s
DDL, statement for statement (indexes and ``DESC`` included), so the matrix follows the
project's one statement of the existing system's schema. A release that is not installed
skips its tests locally, with the command that installs it, and fails them under CI=true.

Variants (each also ``_wal``: the last writes still in a pending ``.wal``):

- ``empty``: every table empty (a fresh installation);
- ``pre_p1``: geoids and scars only (identities, echoforms, log empty: many installations);
- ``no_lattice``: every table but echoforms (most installations: the lattice never ran);
- ``null_keys``: every table filled, but ``identities.entropy_score`` NULL in every row, so
  that index is empty although its table is not;
- ``full``: every table filled and every index holding keys.

DuckDB >= 1.5 refuses a 0.9.2 file as soon as one index is empty (``refused_by_current``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kimera_core.identity import Geoid, Scar
from kimera_core.legacy import (
    LEGACY_DDL,
    LEGACY_INDEXES,
    LEGACY_TABLES,
    geoid_to_row,
    identities_row,
    scar_to_row,
)
from kimera_core.upgrade import UPGRADE_DUCKDB, duckdb_release, install_command

# Every minor release line from the existing system's pin (0.9.2) to the LTS the upgrade
# uses, newest patch of each with cp311 manylinux wheels. `make setup` installs the same list.
OLD_DUCKDB_VERSIONS: tuple[str, ...] = (
    "0.9.2",
    "0.10.3",
    "1.0.0",
    "1.1.3",
    "1.2.2",
    "1.3.2",
    UPGRADE_DUCKDB,
)
GENERATOR = Path(__file__).with_name("make_duckdb_matrix.py")
T0 = 1714564800.0  # 2024-05-01T12:00:00Z

ALL = list(LEGACY_TABLES)
VARIANT_TABLES: dict[str, list[str]] = {
    "empty": [],
    "pre_p1": ["legacy_geoids", "legacy_scars"],
    "no_lattice": [t for t in ALL if t != "echoforms"],
    "null_keys": ALL,
    "full": ALL,
}
VARIANTS: tuple[str, ...] = tuple(
    f"{name}{suffix}" for name in VARIANT_TABLES for suffix in ("", "_wal")
)
# The tables whose key columns are all indexed (LEGACY_INDEXES) and may leave an index empty.
INDEXED_TABLES = sorted({table for _name, table, _column, _ddl in LEGACY_INDEXES})


def base_variant(variant: str) -> str:
    return variant.removesuffix("_wal")


def refused_by_current(version: str, variant: str) -> bool:
    """DuckDB >= 1.5 refuses a DuckDB 0.9 file in which some index is empty."""
    name = base_variant(variant)
    filled = VARIANT_TABLES[name]
    empty_index = name == "null_keys" or any(t not in filled for t in INDEXED_TABLES)
    return version == "0.9.2" and empty_index


def _geoids() -> list[Geoid]:
    specs = [
        ("Hello world", "en", ["greeting"], 1.0),
        ("  Café crème  ", "fr", ["boisson", "français"], 0.75),
        ("مرحبا بالعالم", "ar", [], None),
        ("line\n", "en", ["a", "b", "c"], 2.5),
    ]
    meta = {"terms": [{"symbol": "a", "role": "x", "intensity": 0.5}], "source": "matrix"}
    return [
        Geoid.new(raw, lang, tags=tags, weight=weight, meta=meta, created_at=T0 + 60.25 * i)
        for i, (raw, lang, tags, weight) in enumerate(specs)
    ]


def rows(variant: str) -> dict[str, list[list[Any]]]:
    """The rows of every table in ``variant``, in column order (dual_write_log with log_id)."""
    geoids = _geoids()
    scars = [
        Scar(f"scar_{i}", [a.gid, b.gid], w, {"relationship_type": "contradicts"}, T0 + i, T0 + i)
        for i, (a, b, w) in enumerate(
            [(geoids[0], geoids[1], 0.8), (geoids[1], geoids[2], None), (geoids[2], geoids[3], 1)]
        )
    ]
    null_keys = base_variant(variant) == "null_keys"
    identities = [
        identities_row(g.to_identity(), None if null_keys else 0.5 + i)
        for i, g in enumerate(geoids[:3])
    ]
    echoforms = [
        [
            f"{geoids[i].gid}_{geoids[i + 1].gid}",
            json.dumps({"anchor": i, "terms": [], "phase": "active"}),
            T0 + 600.0 + i,
            T0 + 660.5 + i,
            None if i else "linguistics",
            "active",
            2.0 * i,
        ]
        for i in range(2)
    ]
    log = [
        [n + 1, T0 + 700.125 + n, ident[0], "store", "success", json.dumps({"attempt": n})]
        for n, ident in enumerate(identities)
    ]
    everything = {
        "legacy_geoids": [list(geoid_to_row(g)) for g in geoids],
        "legacy_scars": [list(scar_to_row(s)) for s in scars],
        "echoforms": echoforms,
        "identities": identities,
        "dual_write_log": log,
    }
    filled = VARIANT_TABLES[base_variant(variant)]
    return {t: (everything[t] if t in filled else []) for t in LEGACY_TABLES}


def spec() -> dict[str, Any]:
    """What make_duckdb_matrix.py reads: the DDL, the rows of each variant, the variants."""
    ddl = [*LEGACY_DDL, *(statement for *_, statement in LEGACY_INDEXES)]
    variants = []
    for variant in VARIANTS:
        table_rows = rows(variant)
        # dual_write_log's log_id comes from the sequence, as the existing system's does
        table_rows["dual_write_log"] = [r[1:] for r in table_rows["dual_write_log"]]
        variants.append(
            {
                "name": variant,
                "filled": [t for t in LEGACY_TABLES if table_rows[t]],
                "wal": variant.endswith("_wal"),
                "rows": table_rows,
            }
        )
    return {"ddl": ddl, "variants": variants, "echoform": rows("full")["echoforms"][0]}


def release_or_skip(version: str) -> Path:
    """The folder of DuckDB ``version``; skip (locally) or fail (CI=true) when missing."""
    folder = duckdb_release(version)
    if folder is None:
        reason = (
            f"DuckDB {version} is not installed for the file matrix: run `make setup` or "
            f"`{install_command(version)}`"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return folder


def generate(version: str, out: Path) -> dict[str, Any]:
    """Write every variant with DuckDB ``version`` into ``out``; the generator's JSON answer."""
    release = release_or_skip(version)
    out.mkdir(parents=True, exist_ok=True)
    spec_file = out / "spec.json"
    spec_file.write_text(json.dumps(spec(), ensure_ascii=False), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-P", "-s", str(GENERATOR), str(spec_file), str(out)],
        env={**os.environ, "PYTHONPATH": str(release)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["duckdb"] == version
    return answer


def read_rows(con, table: str) -> list[list[Any]]:
    """A table's rows in column order, sorted by its key (every key is the first column)."""
    # table comes from LEGACY_TABLES, constants
    return [list(r) for r in con.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()]


def expected_rows(variant: str, table: str) -> list[list[Any]]:
    """``rows(variant)[table]`` sorted as ``read_rows`` sorts (every key is the first column)."""
    return sorted(rows(variant)[table], key=lambda r: r[0])
