"""Running lm-eval 0.4 on local multiple-choice tasks, offline, on an explicit device.

Why a wrapper: lm-eval's defaults are wrong for this use (device "cuda", 14k built-in tasks indexed in ~14 s,
per-sample logs kept, hub look-ups that hang without a network). Task YAMLs hold absolute ``data_files`` for the
lm-eval CLI; when a workspace has moved (a clone, a container mount), the JSONL beside the YAML is used instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
METRICS = ("acc", "acc_norm")
DEFAULT_BATCH_SIZE = 32


def load_task(path: Path) -> dict[str, Any]:
    """A task YAML as a config dict whose data files exist (re-pointed beside the YAML if it moved)."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    for split, location in list(files.items()) if isinstance(files, dict) else []:
        if isinstance(location, str) and not Path(location).exists() and (path.parent / Path(location).name).exists():
            files[split] = str((path.parent / Path(location).name).resolve())
    return config


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is usable, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(
    model: str | Any,
    task_files: list[Path],
    *,
    peft: str | None = None,
    device: str = "auto",
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: Path | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``model`` (a folder, or an already built ``HFLM``) on the tasks; returns per task acc, acc_norm, n."""
    configs, results = _simple_evaluate(model, task_files, peft=peft, device=device, limit=limit,
                                        batch_size=batch_size, cache_dir=cache_dir, log_samples=False)
    scores = {}
    for config in configs:
        name = config["task"]
        row = results["results"][name]
        scores[name] = {metric: float(row[f"{metric},none"]) for metric in METRICS if f"{metric},none" in row}
        scores[name]["n"] = int(results["n-samples"][name]["effective"])
    return scores


def item_scores(
    model: str | Any,
    task_file: Path,
    metric: str,
    *,
    peft: str | None = None,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: Path | None = None,
) -> list[tuple[dict[str, Any], float]]:
    """Each item of one task with its ``metric`` (lm-eval's per-sample log), in the task's order: for breaking
    a score down by a field of the items, scored exactly as :func:`evaluate` scores the task."""
    configs, results = _simple_evaluate(model, [task_file], peft=peft, device=device, limit=None,
                                        batch_size=batch_size, cache_dir=cache_dir, log_samples=True)
    return [(sample["doc"], float(sample[metric])) for sample in results["samples"][configs[0]["task"]]]


def _simple_evaluate(model: str | Any, task_files: list[Path], *, peft: str | None, device: str, limit: int | None,
                     batch_size: int, cache_dir: Path | None, log_samples: bool) -> tuple[list[dict[str, Any]], Any]:
    """lm-eval's ``simple_evaluate`` on the task YAMLs, offline: their configs and lm-eval's results."""
    os.environ.update(OFFLINE_ENV)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notes about defaults it fills in
    if cache_dir is not None:
        os.environ.setdefault("HF_DATASETS_CACHE", str(cache_dir))
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    configs = [load_task(Path(p)) for p in task_files]
    manager = TaskManager(include_path=sorted({str(Path(p).parent) for p in task_files}), include_defaults=False)
    lm = model if not isinstance(model, str) else HFLM(
        pretrained=model, peft=peft, device=resolve_device(device), dtype="float32", batch_size=batch_size
    )
    with _git_hash_of(Path(task_files[0]).parent):
        results = lm_eval.simple_evaluate(
            model=lm, tasks=configs, task_manager=manager, limit=limit,
            bootstrap_iters=0, log_samples=log_samples, num_fewshot=0,
        )
    return configs, results


@contextmanager
def _git_hash_of(folder: Path) -> Iterator[None]:
    """Make lm-eval record the commit of the repository holding the tasks (a workspace: the version of the data
    evaluated), quietly. Why: lm-eval runs ``git describe`` in the current directory, which under Airflow or the
    demo is no repository, and git prints "fatal: not a git repository" into every stage's log; where it is one
    (a checkout of ctune) that commit says nothing about what was evaluated."""
    from lm_eval import evaluator

    def describe() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], cwd=folder, capture_output=True, text=True,
                                  check=False)
        except OSError:  # no git on the machine
            return None
        return (done.stdout.strip() or None) if done.returncode == 0 else None

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # a later lm-eval that no longer records it
        yield
        return
    evaluator.get_git_commit_hash = describe
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original
