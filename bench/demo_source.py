"""The demo database a benchmark runs on: a copy of ``--source`` when it exists, else
generated (seed 3) and, when ``--source`` names a path, kept there for the next run.

Shared by bench_migration.py and bench_online.py (run as scripts, so this directory is on
``sys.path``)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from kimera_core.demo import generate_demo_data


def demo_source(saved: Path | None, target: Path, geoids: int, scars: int) -> None:
    """Write the legacy demo database to ``target`` (never modifies ``saved``'s content)."""
    rows = geoids + scars
    if saved is not None and saved.exists():
        shutil.copy(saved, target)
        print(f"demo database: {saved} ({rows:,} legacy rows asked for; reused)")
        return
    t0 = time.perf_counter()
    generate_demo_data(target, geoids=geoids, scars=scars, seed=3)
    print(f"demo database: {rows:,} legacy rows generated in {time.perf_counter() - t0:.1f} s")
    if saved is not None:
        shutil.copy(target, saved)
