"""Shared fixtures. The small world (3 days, small models) is built once per session: bootstrapping costs
about a minute, and every test that needs models reads the same workspace without changing it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from ctune_ops.experiment import SMALL_PARAMS, set_params  # noqa: F401 - set_params: the tests' helper
from ctune_ops.workspace import Workspace, init_workspace

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Airflow reads its home when first imported: keep the tests' Airflow state out of ~/airflow
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="ctune-tests-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMALL_DAYS = 3


# the small world: the experiment's small mode uses the same models (ctune_ops.experiment.SMALL_PARAMS)
SMALL_WORLD = {key: SMALL_PARAMS[key] for key in ("world", "bootstrap")}
# and the adapter rank its tests were tuned at (each test picks its own target modules)
SMALL_WORLD["train"] = {"lora": {key: SMALL_PARAMS["train"]["lora"][key] for key in ("rank", "alpha")}}


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
