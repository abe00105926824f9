"""The batch date of a DAG run, the one rule every ctune task uses to know which day it processes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any


class BatchDateError(ValueError):
    """A run that names no batch day: neither a ``date`` param nor a data interval."""


def batch_date(params: Mapping[str, Any] | None, data_interval_start: dt.datetime | None) -> str:
    """The ``date`` param if set, else the run's data interval start, as YYYY-MM-DD.

    Never ``{{ ds }}``: Airflow 3 runs without a logical date (manual or asset-triggered) have none. In a
    template: ``{{ macros.ctune.batch_date(params, data_interval_start) }}``.
    """
    explicit = (params or {}).get("date")
    if explicit:
        try:
            return dt.date.fromisoformat(str(explicit)).isoformat()
        except ValueError:
            raise BatchDateError(f"param 'date' is {explicit!r}; expected YYYY-MM-DD") from None
    if data_interval_start is not None:
        return data_interval_start.date().isoformat()
    raise BatchDateError("this run has no data interval; trigger it with the 'date' param set (YYYY-MM-DD)")


def context_batch_date(context: Mapping[str, Any]) -> str:
    """:func:`batch_date` of a task's execution context."""
    return batch_date(context.get("params"), context.get("data_interval_start"))
