"""The pipeline stages of DESIGN §3, one module each, every one a function ``run(ws, date) -> StageResult``.

Stages read their inputs from the workspace and write their outputs there; the CLI (``ctune stage NAME``), DVC
(``dvc.yaml`` runs that command) and the Airflow operators all call them through :func:`run_stage`. The registry
names modules as strings and imports them on use, so importing this package stays cheap for DAG files; no stage
module imports Airflow.
"""

from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ctune_ops.workspace import Workspace

# Pipeline order (DESIGN §3). Promote is no DVC stage (it versions what the others made: candidates into models/,
# dvc add, commit, tag), but it runs like one, so operators and `ctune stage promote` call it the same way.
_STAGES = {
    "validate": "ctune_ops.stages.validate:run",
    "dedup": "ctune_ops.stages.dedup:run",
    "score": "ctune_ops.stages.score:run",
    "select": "ctune_ops.stages.select:run",
    "train": "ctune_ops.stages.train:run",
    "proxy": "ctune_ops.stages.proxy:run",
    "evaluate": "ctune_ops.stages.evaluate:run",
    "repair": "ctune_ops.stages.repair:run",
    "promote": "ctune_ops.stages.promote:run",
}
IN_POD_ENV = "CTUNE_IN_POD"  # set in the Kubernetes pods that run a stage (ctune_ops/airflow/kubernetes.py)
DVC_STAGE_NAMES = tuple(name for name in _STAGES if name != "promote")
STAGE_NAMES = tuple(_STAGES)


class StageError(RuntimeError):
    """A stage cannot run: a missing input folder, a missing model, a stage not built yet. Says which and why."""


@dataclass(frozen=True)
class StageResult:
    """What a stage did: ``summary`` is small and JSON-serialisable (it becomes the Airflow task's XCom);
    ``outputs`` maps names to the files written, relative to the workspace root."""

    stage: str
    date: str
    summary: dict[str, Any]
    outputs: dict[str, str] = field(default_factory=dict)


StageFunction = Callable[["Workspace", str], StageResult]


def get_stage(name: str) -> StageFunction:
    """The ``run`` function of stage ``name``; fails clearly for an unknown name."""
    target = _STAGES.get(name)
    if target is None:
        raise StageError(f"unknown stage {name!r}; the stages are: {', '.join(STAGE_NAMES)}")
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def check_date(date: str) -> str:
    """``date`` if it is a calendar date written YYYY-MM-DD, else a StageError saying so."""
    try:
        if dt.date.fromisoformat(date).isoformat() == date:
            return date
    except (TypeError, ValueError):
        pass
    raise StageError(f"batch date {date!r} is not a calendar date written YYYY-MM-DD")


def run_stage(ws: Workspace, name: str, date: str) -> StageResult:
    """Run stage ``name`` for batch date ``date`` on the workspace (the caller holds the workspace lock).

    Refuses while a promote or rollback is half done (only promote itself may finish it)."""
    stage = get_stage(name)
    if name != "promote":
        from ctune_ops.registry import refuse_if_interrupted

        refuse_if_interrupted(ws)
    return stage(ws, check_date(date))
