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

# Pipeline order (DESIGN §3); promote is not a stage (it moves candidates into models/ and tags a version).
_STAGES = {
    "validate": "ctune_ops.stages.validate:run",
    "dedup": "ctune_ops.stages.dedup:run",
    "score": "ctune_ops.stages.score:run",
    "select": "ctune_ops.stages.select:run",
    "train": "ctune_ops.stages.train:run",
    "proxy": "ctune_ops.stages.proxy:run",
    "evaluate": "ctune_ops.stages.evaluate:run",
}
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
    """Run stage ``name`` for batch date ``date`` on the workspace (the caller holds the workspace lock)."""
    return get_stage(name)(ws, check_date(date))
