"""The database server: one process owns the DuckDB file, every other process talks to it.

DuckDB lets one process write a file. ``server`` owns it (``kimera db serve``) and gives
each client connection its own cursor, so each client has its own transaction context and
DuckDB's MVCC runs them concurrently in one process. ``client`` is the proxy connection
``kimera_core.db.open_database`` returns for a ``kimera://host:port`` address: the same
calls as a DuckDB connection (execute with bound parameters, fetch, Arrow, register,
transactions), forwarded. ``protocol`` holds the frames, the typed value codec, addresses
and tokens. docs/deployment.md explains the modes and their limits.

This package root imports nothing: ``kimera_core.db`` imports ``client`` and ``server``
imports ``kimera_core.db``.
"""
