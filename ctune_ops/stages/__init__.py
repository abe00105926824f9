"""The pipeline stages of DESIGN §3, one module each, every one a function ``run(ws, date) -> StageResult``.

Stages read their inputs from the workspace and write their outputs there; the CLI (``ctune stage NAME``), DVC
(``dvc.yaml`` runs that command) and the Airflow operators all call them through :func:`run_stage`. The registry
(:mod:`ctune_ops.pipeline`, which also holds the stage names and the batch-date rule) names modules as strings and
imports them on use; no stage module imports Airflow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ctune_ops.pipeline import DVC_STAGE_NAMES, IN_POD_ENV, STAGE_FUNCTIONS, STAGE_NAMES, StageError, check_date

if TYPE_CHECKING:
    from ctune_ops.workspace import Workspace

__all__ = ["DVC_STAGE_NAMES", "IN_POD_ENV", "STAGE_NAMES", "StageError", "StageFunction", "StageResult",
           "check_date", "get_stage", "run_stage"]


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
    target = STAGE_FUNCTIONS.get(name)
    if target is None:
        raise StageError(f"unknown stage {name!r}; the stages are: {', '.join(STAGE_NAMES)}")
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def run_stage(ws: Workspace, name: str, date: str) -> StageResult:
    """Run stage ``name`` for batch date ``date`` on the workspace (the caller holds the workspace lock).

    Refuses while a promote or rollback is half done (only promote itself may finish it)."""
    stage = get_stage(name)
    if name != "promote":
        from ctune_ops.registry import refuse_if_interrupted

        refuse_if_interrupted(ws)
    return stage(ws, check_date(date))
