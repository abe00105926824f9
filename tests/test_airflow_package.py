"""The Airflow face of the package: entry points, provider info, plugin, batch-date rule, import cost."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from ctune_ops.airflow.dates import BatchDateError, batch_date, context_batch_date

HEAVY = ("torch", "transformers", "peft", "great_expectations", "lm_eval", "pandas", "pyarrow")


def test_entry_points_are_registered() -> None:
    providers = {(ep.name, ep.value) for ep in entry_points(group="apache_airflow_provider")}
    plugins = {(ep.name, ep.value) for ep in entry_points(group="airflow.plugins")}
    assert ("provider_info", "ctune_ops.airflow.provider_info:get_provider_info") in providers
    assert ("ctune", "ctune_ops.airflow.plugin:CtunePlugin") in plugins
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("ctune") == "ctune_ops.cli:main"


def test_provider_info_is_valid_for_airflow() -> None:
    import airflow
    import jsonschema

    from ctune_ops.airflow.provider_info import get_provider_info

    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)
    assert get_provider_info()["plugins"][0]["plugin-class"] == "ctune_ops.airflow.plugin.CtunePlugin"


def test_provider_info_names_every_operator_module() -> None:
    """Every operator class ctune_ops.airflow defines lives in a module the provider info lists."""
    import importlib
    import pkgutil

    from airflow.sdk import BaseOperator

    import ctune_ops.airflow
    from ctune_ops.airflow.provider_info import get_provider_info

    def operators(module: str) -> set[str]:
        return {f"{module}.{name}" for name, value in vars(importlib.import_module(module)).items()
                if isinstance(value, type) and issubclass(value, BaseOperator) and value.__module__ == module}

    (entry,) = get_provider_info()["operators"]
    per_module = {module: operators(module) for module in entry["python-modules"]}
    assert all(per_module.values()), per_module  # no listed module without an operator
    listed = set().union(*per_module.values())
    defined = set().union(*(operators(f"ctune_ops.airflow.{info.name}")
                            for info in pkgutil.iter_modules(ctune_ops.airflow.__path__)))
    assert listed == defined
    assert "ctune_ops.airflow.rollback.RollbackOperator" in listed


def test_plugin_class() -> None:
    from ctune_ops.airflow.plugin import CtunePlugin

    assert CtunePlugin.name == "ctune"
    assert batch_date in CtunePlugin.macros


def test_batch_date_rule() -> None:
    start = dt.datetime(2026, 1, 3, tzinfo=dt.UTC)
    assert batch_date({}, start) == "2026-01-03"
    assert batch_date({"date": "2026-02-01"}, start) == "2026-02-01"
    assert context_batch_date({"params": {"date": None}, "data_interval_start": start}) == "2026-01-03"
    with pytest.raises(BatchDateError, match="no data interval"):
        batch_date({}, None)
    with pytest.raises(BatchDateError, match="YYYY-MM-DD"):
        batch_date({"date": "3 Jan"}, None)


def test_airflow_modules_import_no_heavy_libraries() -> None:
    code = (
        "import sys, ctune_ops.airflow.plugin, ctune_ops.airflow.provider_info, ctune_ops.airflow.operators,"
        " ctune_ops.stages, ctune_ops.stages.validate, ctune_ops.cli, ctune_ops.config;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_airflow_loads_plugin_and_provider(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    airflow = str(Path(sys.executable).parent / "airflow")
    plugins = subprocess.run([airflow, "plugins", "-o", "json"], env=env, capture_output=True, text=True, check=True)
    listed = {p["name"]: p for p in json.loads(plugins.stdout)}
    assert "ctune_ops.airflow.dates.batch_date" in listed["ctune"]["macros"]
    assert "ctune_ops.airflow.plugin:CtunePlugin" in listed["ctune"]["source"]
    provider = subprocess.run(
        [airflow, "providers", "get", "ctune", "-o", "json"], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(provider.stdout)[0]["Provider"] == "ctune"


def test_a_sqlite_home_waits_for_write_locks(tmp_path) -> None:  # noqa: ANN001
    """The embedded Airflow's processes share one SQLite file: each waits for the others' locks (a CLI command
    otherwise fails with 'database is locked' after sqlite3's 5 s), through Airflow's own connect-args option."""
    import importlib
    import os

    from ctune_ops.airflow.local import LocalAirflow
    from ctune_ops.airflow.sqlite import BUSY_TIMEOUT_S

    sqlite_env = LocalAirflow(tmp_path / "ws", start_date="2026-01-01").env()
    module, _, name = sqlite_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"].rpartition(".")
    assert getattr(importlib.import_module(module), name)["timeout"] == BUSY_TIMEOUT_S > 5
    postgres_env = LocalAirflow(tmp_path / "ws", start_date="2026-01-01", database_url="postgresql+psycopg2://u@127.0.0.1/db").env()
    assert postgres_env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS") == \
        os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS")  # Postgres: Airflow's defaults


def test_a_sqlite_cli_command_that_lost_a_lock_race_runs_again(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """SQLite refuses a read-then-write transaction at once when another process wrote meanwhile (no busy wait
    helps); `airflow backfill create` cleans up after itself then, so the command is run again. Other failures,
    and any failure on Postgres, are not retried."""
    from ctune_ops.airflow import local

    calls: list[list[str]] = []
    answers: list[tuple[int, str]] = []

    def fake_run(args, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append(args)
        code, err = answers.pop(0)
        return subprocess.CompletedProcess(args, code, stdout="", stderr=err)

    monkeypatch.setattr(local.subprocess, "run", fake_run)
    monkeypatch.setattr(local, "LOCKED_PAUSE_S", 0.0)
    home = local.LocalAirflow(tmp_path / "ws", start_date="2026-01-01")
    answers[:] = [(1, "sqlite3.OperationalError: database is locked"), (0, "")]
    assert home.airflow("backfill", "create").returncode == 0
    assert len(calls) == 2

    calls.clear()
    answers[:] = [(1, "database is locked")] * (local.LOCKED_RETRIES + 1)
    with pytest.raises(local.LocalAirflowError, match="database is locked"):
        home.airflow("backfill", "create")
    assert len(calls) == local.LOCKED_RETRIES + 1

    calls.clear()
    answers[:] = [(1, "DagNotFound: ctune_daily")]
    with pytest.raises(local.LocalAirflowError, match="DagNotFound"):
        home.airflow("backfill", "create")
    assert len(calls) == 1

    calls.clear()
    postgres = local.LocalAirflow(tmp_path / "ws", start_date="2026-01-01", database_url="postgresql+psycopg2://u@h/db")
    answers[:] = [(1, "database is locked")]
    assert postgres.airflow("backfill", "create", check=False).returncode == 1
    assert len(calls) == 1


class _Records:
    """A logger that keeps what it is given at INFO."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: object) -> None:
        self.lines.append(message % args)


def test_a_stage_s_progress_bars_are_logged_at_info_not_printed_to_stderr(capsys) -> None:  # noqa: ANN001
    """Airflow logs a task's stderr at ERROR: progress bars and other stderr writes of a stage become INFO records
    (a bar's last state, and its state now and then while it runs); nothing reaches the real stderr."""
    from tqdm import tqdm

    from ctune_ops.airflow.task_log import stderr_as_log

    quiet = _Records()
    with stderr_as_log(quiet, interval_s=3600):
        for _ in tqdm(range(50), desc="score 2026-01-01", mininterval=0):
            pass
        for _ in tqdm(range(50), desc="cleared", mininterval=0, leave=False):  # erases itself: nothing to log
            pass
        print("a plain line", file=sys.stderr)
        sys.stderr.write("\rhalf a bar")  # closed without a newline
    assert capsys.readouterr().err == ""
    assert len(quiet.lines) == 3 and quiet.lines[1:] == ["a plain line", "half a bar"], quiet.lines
    assert quiet.lines[0].startswith("score 2026-01-01: 100%") and "50/50" in quiet.lines[0]

    every = _Records()  # no interval: each redraw is logged (the close redraws 3/3 with its final rate)
    with stderr_as_log(every, interval_s=0):
        for _ in tqdm(range(3), desc="bar", mininterval=0):
            pass
    counts = [line.split("|")[-1].split()[0] for line in every.lines]
    assert list(dict.fromkeys(counts)) == ["0/3", "1/3", "2/3", "3/3"], every.lines
