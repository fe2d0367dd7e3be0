"""The ``kimera`` CLI: one module per command group, shared options in ``options``."""

from kimera_core.cli.main import cli, main

__all__ = ["cli", "main"]
