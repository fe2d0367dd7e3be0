"""The CLS lattice write path: ``lattice_resolve(a, b)`` as the existing system defined it.

The first resolution of a pair creates the echoform anchored at ``f"{id_a}_{id_b}"`` (domain
``cls``, phase ``lattice_active``) with a ``CLS`` seed term (intensity 1.0) and a ``cls_event``
term of intensity ``0.1 * (1 + mean(H_a, H_b))``, and stores both identities. Each later
resolution of the same pair appends another ``cls_event`` term with the same formula (the
entropies as they are then) and stores an identity only if it is missing. The return value
is the form's intensity sum (undecayed, as ``echoforms.intensity_sum`` holds it).

Identities go through ``kimera_core.storage.Storage`` (``store_batch``: one transaction, to
the stores the rollout stage names, with ``dual_write_log`` rows and the write-path
metrics). The echoform is then written to ``echoforms`` in its own transaction on the same
connection: a failure between the two leaves valid identities and no form (a retry
resolves the pair again as a first resolution).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Histogram

from kimera_core import metrics
from kimera_core.db import transaction
from kimera_core.entropy import identity_entropy
from kimera_core.identity import Geoid, Identity, Scar
from kimera_core.storage import Storage

DOMAIN = "cls"
PHASE = "lattice_active"
CLS_SEED_INTENSITY = 1.0
CLS_EVENT_FACTOR = 0.1

CLS_RESOLVE_SECONDS = Histogram(
    "kimera_cls_resolve_seconds",
    "Time of one CLS lattice resolution (identities and echoform), by first or repeat.",
    ["resolution"],
    buckets=metrics.LATENCY_BUCKETS_SECONDS,
    registry=metrics.REGISTRY,
)

FORM_SQL = "SELECT blob FROM echoforms WHERE anchor = ?"
FORM_UPSERT = """
INSERT INTO echoforms (anchor, blob, created_at, updated_at, domain, phase, intensity_sum)
VALUES ($anchor, $blob, $now, $now, $domain, $phase, $sum)
ON CONFLICT (anchor) DO UPDATE SET blob = excluded.blob, updated_at = excluded.updated_at,
    domain = excluded.domain, phase = excluded.phase, intensity_sum = excluded.intensity_sum
"""

Resolvable = Identity | Geoid | Scar | str


def cls_event_intensity(h_a: float | None, h_b: float | None) -> float:
    """0.1 * (1 + mean(H_a, H_b)); an unknown entropy counts as 0 (as it does for tau)."""
    return CLS_EVENT_FACTOR * (1 + ((h_a or 0.0) + (h_b or 0.0)) / 2)


def intensity_sum(form: dict[str, Any]) -> float:
    """The sum of the form's term intensities (no decay)."""
    return float(sum(float(t.get("intensity") or 0.0) for t in form.get("terms", [])))


def _identity(storage: Storage, item: Resolvable) -> Identity:
    if isinstance(item, Identity):
        return item
    if isinstance(item, Geoid | Scar):
        return item.to_identity()
    found = storage.fetch(item)
    if found is None:
        raise KeyError(f"no identity with id {item!r}")
    return found


@dataclass(frozen=True)
class Resolution:
    """What one resolution did: the anchor, first or repeat, the new term and the sum."""

    anchor: str
    first: bool
    cls_event_intensity: float
    intensity_sum: float
    identities_stored: int


def resolve(
    storage: Storage,
    a: Resolvable,
    b: Resolvable,
    *,
    clock: Callable[[], float] = time.time,
) -> Resolution:
    """Resolve the pair (a, b) on the lattice and say what was written."""
    t0 = time.perf_counter()
    ident_a, ident_b = _identity(storage, a), _identity(storage, b)
    anchor = f"{ident_a.id}_{ident_b.id}"
    h_a, h_b = identity_entropy(ident_a), identity_entropy(ident_b)
    intensity = cls_event_intensity(h_a, h_b)
    now = clock()
    con = storage.con
    row = con.execute(FORM_SQL, [anchor]).fetchone()
    form = json.loads(row[0]) if row is not None else None
    first = form is None or not isinstance(form, dict)
    event = {
        "symbol": "cls_event",
        "role": "resonance_trigger",
        "intensity": intensity,
        "timestamp": now,
        "event_type": "lattice_resolve_initial" if first else "lattice_resolve_repeat",
        "entropy_a": h_a,
        "entropy_b": h_b,
    }
    pair = {ident_a.id: ident_a, ident_b.id: ident_b}
    if first:
        event |= {"identity_a_id": ident_a.id, "identity_b_id": ident_b.id}
        form = {
            "anchor": anchor,
            "domain": DOMAIN,
            "phase": PHASE,
            "terms": [
                {"symbol": "CLS", "role": "cls_seed", "intensity": CLS_SEED_INTENSITY},
                event,
            ],
            "topology": {"nodes": [ident_a.id, ident_b.id], "edges": 1},
            "trace_signature": hashlib.sha256((ident_a.id + ident_b.id).encode()).hexdigest()[:32],
        }
        to_store = list(pair.values())
    else:
        assert form is not None
        form.setdefault("terms", []).append(event)
        to_store = [i for i in pair.values() if storage.fetch(i.id) is None]
    if to_store:
        storage.store_batch(to_store)
    total = intensity_sum(form)
    with transaction(con):
        con.execute(
            FORM_UPSERT,
            {
                "anchor": anchor,
                "blob": json.dumps(form, ensure_ascii=False),
                "now": now,
                "domain": form.get("domain", DOMAIN),
                "phase": form.get("phase", PHASE),
                "sum": total,
            },
        )
    CLS_RESOLVE_SECONDS.labels("first" if first else "repeat").observe(time.perf_counter() - t0)
    return Resolution(anchor, first, intensity, total, len(to_store))


def lattice_resolve(storage: Storage, a: Resolvable, b: Resolvable) -> float:
    """The existing system's call: resolve (a, b) and return the form's intensity sum."""
    return resolve(storage, a, b).intensity_sum


# --- a workload that drives the write path -----------------------------------------------
PAIRS_SQL = """
SELECT g1.gid, g2.gid FROM (
    SELECT related_ids->>0 AS a, related_ids->>1 AS b, id FROM legacy_scars
    WHERE json_array_length(TRY_CAST(related_ids AS JSON)) = 2
) s
JOIN legacy_geoids g1 ON g1.gid = s.a JOIN legacy_geoids g2 ON g2.gid = s.b
WHERE g1.raw <> '' AND g2.raw <> ''
ORDER BY hash(s.id, $seed) LIMIT $n
"""


@dataclass
class LatticeWorkloadReport:
    """Counts of a lattice workload run."""

    resolutions: int = 0
    first: int = 0
    repeats: int = 0
    failures: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolutions": self.resolutions,
            "first": self.first,
            "repeats": self.repeats,
            "failures": self.failures,
            "seconds": round(self.seconds, 3),
            "errors": self.errors[:10],
        }


def run_lattice_workload(
    storage: Storage,
    *,
    pairs: int = 100,
    repeat_share: float = 0.3,
    seed: int = 7,
    stop: Callable[[], bool] = lambda: False,
) -> LatticeWorkloadReport:
    """Resolve ``pairs`` scar-linked geoid pairs of the demo data, repeating a share of them."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    chosen = storage.con.execute(PAIRS_SQL, {"seed": seed, "n": pairs}).fetchall()
    report = LatticeWorkloadReport()
    done: list[tuple[str, str]] = []
    for a, b in chosen:
        if stop():
            break
        plan = [(a, b)]
        if done and rng.random() < repeat_share:
            plan.append(rng.choice(done))
        for x, y in plan:
            try:
                result = resolve(storage, x, y)
            except Exception as exc:  # noqa: BLE001 - a workload counts failures and goes on
                report.failures += 1
                report.errors.append(f"{x}_{y}: {type(exc).__name__}: {exc}")
                continue
            report.resolutions += 1
            if result.first:
                report.first += 1
            else:
                report.repeats += 1
        done.append((a, b))
    report.seconds = time.perf_counter() - t0
    return report
