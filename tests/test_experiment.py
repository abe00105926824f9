"""The continual-stream experiment in its small mode (issue 8): 2 days of the small world, all four arms through the
stages, and what it must write. Its figures are the benchmark's to quote; here only that each arm is what it says."""

from __future__ import annotations

import json
import shutil

from ctune_ops.experiment import ARM_ORDER, run_experiment
from ctune_ops.workspace import Workspace
from tests.conftest import set_params
from tests.test_proxy_stage import SMALL_TRAIN

DAYS = 2


def test_small_experiment(small_world, tmp_path) -> None:  # noqa: ANN001
    root = tmp_path / "base"
    shutil.copytree(small_world.root, root, symlinks=True)
    set_params(Workspace.open(root), SMALL_TRAIN)
    lines: list[str] = []
    result = run_experiment(root, days=DAYS, small=True, progress=lines.append)

    folder = root / "reports" / "experiment"
    assert json.loads((folder / "results.json").read_text())["days"] == result["days"]
    assert "| target | measured | wanted | met |" in (folder / "results.md").read_text()
    for name in ("tokens_per_day.png", "cumulative_compute.png", "accuracy_target.png", "accuracy_retention.png"):
        assert (folder / name).stat().st_size > 0
    rows = {(r["arm"], r["date"]): r for r in result["rows"]}
    assert len(rows) == DAYS * len(ARM_ORDER)
    for date in result["days"]:
        ctune, every, static, rand = (rows[(arm, date)] for arm in ("ctune", "all", "static", "random"))
        assert every["selected"] == every["unique"]  # no redundancy filter
        assert rand["selected"] == ctune["selected"]  # as many random rows as ctune selected
        assert static["tokens"]["proxy_update"] == 0 and ctune["tokens"]["proxy_update"] > 0
        assert every["tokens"]["train"] > ctune["tokens"]["train"]
        for row in (ctune, every, static, rand):
            assert set(row["production"]) == {"ctune_retention", "ctune_target"}
            assert all(v is None or 0 <= v <= 1 for v in row["quality"].values())
    arms = result["arms"]
    assert arms["all"]["tokens"]["score"] == 0 and arms["ctune"]["tokens"]["score"] > 0
    assert 0 < result["targets"]["train_tokens_share"]["value"] < 1
    assert set(result["targets"]) >= {"train_tokens_share", "flops_share_7b_0.5b", "final_ctune_target_vs_all",
                                      "earlier_drop_recall_vs_static", "final_ctune_target_vs_random"}
    assert not (tmp_path / "base-arms" / "static" / "models" / "proxy").exists()  # the day-0 proxy, never replaced
    # the final model's target items by the day their facts came, scored as lm-eval does: its totals are the gate's
    by_day = json.loads((folder / "results.json").read_text())["final_target_by_fact_day"]
    assert set(by_day) == set(ARM_ORDER)
    for arm, counts in by_day.items():
        assert sorted(counts) == result["days"], counts
        right, items = (sum(c[k] for c in counts.values()) for k in ("right", "items"))
        assert items > 0 and abs(right / items - arms[arm]["final"]["ctune_target"]) < 1e-9, (arm, counts)
    assert "by the day their facts were introduced" in (folder / "results.md").read_text()
