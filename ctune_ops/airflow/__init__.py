"""ctune's Airflow integration: provider info, the plugin and its page, operators, DAG builders, a local runner.

Nothing here imports torch, transformers, peft, great_expectations or lm_eval at module level: DAG files and the
plugin import this package on every parse.
"""

URL_PREFIX = "/ctune"  # where the plugin mounts ctune's page in the API server
