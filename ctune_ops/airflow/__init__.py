"""ctune's Airflow integration: provider info, the plugin and (later) the operators and DAG builders.

Nothing here imports torch, transformers, peft, great_expectations or lm_eval at module level: DAG files and the
plugin import this package on every parse.
"""
