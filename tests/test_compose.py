"""docker-compose.yml (issue 7): Docker cannot run here, so its structure is checked: the Airflow 3.3 Celery stack
(Postgres, Redis, api-server, scheduler, dag-processor, triggerer, worker, init) in the ctune image built from the
Dockerfile, the workspace and DVC remote volumes, the kubeconfig mount, and the settings Airflow 3 needs."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-init")


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_and_commands() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "redis", *AIRFLOW_SERVICES}
    commands = {name: services[name]["command"] for name in AIRFLOW_SERVICES}
    assert commands["airflow-apiserver"] == "airflow api-server"
    assert commands["airflow-scheduler"] == "airflow scheduler"
    assert commands["airflow-dag-processor"] == "airflow dag-processor"
    assert commands["airflow-triggerer"] == "airflow triggerer"
    assert commands["airflow-worker"] == "airflow celery worker"
    init = "\n".join(commands["airflow-init"])
    assert "airflow db migrate" in init and "airflow pools set ctune_workspace 1" in init
    assert "airflow variables set ctune_workspace /workspace" in init and "ctune init /workspace" in init
    for name in ("postgres", "redis", *AIRFLOW_SERVICES[:-1]):
        assert "healthcheck" in services[name], name
    assert services["postgres"]["image"].startswith("postgres:") and services["redis"]["image"].startswith("redis:")


def test_every_airflow_service_runs_the_ctune_image_with_the_celery_settings() -> None:
    services = _compose()["services"]
    for name in AIRFLOW_SERVICES:
        service = services[name]
        assert service["build"]["context"] == "." and (REPO / "Dockerfile").exists(), name
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/ctune/dags" and env["CTUNE_WORKSPACE"] == "/workspace"
        mounts = {(volume.rsplit(":", 2) if volume.endswith(":ro") else volume.rsplit(":", 1))[1]: volume
                  for volume in service["volumes"]}  # source may hold ':' (a ${VAR:-default})
        assert mounts["/workspace"].startswith("workspace:") and mounts["/dvc-remote"].startswith("dvc-remote:")
        assert mounts["/home/ctune/.kube/config"].endswith(":ro") and env["KUBECONFIG"] == "/home/ctune/.kube/config"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {"workspace", "dvc-remote", "postgres-db"} <= set(_compose()["volumes"])
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"


def test_the_image_carries_the_dags_and_the_production_extra() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY dags ./dags" in dockerfile and '".[production]"' in dockerfile
    assert "dags" not in (REPO / ".dockerignore").read_text().split()
    setup = (REPO / "setup.cfg").read_text()
    production = setup.split("production =")[1].split("dev =")[0]
    assert "apache-airflow-providers-celery==" in production and "psycopg2-binary==" in production
