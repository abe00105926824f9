"""The ctune Airflow plugin, registered by the ``airflow.plugins`` entry point (never also from plugins/).

It contributes the ``batch_date`` macro, so users' own DAGs resolve a run's batch day by ctune's rule:
``{{ macros.ctune.batch_date(params, data_interval_start) }}``.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from ctune_ops.airflow.dates import batch_date


class CtunePlugin(AirflowPlugin):
    name = "ctune"
    macros = [batch_date]
