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


def asset_event_date(context: Mapping[str, Any]) -> str | None:
    """The ``date`` in the ``extra`` of the asset event that triggered the run (``ctune_incoming``), if any."""
    events = context.get("triggering_asset_events") or {}
    for asset_events in events.values():
        for event in asset_events:
            date = (getattr(event, "extra", None) or {}).get("date")
            if date:
                return str(date)
    return None


def context_batch_date(context: Mapping[str, Any]) -> str:
    """:func:`batch_date` of a task's execution context; an asset-triggered run's event may name the day."""
    params = dict(context.get("params") or {})
    if not params.get("date") and context.get("data_interval_start") is None:
        params["date"] = asset_event_date(context)
    return batch_date(params, context.get("data_interval_start"))
