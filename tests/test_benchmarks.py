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
    printed = _run("dag_parse.py", "--out", str(out))
    result = json.loads(out.read_text())
    assert "bare (1 EmptyOperator)" in printed
    for measure in ("dag_processor", "file_parse", "whole_process"):
        files = [row["file"] for row in result[measure]["rows"]]
        assert files == ["bare (1 EmptyOperator)", "same shape, EmptyOperators", "ctune_daily.py",
                         "ctune_incoming.py", "ctune_rollback.py"]
        assert set(result[measure]["ctune_ms_beyond_same_shape"]) == {"ctune_daily.py", "ctune_incoming.py"}
        assert all(row["median_ms"] > 0 for row in result[measure]["rows"])
