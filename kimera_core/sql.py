"""SQL safety: values are always bound parameters; identifiers pass through ``vetted_identifier``."""

from __future__ import annotations

import re

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def vetted_identifier(name: str) -> str:
    """A quoted SQL identifier, refusing anything but a plain name."""
    if not isinstance(name, str) or not _IDENT_RE.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return f'"{name}"'
