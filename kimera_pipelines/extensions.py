"""Extension points for the observability layer (kimera_pipelines/observability.py).

``EXTRA_SENSORS``: sensors definitions.py adds to the code location.
``RUN_OUTCOME_HOOKS``: callables given each run's outcome (``sensors.record_run_outcome``)
by the run-status sensors, e.g. to push it to a Pushgateway. A hook that raises is logged
and does not stop the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dagster as dg

EXTRA_SENSORS: list[dg.SensorDefinition] = []
RUN_OUTCOME_HOOKS: list[Callable[[dict[str, Any]], None]] = []

# Pushgateway sensors (kimera_pipelines/observability.py, docs/observability.md).
from kimera_pipelines.observability import OBSERVABILITY_SENSORS  # noqa: E402

EXTRA_SENSORS.extend(OBSERVABILITY_SENSORS)
