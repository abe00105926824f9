"""The evaluate stage (DESIGN §3.7): lm-eval on the candidate and on production, and the gate's decision.

Reads ``models/candidates/D/adapter`` and the task YAMLs of ``evaluate.tasks``; writes ``reports/D/eval.json``
with both score sets, the rule, one check per task and the decision (``promote`` or ``keep``). The promote stage
acts on it.

Production (the base with ``models/deployed`` when a version is promoted) is scored once per version and task:
``state/eval_scores.json`` keeps its scores under the version, keyed by task name, a digest of the task's YAML and
data files and a digest of production's own files, so a task whose items changed (the demo world's target task
grows every day) or an adapter that was replaced is scored again, and a rollback finds the restored version's
scores where it left them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ctune_ops import lmeval
from ctune_ops.stages import StageError, StageResult
from ctune_ops.stages.dedup import require_input, write_report
from ctune_ops.workspace import BASE_VERSION, Workspace, atomic_write_text

STAGE = "evaluate"
REPORT_FILE = "eval.json"
CACHE_FILE = "eval_scores.json"
DEPLOYED = "models/deployed"
PROMOTE, KEEP = "promote", "keep"
SCORE_DIGITS = 4
log = logging.getLogger(__name__)


def task_files(ws: Workspace, date: str) -> list[Path]:
    """``evaluate.tasks`` for ``date``, as existing files; a missing one is named with the key that lists it."""
    files = []
    for number, entry in enumerate(ws.config.evaluate.tasks):
        path = ws.root / entry.format(date=date)
        if not path.is_file():
            raise StageError(f"params.yaml: key 'evaluate.tasks[{number}]': {ws.shown(path)} does not "
                             "exist (an lm-eval task YAML, relative to the workspace; {date} = the batch date)")
        files.append(path)
    return files


def _data_files(config: dict[str, Any], path: Path) -> list[Path]:
    """The task's local data files (``data_files`` as a string, list or split mapping), resolved against the
    YAML's folder; a source that cannot be hashed (a local dataset folder, an ``include``) is refused."""
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is None or config.get("include"):
        raise StageError(f"{path}: evaluate needs tasks whose items are local data_files (dataset_kwargs."
                         "data_files), so production's cached scores can be tied to the exact items")
    values = files.values() if isinstance(files, dict) else [files]
    flat = [item for value in values for item in ([value] if isinstance(value, str) else value)]
    return [Path(item) if Path(item).is_absolute() else path.parent / item for item in flat]


def task_digest(path: Path) -> tuple[str, str]:
    """(task name, sha256 of the YAML and its data files): what a cached score is valid for."""
    config = lmeval.load_task(path)
    if not isinstance(config.get("task"), str):
        raise StageError(f"{path}: not a single lm-eval task (no 'task' name); list each task's YAML in "
                         "evaluate.tasks")
    digest = hashlib.sha256(path.read_bytes())
    for data_file in _data_files(config, path):
        digest.update(data_file.read_bytes())
    return config["task"], digest.hexdigest()


def production_identity(ws: Workspace, base_only: bool = False) -> str:
    """sha256 of what production is: the base's location and the deployed adapter's files (none before the
    first promotion, or with ``base_only``: the base as first deployed). Part of the cache key, so a restored or
    replaced adapter is never judged by old scores."""
    digest = hashlib.sha256(ws.model_path(ws.config.models.base).encode())
    adapter = ws.root / DEPLOYED
    for item in sorted(adapter.glob("*")) if production_adapter(ws) and not base_only else []:
        if item.is_file():
            digest.update(item.name.encode() + item.read_bytes())
    return digest.hexdigest()[:16]


def production_adapter(ws: Workspace) -> str | None:
    adapter = ws.root / DEPLOYED
    return str(adapter) if (adapter / "adapter_config.json").exists() else None


def gate(production: dict[str, dict[str, float]], candidate: dict[str, dict[str, float]],
         config: Any, base: dict[str, dict[str, float]] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The decision and one check per task: within ``tolerance`` of production; targets at least ``min_gain``;
    a task that is no target also within ``drift_tolerance`` of ``base`` (the base model's scores, when given)."""
    checks = []
    drift = getattr(config, "drift_tolerance", None)
    for task in sorted(candidate):
        before, after = production[task][config.metric], candidate[task][config.metric]
        target = task in config.target_tasks
        floor = before + config.min_gain if target else before - config.tolerance
        check = {"task": task, "target": target, "production": round(before, SCORE_DIGITS),
                 "candidate": round(after, SCORE_DIGITS), "change": round(after - before, SCORE_DIGITS)}
        if not target and drift is not None and base and task in base:
            check["base"] = round(base[task][config.metric], SCORE_DIGITS)
            floor = max(floor, base[task][config.metric] - drift)
        checks.append({**check, "floor": round(floor, SCORE_DIGITS), "passed": after >= floor - 1e-12})
    return (PROMOTE if all(c["passed"] for c in checks) else KEEP), checks


def _cache_key(task: str, digest: str, identity: str, limit: int | None) -> str:
    """Where ``state/eval_scores.json`` keeps a model's scores on a task (under the version's key)."""
    return f"{task}:{digest}:production={identity}:limit={limit}"


def _base_scores(ws: Workspace, files: list[Path], keys: dict[Path, tuple[str, str]], cache: dict[str, Any],
                 options: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The base model's scores (no adapter: what v0 deployed) on the tasks that are no target, for the drift
    floor. Kept in the cache under v0, where day 1's evaluation put them; scored here when missing (a workspace
    whose first day ran before this rule, or a task added since)."""
    config = ws.config.evaluate
    wanted = [path for path in files if keys[path][0] not in config.target_tasks]
    if config.drift_tolerance is None or not wanted:
        return {}
    identity = production_identity(ws, base_only=True)
    cached = cache.setdefault(BASE_VERSION, {})
    entry = {path: _cache_key(*keys[path], identity, config.limit) for path in wanted}
    todo = [path for path in wanted if entry[path] not in cached]
    if todo:
        fresh = lmeval.evaluate(ws.model_path(ws.config.models.base), todo, peft=None, **options)
        for path in todo:
            cached[entry[path]] = fresh[keys[path][0]]
    return {keys[path][0]: cached[entry[path]] for path in wanted}


def judge(ws: Workspace, date: str, adapter: Path) -> dict[str, Any]:
    """The gate's report on the candidate ``adapter`` for ``date``: both score sets, the rule, one check per task
    and the decision. Production's scores come from the cache when it has them (the repair stage judges a
    second candidate of the day against the same production)."""
    config = ws.config.evaluate
    files = task_files(ws, date)
    keys = {path: task_digest(path) for path in files}
    unknown = set(config.target_tasks) - {name for name, _ in keys.values()}
    if unknown:
        raise StageError(f"params.yaml: key 'evaluate.target_tasks': {sorted(unknown)} are not among the tasks of "
                         f"evaluate.tasks ({sorted(name for name, _ in keys.values())})")
    base = ws.model_path(ws.config.models.base)
    device = lmeval.resolve_device(ws.config.models.device)
    options = {"device": device, "limit": config.limit, "batch_size": config.batch_size,
               "cache_dir": ws.root / ".lmeval-cache"}

    version = ws.current_version
    cache_path = ws.root / "state" / CACHE_FILE
    cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.exists() else {}
    loaded = json.dumps(cache, sort_keys=True)
    cached = cache.setdefault(version, {})
    identity = production_identity(ws)
    entry = {path: _cache_key(name, digest, identity, config.limit) for path, (name, digest) in keys.items()}
    todo = [path for path in files if entry[path] not in cached]
    if todo:
        fresh = lmeval.evaluate(base, todo, peft=production_adapter(ws), **options)
        for path in todo:
            cached[entry[path]] = fresh[keys[path][0]]
    production = {keys[path][0]: cached[entry[path]] for path in files}
    anchor = _base_scores(ws, files, keys, cache, options)
    if json.dumps(cache, sort_keys=True) != loaded:  # production's or the base's scores were computed
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    candidate = lmeval.evaluate(base, files, peft=str(adapter), **options)
    lacking = sorted(task for task, scores in candidate.items() if config.metric not in scores)
    if lacking:
        raise StageError(f"params.yaml: key 'evaluate.metric': the tasks {lacking} do not report "
                         f"{config.metric!r} (their YAML's metric_list)")
    decision, checks = gate(production, candidate, config, anchor)
    return {
        "date": date,
        "decision": decision,
        "rule": {"metric": config.metric, "tolerance": config.tolerance, "min_gain": config.min_gain,
                 "drift_tolerance": config.drift_tolerance, "target_tasks": list(config.target_tasks),
                 "text": f"every task's {config.metric} >= production - {config.tolerance}; target tasks >= "
                         f"production + {config.min_gain}"
                         + ("" if config.drift_tolerance is None else
                            f"; other tasks >= base - {config.drift_tolerance}")},
        "checks": checks,
        "production": {"version": version, "adapter": production_adapter(ws) and DEPLOYED,
                       "scores": production, "cached": len(files) - len(todo)},
        "candidate": {"adapter": ws.shown(adapter), "scores": candidate},
        "tasks": {keys[path][0]: ws.shown(path) for path in files},
        "device": device,
    }


def describe(report: dict[str, Any]) -> str:
    """One line of a gate report's checks, for logs."""
    return ", ".join(f"{c['task']} {c['production']} -> {c['candidate']}" for c in report["checks"])


def run(ws: Workspace, date: str) -> StageResult:
    adapter = require_input(ws.candidates(date) / "adapter", ws, "train")
    report = judge(ws, date, adapter)
    write_report(ws.reports(date) / REPORT_FILE, report)
    decision, checks = report["decision"], report["checks"]
    log.info("evaluate %s: %s (%s)", date, decision, describe(report))
    summary = {"decision": decision, **{c["task"]: c["candidate"] for c in checks},
               "failed": [c["task"] for c in checks if not c["passed"]]}
    return StageResult(STAGE, date, summary, {"report": f"reports/{date}/{REPORT_FILE}"})
