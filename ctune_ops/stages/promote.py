"""The promote stage (DESIGN §3.8): version the day, promoting its candidate or keeping production.

Reads the gate's decision from ``reports/D/eval.json``; :func:`ctune_ops.registry.promote` does the work (install
the candidates, mark the day's rows trained or not trained, record everything in DVC and git, tag ``vN``).
"""

from __future__ import annotations

from ctune_ops.registry import promote
from ctune_ops.stages import StageResult
from ctune_ops.workspace import Workspace

STAGE = "promote"


def run(ws: Workspace, date: str) -> StageResult:
    outcome = promote(ws, date)
    summary = {"date": date, "decision": outcome.decision, "version": outcome.version, "parent": outcome.parent,
               "already_recorded": outcome.already}
    outputs = {"registry": "registry.json", "current": "CURRENT"}
    return StageResult(STAGE, date, summary, outputs)
