"""The DAGs (issue 7): integrity through DagBag, the task graph and its scheduling contract, the batch-date rule for
asset-triggered runs, and a real backfill on a local Airflow (SQLite, LocalExecutor) that must produce the same
versions as running the stages in order by hand."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctune_ops.airflow.dags import DAILY_TASKS, POOL, WORKSPACE_ENV
from ctune_ops.airflow.dates import context_batch_date
from ctune_ops.registry import Registry, promote
from ctune_ops.stages import run_stage
from ctune_ops.workspace import Workspace
from tests.conftest import set_params
from tests.test_proxy_stage import SMALL_TRAIN

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "test-output" / "airflow"
CHROMIUM = "/usr/bin/chromium"
DAYS = ("2026-01-01", "2026-01-02")
BACKFILL_TIMEOUT_S = 1500.0
PARAMS = {**SMALL_TRAIN, "evaluate": {"tolerance": 1.0, "min_gain": -1.0, "drift_tolerance": None}}  # v1, v2


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):  # noqa: ANN001, ANN201
    home = tmp_path_factory.mktemp("airflow-home")
    env = {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), WORKSPACE_ENV: str(home / "ws")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        from airflow.dag_processing.dagbag import DagBag

        yield DagBag(dag_folder=str(REPO / "dags"))


def test_dag_files_import_cleanly(dagbag) -> None:  # noqa: ANN001
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"ctune_daily", "ctune_incoming", "ctune_rollback"}
    for stat in dagbag.dagbag_stats:
        assert stat.duration.total_seconds() < 5, stat  # generous: parse-time ratios are benchmarks/dag_parse.py


def test_daily_dag_contract(dagbag) -> None:  # noqa: ANN001
    dag = dagbag.dags["ctune_daily"]
    assert [task.task_id for task in dag.topological_sort()] == [task_id for task_id, _ in DAILY_TASKS]
    for (upstream, _), (downstream, _) in zip(DAILY_TASKS, DAILY_TASKS[1:], strict=False):
        assert dag.get_task(upstream).downstream_task_ids == {downstream}
    assert dag.catchup is True and dag.max_active_runs == 1
    assert type(dag.timetable).__name__ == "CronTriggerTimetable" and dag.timetable.expression == "0 0 * * *"
    for task in dag.tasks:
        assert task.depends_on_past and task.pool == POOL and task.retries >= 1
    assert dag.get_task("update_proxy").stage == "proxy"
    assert "date" in dag.params
    incoming = dagbag.dags["ctune_incoming"]
    assert "ctune_incoming" in str(incoming.timetable.asset_condition)
    rollback = dagbag.dags["ctune_rollback"]
    assert type(rollback.timetable).__name__ == "NullTimetable" and "version" in rollback.params
    assert [t.task_id for t in rollback.tasks] == ["rollback"] and rollback.get_task("rollback").pool == POOL


def test_dag_file_imports_no_heavy_library() -> None:
    code = ("import sys, runpy; runpy.run_path(sys.argv[1]); "
            "print([m for m in ('torch', 'transformers', 'peft', 'great_expectations', 'lm_eval', 'dvc.repo') "
            "if m in sys.modules])")
    for name in ("ctune_daily.py", "ctune_incoming.py", "ctune_rollback.py"):
        out = subprocess.run([sys.executable, "-c", code, str(REPO / "dags" / name)], capture_output=True,
                             text=True, check=True).stdout
        assert out.strip().splitlines()[-1] == "[]", (name, out)


def test_dag_files_import_only_what_they_build() -> None:
    """What keeps a parse cheap (benchmarks/dag_parse.py times it): no DAG file imports the stage registry's
    package (the stage modules' home), and the rollback DAG's file not the stage operators with their extra link."""
    code = ("import sys, runpy; runpy.run_path(sys.argv[1]); "
            "print([m for m in ('ctune_ops.stages', 'ctune_ops.config', 'ctune_ops.workspace', "
            "'ctune_ops.airflow.operators', 'airflow.sdk.bases.operatorlink') if m in sys.modules])")
    loaded = {name: subprocess.run([sys.executable, "-c", code, str(REPO / "dags" / name)], capture_output=True,
                                   text=True, check=True).stdout.strip().splitlines()[-1]
              for name in ("ctune_daily.py", "ctune_rollback.py")}
    assert loaded["ctune_rollback.py"] == "[]", loaded
    assert loaded["ctune_daily.py"] == "['ctune_ops.airflow.operators', 'airflow.sdk.bases.operatorlink']", loaded


def test_asset_triggered_run_takes_the_events_date() -> None:
    event = SimpleNamespace(extra={"date": "2026-01-04"})
    context = {"params": {"date": None}, "data_interval_start": None, "triggering_asset_events": {"a": [event]}}
    assert context_batch_date(context) == "2026-01-04"
    context["params"] = {"date": "2026-01-02"}  # the param wins
    assert context_batch_date(context) == "2026-01-02"
    start = dt.datetime(2026, 1, 3, tzinfo=dt.UTC)
    assert context_batch_date({"params": {}, "data_interval_start": start}) == "2026-01-03"


def _summary(ws: Workspace) -> list[tuple]:
    return [(e["kind"], e["date"], e["version"], e["parent"], e["models"]["models/deployed"]["sha256"])
            for e in Registry.load(ws).entries]


def _request(url: str, token: str | None = None, data: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=data, headers={**(headers or {}), **auth})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _stderr_records(local, dag_id: str) -> list[str]:  # noqa: ANN001
    """Records of what the DAG's tasks printed on stderr, which Airflow logs at ERROR: a successful run should leave
    none (a stage's progress bars go to the task log at INFO, ctune_ops/airflow/task_log.py)."""
    logs = sorted(local.home.glob(f"logs/dag_id={dag_id}/**/*.log"))
    assert logs, f"no task logs of {dag_id} under {local.home / 'logs'}"
    return [f"{path.relative_to(local.home)}: {line[:300]}" for path in logs
            for line in path.read_text(errors="replace").splitlines() if '"logger":"task.stderr"' in line]


@pytest.fixture(scope="module")
def airflow_world(small_world, tmp_path_factory):  # noqa: ANN001, ANN201
    """The small world's days through ctune_daily on `airflow standalone` (what `make airflow` runs; kept running
    for the plugin tests); the gate is opened wide so that both days make versions (v1, v2)."""
    from ctune_ops.airflow.local import STANDALONE, LocalAirflow

    root = tmp_path_factory.mktemp("airflow-world") / "ws"
    ws = set_params(Workspace.open(shutil.copytree(small_world.root, root, symlinks=True)), PARAMS)
    local = LocalAirflow(ws.root, start_date=DAYS[0], end_date=DAYS[-1])
    local.setup()
    with local.running((STANDALONE,)):
        runs = local.backfill("ctune_daily", DAYS[0], DAYS[-1], timeout_s=BACKFILL_TIMEOUT_S)
        passwords = json.loads((local.home / "simple_auth_manager_passwords.json.generated").read_text())
        login = json.dumps({"username": "admin", "password": passwords["admin"]}).encode()
        status, body = _request(f"{local.url}/auth/token", data=login, headers={"Content-Type": "application/json"})
        assert status == 201, body
        yield {"ws": ws, "local": local, "runs": runs, "password": passwords["admin"],
               "token": json.loads(body)["access_token"]}


def test_backfill_matches_the_sequential_run(airflow_world, small_world, tmp_path) -> None:  # noqa: ANN001
    ws, local, runs = airflow_world["ws"], airflow_world["local"], airflow_world["runs"]
    states = {run["run_id"]: local.task_states("ctune_daily", run["run_id"]) for run in runs}
    assert [run["logical_date"][:10] for run in runs] == list(DAYS)
    assert all(run["state"] == "success" and run["run_type"] == "backfill" for run in runs), (runs, states)
    assert not _stderr_records(local, "ctune_daily")

    sequential = set_params(Workspace.open(shutil.copytree(small_world.root, tmp_path / "seq", symlinks=True)),
                            PARAMS)
    for date in DAYS:
        for stage in ("validate", "dedup", "score", "select", "train", "proxy", "evaluate"):
            run_stage(sequential, stage, date)
        promote(sequential, date)
    assert _summary(ws) == _summary(sequential)
    assert [kind for kind, *_ in _summary(ws)] == ["promote", "promote"]
    assert ws.git("tag", "--list").stdout.split() == ["v1", "v2"] == sequential.git("tag", "--list").stdout.split()


def test_plugin_requires_airflow_authentication(airflow_world) -> None:  # noqa: ANN001
    url, token = airflow_world["local"].url, airflow_world["token"]
    for path in ("/ctune/", "/ctune/api/versions", "/ctune/api/days", f"/ctune/days/{DAYS[0]}"):
        status, _ = _request(url + path)
        assert status == 401, path
    status, body = _request(url + "/ctune/api/versions", token)
    assert status == 200
    data = json.loads(body)
    assert data["current"] == "v2" and [v["version"] for v in data["versions"]] == ["v0", "v1", "v2"]
    status, body = _request(url + "/ctune/api/days", token)
    days = json.loads(body)
    assert status == 200 and [d["date"] for d in days["days"]] == list(DAYS)
    assert 0 < days["compute"]["saved_share"] < 1
    status, body = _request(url + f"/ctune/days/{DAYS[0]}", token)
    assert status == 200 and b"selection.json" in body


def test_plugin_page_in_headless_chromium(airflow_world) -> None:  # noqa: ANN001
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    local = airflow_world["local"]
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{local.url}/auth/login")
        page.fill("input[name=username]", "admin")
        page.fill("input[name=password]", airflow_world["password"])
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/auth/login" not in url, timeout=60_000)
        page.goto(f"{local.url}/ctune/")
        page.wait_for_selector("#versions")
        versions = page.locator("#versions tr[data-version]").evaluate_all("rows => rows.map(r => r.dataset.version)")
        current = page.inner_text("#current-version")
        page.screenshot(path=str(OUTPUT / "ctune-page.png"), full_page=True)
        page.goto(f"{local.url}/plugin/ctune")  # the nav entry: the same page in the UI's frame
        page.wait_for_timeout(2000)
        page.screenshot(path=str(OUTPUT / "ctune-in-airflow-ui.png"), full_page=True)
        browser.close()
    assert versions == ["v0", "v1", "v2"] and current == "v2"
    assert (OUTPUT / "ctune-page.png").stat().st_size > 0


def test_rollback_from_the_page_runs_the_rollback_dag(airflow_world) -> None:  # noqa: ANN001
    ws, local, token = airflow_world["ws"], airflow_world["local"], airflow_world["token"]
    local.wait_for_dag("ctune_rollback")
    local.airflow("dags", "unpause", "ctune_rollback")
    status, _ = _request(f"{local.url}/ctune/rollback", token, data=b"version=v1",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status in (200, 303)  # urllib follows the redirect to the page
    runs = local.wait_for_runs("ctune_rollback", count=1, timeout_s=BACKFILL_TIMEOUT_S)
    assert runs[-1]["state"] == "success", local.task_states("ctune_rollback", runs[-1]["run_id"])
    assert not _stderr_records(local, "ctune_rollback")
    assert ws.current_version == "v1"
    assert Registry.load(ws).entries[-1]["kind"] == "rollback"
