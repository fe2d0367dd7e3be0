"""Independent references for the value tests: the existing Kimera's Python, and the value rules.

Written from KIMERA_LEGACY.md and docs/migration.md, not from the product's code: the tests
compare the migration (SQL), the storage API (Python and SQL) and the entropy forms against
these. Values are Python values as ``json.loads`` reads the legacy JSON text (NaN and 1e999
become float NaN/inf, integers stay exact).
"""

from __future__ import annotations

import math
from typing import Any

YEAR_1 = -62135596800.0  # 0001-01-01T00:00:00Z
YEAR_10000 = 253402300800.0  # 10000-01-01T00:00:00Z
DOUBLE_MAX = 1.7976931348623157e308


def existing_geoid_entropy(meta: Any, tags: Any) -> float:
    """KIMERA_LEGACY.md's geoid formula as the existing Python computes it (exact int sums).

    Defined on what the migration accepts: meta an object or false, tags a list or false.
    """
    meta = meta or {}
    tags = tags or []
    terms = meta.get("terms")
    if isinstance(terms, list):
        values = [
            t["intensity"]
            for t in terms
            if isinstance(t, dict)
            and isinstance(t.get("intensity"), (int, float))
            and t["intensity"] > 0
        ]
        total = sum(values)
        h = 0.0
        for v in values:
            p = v / total
            if p > 0:
                h -= p * math.log2(p)
        return h
    return math.log2(len(tags)) if len(tags) > 1 else 0.0


def existing_scar_entropy(related_ids: Any, weight: Any) -> float:
    """The existing scar formula: a missing weight is 1.0, ``related_ids or []``."""
    related_ids = related_ids or []
    weight = 1.0 if weight is None else weight
    return 0.0 if len(related_ids) <= 1 else math.log2(len(related_ids)) * weight


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return value != value or value in (math.inf, -math.inf)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > DOUBLE_MAX


def _any_non_finite_float(value: Any) -> bool:
    if isinstance(value, float):
        return _non_finite(value)
    if isinstance(value, dict):
        return any(_any_non_finite_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_any_non_finite_float(v) for v in value)
    return False


def _time_reasons(created: float | None, updated: float | None) -> set[str]:
    times = [t for t in (created, updated) if t is not None]
    if not times:
        return {"missing_timestamps"}
    if any(t != t or t in (math.inf, -math.inf) for t in times):
        return {"non_finite_timestamp"}
    if not all(YEAR_1 <= t < YEAR_10000 for t in times):
        return {"timestamp_out_of_range"}
    return set()


def _intensity_reason(meta: Any) -> set[str]:
    terms = meta.get("terms") if isinstance(meta, dict) else None
    if isinstance(terms, list) and any(
        isinstance(t, dict) and "intensity" in t and _non_finite(t["intensity"]) for t in terms
    ):
        return {"non_finite_intensity"}
    return set()


def value_reasons(
    kind: str,
    *,
    raw: Any = None,
    weight: Any = None,
    meta: Any = None,
    json_fields: tuple[Any, ...] = (),
    created: float | None = None,
    updated: float | None = None,
) -> set[str]:
    """The reasons docs/migration.md gives for these values (both paths use the same rules).

    ``json_fields``: the other JSON values (tags, related_ids) checked for numbers JSON
    cannot carry. Structure rules (non-object meta, list shapes, keys) are not covered here.
    """
    reasons = _time_reasons(created, updated)
    if kind == "geoid" and (raw is None or not raw.strip()):
        reasons.add("empty_raw")
    if weight is not None and _non_finite(weight):
        reasons.add("non_finite_weight")
    if kind == "geoid":  # a geoid's entropy reads the intensities; a scar's does not
        reasons |= _intensity_reason(meta)
    if any(_any_non_finite_float(v) for v in (meta, *json_fields)):
        reasons.add("non_finite_number")
    return reasons


def structure_reasons(meta_given: bool, meta: Any, tags_given: bool, tags: Any) -> set[str]:
    """non_object_meta / non_list_tags by ``meta or {}`` and ``tags or []`` (given = not NULL)."""
    reasons = set()
    if meta_given and meta and not isinstance(meta, dict):
        reasons.add("non_object_meta")
    if tags_given and tags and not isinstance(tags, list):
        reasons.add("non_list_tags")
    return reasons
