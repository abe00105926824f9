"""The rollback operator (the ``ctune_rollback`` DAG's one task), in a module of its own.

The rollback DAG file imports only this: not the stage operators' module, whose extra link costs the parse the
import of Airflow's operator-link machinery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from ctune_ops.airflow.access import lock_timeout, open_workspace


class RollbackOperator(BaseOperator):
    """Make ``version`` (templated; the ``ctune_rollback`` DAG's Param) production again, as ``ctune rollback``."""

    template_fields: Sequence[str] = ("workspace", "version")
    ui_color = "#f2dcd9"

    def __init__(self, *, workspace: str, version: str, lock_timeout_s: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.workspace = workspace
        self.version = version
        self.lock_timeout_s = lock_timeout_s

    def execute(self, context: Any) -> dict[str, Any]:
        from ctune_ops.airflow.task_log import stderr_as_log
        from ctune_ops.registry import rollback

        ws = open_workspace(self.workspace)
        purpose = f"{self.task_id}: rollback {self.version}"
        with ws.lock(timeout_s=lock_timeout(self.lock_timeout_s), purpose=purpose), stderr_as_log(self.log):
            outcome = rollback(ws, self.version, after_step=lambda step: self.log.info("rollback step %s done", step))
        self.log.info("production: %s (was %s)", outcome.version, outcome.previous)
        return {"version": outcome.version, "previous": outcome.previous, "already": outcome.already}
