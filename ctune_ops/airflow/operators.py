"""Thin Airflow operators: each opens the workspace, takes its lock, runs one stage and returns its summary.

All the work is in the stage (:mod:`ctune_ops.stages`), which a test, the CLI and DVC call the same way; the
operator only resolves the batch date by ctune's rule (:func:`ctune_ops.airflow.dates.context_batch_date`),
serialises workspace access, records the stage's inputs and outputs in ``dvc.lock`` (``dvc commit`` of that DVC
stage, so ``dvc status`` and ``dvc repro`` see what ran), pushes the stage's small JSON summary to XCom and the
address of the day's report for the task's extra link. Importing this module imports no heavy library: DAG files
import it on every parse. The rollback operator is in :mod:`ctune_ops.airflow.rollback`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, BaseOperatorLink

from ctune_ops.airflow import URL_PREFIX
from ctune_ops.airflow.access import lock_timeout, open_workspace
from ctune_ops.pipeline import DVC_STAGE_NAMES, STAGE_NAMES, check_date


def report_url(date: str) -> str:
    """The plugin's page for one day (its funnel, scores and reports)."""
    return f"{URL_PREFIX}/days/{date}"


class CtuneReportLink(BaseOperatorLink):
    """"ctune report" on a ctune task: the plugin's page for the day the task processed (set when it ran)."""

    name = "ctune report"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        """The address the task pushed under ``xcom_key`` (the API server reads the same XCom itself)."""
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=self.xcom_key) or ""


class CtuneStageOperator(BaseOperator):
    """Run ctune stage ``stage`` for one batch date on the workspace at ``workspace``.

    ``date`` (templated) defaults to the run's batch date: the ``date`` param, else the data interval start.
    A stage name that does not exist fails when the DAG is parsed; a missing input (say, a day folder upstream
    has not delivered yet) raises a retryable error naming it.
    """

    template_fields: Sequence[str] = ("workspace", "date")
    ui_color = "#d9ecf2"
    operator_extra_links = (CtuneReportLink(),)

    def __init__(
        self,
        *,
        stage: str,
        workspace: str,
        date: str | None = None,
        lock_timeout_s: float | None = None,
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
        from ctune_ops.airflow.dates import batch_date, context_batch_date  # at run time: not needed to parse
        from ctune_ops.airflow.task_log import stderr_as_log
        from ctune_ops.stages import run_stage

        date = check_date(batch_date({"date": self.date}, None) if self.date else context_batch_date(context))
        ws = open_workspace(self.workspace)
        self.log.info("ctune stage %s for %s on %s", self.stage, date, ws.root)
        purpose = f"{self.task_id}: stage {self.stage} {date}"
        with ws.lock(timeout_s=lock_timeout(self.lock_timeout_s), purpose=purpose), stderr_as_log(self.log):
            result = run_stage(ws, self.stage, date)
            if self.stage in DVC_STAGE_NAMES:
                from ctune_ops.registry import record_stage

                record_stage(ws, date, self.stage)
        for name, path in result.outputs.items():
            self.log.info("%s: %s", name, path)
        if context.get("ti") is not None:  # always in Airflow; tests may call execute with a bare context
            context["ti"].xcom_push(key=CtuneReportLink().xcom_key, value=report_url(date))
        return result.summary


class ValidateOperator(CtuneStageOperator):
    """The validate stage (DESIGN §3.1): accepted and quarantined rows and ``reports/D/validation.json``."""

    def __init__(self, *, workspace: str, date: str | None = None, **kwargs: Any) -> None:
        super().__init__(stage="validate", workspace=workspace, date=date, **kwargs)
