"""ctune's daily tasks triggered by a new batch in incoming/ (an Asset event); built in ctune_ops.airflow.dags."""

from ctune_ops.airflow.dags import incoming_dag

ctune_incoming = incoming_dag()
