"""The unified Identity model (ADR-001), the legacy Geoid and Scar records, and conversions.

Field mapping (ADR-001):

    Geoid.gid            -> Identity.id (copied as is)
    Geoid.context_layers -> Identity.tags        (legacy_geoids.tags)
    Geoid.scars          -> Identity.related_ids (not persisted by legacy_geoids)
    Scar.scar_id         -> Identity.id (copied as is)
    Scar.gid_pair        -> Identity.related_ids (legacy_scars.related_ids)
    weight, raw, echo, lang_axis, meta -> same names

Timestamps are Unix epoch seconds as floats everywhere in the model, exactly as the DOUBLE
columns hold them. The P1 JSON document carries them as ISO-8601 strings written so that
they parse back to the very same float (see ``epoch_to_iso``); that text exists for the
epochs of the years 1 to 9999 (``EPOCH_MIN`` <= t < ``EPOCH_END``), what Python's
``datetime`` can represent.

Text follows Python's ``str.strip``: ``PY_WHITESPACE`` lists the characters it strips (every
``str.isspace`` character), which the SQL rules (``kimera_core.sql``) strip too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Context, Decimal, localcontext
from typing import Any, Literal, get_args

IdentityType = Literal["geoid", "scar"]
# The one list of identity types (the type hint's values): import it, never restate it.
IDENTITY_TYPES: tuple[str, ...] = get_args(IdentityType)

# Key order of the P1 JSON document in identities.data.
DOCUMENT_KEYS: tuple[str, ...] = (
    "id",
    "identity_type",
    "raw",
    "echo",
    "lang_axis",
    "tags",
    "weight",
    "related_ids",
    "meta",
    "created_at",
    "updated_at",
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The epochs ISO-8601 text can carry: 0001-01-01T00:00:00 <= t < 10000-01-01T00:00:00 (UTC).
EPOCH_MIN = -62135596800.0
EPOCH_END = 253402300800.0

# The characters Python's str.strip() removes (str.isspace): tab, LF, VT, FF, CR,
# the information separators 0x1C-0x1F, space, NEL, NBSP, and the Unicode spaces and line
# and paragraph separators. tests/core/test_identity.py checks it against str.isspace.
PY_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_ISO_RE = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[T ](?P<time>\d{2}:\d{2}:\d{2})"
    r"(?:\.(?P<frac>\d+))?(?P<tz>Z|[+-]\d{2}:?\d{2})?$"
)


class ConversionError(ValueError):
    """A record cannot be converted without losing information."""


def geoid_id(raw: str, lang_axis: str | None) -> str:
    """The deterministic geoid id of the existing system: sha256(f"{lang}:{echo}")[:16]."""
    echo = raw.strip()
    return hashlib.sha256(f"{lang_axis}:{echo}".encode()).hexdigest()[:16]


def epoch_in_range(ts: float) -> bool:
    """Whether epoch seconds ``ts`` has ISO-8601 text (years 1 to 9999); False for NaN/inf."""
    return EPOCH_MIN <= ts < EPOCH_END


def epoch_to_iso(ts: float | None) -> str | None:
    """ISO-8601 (UTC) text for an epoch-seconds float that parses back to the same float.

    Whole seconds come from the calendar; the fraction is the exact decimal digits of the
    float's shortest repr, padded to at least six digits (the form ``datetime.isoformat``
    writes, which the P1 application reads), longer only when the float needs it. Raises
    ValueError for NaN or infinity and OverflowError outside the years 1 to 9999.
    """
    if ts is None:
        return None
    ts = float(ts)
    if not math.isfinite(ts):
        raise ValueError(f"timestamp must be finite, got {ts!r}")
    exact = Decimal(repr(ts))
    whole = int(exact.to_integral_value(rounding=ROUND_FLOOR))
    # subtract exactly: the default 28 digits round e.g. -1e-30 - (-1) up to 1, a second off
    frac = Context(prec=1000).subtract(exact, whole)
    frac_digits = format(frac, "f").partition(".")[2].rstrip("0")
    frac_digits = frac_digits.ljust(6, "0")
    stamp = (_EPOCH + timedelta(seconds=whole)).isoformat(timespec="seconds")[:19]
    return f"{stamp}.{frac_digits}+00:00"


def iso_to_epoch(text: str | None) -> float | None:
    """Epoch seconds for ISO-8601 text; a naive time is taken as UTC."""
    if text is None:
        return None
    match = _ISO_RE.match(text.strip())
    if match is None:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}")
    base = datetime.fromisoformat(f"{match['date']}T{match['time']}").replace(tzinfo=UTC)
    tz = match["tz"]
    offset = 0
    if tz and tz != "Z":
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        offset = sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    whole = (base - _EPOCH) // timedelta(seconds=1) - offset
    with localcontext() as ctx:
        ctx.prec = 80
        value = Decimal(whole) + Decimal(f"0.{match['frac'] or '0'}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Identity:
    """One identity of the unified model (identity_type 'geoid' or 'scar')."""

    id: str
    identity_type: IdentityType
    raw: str | None = None
    echo: str | None = None
    lang_axis: str | None = None
    tags: list[Any] | None = None
    weight: float | None = None
    related_ids: list[Any] | None = None
    meta: Any = None
    created_at: float | None = None
    updated_at: float | None = None

    def __post_init__(self) -> None:
        if self.identity_type not in IDENTITY_TYPES:
            raise ValueError(
                f"identity_type must be one of {IDENTITY_TYPES}, got {self.identity_type!r}"
            )

    # --- the P1 JSON document -------------------------------------------------------------
    def to_document(self) -> dict[str, Any]:
        """The P1 document stored in identities.data (timestamps as ISO-8601)."""
        return {
            "id": self.id,
            "identity_type": self.identity_type,
            "raw": self.raw,
            "echo": self.echo,
            "lang_axis": self.lang_axis,
            "tags": self.tags,
            "weight": self.weight,
            "related_ids": self.related_ids,
            "meta": self.meta,
            "created_at": epoch_to_iso(self.created_at),
            "updated_at": epoch_to_iso(self.updated_at),
        }

    def to_json(self) -> str:
        """identities.data as text; ValueError for NaN or infinity, which JSON cannot carry."""
        return json.dumps(self.to_document(), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_document(cls, doc: dict[str, Any] | str) -> Identity:
        """Rebuild an Identity from a P1 document (dict or JSON text), as the P1 reader does."""
        if isinstance(doc, str):
            doc = json.loads(doc)
        if not isinstance(doc, dict):
            raise ValueError(f"identity document must be a JSON object, got {type(doc).__name__}")
        return cls(
            id=doc["id"],
            identity_type=doc["identity_type"],
            raw=doc.get("raw"),
            echo=doc.get("echo"),
            lang_axis=doc.get("lang_axis"),
            tags=doc.get("tags"),
            weight=doc.get("weight"),
            related_ids=doc.get("related_ids"),
            meta=doc.get("meta"),
            created_at=_doc_time(doc.get("created_at")),
            updated_at=_doc_time(doc.get("updated_at")),
        )

    # --- legacy conversions ---------------------------------------------------------------
    def to_legacy(self) -> Geoid | Scar:
        """The legacy record of this identity; refuses a conversion that would lose a field."""
        if self.identity_type == "geoid":
            if self.raw is None:
                raise ConversionError(
                    f"geoid {self.id!r} has no raw text; legacy_geoids.raw is NOT NULL"
                )
            return Geoid(
                gid=self.id,
                raw=self.raw,
                echo=self.echo,
                lang_axis=self.lang_axis,
                context_layers=self.tags,
                weight=self.weight,
                meta=self.meta,
                created_at=self.created_at,
                updated_at=self.updated_at,
                scars=self.related_ids,
            )
        lost = [
            name
            for name in ("raw", "echo", "lang_axis", "tags")
            if getattr(self, name) not in (None, [])
        ]
        if lost:
            raise ConversionError(
                f"scar {self.id!r} carries {', '.join(lost)}, which legacy_scars cannot hold"
            )
        return Scar(
            scar_id=self.id,
            gid_pair=self.related_ids,
            weight=self.weight,
            meta=self.meta,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


def _doc_time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"timestamp must be ISO-8601 text or a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    return iso_to_epoch(value)


def created_or(time: float | None, other: float | None) -> float | None:
    """A legacy timestamp as the migration writes it: ``time``, or when it is missing the
    row's ``other`` timestamp (docs/migration.md, warnings null_created_at /
    null_updated_at). The SQL form is ``kimera_core.sql.filled_times_sql``."""
    return time if time is not None else other


@dataclass(frozen=True, slots=True)
class Geoid:
    """A row of legacy_geoids (plus the in-memory ``scars`` list the table does not persist)."""

    gid: str
    raw: str
    echo: str | None = None
    lang_axis: str | None = None
    context_layers: list[Any] | None = None
    weight: float | None = None
    meta: Any = None
    created_at: float | None = None
    updated_at: float | None = None
    scars: list[Any] | None = None

    @classmethod
    def new(
        cls,
        raw: str,
        lang_axis: str,
        *,
        tags: list[str] | None = None,
        weight: float | None = 1.0,
        meta: Any = None,
        created_at: float | None = None,
        updated_at: float | None = None,
    ) -> Geoid:
        """A geoid with the existing system's deterministic id and echo."""
        return cls(
            gid=geoid_id(raw, lang_axis),
            raw=raw,
            echo=raw.strip(),
            lang_axis=lang_axis,
            context_layers=tags if tags is not None else [],
            weight=weight,
            meta=meta if meta is not None else {},
            created_at=created_at,
            updated_at=updated_at if updated_at is not None else created_at,
            scars=[],
        )

    def to_identity(self) -> Identity:
        return Identity(
            id=self.gid,
            identity_type="geoid",
            raw=self.raw,
            echo=self.echo,
            lang_axis=self.lang_axis,
            tags=self.context_layers,
            weight=self.weight,
            related_ids=self.scars,
            meta=self.meta,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


@dataclass(frozen=True, slots=True)
class Scar:
    """A row of legacy_scars."""

    scar_id: str
    gid_pair: list[Any] | None = None
    weight: float | None = None
    meta: Any = None
    created_at: float | None = None
    updated_at: float | None = None

    def to_identity(self) -> Identity:
        return Identity(
            id=self.scar_id,
            identity_type="scar",
            weight=self.weight,
            related_ids=self.gid_pair,
            meta=self.meta,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


# --- values the write path refuses, by the migration's quarantine reasons -----------------
# One rule per reason, the same on both paths: the migration quarantines a legacy row for it
# (kimera_core.migration.statements), the storage API refuses an identity for it (StorageError
# and a failed dual_write_log row). docs/migration.md, "Values carried exactly or refused".
VALUE_RULES: dict[str, str] = {
    "non_object_meta": 'meta is neither an object nor empty (null, {}, [], "", 0 and false are {})',
    "non_list_tags": 'tags is neither a list nor empty (null, [], {}, "", 0 and false are [])',
    "empty_raw": "a geoid's raw text is missing, empty or only whitespace (Python's str.strip)",
    "invalid_text": "a text holds a lone surrogate (U+D800-U+DFFF), which UTF-8 cannot encode",
    "non_finite_weight": "weight is NaN or infinite",
    "non_finite_intensity": "a meta.terms intensity is NaN, infinite or beyond the double range",
    "non_finite_number": (
        "meta, tags or related_ids hold NaN, Infinity or a float beyond the double range, "
        "which JSON cannot carry"
    ),
    "non_finite_timestamp": "created_at or updated_at is NaN or infinite",
    "timestamp_out_of_range": (
        "created_at or updated_at lies outside the years 1 to 9999, which ISO-8601 text "
        "cannot carry (an epoch in milliseconds?)"
    ),
}

_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (U+D800-U+DFFF), which UTF-8 cannot encode."""
    return _SURROGATE.search(text) is not None


def value_refusals(identity: Identity) -> list[str]:
    """The ``VALUE_RULES`` reasons an identity breaks, in the migration's order ([] if none).

    Timestamps are judged as given (None passes: the storage API stamps it). A scar's
    relation (its related ids' shape and existence) is judged by the migration only.
    """
    reasons: list[str] = []
    # meta or {}, tags or []: a false value is the default
    if identity.meta and not isinstance(identity.meta, dict):
        reasons.append("non_object_meta")
    if identity.tags and not isinstance(identity.tags, list):
        reasons.append("non_list_tags")
    raw = identity.raw
    if identity.identity_type == "geoid" and (
        raw is None or (isinstance(raw, str) and not raw.strip())
    ):
        reasons.append("empty_raw")
    texts = (identity.id, raw, identity.echo, identity.lang_axis)
    non_finite, bad_text = _scan_json((identity.tags, identity.related_ids, identity.meta))
    if bad_text or any(isinstance(t, str) and has_lone_surrogate(t) for t in texts):
        reasons.append("invalid_text")
    if _non_finite_float(identity.weight):
        reasons.append("non_finite_weight")
    if identity.identity_type == "geoid" and _non_finite_intensity(identity.meta):
        reasons.append("non_finite_intensity")
    if non_finite:
        reasons.append("non_finite_number")
    times = [t for t in (identity.created_at, identity.updated_at) if t is not None]
    if any(_non_finite_float(t) for t in times):
        reasons.append("non_finite_timestamp")
    elif not all(epoch_in_range(t) for t in times):
        reasons.append("timestamp_out_of_range")
    return reasons


def _non_finite_float(value: Any) -> bool:
    """A float that is NaN or infinite, or an integer beyond the double range."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            return True
    return False


def _non_finite_intensity(meta: Any) -> bool:
    terms = meta.get("terms") if isinstance(meta, dict) else None
    if not isinstance(terms, list):
        return False
    return any(
        isinstance(t, dict) and "intensity" in t and _non_finite_float(t["intensity"])
        for t in terms
    )


def _scan_json(value: Any) -> tuple[bool, bool]:
    """(a float JSON cannot carry, a string with a lone surrogate) anywhere in ``value``.

    Integers of any size are JSON numbers and pass; only floats (NaN, infinities) fail.
    """
    non_finite = bad_text = False
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            bad_text = bad_text or has_lone_surrogate(item)
        elif isinstance(item, float):
            non_finite = non_finite or not math.isfinite(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return non_finite, bad_text
