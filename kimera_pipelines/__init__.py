"""Dagster code location over kimera_core."""
