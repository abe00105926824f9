"""The production-shaped Airflow without Docker (issue 7): Postgres as the metadata DB, CeleryExecutor with Redis,
scheduler, dag-processor, api-server and a Celery worker started by the test; one day of ``ctune_daily`` end to end.
Skips, saying why, where Postgres (127.0.0.1:5432, trust auth) or Redis (127.0.0.1:6379) is not running."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket

import pytest

from ctune_ops.airflow.dags import DAILY_TASKS
from ctune_ops.registry import Registry
from ctune_ops.workspace import Workspace
from tests.conftest import set_params
from tests.test_proxy_stage import SMALL_TRAIN

POSTGRES = ("127.0.0.1", 5432)
REDIS = ("127.0.0.1", 6379)
REDIS_DB = 7  # a database of its own on the shared Redis, flushed before use
DAY = "2026-01-01"
TIMEOUT_S = 1500.0


def _listening(address: tuple[str, int]) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=1):
        return True
    return False


pytestmark = pytest.mark.skipif(
    not (_listening(POSTGRES) and _listening(REDIS)),
    reason=f"needs PostgreSQL on {POSTGRES[0]}:{POSTGRES[1]} (trust auth) and Redis on {REDIS[0]}:{REDIS[1]}; "
           "CI machines of this project run both",
)


@pytest.fixture
def postgres_db():  # noqa: ANN201
    """A fresh database for Airflow's metadata, dropped afterwards."""
    import psycopg2

    name = f"ctune_it_{os.getpid()}"
    admin = psycopg2.connect(host=POSTGRES[0], port=POSTGRES[1], user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg2://postgres@{POSTGRES[0]}:{POSTGRES[1]}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_one_day_on_postgres_and_celery(small_world, tmp_path, postgres_db) -> None:  # noqa: ANN001
    import redis

    from ctune_ops.airflow.local import LocalAirflow

    redis.Redis(host=REDIS[0], port=REDIS[1], db=REDIS_DB).flushdb()
    ws = set_params(Workspace.open(shutil.copytree(small_world.root, tmp_path / "ws", symlinks=True)), SMALL_TRAIN)
    local = LocalAirflow(ws.root, start_date=DAY, end_date=DAY, database_url=postgres_db,
                         broker_url=f"redis://{REDIS[0]}:{REDIS[1]}/{REDIS_DB}")
    assert local.executor == "CeleryExecutor" and "celery worker" in local.components
    local.setup()
    with local.running():
        runs = local.backfill("ctune_daily", DAY, DAY, timeout_s=TIMEOUT_S)
        states = local.task_states("ctune_daily", runs[0]["run_id"])
        executors = local._query("SELECT DISTINCT executor_config IS NOT NULL, queue FROM task_instance "
                                 "WHERE dag_id = ?", ("ctune_daily",))
    assert [r["state"] for r in runs] == ["success"], states
    assert set(states.values()) == {"success"} and set(states) == {task_id for task_id, _ in DAILY_TASKS}
    assert executors, "no task instances recorded in Postgres"
    worker_log = (local.home / "logs" / "celery-worker.log").read_text(errors="replace")
    assert "ctune_daily" in worker_log or "execute_workload" in worker_log, worker_log[-2000:]
    entry = Registry.load(ws).entries[-1]
    assert entry["date"] == DAY and entry["kind"] in ("promote", "keep")
