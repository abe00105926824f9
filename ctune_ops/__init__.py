"""ctune: keep a deployed LLM learning from daily instruction data, training only on what it does not know.

The package is importable without Airflow running and without heavy ML libraries: modules import torch,
transformers, peft, great_expectations and lm_eval inside the functions that need them, so that DAG files
and the Airflow plugin parse in well under a second.
"""

__version__ = "0.1.0"
PARAMS_FILE = "params.yaml"  # a workspace's configuration (ctune_ops.config reads it)
