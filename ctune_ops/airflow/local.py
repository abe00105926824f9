"""Airflow on one machine for one workspace: SQLite metadata DB, LocalExecutor, ctune's DAGs.

What ``make demo`` (a backfill of the world's days through ``ctune_daily``), ``make airflow`` (``airflow
standalone`` on the demo workspace) and the backfill test run. The production shape (Postgres metadata DB,
CeleryExecutor with a Redis broker and a Celery worker) is the same class with ``database_url`` and
``broker_url`` set, as the integration test runs it without Docker. Everything lives in ``<workspace>/.airflow``
(``airflow.cfg`` is not written: the settings are environment variables, so the same home works with any
checkout). The components are started as ``airflow <component>`` processes, as ``airflow standalone`` does; the
API server also serves the Execution API the LocalExecutor's tasks talk to, so it runs too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ctune_ops.airflow.dags import END_DATE_ENV, POOL, START_DATE_ENV, WORKSPACE_ENV, WORKSPACE_VARIABLE

HOME_DIR = ".airflow"
COMPONENTS = ("api-server", "scheduler", "dag-processor")
STANDALONE = "standalone"  # `airflow standalone`: runs all of these and the triggerer itself (`make airflow`)
STANDALONE_PARTS = (*COMPONENTS, "triggerer")
HEALTH_REPORTED = ("scheduler", "dag-processor", "triggerer")  # what /api/v2/monitor/health reports on
STARTUP_TIMEOUT_S = 180.0
POLL_S = 2.0
HEALTH_PATH = "/api/v2/monitor/health"
FINISHED = ("success", "failed")
# SQLite answers "database is locked" at once, without waiting for the busy timeout, when a transaction that has
# read must upgrade to a write another process made meanwhile (its deadlock rule); `airflow backfill create` then
# removes the backfill it half made so that the caller can retry (airflow.models.backfill._cleanup_partial_backfill)
LOCKED = "database is locked"
LOCKED_RETRIES = 4
LOCKED_PAUSE_S = 3.0
DAG_FILES_REFRESH_S = 10  # dag_processor.refresh_interval: new DAG files show up within this


class LocalAirflowError(RuntimeError):
    """The local Airflow could not start or a run did not finish; names the log to read."""


def dags_folder() -> Path:
    """The repository's ``dags/`` (ctune is installed editable, as README's install does)."""
    folder = Path(__file__).resolve().parents[2] / "dags"
    if not (folder / "ctune_daily.py").exists():
        raise LocalAirflowError(f"{folder} does not hold ctune_daily.py; install ctune from its repository "
                                "(`make install`) so that the DAG files are beside the package")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalAirflow:
    """Airflow for ``workspace`` with its home in ``<workspace>/.airflow``; ``dates`` bound the DAG's schedule."""

    workspace: Path
    start_date: str
    end_date: str | None = None
    database_url: str | None = None  # None: SQLite in the home; else e.g. postgresql+psycopg2://user@host/db
    broker_url: str | None = None  # set: CeleryExecutor with this broker (redis://host:6379/0), results in the DB
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.workspace / HOME_DIR

    @property
    def db_path(self) -> Path:
        return self.home / "airflow.db"

    @property
    def executor(self) -> str:
        return "CeleryExecutor" if self.broker_url else "LocalExecutor"

    @property
    def components(self) -> tuple[str, ...]:
        """What must run for tasks to run: the Celery shape adds a worker."""
        return (*COMPONENTS, "celery worker") if self.broker_url else COMPONENTS

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    def _secret(self, name: str) -> str:
        """A secret shared by every component of this home (each would otherwise invent its own)."""
        path = self.home / f".{name}"
        if not path.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32), encoding="utf-8")
            path.chmod(0o600)
        return path.read_text(encoding="utf-8").strip()

    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url or f"sqlite:///{self.db_path}",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": str(DAG_FILES_REFRESH_S),
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt_secret"),
            "AIRFLOW__API__SECRET_KEY": self._secret("api_secret"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
            WORKSPACE_ENV: str(self.workspace),
            START_DATE_ENV: self.start_date,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "DVC_NO_ANALYTICS": "1",
            "TQDM_DISABLE": "1",
        }
        if not self.database_url:  # SQLite: every process waits for the others' write locks (airflow/sqlite.py)
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = "ctune_ops.airflow.sqlite.CONNECT_ARGS"
        if self.end_date:
            env[END_DATE_ENV] = self.end_date
        if self.broker_url:
            env["AIRFLOW__CELERY__BROKER_URL"] = self.broker_url
            env["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+" + (self.database_url or "").replace("+psycopg2", "")
            env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] = "2"
        return env

    def airflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the ``airflow`` CLI against this home; on SQLite, a command that lost a lock race is run again."""
        for attempt in range(LOCKED_RETRIES + 1):
            result = subprocess.run([str(Path(sys.executable).parent / "airflow"), *args], env=self.env(),
                                    capture_output=True, text=True, check=False)
            locked = result.returncode != 0 and LOCKED in (result.stderr + result.stdout)
            if self.database_url or not locked or attempt == LOCKED_RETRIES:
                break
            time.sleep(LOCKED_PAUSE_S)
        if check and result.returncode != 0:
            raise LocalAirflowError(f"airflow {' '.join(args)} failed ({result.returncode}):\n"
                                    f"{(result.stderr or result.stdout)[-3000:]}")
        return result

    def setup(self) -> None:
        """Migrate the metadata DB, create the one-slot workspace pool and the workspace Variable."""
        self.airflow("db", "migrate")
        self.airflow("pools", "set", POOL, "1", "ctune: one task at a time on the workspace (DVC's lock fails fast)")
        self.airflow("variables", "set", WORKSPACE_VARIABLE, str(self.workspace))

    # -- components ------------------------------------------------------------------------------------------------
    def _log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def start(self, components: tuple[str, ...] | None = None) -> None:
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        components = components or self.components
        for name in components:
            with open(self._log(name.replace(" ", "-")), "ab") as log:
                self.processes[name] = subprocess.Popen(
                    [str(Path(sys.executable).parent / "airflow"), *name.split()], env=self.env(), stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_healthy(components)

    def health(self) -> dict[str, str]:
        with urllib.request.urlopen(self.url + HEALTH_PATH, timeout=5) as response:  # noqa: S310 - local URL
            data = json.load(response)
        return {part: (value or {}).get("status", "") for part, value in data.items()}

    def wait_healthy(self, components: tuple[str, ...], timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        parts = STANDALONE_PARTS if STANDALONE in components else components
        wanted = {"metadatabase", *(c.replace("-", "_") for c in parts if c in HEALTH_REPORTED)}
        deadline = time.monotonic() + timeout_s
        status: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise LocalAirflowError(f"airflow {name} exited with {process.returncode}; see {self._log(name)}")
            with contextlib.suppress(OSError, ValueError):
                status = self.health()
                if all(status.get(part) == "healthy" for part in wanted):
                    return
            time.sleep(POLL_S)
        raise LocalAirflowError(f"Airflow not healthy after {timeout_s:.0f}s ({status}); logs in {self.home / 'logs'}")

    def stop(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            self.processes[name] = process
        self.processes.clear()

    @contextlib.contextmanager
    def running(self, components: tuple[str, ...] | None = None) -> Iterator[LocalAirflow]:
        try:
            self.start(components)
            yield self
        finally:
            self.stop()

    # -- runs ---------------------------------------------------------------------------------------------------------
    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Read the metadata DB directly (the run states the CLI would print, without a CLI start each poll)."""
        if self.database_url:
            import psycopg2

            dsn = self.database_url.replace("postgresql+psycopg2://", "postgresql://")
            with contextlib.closing(psycopg2.connect(dsn)) as db, db.cursor() as cursor:
                cursor.execute(sql.replace("?", "%s"), args)
                return [tuple(str(v) if v is not None and not isinstance(v, str) else v for v in row)
                        for row in cursor.fetchall()]
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)) as db:
            return db.execute(sql, args).fetchall()

    def wait_for_dag(self, dag_id: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Until the dag-processor has parsed and stored ``dag_id``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(sqlite3.Error, ImportError, OSError, RuntimeError):
                if self._query("SELECT 1 FROM serialized_dag WHERE dag_id = ?", (dag_id,)):
                    return
            time.sleep(POLL_S)
        raise LocalAirflowError(f"DAG {dag_id} not parsed after {timeout_s:.0f}s; see {self._log('dag-processor')}")

    def runs(self, dag_id: str) -> list[dict[str, str]]:
        rows = self._query("SELECT run_id, logical_date, state, run_type FROM dag_run WHERE dag_id = ? "
                           "ORDER BY logical_date", (dag_id,))
        return [{"run_id": r, "logical_date": d, "state": s, "run_type": t} for r, d, s, t in rows]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        rows = self._query("SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?",
                           (dag_id, run_id))
        return {task: state or "none" for task, state in rows}

    def wait_for_runs(self, dag_id: str, count: int, timeout_s: float) -> list[dict[str, str]]:
        """Until ``dag_id`` has at least ``count`` runs and all of them have finished."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            runs = self.runs(dag_id)
            if len(runs) >= count and all(r["state"] in FINISHED for r in runs):
                return runs
            time.sleep(POLL_S)
        raise LocalAirflowError(f"{dag_id}: runs not finished after {timeout_s:.0f}s: {self.runs(dag_id)}")

    def backfill(self, dag_id: str, from_date: str, to_date: str, timeout_s: float,
                 progress: Callable[[dict[str, str]], None] | None = None) -> list[dict[str, str]]:
        """``airflow backfill create`` over the dates, unpause, and wait until every run has finished."""
        self.wait_for_dag(dag_id)
        # depends_on_past DAGs must say what to do with days already run: redo failed ones, keep completed ones
        self.airflow("backfill", "create", "--dag-id", dag_id, "--from-date", from_date, "--to-date", to_date,
                     "--max-active-runs", "1", "--reprocess-behavior", "failed")
        self.airflow("dags", "unpause", dag_id)
        deadline = time.monotonic() + timeout_s
        reported: set[str] = set()
        while time.monotonic() < deadline:
            runs = [r for r in self.runs(dag_id) if from_date <= r["logical_date"][:10] <= to_date]
            for run in runs:
                if run["state"] in FINISHED and run["run_id"] not in reported:
                    reported.add(run["run_id"])
                    if progress:
                        progress(run)
            if runs and all(r["state"] in FINISHED for r in runs):
                return runs
            if any(r["state"] == "failed" for r in runs):
                return runs  # depends_on_past: nothing after a failed day can run
            time.sleep(POLL_S)
        raise LocalAirflowError(f"backfill of {dag_id} not finished after {timeout_s:.0f}s: {self.runs(dag_id)}; "
                                f"logs in {self.home / 'logs'}")
