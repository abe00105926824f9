"""Shared fixtures. The small world (3 days, small models) is built once per session: bootstrapping costs
about a minute, and every test that needs models reads the same workspace without changing it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctune_ops.workspace import Workspace, init_workspace

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Airflow reads its home when first imported: keep the tests' Airflow state out of ~/airflow
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="ctune-tests-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMALL_DAYS = 3


def set_params(ws: Workspace, updates: dict[str, Any]) -> Workspace:
    """Deep-merge ``updates`` into the workspace's params.yaml and return a fresh handle."""
    path = ws.root / "params.yaml"
    data = yaml.safe_load(path.read_text())

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(data, updates)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    ws.commit("test: params", ["params.yaml"])
    return ws.reload()


SMALL_WORLD = {
    "world": {"rows_per_day": 100},
    "bootstrap": {
        "base": {"hidden_size": 128, "num_layers": 4, "intermediate_size": 352, "epochs": 4,
                 "learning_rate": 0.004, "tie_embeddings": True},
        "proxy": {"hidden_size": 64, "num_layers": 2, "intermediate_size": 176, "epochs": 5},
    },
}


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A workspace with a small generated world and bootstrapped small models (read-only for tests)."""
    from ctune_ops.world.bootstrap import bootstrap_models
    from ctune_ops.world.generate import generate_world

    ws = init_workspace(tmp_path_factory.mktemp("small") / "ws").workspace
    ws = set_params(ws, SMALL_WORLD)
    generate_world(ws, days=SMALL_DAYS)
    bootstrap_models(ws)
    return ws


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A fresh, empty workspace."""
    return init_workspace(tmp_path / "ws").workspace
