"""LoRA training of the deployed model (DESIGN §3.5): one entrypoint, ``python -m ctune_ops.training``.

The same entrypoint trains locally (a subprocess of the ``train`` stage) and in a Kubernetes GPU pod
(:func:`ctune_ops.airflow.kubernetes.training_pod_operator`)::

    python -m ctune_ops.training --spec models/candidates/D/train_spec.json [--workspace ROOT]
    python -m ctune_ops.training --workspace ROOT --date D     # writes that spec from params.yaml first

Modules: :mod:`~ctune_ops.training.spec` (the JSON spec of one run), :mod:`~ctune_ops.training.data` (response-only
labels, the batch plan), :mod:`~ctune_ops.training.checkpoint` (resumable state), :mod:`~ctune_ops.training.loop`
(the training loop). Importing this package imports no torch, transformers or peft; the loop imports them when
it runs.
"""
