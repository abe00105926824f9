"""The ctune Airflow plugin, registered by the ``airflow.plugins`` entry point (never also from plugins/).

It contributes:

* the ``batch_date`` macro, so users' own DAGs resolve a run's batch day by ctune's rule:
  ``{{ macros.ctune.batch_date(params, data_interval_start) }}``;
* ctune's page: a FastAPI app mounted at ``/ctune`` in the API server (:mod:`ctune_ops.airflow.webapp`: versions,
  funnels, trends, compute saved, rollback; behind Airflow's authentication) and an entry in the UI's navigation
  (Browse -> ctune) that shows it;
* the "ctune report" extra link of ctune's tasks.

The app is built on first access of ``fastapi_apps`` (only the API server asks), so schedulers and workers that
load plugins for the macro do not import FastAPI routes and Airflow's API security module.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from ctune_ops.airflow import URL_PREFIX
from ctune_ops.airflow.dates import batch_date


class CtunePlugin(AirflowPlugin):
    name = "ctune"
    macros = [batch_date]
    external_views = [{
        "name": "ctune",
        "href": f"{URL_PREFIX}/",
        "destination": "nav",
        "category": "browse",
        "url_route": "ctune",
    }]

    @cached_property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        from ctune_ops.airflow.webapp import create_app

        return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "ctune"}]

    @cached_property
    def operator_extra_links(self) -> list[Any]:  # type: ignore[override]
        from ctune_ops.airflow.operators import CtuneReportLink

        return [CtuneReportLink()]
