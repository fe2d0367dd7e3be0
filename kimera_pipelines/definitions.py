"""The Dagster code location: ``dagster dev`` loads ``defs`` from here (workspace.yaml).

One ``Definitions`` per domain (``kimera_pipelines/defs/<domain>.py``), merged as
dagster-open-platform does, plus the resources every domain shares: the DuckDB database
(``KIMERA_DB``) and the Pushgateway (``KIMERA_PUSHGATEWAY``).
"""

from __future__ import annotations

import dagster as dg

from kimera_pipelines.defs import (
    consistency,
    entropy,
    legacy,
    migration,
    observability,
    repair,
    rollout,
)
from kimera_pipelines.resources import database_from_env, pushgateway_from_env

defs = dg.Definitions.merge(
    legacy.defs,
    migration.defs,
    consistency.defs,
    entropy.defs,
    rollout.defs,
    repair.defs,
    observability.defs,
    dg.Definitions(
        resources={"database": database_from_env(), "prometheus": pushgateway_from_env()}
    ),
)
