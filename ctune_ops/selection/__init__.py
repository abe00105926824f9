"""The algorithms behind the dedup, score and select stages: MinHash signatures, the history index in
``state/history.sqlite``, the batched proxy scorer and the selection policy. Nothing here imports Airflow; torch is
imported inside the scorer's functions only."""
