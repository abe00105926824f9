"""The DAGs of DESIGN §4, built by functions: ``dags/*.py`` are one line each and tests build the same objects.

* ``ctune_daily``: ``@daily`` with catchup (a backfill is a range of days), one run at a time, each task depending
  on its previous run (continual learning is sequential), every task in the one-slot ``ctune_workspace`` pool,
  retries (the stages are idempotent). Tasks: validate -> dedup -> score -> select -> train -> update_proxy ->
  evaluate -> repair -> promote. The batch date is the ``date`` param when given, else the run's data interval start.
* ``ctune_incoming``: the same tasks, triggered by an event on the ``incoming/`` Asset; the event's ``extra`` (or
  the ``date`` param) names the day.
* ``ctune_rollback``: manual, Param ``version``.

The workspace is a templated field: the Airflow Variable ``ctune_workspace`` when set, else the ``CTUNE_WORKSPACE``
environment variable read when the file is parsed. The start date comes from ``CTUNE_START_DATE`` (default: the
demo world's first day). Parsing reads the workspace's ``params.yaml`` only to pick the training backend.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from airflow.sdk import DAG, Asset, Param, chain

WORKSPACE_ENV = "CTUNE_WORKSPACE"
START_DATE_ENV = "CTUNE_START_DATE"
END_DATE_ENV = "CTUNE_END_DATE"  # optional: no scheduled runs after it (the demo's last day)
WORKSPACE_VARIABLE = "ctune_workspace"
POOL = "ctune_workspace"  # one slot: DVC's repository lock fails fast, so workspace tasks never overlap
DEFAULT_WORKSPACE = "demo-workspace"
TRAIN_BACKENDS = ("local", "kubernetes")
DEFAULT_START_DATE = "2026-01-01"  # the demo world's day 1
RETRIES = 2
RETRY_DELAY = dt.timedelta(seconds=30)
# task id -> stage (DESIGN §4 names the proxy task update_proxy)
DAILY_TASKS = (
    ("validate", "validate"), ("dedup", "dedup"), ("score", "score"), ("select", "select"), ("train", "train"),
    ("update_proxy", "proxy"), ("evaluate", "evaluate"), ("repair", "repair"), ("promote", "promote"),
)
POD_TASKS = {"train": "training_pod_operator", "repair": "repair_pod_operator"}  # train.backend: kubernetes
DATE_PARAM = Param(None, type=["null", "string"], pattern=r"^\d{4}-\d{2}-\d{2}$",
                   description="Batch date YYYY-MM-DD; empty = the run's data interval start (scheduled and "
                               "backfill runs)")


def workspace_path() -> str:
    """The workspace a DAG file points at when the ``ctune_workspace`` Variable is not set."""
    return os.path.abspath(os.environ.get(WORKSPACE_ENV, DEFAULT_WORKSPACE))


def workspace_template(default: str | None = None) -> str:
    """The operators' ``workspace`` field: the Variable when set (rendered at run time), else ``default``."""
    return "{{ var.value.get(" + f"{WORKSPACE_VARIABLE!r}, {default or workspace_path()!r}" + ") }}"


def _env_date(name: str, default: str | None) -> dt.datetime | None:
    value = os.environ.get(name, default)
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected YYYY-MM-DD") from None


def start_date() -> dt.datetime:
    return _env_date(START_DATE_ENV, DEFAULT_START_DATE)


def end_date() -> dt.datetime | None:
    return _env_date(END_DATE_ENV, None)


def _train_backend(workspace: str) -> str:
    """``train.backend`` of the workspace's params.yaml; ``local`` when there is no workspace yet.

    Read without the typed config (building its models would cost a DAG file 25 ms on every parse) and, where
    the file says it plainly, without YAML: a ``train:`` block holding one ``backend: local`` or ``backend:
    kubernetes`` line at its keys' indentation is read off that line (parsing the block with libyaml would be
    most of a ~5 ms parse's share that is ctune's). Anything else (flow style, an alias, a value that is no known
    backend, no such line) goes to YAML: the ``train:`` section alone where it stands as a block of its own, else
    the whole file, with libyaml's loader where PyYAML has it; a value that is not a known backend loads the
    typed config, whose error names the file, line and key.
    """
    from pathlib import Path

    from ctune_ops import PARAMS_FILE

    params = Path(workspace) / PARAMS_FILE
    if not params.exists():
        return "local"
    text = params.read_text(encoding="utf-8")
    block = _top_level_block(text, "train")
    backend = _plain_backend(block)
    if backend is not None:
        return backend
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(block, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        data = yaml.load(text, Loader=loader) or {}  # noqa: S506 - a safe loader
    backend = (data.get("train") or {}).get("backend", "local") if isinstance(data, dict) else None
    if backend not in TRAIN_BACKENDS:
        from ctune_ops.config import load_config

        return load_config(params).train.backend
    return backend


def _plain_backend(block: str) -> str | None:
    """The backend a ``train:`` block names on a line of its own (``  backend: kubernetes  # comment``, the
    value plain or quoted), at the indentation of the block's first key; None when it does not say so plainly
    (no such line, two of them, or anything YAML must read). String methods, not regular expressions: compiling
    two would cost the parse about as much as they save."""
    lines = block.splitlines()
    head = lines[0].rstrip() if lines else ""
    if head != "train:" and not (head.startswith("train: ") and head[7:].lstrip().startswith("#")):
        return None  # "train: {...}", "train: *pod": YAML reads those
    keys = [line for line in lines[1:] if line.strip() and not line.lstrip().startswith("#")]
    indent = keys[0][: len(keys[0]) - len(keys[0].lstrip(" "))] if keys else ""
    found = [line[len(indent):] for line in keys if indent and line.startswith(indent + "backend")]
    if len(found) != 1 or not found[0].startswith("backend: "):
        return None
    value = found[0][len("backend: "):].split(" #", 1)[0].strip()
    if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0]:
        value = value[1:-1]
    return value if value in TRAIN_BACKENDS else None


def _top_level_block(text: str, key: str) -> str:
    """The lines of ``key:`` at the top level of a YAML mapping up to the next top-level line ('' if absent)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(f"{key}:")), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines))
                if lines[i][:1] not in ("", " ", "\t", "\n", "\r", "#")), len(lines))
    return "".join(lines[start:end])


def _default_args() -> dict[str, Any]:
    return {"owner": "ctune", "depends_on_past": True, "pool": POOL, "retries": RETRIES, "retry_delay": RETRY_DELAY}


def _daily_tasks(workspace: str) -> list[Any]:
    from ctune_ops.airflow.operators import CtuneStageOperator  # here: the rollback DAG's file does without it

    config = None  # the typed config, loaded once and only for the pod backend
    if _train_backend(workspace) == "kubernetes":
        from ctune_ops.config import load_config

        config = load_config(os.path.join(workspace, "params.yaml"))
    tasks = []
    for task_id, stage in DAILY_TASKS:
        if stage in POD_TASKS and config is not None:
            from ctune_ops.airflow import kubernetes

            tasks.append(getattr(kubernetes, POD_TASKS[stage])(config=config, task_id=task_id))
        else:
            tasks.append(CtuneStageOperator(task_id=task_id, stage=stage, workspace=workspace_template(workspace)))
    chain(*tasks)
    return tasks


def _pipeline_dag(dag_id: str, workspace: str | None, schedule: Any, **scheduling: Any) -> DAG:
    """A DAG of the nine daily tasks; ``schedule`` and ``scheduling`` (catchup, end date, ...) say when it runs."""
    workspace = workspace or workspace_path()
    default_args = {**_default_args(), **scheduling.pop("default_args", {})}
    with DAG(dag_id, schedule=schedule, start_date=start_date(), max_active_runs=1, default_args=default_args,
             params={"date": DATE_PARAM}, tags=["ctune"], doc_md=__doc__, **scheduling) as dag:
        _daily_tasks(workspace)
    return dag


def daily_dag(dag_id: str = "ctune_daily", workspace: str | None = None) -> DAG:
    """The daily continual-learning DAG (see the module docstring)."""
    return _pipeline_dag(dag_id, workspace, schedule="@daily", end_date=end_date(), catchup=True)


def incoming_asset(workspace: str | None = None) -> Asset:
    """The ``incoming/`` folder as an Asset: upstream emits an event (``extra={"date": D}``) when a batch lands."""
    return Asset(name="ctune_incoming", uri=f"file://{os.path.join(workspace or workspace_path(), 'incoming')}")


def incoming_dag(dag_id: str = "ctune_incoming", workspace: str | None = None) -> DAG:
    """The daily tasks triggered by a new batch in ``incoming/`` instead of the clock."""
    return _pipeline_dag(dag_id, workspace, schedule=[incoming_asset(workspace)], catchup=False,
                         default_args={"depends_on_past": False})


def rollback_dag(dag_id: str = "ctune_rollback", workspace: str | None = None) -> DAG:
    """Manual: make the Param ``version`` production again (``ctune rollback``)."""
    from ctune_ops.airflow.rollback import RollbackOperator

    with DAG(
        dag_id,
        schedule=None,
        start_date=start_date(),
        catchup=False,
        max_active_runs=1,
        params={"version": Param("v1", type="string", pattern=r"^v\d+$",
                                 description="a promoted version, e.g. v3 (see `ctune versions`)")},
        tags=["ctune"],
        doc_md=__doc__,
    ) as dag:
        RollbackOperator(task_id="rollback", workspace=workspace_template(workspace), version="{{ params.version }}",
                         pool=POOL)
    return dag
