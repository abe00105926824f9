"""The repair stage's rule (which kept candidates get a rehearsal pass) and which gate report decides a day; the
run itself (rehearsal, second gate, promote installing the repaired adapter) is in tests/test_registry.py."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from ctune_ops.config import RepairConfig
from ctune_ops.stages import StageError
from ctune_ops.stages.repair import _why_not, deciding_report


def _check(task: str, candidate: float, floor: float, target: bool = False) -> dict[str, Any]:
    return {"task": task, "target": target, "candidate": candidate, "floor": floor, "passed": candidate >= floor}


def _report(*checks: dict[str, Any]) -> dict[str, Any]:
    return {"decision": "promote" if all(c["passed"] for c in checks) else "keep", "checks": list(checks)}


def _ws(**repair: Any) -> Any:
    return SimpleNamespace(config=SimpleNamespace(repair=RepairConfig(**repair)))


def test_only_a_shallow_fall_is_repaired() -> None:
    target_ok = _check("ctune_target", 0.80, 0.60, target=True)
    assert _why_not(_ws(), _report(_check("ctune_retention", 0.85, 0.87), target_ok)) is None
    assert "promoted" in _why_not(_ws(), _report(_check("ctune_retention", 0.90, 0.87), target_ok))
    assert "repair.enabled is false" in _why_not(_ws(enabled=False), _report(_check("ctune_retention", 0.85, 0.87),
                                                                              target_ok))
    forgot_earlier_days = _report(_check("ctune_retention", 0.85, 0.87), _check("ctune_target", 0.74, 0.75, True))
    assert _why_not(_ws(), forgot_earlier_days) is None
    not_learned = _why_not(_ws(), _report(_check("ctune_retention", 0.90, 0.87),
                                          _check("ctune_target", 0.55, 0.75, target=True)))
    assert "tasks ['ctune_target']" in not_learned and "max_shortfall (0.1)" in not_learned
    poisoned = _why_not(_ws(), _report(_check("ctune_retention", 0.70, 0.87), target_ok))
    assert "tasks ['ctune_retention']" in poisoned
    assert _why_not(_ws(max_shortfall=0.2), _report(_check("ctune_retention", 0.70, 0.87), target_ok)) is None


def test_the_repair_report_decides_only_for_the_eval_it_answers(workspace) -> None:  # noqa: ANN001
    date = "2026-01-01"
    folder = workspace.reports(date)
    folder.mkdir(parents=True)
    assert deciding_report(workspace, date) == {}
    evaluation = {"decision": "keep", "checks": [], "candidate": {"adapter": "models/candidates/x/adapter"}}
    (folder / "eval.json").write_text(json.dumps(evaluation))
    assert deciding_report(workspace, date) == evaluation  # no repair stage ran (an older DAG)

    import hashlib

    digest = hashlib.sha256((folder / "eval.json").read_bytes()).hexdigest()
    repaired = {"attempted": True, "eval_sha256": digest, "decision": "promote", "checks": []}
    (folder / "repair.json").write_text(json.dumps(repaired))
    assert deciding_report(workspace, date) == repaired
    (folder / "repair.json").write_text(json.dumps({**repaired, "attempted": False, "decision": "keep"}))
    assert deciding_report(workspace, date) == evaluation

    (folder / "eval.json").write_text(json.dumps({**evaluation, "decision": "promote"}))  # evaluate ran again
    with pytest.raises(StageError, match="run the repair stage for 2026-01-01 again"):
        deciding_report(workspace, date)


def test_a_workspace_from_before_the_repair_stage_is_told_how_to_get_it(workspace) -> None:  # noqa: ANN001
    import yaml

    from ctune_ops.registry import record_stage
    from ctune_ops.workspace import WorkspaceError

    path = workspace.root / "dvc.yaml"
    pipeline = yaml.safe_load(path.read_text())
    assert "repair" in pipeline["stages"]  # a new workspace has it
    del pipeline["stages"]["repair"]
    path.write_text(yaml.safe_dump(pipeline))
    with pytest.raises(WorkspaceError, match="dvc.yaml has no stage 'repair'.*ctune_ops/resources/dvc.yaml"):
        record_stage(workspace, "2026-01-01", "repair")
