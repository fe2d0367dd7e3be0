"""How the code location publishes the core's typed reports, and the readable entries beside them.

Each core report travels whole as ONE ``MetadataValue.json`` entry under a key named here,
beside the human-readable entries the UI shows. The readers (``defs/observability.py``)
look a report up by that key and rebuild the type with its ``from_dict``; nothing is
flattened into strings and parsed back.

==============================  ======================================  =================
key                             value (``to_dict`` of)                  on
==============================  ======================================  =================
``MIGRATION_REPORT``            ``migration.MigrationReport``           identities (materialization)
``MIGRATION_PARTITION``         ``migration.PartitionCounts``           identities (observation, per step)
``GATE``                        ``gates.Gate``                          each consistency check
``ENTROPY_STATISTICS``          ``report.EntropyStatistics``            entropy_distribution
``ADVANCE``                     ``rollout.AdvanceResult``               rollout_stage (an advance)
``REPAIR_REPORT``               ``repair.RepairReport``                 repair
==============================  ======================================  =================
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

MIGRATION_REPORT = "migration_report"
MIGRATION_PARTITION = "migration_partition"
STEPS_DONE = "steps_done"  # beside MIGRATION_PARTITION: n of the run's planned steps
STEPS_PLANNED = "steps_planned"  # a step: one table (geoids, scars) of one partition
GATE = "gate"
GATE_REPORT = "gate_report"  # the whole GateReport (every gate and the verification) once a step
ENTROPY_STATISTICS = "entropy_statistics"
ADVANCE = "advance"
REPAIR_REPORT = "repair_report"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> dg.MetadataValue:
    """A markdown table entry: ``header`` over ``rows`` (cells as ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))
