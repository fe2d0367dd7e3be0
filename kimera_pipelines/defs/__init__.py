"""One module per domain (legacy, migration, consistency, entropy, rollout, observability).

Each holds its own assets, checks, jobs, schedules and sensors and exposes ``defs``;
``kimera_pipelines.definitions`` merges them and binds the resources.
"""
