"""Manual rollback to a promoted version (Param ``version``); built in ctune_ops.airflow.dags."""

from ctune_ops.airflow.dags import rollback_dag

ctune_rollback = rollback_dag()
