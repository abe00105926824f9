"""Measuring a model against the demo world's eval tasks (``ctune world evaluate``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ctune_ops import lmeval
from ctune_ops.workspace import Workspace, WorkspaceError
from ctune_ops.world import evalsets
from ctune_ops.world.generate import MANIFEST


def world_task_files(ws: Workspace, date: str | None = None) -> list:
    """Retention plus day ``date``'s target and new-fact tasks (default: the last generated day)."""
    manifest_path = ws.world_dir / MANIFEST
    if not manifest_path.exists():
        raise WorkspaceError(f"{manifest_path} is missing: run `ctune world generate` first")
    dates = json.loads(manifest_path.read_text(encoding="utf-8"))["dates"]
    date = date or dates[-1]
    if date not in dates:
        raise WorkspaceError(f"no eval tasks for {date}; the world has days {dates[0]} .. {dates[-1]}")
    day = evalsets.day_dir(ws.eval_dir, date)
    return [
        evalsets.retention_dir(ws.eval_dir) / f"{evalsets.RETENTION_TASK}.yaml",
        day / f"{evalsets.TARGET_TASK}.yaml",
        day / f"{evalsets.NEW_TASK}.yaml",
    ]


def evaluate_world_model(
    ws: Workspace, model: str = "base", date: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    """lm-eval scores of ``model`` (``base``, ``proxy`` or a folder) on retention and day ``date``'s targets."""
    models = ws.config.models
    location = {"base": models.base, "proxy": models.proxy_base}.get(model, model)
    path = ws.model_path(location)
    return lmeval.evaluate(
        path, world_task_files(ws, date), device=models.device, limit=limit,
        cache_dir=ws.root / ".lmeval-cache",
    )


def task_items(ws: Workspace, adapter: str | None, task_file: Path) -> list[tuple[dict[str, Any], float]]:
    """Each item of one world task with the base model plus ``adapter`` scored by the gate's ``evaluate.metric``
    (lm-eval's per-sample log, so the mean is the gate's score of the task)."""
    return lmeval.item_scores(ws.model_path(ws.config.models.base), task_file, ws.config.evaluate.metric,
                              peft=adapter, device=ws.config.models.device, cache_dir=ws.root / ".lmeval-cache")


def target_by_fact_day(ws: Workspace, adapter: str | None, date: str) -> dict[str, dict[str, int]]:
    """Day ``date``'s ``ctune_target`` items the base model with ``adapter`` answers right (by the gate's
    ``evaluate.metric``), by the day each item's fact was introduced (``{day: {"right": r, "items": n}}``).

    Why: a final target score alone cannot tell facts never learned on their day from facts learned and lost
    later; this can (the experiment writes it for each arm's final model). lm-eval scores the items, so the
    totals are the gate's ``ctune_target`` score.
    """
    from ctune_ops.records import read_jsonl

    dates = json.loads((ws.world_dir / MANIFEST).read_text(encoding="utf-8"))["dates"]
    introduced = {item["fact_id"]: day for day in dates if day <= date
                  for item in read_jsonl(evalsets.day_dir(ws.eval_dir, day) / f"{evalsets.NEW_TASK}.jsonl")}
    items = task_items(ws, adapter, evalsets.day_dir(ws.eval_dir, date) / f"{evalsets.TARGET_TASK}.yaml")
    counts = {day: {"right": 0, "items": 0} for day in sorted(set(introduced.values()))}
    for doc, value in items:
        day = counts[introduced[doc["fact_id"]]]
        day["items"] += 1
        day["right"] += int(value)
    return counts
