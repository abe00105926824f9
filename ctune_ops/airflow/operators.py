"""Thin Airflow operators: each opens the workspace, takes its lock, runs one stage and returns its summary.

All the work is in the stage (:mod:`ctune_ops.stages`), which a test, the CLI and DVC call the same way; the
operator only resolves the batch date by ctune's rule (:func:`ctune_ops.airflow.dates.context_batch_date`),
serialises workspace access and pushes the stage's small JSON summary to XCom. Importing this module imports no
heavy library: DAG files import it on every parse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from ctune_ops.airflow.dates import batch_date, context_batch_date
from ctune_ops.stages import STAGE_NAMES, check_date, get_stage
from ctune_ops.workspace import LOCK_TIMEOUT_S, Workspace


class CtuneStageOperator(BaseOperator):
    """Run ctune stage ``stage`` for one batch date on the workspace at ``workspace``.

    ``date`` (templated) defaults to the run's batch date: the ``date`` param, else the data interval start.
    A stage name that does not exist fails when the DAG is parsed; a missing input (say, a day folder upstream
    has not delivered yet) raises a retryable error naming it.
    """

    template_fields: Sequence[str] = ("workspace", "date")
    ui_color = "#d9ecf2"

    def __init__(
        self,
        *,
        stage: str,
        workspace: str,
        date: str | None = None,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        if stage not in STAGE_NAMES:  # a typo fails when the DAG is parsed, not at run time
            raise ValueError(f"unknown ctune stage {stage!r}; the stages are: {', '.join(STAGE_NAMES)}")
        super().__init__(**kwargs)
        self.stage = stage
        self.workspace = workspace
        self.date = date
        self.lock_timeout_s = lock_timeout_s

    def execute(self, context: Any) -> dict[str, Any]:
        date = batch_date({"date": self.date}, None) if self.date else context_batch_date(context)
        run = get_stage(self.stage)
        ws = Workspace.open(self.workspace)
        self.log.info("ctune stage %s for %s on %s", self.stage, date, ws.root)
        with ws.lock(timeout_s=self.lock_timeout_s, purpose=f"{self.task_id}: stage {self.stage} {date}"):
            result = run(ws, check_date(date))
        for name, path in result.outputs.items():
            self.log.info("%s: %s", name, path)
        return result.summary


class ValidateOperator(CtuneStageOperator):
    """The validate stage (DESIGN §3.1): accepted and quarantined rows and ``reports/D/validation.json``."""

    def __init__(self, *, workspace: str, date: str | None = None, **kwargs: Any) -> None:
        super().__init__(stage="validate", workspace=workspace, date=date, **kwargs)
