"""Errors kimera_core raises for conditions a user can act on (shown as one line by the CLI)."""


class KimeraError(Exception):
    """Base class: the message is complete and meant for the user."""


class DatabaseOpenError(KimeraError):
    """A database file cannot be opened; the file was left untouched."""
