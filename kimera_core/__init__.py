"""Kimera core: domain model, entropy, storage layout, migration and verification (no Dagster)."""

__version__ = "0.1.0"
