"""ctune: keep a deployed LLM learning from daily instruction data, training only on what it does not know.

The package is importable without Airflow running and without heavy ML libraries: modules import torch,
transformers, peft, great_expectations and lm_eval inside the functions that need them, so that DAG files
and the Airflow plugin parse in well under a second.
"""

import warnings

__version__ = "0.1.0"
PARAMS_FILE = "params.yaml"  # a workspace's configuration (ctune_ops.config reads it)

# peft (0.21) asks every model it wraps for ``is_gradient_checkpointing``, an alias transformers (5.x) deprecates;
# each LoRA load would log a FutureWarning no ctune user can act on (in every train, proxy and evaluate task log).
# Only that message is silenced; ``is_activation_checkpointing`` is what both will use once peft moves.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
