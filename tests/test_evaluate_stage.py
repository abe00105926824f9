"""The evaluate stage: lm-eval on candidate and production, production scores cached per version, the gate."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ctune_ops.stages import StageError, run_stage
from ctune_ops.stages.evaluate import KEEP, PROMOTE, gate
from ctune_ops.workspace import Workspace
from tests.conftest import set_params

DATE = "2026-01-01"
RULE = SimpleNamespace(metric="acc", tolerance=0.03, min_gain=0.0, target_tasks=["target"])


def _scores(retention: float, target: float) -> dict[str, dict[str, float]]:
    return {"retention": {"acc": retention}, "target": {"acc": target}}


def test_gate_rule() -> None:
    assert gate(_scores(0.9, 0.3), _scores(0.88, 0.6), RULE)[0] == PROMOTE  # within tolerance, target up
    decision, checks = gate(_scores(0.9, 0.3), _scores(0.86, 0.6), RULE)  # retention fell 0.04 > 0.03
    assert decision == KEEP and [c["passed"] for c in checks] == [False, True]
    assert gate(_scores(0.9, 0.3), _scores(0.9, 0.29), RULE)[0] == KEEP  # a target task got worse
    strict = SimpleNamespace(**{**vars(RULE), "min_gain": 0.05})
    assert gate(_scores(0.9, 0.3), _scores(0.9, 0.34), strict)[0] == KEEP


def test_the_gate_holds_tasks_that_are_no_target_near_the_base() -> None:
    """Each day's tolerance is granted against the production of the day; without an anchor a task could lose it
    every day. With drift_tolerance the floor is also the base model's score minus that; targets are not
    anchored (their items grow every day), and without base scores the rule is the per-day one."""
    drift = SimpleNamespace(**{**vars(RULE), "drift_tolerance": 0.03})
    base = _scores(0.93, 0.2)
    decision, checks = gate(_scores(0.91, 0.5), _scores(0.89, 0.6), drift, base)  # 0.02 below production
    retention = checks[0]
    assert decision == KEEP and retention["floor"] == 0.9 and retention["base"] == 0.93
    assert not retention["passed"] and "base" not in checks[1] and checks[1]["passed"]
    assert gate(_scores(0.91, 0.5), _scores(0.90, 0.6), drift, base)[0] == PROMOTE
    assert gate(_scores(0.91, 0.5), _scores(0.89, 0.6), drift)[0] == PROMOTE  # no base scores: per day only
    off = SimpleNamespace(**{**vars(RULE), "drift_tolerance": None})
    assert gate(_scores(0.91, 0.5), _scores(0.89, 0.6), off, base)[0] == PROMOTE
    assert gate(_scores(0.99, 0.5), _scores(0.95, 0.6), drift, base)[0] == KEEP  # the day's rule still holds


@pytest.fixture(scope="module")
def trained_world(small_world, tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("evaluate") / "ws"
    shutil.copytree(small_world.root, root, symlinks=True)
    ws = Workspace.open(root)
    for stage in ("validate", "dedup", "score", "select", "train"):
        run_stage(ws, stage, DATE)
    return ws


def test_evaluate_scores_both_and_caches_production(trained_world) -> None:  # noqa: ANN001
    ws = trained_world
    summary = run_stage(ws, "evaluate", DATE).summary
    report = json.loads((ws.reports(DATE) / "eval.json").read_text())
    assert report["decision"] == summary["decision"] in (PROMOTE, KEEP)
    assert {c["task"] for c in report["checks"]} == {"ctune_retention", "ctune_target"}
    assert report["production"]["version"] == "v0" and report["production"]["cached"] == 0
    assert report["decision"] == (PROMOTE if all(c["passed"] for c in report["checks"]) else KEEP)
    cache = json.loads((ws.root / "state" / "eval_scores.json").read_text())
    assert len(cache["v0"]) == 2  # production is the base on day 1: its retention score is the drift anchor too
    retention = next(c for c in report["checks"] if c["task"] == "ctune_retention")
    assert retention["base"] == retention["production"]
    assert abs(retention["floor"] - (retention["production"] - ws.config.evaluate.tolerance)) < 1e-4
    assert report["rule"]["drift_tolerance"] == ws.config.evaluate.drift_tolerance == 0.03
    again = json.loads(json.dumps(report))
    run_stage(ws, "evaluate", DATE)
    report = json.loads((ws.reports(DATE) / "eval.json").read_text())
    assert report["production"]["cached"] == 2  # production is scored once per version and task
    assert report["checks"] == again["checks"]
    # production's files change under the same version (a restore by hand, a half-done promote): scored again
    shutil.copytree(ws.candidates(DATE) / "adapter", ws.root / "models" / "deployed")
    try:
        run_stage(ws, "evaluate", DATE)
        report = json.loads((ws.reports(DATE) / "eval.json").read_text())
        assert report["production"]["cached"] == 0
        assert report["production"]["scores"] == report["candidate"]["scores"]  # production is now the candidate
    finally:
        shutil.rmtree(ws.root / "models" / "deployed")


def test_evaluate_names_a_missing_task_and_a_stray_target(trained_world, tmp_path) -> None:  # noqa: ANN001
    root = tmp_path / "ws"
    shutil.copytree(trained_world.root, root, symlinks=True)
    ws = set_params(Workspace.open(root), {"evaluate": {"tasks": ["eval/retention/ctune_retention.yaml",
                                                                   "eval/mine/{date}.yaml"]}})
    with pytest.raises(StageError, match=r"key 'evaluate.tasks\[1\]': eval/mine/2026-01-01.yaml does not exist"):
        run_stage(ws, "evaluate", DATE)
    ws = set_params(ws, {"evaluate": {"tasks": ["eval/retention/ctune_retention.yaml"]}})
    with pytest.raises(StageError, match=r"key 'evaluate.target_tasks': \['ctune_target'\] are not among"):
        run_stage(ws, "evaluate", DATE)


MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu_medical" / "anatomy_test.csv"
USER_ITEMS = 24


def _user_task(folder: Path) -> Path:
    """An lm-eval YAML of the user's own over a JSONL they built (MMLU anatomy, 4 choices), as a user would."""
    folder.mkdir(parents=True)
    with MMLU.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[:USER_ITEMS]
    items = [{"context": f"Question: {q}\nAnswer:", "choices": [f" {c}" for c in (a, b, c_, d)],
              "label": "ABCD".index(answer)} for q, a, b, c_, d, answer in rows]
    (folder / "anatomy.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    config = {"task": "user_anatomy", "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(folder / "anatomy.jsonl")}}, "test_split": "test",
              "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
              "doc_to_target": "label", "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                         "higher_is_better": True}]}
    (folder / "anatomy.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return folder / "anatomy.yaml"


@pytest.mark.skipif(not MMLU.exists(), reason=f"MMLU medical data is not available at {MMLU}")
def test_a_user_task_takes_part_in_the_gate(trained_world, tmp_path) -> None:  # noqa: ANN001
    root = tmp_path / "ws"
    shutil.copytree(trained_world.root, root, symlinks=True)
    ws = Workspace.open(root)
    task = _user_task(ws.root / "user-tasks")
    ws = set_params(ws, {"evaluate": {"tasks": [*ws.config.evaluate.tasks, task.relative_to(ws.root).as_posix()],
                                      "tolerance": 0.0}})
    run_stage(ws, "evaluate", DATE)
    report = json.loads((ws.reports(DATE) / "eval.json").read_text())
    check = next(c for c in report["checks"] if c["task"] == "user_anatomy")
    assert report["candidate"]["scores"]["user_anatomy"]["n"] == USER_ITEMS
    assert check["floor"] == check["production"]  # tolerance 0: the user's task may not get worse at all
    assert report["decision"] == (PROMOTE if all(c["passed"] for c in report["checks"]) else KEEP)
