"""ctune's daily continual-learning DAG; built in ctune_ops.airflow.dags."""

from ctune_ops.airflow.dags import daily_dag

ctune_daily = daily_dag()
