"""When two values of one identity are equal: the comparison rules of every consistency path.

The verifier, shadow reads, the gates and the metrics all decide equality here
(docs/consistency.md): NULL-safe, ``weight`` at a relative tolerance, timestamps at one
microsecond, JSON fields as parsed values (object key order ignored, ``1 == 1.0``, ``true``
is not ``1``), text byte-exact; a geoid's ``related_ids`` NULL equals ``[]`` (legacy_geoids
has no column for it). ``FIELD_RULES`` names the rule of each field.

The verifier compares millions of rows in DuckDB, so it states the same rules in SQL: the
``kimera_json_eq`` and ``kimera_float_eq`` macros (``consistency.sources``) and the field-by-
field query built from ``FIELD_RULES`` (``consistency.rows``), with ``Tolerance`` bound as
parameters. The Python functions here are the reference those must agree with
(tests/core/consistency/test_compare.py runs the same pairs through both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from kimera_core.identity import DOCUMENT_KEYS, Identity

COMPARED_FIELDS: tuple[str, ...] = DOCUMENT_KEYS[1:]  # every field but the key
JSON_FIELDS = frozenset({"tags", "related_ids", "meta"})
TIME_FIELDS = frozenset({"created_at", "updated_at"})
WEIGHT_FIELDS = frozenset({"weight"})

Rule = Literal["exact", "relative", "seconds", "json"]
# How each compared field is judged: text byte-exact; weight within Tolerance.weight_relative
# of the legacy value; timestamps within Tolerance.seconds; JSON as parsed values. The
# verifier's SQL (kimera_core.consistency.rows) is built from this table.
FIELD_RULES: dict[str, Rule] = {
    name: (
        "relative"
        if name in WEIGHT_FIELDS
        else "seconds"
        if name in TIME_FIELDS
        else "json"
        if name in JSON_FIELDS
        else "exact"
    )
    for name in COMPARED_FIELDS
}
MISSING_IN_NEW = "<missing in new>"
MISSING_IN_LEGACY = "<missing in legacy>"


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far two values may differ and still be equal (docs/consistency.md)."""

    # weight: |a - b| <= weight_relative * max(1, |a|)
    weight_relative: float = 1e-9
    # created_at / updated_at, in seconds: microseconds are what the P1 document carries
    seconds: float = 1e-6

    def to_dict(self) -> dict[str, float]:
        """``{"weight_relative": ..., "seconds": ...}``: echoed in reports, bound in SQL."""
        return {"weight_relative": self.weight_relative, "seconds": self.seconds}


DEFAULT_TOLERANCE = Tolerance()


def json_equal(a: Any, b: Any) -> bool:
    """Equality of parsed JSON values: object key order ignored, 1 == 1.0, true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _float_equal(a: Any, b: Any, tolerance: float, relative: bool) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if a == b:
        return True
    return abs(a - b) <= tolerance * (max(1.0, abs(a)) if relative else 1.0)


def differing_fields(
    legacy: Identity | None, new: Identity | None, tolerance: Tolerance = DEFAULT_TOLERANCE
) -> list[str]:
    """Names of the ADR-001 fields on which two reads of one identity differ."""
    if legacy is None and new is None:
        return []
    if new is None:
        return [MISSING_IN_NEW]
    if legacy is None:
        return [MISSING_IN_LEGACY]
    out = []
    for name, rule in FIELD_RULES.items():
        a, b = getattr(legacy, name), getattr(new, name)
        if rule == "relative":
            same = _float_equal(a, b, tolerance.weight_relative, relative=True)
        elif rule == "seconds":
            same = _float_equal(a, b, tolerance.seconds, relative=False)
        elif name == "related_ids" and legacy.identity_type == "geoid":
            # legacy_geoids cannot hold related ids: its null stands for the empty list
            same = json_equal([] if a is None else a, [] if b is None else b)
        elif rule == "json":
            same = json_equal(a, b)
        else:
            same = a == b
        if not same:
            out.append(name)
    return out


def compare_reads(
    legacy: Identity | list[Identity] | None,
    new: Identity | list[Identity] | None,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
) -> dict[str | None, list[str]]:
    """Differences between two answers (one identity or a list), keyed by identity id."""
    if isinstance(legacy, list) or isinstance(new, list):
        left = {i.id: i for i in legacy or []}
        right = {i.id: i for i in new or []}
        found = {}
        for key in left.keys() | right.keys():
            fields = differing_fields(left.get(key), right.get(key), tolerance)
            if fields:
                found[key] = fields
        return found
    fields = differing_fields(legacy, new, tolerance)
    if not fields:
        return {}
    return {(legacy or new).id: fields}  # type: ignore[union-attr]
