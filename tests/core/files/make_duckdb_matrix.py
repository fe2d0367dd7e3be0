"""Write the existing Kimera layout with whichever DuckDB this Python imports (an old one).

Run in a subprocess by tests/core/files/duckdb_matrix.py, never imported by the tests:

    PYTHONPATH=var/duckdb-versions/0.9.2 python -P -s make_duckdb_matrix.py SPEC.json OUT_DIR

``-P`` keeps this script's folder off ``sys.path`` and PYTHONPATH puts the old ``duckdb``
ahead of the venv's, so ``import duckdb`` below is the old release. The script uses the
standard library and ``duckdb`` only (the project's modules import the venv's DuckDB).

SPEC.json (written by the test, from ``kimera_core.legacy``): ``ddl`` (the statements, in
order: tables, sequence, indexes) and ``variants``: each ``{"name", "filled": [tables with
rows, in order], "wal": bool, "rows": {table: [rows in column order]}}``, ``dual_write_log``
rows without ``log_id``, which the sequence fills.

A variant without ``wal`` is written, CHECKPOINTed and closed: no ``.wal`` is left. A
variant with ``wal`` checkpoints the DDL and the first row of each filled table, then
writes the rest with checkpoints off and closes without one, so the ``.wal`` holds
committed work the main file does not. A variant with no filled table still gets a pending
WAL: ``spec["echoform"]`` inserted and deleted (an index on an empty table, replayed).

Prints one JSON line: ``{"duckdb": version, "files": {name: {"path", "wal"}}}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import duckdb

INSERT_COLUMNS = {
    "dual_write_log": "(timestamp, identity_id, operation, status, details)",
}


def _insert(con, table: str, rows: list[list]) -> None:
    if not rows:
        return
    columns = INSERT_COLUMNS.get(table, "")
    marks = ", ".join("?" for _ in rows[0])
    con.executemany(f"INSERT INTO {table} {columns} VALUES ({marks})", rows)


def _quiet_checkpoints(con) -> None:
    """No checkpoint until the close, on every release from 0.9 on (the names moved)."""
    con.execute("PRAGMA disable_checkpoint_on_shutdown")
    for setting in ("wal_autocheckpoint", "checkpoint_threshold"):
        try:
            con.execute(f"SET {setting} = '1GB'")
            return
        except duckdb.Error:
            continue


def write_variant(path: Path, spec: dict, variant: dict) -> bool:
    """Write one file; True when a ``.wal`` is left beside it."""
    con = duckdb.connect(str(path))
    for statement in spec["ddl"]:
        con.execute(statement)
    rows = variant["rows"]
    filled = variant["filled"]
    if not variant["wal"]:
        for table in filled:
            _insert(con, table, rows[table])
        con.execute("CHECKPOINT")
        con.close()
        return Path(f"{path}.wal").exists()
    for table in filled:
        _insert(con, table, rows[table][:1])
    con.execute("CHECKPOINT")
    _quiet_checkpoints(con)
    for table in filled:
        _insert(con, table, rows[table][1:])
    if not filled:
        row = spec["echoform"]
        _insert(con, "echoforms", [row])
        con.execute("DELETE FROM echoforms WHERE anchor = ?", [row[0]])
    con.close()
    return Path(f"{path}.wal").exists()


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    out = Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for variant in spec["variants"]:
        path = out / f"{variant['name']}.duckdb"
        wal = write_variant(path, spec, variant)
        files[variant["name"]] = {"path": str(path), "wal": wal}
    print(json.dumps({"duckdb": duckdb.__version__, "files": files}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
