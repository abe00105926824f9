"""The benchmarks run in their small mode, so they keep working (CI); no timing is asserted, only that each one
measures what it says and writes its JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--small", *args], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_validate_benchmark_small(tmp_path: Path) -> None:
    out = tmp_path / "validate.json"
    printed = _run("validate.py", "--out", str(out))
    result = json.loads(out.read_text())
    assert "ratio validate / plain" in printed
    assert result["accepted"] + result["quarantined"] == result["rows"] and result["ratio"] > 0


def test_selection_benchmark_small(small_world, tmp_path: Path) -> None:  # noqa: ANN001
    root = tmp_path / "ws"
    shutil.copytree(small_world.root, root, symlinks=True)
    out = tmp_path / "selection.json"
    printed = _run("selection.py", "--workspace", str(root), "--out", str(out))
    result = json.loads(out.read_text())
    assert "targets:" in printed
    world = result["scoring"][0]
    assert world["workload"] == "world" and world["max_abs_diff_l_cond"] < 1e-4  # batched = one-row reference
    assert {d["workload"] for d in result["dedup"]} >= {"world"}
    assert all(0 <= d["ctune_recall"] <= 1 for d in result["dedup"])
    # a day run against the history kept on disk drops what the same day dropped with both days in one process
    assert all(d["daily"]["same_drops_as_in_process"] and d["daily"]["ctune_dropped"] > 0 for d in result["dedup"])


def test_dag_parse_benchmark_small(tmp_path: Path) -> None:
    out = tmp_path / "dag_parse.json"
    printed = _run("dag_parse.py", "--out", str(out), "--repeat", "1")  # one round: the table's shape, not timings
    result = json.loads(out.read_text())
    assert "bare (1 EmptyOperator)" in printed
    for measure in ("dag_processor", "file_parse", "whole_process"):
        files = [row["file"] for row in result[measure]["rows"]]
        assert files == ["bare (1 EmptyOperator)", "same shape, EmptyOperators", "ctune_daily.py",
                         "ctune_incoming.py", "ctune_rollback.py"]
        assert set(result[measure]["ctune_ms_beyond_same_shape"]) == {"ctune_daily.py", "ctune_incoming.py"}
        assert all(row["median_ms"] > 0 for row in result[measure]["rows"])


def test_oracle_selection_benchmark_small(small_world, tmp_path: Path) -> None:  # noqa: ANN001
    """The oracle trains exactly the rows it names that the policy judged known: paraphrases (by the truth file)
    of facts the deployed model answered wrong, each then selected in the day's decisions like any other row."""
    import pyarrow.parquet as pq

    from ctune_ops.workspace import Workspace
    from ctune_ops.world.selection_truth import day_truth
    from tests.conftest import set_params
    from tests.test_proxy_stage import SMALL_TRAIN

    root = tmp_path / "base"
    shutil.copytree(small_world.root, root, symlinks=True)
    set_params(Workspace.open(root), SMALL_TRAIN)
    printed = _run("oracle_selection.py", "--workspace", str(root), "--oracles", "wrong")
    result = json.loads((root / "reports" / "experiment" / "oracles.json").read_text())
    assert "| oracle | rows turned |" in printed and [o["oracle"] for o in result["oracles"]] == ["wrong"]
    wrong = result["oracles"][0]
    arm = Workspace.open(tmp_path / "base-oracles" / "wrong")
    assert [d["date"] for d in wrong["days"]] == result["days"] and wrong["turned"] > 0
    for day in wrong["days"]:
        truth = day_truth(arm, day["date"])
        decisions = pq.read_table(arm.reports(day["date"]) / "decisions.parquet").to_pydict()
        decided = dict(zip(decisions["id"], decisions["decision"], strict=True))
        assert len(day["turned"]) <= day["oracle_rows"]
        assert all(truth[i]["kind"] in ("known", "earlier") and decided[i] == "selected" for i in day["turned"])
    assert wrong["train_tokens"] == sum(d["tokens"]["train"] for d in wrong["days"])
