"""Evidence an operator can act on: the offending keys with both stores' values, and what to do.

A finding's evidence is a capped list of ``KeyEvidence``: the key, and per differing field
the value each side holds (``FieldValues``), as display text cut to ``MAX_CHARS`` (the cut
says how much is missing). Which two sides a finding compares is its ``sides``: legacy and
identities for the store comparisons, an ``identities`` row's column and its own document for
the column checks. ``NEXT_STEPS`` says, per kind of finding and per authoritative side, what
the operator does; the authoritative side is where reads come from at the live rollout stage
(``kimera_core.rollout.routing(stage).read``): legacy before ``read-new``, identities from it
on. ``evidence_markdown`` renders a finding for a Dagster check's metadata or a terminal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_CHARS = 80  # a displayed value longer than this is cut, with the length it had
STORE_SIDES: tuple[str, str] = ("legacy", "identities")
COLUMN_SIDES: tuple[str, str] = ("column", "document")
ABSENT = None  # a side without the key or the member

_MIGRATE = "run `kimera migrate` (idempotent)"
_RESTORE = "re-store the key through `Storage` in a dual-write stage"
NEXT_STEPS: dict[str, dict[str, str]] = {
    "field_mismatches": {
        "legacy": (
            "legacy is authoritative: copy the legacy row into identities "
            f"({_RESTORE} from the legacy read, or {_MIGRATE} when legacy is newer); many "
            "rows on one field point at that field's writer: fix it, then re-migrate"
        ),
        "identities": (
            "identities is authoritative: write the identities row back to legacy "
            f"({_RESTORE}); many rows on one field point at that field's writer"
        ),
    },
    "legacy_stale": {
        "legacy": (
            "the merge rule kept the newer identity: copy identities into legacy "
            f"({_RESTORE}), or, if the identities write was wrong, fix legacy and bump its "
            "updated_at, then re-migrate"
        ),
        "identities": f"legacy is behind identities: copy identities into legacy ({_RESTORE})",
    },
    "missing_in_new": {
        "legacy": (f"{_MIGRATE}; if it quarantines the key, fix the legacy row as the reason says"),
        "identities": (
            f"reads from identities miss this key: {_MIGRATE} now, then find why it was lost"
        ),
    },
    "missing_in_legacy": {
        "legacy": (
            f"a write reached identities only: {_RESTORE} if it should exist, else delete it "
            "from identities"
        ),
        "identities": (
            f"expected from write-new on (writes go to identities only); before: {_RESTORE}"
        ),
    },
    "duplicate_keys": {
        "legacy": (
            "one id is two legacy rows: decide which record is real, rename or delete the "
            "other in legacy, then re-migrate the key"
        ),
        "identities": (
            "one id is two legacy rows: decide which record is real, rename or delete the "
            "other in legacy, then re-migrate the key"
        ),
    },
    "null_keys": {
        "legacy": "a row without an id cannot be migrated: delete or repair it in legacy",
        "identities": "a row without an id cannot be read: delete or repair it",
    },
    "column_mismatches": {
        "legacy": (
            "the identities row's columns disagree with its document (what P1 reads): "
            f"{_RESTORE} so both are written from one identity"
        ),
        "identities": (
            "the identities row's columns disagree with its document (what P1 reads): "
            f"{_RESTORE} so both are written from one identity"
        ),
    },
    "quarantined": {
        "legacy": (
            "explained: fix the legacy row as the reason says, then run `kimera migrate`; "
            "`kimera migrate quarantine` lists every row"
        ),
        "identities": (
            "explained, but reads come from identities: these rows are not served; fix "
            "them in legacy and run `kimera migrate`"
        ),
    },
    "quarantined_in_identities": {
        "legacy": (
            "explained: identities already held the same row (written before the "
            "migration); fix the legacy row as the reason says and re-migrate"
        ),
        "identities": (
            "explained: identities already held the same row (written before the "
            "migration); fix the legacy row as the reason says and re-migrate"
        ),
    },
}


def authoritative_side(read: str) -> str:
    """'legacy' or 'identities': the store reads come from (``Routing.read``: 'legacy'/'new')."""
    return "identities" if read == "new" else "legacy"


def next_step(kind: str, authoritative: str) -> str:
    """What the operator does about a finding of ``kind``; KeyError for an unknown kind."""
    return NEXT_STEPS[kind][authoritative]


def display(value: Any, limit: int = MAX_CHARS) -> str | None:
    """A value as one line of JSON text (text quoted, so ``"2024"`` and ``2024`` read apart;
    NaN and infinities as Python's JSON writes them), cut to ``limit`` characters with the
    count cut off; None stays None (the side has no value)."""
    if value is None:
        return None
    text = json.dumps(value, ensure_ascii=False, default=str)
    return _window(text, 0, limit)


def _window(text: str, start: int, limit: int) -> str:
    """``limit`` characters of ``text`` from ``start``, each cut marked with what it left out."""
    text = " ".join(text.splitlines())
    if len(text) <= limit:
        return text
    start = max(0, min(start, len(text) - limit))
    head = f"(…{start:,} chars) " if start else ""
    piece = text[start : start + limit]
    rest = len(text) - start - len(piece)
    return head + piece + (f" (…{rest:,} chars)" if rest else "")


def clip(text: str | None, limit: int = MAX_CHARS) -> str | None:
    """Display text cut to ``limit`` characters (None stays None)."""
    return None if text is None else _window(text, 0, limit)


def clip_pair(
    left: str | None, right: str | None, limit: int = MAX_CHARS
) -> tuple[str | None, str | None]:
    """Two display texts of one field cut alike around their first difference, so a long
    value shows where the sides part (both from the same offset)."""
    if left is None or right is None or (len(left) <= limit and len(right) <= limit):
        return clip(left, limit), clip(right, limit)
    first = next(
        (i for i, (a, b) in enumerate(zip(left, right, strict=False)) if a != b),
        min(len(left), len(right)),
    )
    start = max(0, first - limit // 3)
    return _window(left, start, limit), _window(right, start, limit)


@dataclass
class FieldValues:
    """One differing field and the value each side holds (display text; None: absent)."""

    field: str
    left: str | None
    right: str | None


@dataclass
class KeyEvidence:
    """One offending key: its differing fields with both sides' values, and a note (e.g. the
    quarantine reason, or how much newer identities is)."""

    id: str
    fields: list[FieldValues] = field(default_factory=list)
    note: str = ""

    def to_dict(self, sides: tuple[str, str] = STORE_SIDES) -> dict[str, Any]:
        """JSON-ready; each field's values under the finding's side names."""
        return {
            "id": self.id,
            "note": self.note,
            "fields": [
                {"field": f.field, sides[0]: f.left, sides[1]: f.right} for f in self.fields
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], sides: tuple[str, str] = STORE_SIDES) -> KeyEvidence:
        return cls(
            d["id"],
            [FieldValues(f["field"], f[sides[0]], f[sides[1]]) for f in d["fields"]],
            d.get("note", ""),
        )


def _cell(text: str | None) -> str:
    if text is None:
        return "*(absent)*"
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else "`''`"


def evidence_markdown(
    title: str,
    evidence: list[KeyEvidence],
    sides: tuple[str, str] = STORE_SIDES,
    authoritative: str = "legacy",
    step: str = "",
    total: int | None = None,
) -> str:
    """A markdown block: a title line, a table | key | field | <side 0> | <side 1> | note |
    (one row per differing field), the authoritative side and the next step."""
    lines = [f"**{title}**", ""]
    if evidence:
        lines += [
            f"| key | field | {sides[0]} | {sides[1]} | note |",
            "|---|---|---|---|---|",
        ]
        for item in evidence:
            rows = item.fields or [FieldValues("", None, None)]
            for values in rows:
                lines.append(
                    f"| `{item.id}` | {values.field} | {_cell(values.left)} | "
                    f"{_cell(values.right)} | {item.note.replace('|', '/')} |"
                )
        if total is not None and total > len(evidence):
            lines += ["", f"first {len(evidence):,} of {total:,}, by key"]
        lines.append("")
    if sides == STORE_SIDES:
        lines.append(f"Authoritative now: **{authoritative}** (where reads come from).")
    if step:
        lines.append(f"Next step: {step}")
    return "\n".join(lines)
