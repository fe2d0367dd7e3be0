"""A stand-in for the application: drive the storage API at a steady rate (``kimera workload``).

``run_workload`` does one operation per tick at ``rate`` operations per second: mostly
geoid and scar stores and fetches, then searches, lists, entropy range queries and deletes,
in proportions fixed by a seeded random generator (the same seed, the same sequence). A
share of stores carries an invalid timestamp, which the storage refuses: a real write
failure, counted like any other. Every operation goes through ``kimera_core.storage``, so
the write path's metrics, ``dual_write_log`` and shadow reads see exactly what an
application would make them see; dashboards and alerts are proven against these numbers.

The rate is kept by sleeping to each tick's slot (not a fixed pause after an operation),
so a slow operation is caught up rather than lowering the rate. The loop stops after
``seconds`` or when its stop event is set (``stop_on_signals``: SIGINT, SIGTERM).

``track=True`` keeps every acknowledged write (a store or delete that returned) by id, the
last one winning: the ids that must be in the stores and those that must not, which the
online tests check against both stores after the run (a server killed, a migration beside).
"""

from __future__ import annotations

import dataclasses
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kimera_core.identity import IDENTITY_TYPES, Identity, geoid_id
from kimera_core.storage import Storage, StorageError

LANGS = ("en", "fr", "ar", "es", "de", "ja")
WORDS = ("entropy", "lattice", "scar", "geoid", "résonance", "تناقض", "echo", "矛盾", "tau")


@dataclass
class WorkloadReport:
    """What a workload did: seconds run, and counts by operation and outcome."""

    seconds: float = 0.0
    # operation (store, store_invalid, fetch, search, list, find_by_entropy, delete) ->
    # {"success": n, "failure": n}
    operations: dict[str, dict[str, int]] = field(default_factory=dict)
    # with track=True: id -> True (its last acknowledged write stored it) / False (deleted)
    acknowledged: dict[str, bool] | None = None

    def count(self, operation: str, outcome: str) -> None:
        by_outcome = self.operations.setdefault(operation, {"success": 0, "failure": 0})
        by_outcome[outcome] += 1

    def acknowledge(self, identity_id: str, present: bool) -> None:
        """Record a write that returned (tracking only): ``present`` after it, or deleted."""
        if self.acknowledged is not None:
            self.acknowledged[identity_id] = present

    @property
    def present_ids(self) -> list[str]:
        """Ids whose last acknowledged write stored them (tracking only; else empty)."""
        return sorted(k for k, v in (self.acknowledged or {}).items() if v)

    @property
    def deleted_ids(self) -> list[str]:
        """Ids whose last acknowledged write deleted them (tracking only; else empty)."""
        return sorted(k for k, v in (self.acknowledged or {}).items() if not v)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds": round(self.seconds, 3), "operations": self.operations}
        if self.acknowledged is not None:
            out["acknowledged"] = {"present": self.present_ids, "deleted": self.deleted_ids}
        return out


def random_geoid(rng: random.Random, now: float) -> Identity:
    """A geoid of 2-6 random words in a random language, up to 30 days old (epoch seconds)."""
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


def random_scar(rng: random.Random, ids: list[str], now: float) -> Identity:
    """A scar linking 2-4 of ``ids`` (mostly 2), created ``now``."""
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
    storage: Storage,
    *,
    seconds: float,
    rate: float,
    seed: int = 7,
    failure_share: float = 0.0,
    stop: threading.Event | None = None,
    track: bool = False,
) -> WorkloadReport:
    """Drive ``storage`` at ``rate`` operations per second for ``seconds`` (0: until stopped).

    Each tick does one operation: mostly geoid and scar stores and fetches, then searches,
    lists, entropy range queries and deletes. ``failure_share`` of geoid stores carry an
    invalid timestamp (NaN), which the storage refuses: counted as ``store_invalid``
    failures. A ``StorageError`` is counted, never raised; any other exception propagates.
    ``track``: keep each acknowledged write's id in ``report.acknowledged``.
    """
    rng = random.Random(seed)
    stop = stop or threading.Event()
    report = WorkloadReport(acknowledged={} if track else None)
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
                item = random_geoid(rng, now)
                if rng.random() < failure_share:
                    operation = "store_invalid"
                    item = dataclasses.replace(item, created_at=float("nan"))
                else:
                    operation = "store"
                storage.store(item)
                report.acknowledge(item.id, True)
                ids.append(item.id)
            elif roll < 0.5:
                operation = "store"
                geoids = [i for i in ids if not i.startswith("scar_")] or ids
                item = random_scar(rng, geoids, now)
                storage.store(item)
                report.acknowledge(item.id, True)
                ids.append(item.id)
            elif roll < 0.75:
                operation = "fetch"
                storage.fetch(rng.choice(ids))
            elif roll < 0.85:
                operation = "search"
                storage.search(rng.choice(WORDS), limit=20)
            elif roll < 0.9:
                operation = "list"
                storage.list_identities(rng.choice((None, *IDENTITY_TYPES)), limit=20)
            elif roll < 0.95:
                operation = "find_by_entropy"
                low = rng.uniform(0, 2)
                storage.find_by_entropy(low, low + 0.5, limit=20)
            else:
                operation = "delete"
                victim = ids.pop(rng.randrange(len(ids)))
                storage.delete(victim)
                report.acknowledge(victim, False)
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


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """An event set by SIGINT or SIGTERM (installed in the main thread), for a clean stop."""
    stop = stop or threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
