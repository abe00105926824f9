"""The train stage (DESIGN §3.5): continue LoRA training of the production adapter on the day's training set.

Reads ``data/selected/D.jsonl`` (the select stage's training set) and ``models/deployed`` (the production adapter,
when one is promoted); writes ``models/candidates/D/adapter`` (safetensors + ``ctune_prompt.json``) and
``reports/D/train.json``, with the training log in ``reports/D/train.log``.

With ``train.backend: local`` the stage writes the run's spec (``models/candidates/D/train_spec.json``) and runs
``python -m ctune_ops.training --spec ...`` as a subprocess, streaming its log: the training process owns torch,
its memory and its threads, and a killed stage leaves checkpoints the next attempt resumes from. With
``backend: kubernetes`` the Airflow DAG trains in a GPU pod built by
:func:`ctune_ops.airflow.kubernetes.training_pod_operator` instead, and this stage refuses to run.

An empty training set (every row was known, duplicate or misaligned) still yields a candidate: the production
adapter unchanged (or, before the first promotion, a new LoRA adapter that leaves the base unchanged), with a
report of 0 rows and 0 steps, so evaluation and promotion see the day like any other and keep production.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from ctune_ops.stages import StageError, StageResult
from ctune_ops.stages.dedup import require_input
from ctune_ops.training.spec import LOG_FILE, spec_for_day, spec_path, write_spec
from ctune_ops.workspace import Workspace

STAGE = "train"
TAIL_LINES = 20  # log lines quoted in the error of a failed run
SUMMARY_KEYS = ("rows", "steps", "tokens_seen", "response_tokens", "first_loss", "final_loss", "wall_s", "device",
                "dtype", "resumed_from", "continued_from")
log = logging.getLogger(__name__)


def _relative(ws: Workspace, path: Path) -> str:
    return path.relative_to(ws.root).as_posix()


def run_training_process(ws: Workspace, spec_file: Path, log_file: Path) -> None:
    """Run the training entrypoint on ``spec_file``, streaming its output to our log and to ``log_file``."""
    command = [sys.executable, "-m", "ctune_ops.training", "--spec", str(spec_file), "--workspace", str(ws.root)]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log.info("train: %s", " ".join(command))
    with open(log_file, "w", encoding="utf-8") as sink, subprocess.Popen(
        command, cwd=ws.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    ) as process:
        assert process.stdout is not None  # stdout=PIPE
        for line in process.stdout:
            sink.write(line)
            sink.flush()
            tail.append(line.rstrip("\n"))
            log.info("train: %s", line.rstrip("\n"))
        code = process.wait()
    if code != 0:
        last = "\n  ".join(tail)
        raise StageError(f"training failed (exit status {code}); the log is {_relative(ws, log_file)}, the spec "
                         f"{_relative(ws, spec_file)}; its last lines:\n  {last}")


def run(ws: Workspace, date: str) -> StageResult:
    config = ws.config.train
    if config.backend == "kubernetes":
        raise StageError(
            "params.yaml: key 'train.backend' is kubernetes: training runs in a GPU pod, a KubernetesPodOperator "
            "built by ctune_ops.airflow.kubernetes.training_pod_operator (the Airflow DAG uses it in place of the "
            "local train task), not in this stage; set train.backend: local to train here"
        )
    require_input(ws.selected(date), ws, "select")
    spec = spec_for_day(ws, date)
    spec_file = write_spec(spec, spec_path(ws, date))
    log_file = ws.reports(date) / LOG_FILE
    run_training_process(ws, spec_file, log_file)
    report_path = require_input(spec.path(ws.root, spec.report), ws, "train")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    summary = {"date": date, **{key: report[key] for key in SUMMARY_KEYS}}
    return StageResult(STAGE, date, summary, {
        "adapter": spec.output_dir,
        "report": spec.report,
        "log": _relative(ws, log_file),
        "spec": _relative(ws, spec_file),
    })
