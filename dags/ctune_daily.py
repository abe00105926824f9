"""ctune's daily continual-learning DAG (and its Asset-triggered twin); built in ctune_ops.airflow.dags."""

from ctune_ops.airflow.dags import daily_dag, incoming_dag

ctune_daily = daily_dag()
ctune_incoming = incoming_dag()
