"""The pipeline's stages by name, and the batch-date rule every stage applies: what a DAG file needs to parse.

Kept apart from :mod:`ctune_ops.stages` (the registry's functions and ``StageResult``), importing nothing but
datetime, so the operators can check a stage name when a DAG file is parsed for the cost of reading this module.
"""

from __future__ import annotations

import datetime as dt

# Pipeline order (DESIGN §3): stage -> "module:function" (imported on use). Promote is no DVC stage (it versions
# what the others made: candidates into models/, dvc add, commit, tag), but it runs like one, so operators and
# `ctune stage promote` call it the same way.
STAGE_FUNCTIONS = {
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
STAGE_NAMES = tuple(STAGE_FUNCTIONS)
DVC_STAGE_NAMES = tuple(name for name in STAGE_NAMES if name != "promote")
IN_POD_ENV = "CTUNE_IN_POD"  # set in the Kubernetes pods that run a stage (ctune_ops/airflow/kubernetes.py)


class StageError(RuntimeError):
    """A stage cannot run: a missing input folder, a missing model, a stage not built yet. Says which and why."""


def check_date(date: str) -> str:
    """``date`` if it is a calendar date written YYYY-MM-DD, else a StageError saying so."""
    try:
        if dt.date.fromisoformat(date).isoformat() == date:
            return date
    except (TypeError, ValueError):
        pass
    raise StageError(f"batch date {date!r} is not a calendar date written YYYY-MM-DD")
