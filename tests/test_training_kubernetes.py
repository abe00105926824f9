"""The Kubernetes side of training (issue 5): the pod the factory builds (rendered without a cluster), the train
section of params.yaml, the Dockerfile, and that none of it costs a DAG file a heavy import."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ctune_ops.config import ConfigError, CtuneConfig, parse_config, read_yaml

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "airflow.providers.cncf.kubernetes", "kubernetes")

POD_PARAMS = """
train:
  backend: kubernetes
  kubernetes:
    image: registry.example/ctune:1.2.3
    namespace: ml
    gpus: 2
    node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
    tolerations:
      - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
      - {key: pool, operator: Equal, value: training}
    pvc_claim: ctune-ws
    workspace_mount_path: /mnt/ws
    shm_size: 16Gi
    startup_timeout_seconds: 900
    schedule_timeout_seconds: 2400
    requests: {cpu: "8", memory: 64Gi}
    limits: {memory: 80Gi}
    service_account: ctune-trainer
"""


def _config(text: str) -> CtuneConfig:
    return parse_config(read_yaml(text), source="p.yaml", text=text)


def test_factory_renders_the_training_pod() -> None:
    from ctune_ops.airflow.kubernetes import BATCH_DATE_TEMPLATE, training_pod_operator

    op = training_pod_operator(config=_config(POD_PARAMS), pool="ctune_workspace", retries=2)
    assert op.task_id == "train" and op.pool == "ctune_workspace" and op.retries == 2
    assert op.schedule_timeout_seconds == 2400 and op.startup_timeout_seconds == 900
    pod = op.build_pod_request_obj(dry_run=True)
    spec = pod.spec
    (container,) = spec.containers
    assert pod.metadata.namespace == "ml" and pod.metadata.name.startswith("ctune-train")
    assert container.image == "registry.example/ctune:1.2.3"
    assert container.command == ["python", "-m", "ctune_ops.training"]
    assert container.args == ["--workspace", "/mnt/ws", "--date", BATCH_DATE_TEMPLATE]
    assert container.resources.limits == {"memory": "80Gi", "nvidia.com/gpu": "2"}
    assert container.resources.requests == {"cpu": "8", "memory": "64Gi"}
    assert spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert [(t.key, t.operator, t.value, t.effect) for t in spec.tolerations] == [
        ("nvidia.com/gpu", "Exists", None, "NoSchedule"), ("pool", "Equal", "training", None)]
    volumes = {v.name: v for v in spec.volumes}
    assert volumes["workspace"].persistent_volume_claim.claim_name == "ctune-ws"
    assert volumes["dshm"].empty_dir.medium == "Memory" and volumes["dshm"].empty_dir.size_limit == "16Gi"
    assert {m.name: m.mount_path for m in container.volume_mounts} == {"workspace": "/mnt/ws", "dshm": "/dev/shm"}
    assert spec.service_account_name == "ctune-trainer" and spec.restart_policy == "Never"
    assert spec.security_context.run_as_non_root and spec.security_context.run_as_user == 1000
    env = {e.name: e.value for e in container.env}
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert "arguments" in op.template_fields  # the batch date renders at run time


def test_defaults_and_the_backend_switch() -> None:
    from ctune_ops.airflow.kubernetes import train_operator, training_pod_operator
    from ctune_ops.airflow.operators import CtuneStageOperator

    default = CtuneConfig()
    pod = training_pod_operator(config=default.train, date="2026-01-05").build_pod_request_obj(dry_run=True)
    (container,) = pod.spec.containers
    assert container.resources.limits["nvidia.com/gpu"] == "1" and container.args[-1] == "2026-01-05"
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu" and not pod.spec.node_selector
    assert container.image_pull_policy == "IfNotPresent"

    assert isinstance(train_operator(workspace="/ws", config=default), CtuneStageOperator)
    k8s = train_operator(workspace="/ws", config=_config(POD_PARAMS), task_id="train_gpu")
    assert type(k8s).__name__ == "KubernetesPodOperator" and k8s.task_id == "train_gpu"
    cpu_only = _config("train:\n  kubernetes:\n    gpus: 0\n")
    (container,) = training_pod_operator(config=cpu_only).build_pod_request_obj(dry_run=True).spec.containers
    assert "nvidia.com/gpu" not in container.resources.limits


def test_the_repair_runs_in_the_same_kind_of_pod(tmp_path) -> None:  # noqa: ANN001
    from ctune_ops.airflow.dags import daily_dag
    from ctune_ops.airflow.kubernetes import BATCH_DATE_TEMPLATE, repair_pod_operator

    pod = repair_pod_operator(config=_config(POD_PARAMS)).build_pod_request_obj(dry_run=True)
    (container,) = pod.spec.containers
    assert pod.metadata.name.startswith("ctune-repair") and pod.metadata.labels["app.kubernetes.io/component"] == \
        "repair"
    assert container.command == ["ctune", "stage", "repair"]
    assert container.args == ["--workspace", "/mnt/ws", "--date", BATCH_DATE_TEMPLATE, "--no-lock"]
    assert container.resources.limits["nvidia.com/gpu"] == "2"
    assert {e.name: e.value for e in container.env}["CTUNE_IN_POD"] == "1"

    (tmp_path / "params.yaml").write_text(POD_PARAMS)
    tasks = {t.task_id: type(t).__name__ for t in daily_dag(workspace=str(tmp_path)).tasks}
    assert tasks["train"] == tasks["repair"] == "KubernetesPodOperator"
    assert {tasks[t] for t in ("evaluate", "promote")} == {"CtuneStageOperator"}


@pytest.mark.parametrize(("text", "expected"), [
    ("train:\n  kubernetes:\n    requests: {cpu: lots}\n", "p.yaml:3: key 'train.kubernetes.requests'"),
    ("train:\n  kubernetes:\n    limits: {nvidia.com/gpu: '1'}\n", "set train.kubernetes.gpus instead"),
    ("train:\n  kubernetes:\n    shm_size: big\n", "shm_size is 'big', not a Kubernetes quantity"),
    ("train:\n  kubernetes:\n    pvc_claim: My_Claim\n", "not a DNS-1123 label"),
    ("train:\n  kubernetes:\n    workspace_mount_path: data\n", "must be an absolute path"),
    ("train:\n  kubernetes:\n    tolerations: [{key: a, operator: Equal}]\n", "operator Equal needs a value"),
    ("train:\n  lora:\n    target_modules: [q_proj, q_proj]\n", "target_modules must be distinct"),
    ("train:\n  backend: slurm\n", "key 'train.backend'"),
    ("train:\n  epochs: 0\n", "key 'train.epochs'"),
    ("train:\n  learning_rate: 0.003\n  warmup: 10\n", "p.yaml:3: key 'train.warmup': unknown key"),
])
def test_train_section_is_validated(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(text)
    assert expected in str(info.value)


def test_dockerfile_builds_the_pinned_package_as_a_non_root_user() -> None:
    text = (REPO / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)  # join continued lines
    instructions = [line.strip() for line in logical.splitlines() if line.strip() and not line.startswith("#")]
    assert instructions[0].startswith("ARG PYTHON_IMAGE=python:3.11-slim")
    assert [i for i in instructions if i.startswith("FROM ")] == ["FROM ${PYTHON_IMAGE}"]
    installs = re.findall(r"pip install ([^&;]*)", logical)
    assert installs, "the Dockerfile installs nothing with pip"
    for args in installs:  # every pip install is either exactly pinned or constrained by constraints.txt
        assert "-c /tmp/constraints.txt" in args or re.fullmatch(r'"?[\w.-]+==[\w.${}+-]+"?\s*', args), args
    assert 'sed "s/^torch==.*/${torch_pin}/" constraints.txt' in logical
    assert "ARG TORCH_VARIANT=cuda" in instructions and "TORCH_VARIANT must be cuda or cpu" in logical
    user = [i for i in instructions if i.startswith("USER ")]
    assert user == ["USER ctune"] and instructions.index(user[0]) > max(
        k for k, i in enumerate(instructions) if "pip install" in i)
    assert "WORKDIR /workspace" in instructions and 'CMD ["ctune", "--help"]' in instructions
    assert not any(i.startswith("ENTRYPOINT") for i in instructions)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    for path in ("setup.cfg", "pyproject.toml", "constraints.txt", "README.md"):
        assert (REPO / path).exists() and path in text
    assert re.search(r"^torch==", (REPO / "constraints.txt").read_text(), re.M)


def test_training_modules_import_no_heavy_library() -> None:
    code = ("import sys, ctune_ops.airflow.kubernetes, ctune_ops.training, ctune_ops.training.spec,"
            " ctune_ops.training.data, ctune_ops.training.checkpoint, ctune_ops.training.loop,"
            " ctune_ops.training.__main__, ctune_ops.stages.train;"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("text", "backend"), [
    ("select:\n  seed: 1\ntrain:\n  backend: kubernetes\n  epochs: 3\n# a comment\nevaluate: {}\n", "kubernetes"),
    ("train:\n\n  # blank and comment lines stay in the section\n  epochs: 3\n\n  backend: kubernetes\n", "kubernetes"),
    ("train: {backend: kubernetes}\n", "kubernetes"),
    ("x: &pod {backend: kubernetes}\ntrain: *pod\n", "kubernetes"),  # an alias to another section: whole file
    ("select:\n  seed: 1\n", "local"),  # no train section: the default
    # read off the backend line (no YAML), as YAML would read it
    ("train:  # LoRA\n  epochs: 3\n  backend: 'kubernetes'  # GPU pods\n", "kubernetes"),
    ("train:\n  lora:\n    backend: kubernetes\n  epochs: 3\n", "local"),  # a nested key is not train's
    ("train:\n  backend: local\n  backend: kubernetes\n", "kubernetes"),  # twice: YAML's reading, the last
    ("", "local"),
])
def test_dag_files_read_the_training_backend_from_the_train_section(tmp_path: Path, text: str,
                                                                     backend: str) -> None:
    from ctune_ops.airflow.dags import _train_backend

    (tmp_path / "params.yaml").write_text(text)
    assert _train_backend(str(tmp_path)) == backend
    assert _train_backend(str(tmp_path / "missing")) == "local"


def test_the_default_params_name_the_backend_plainly() -> None:
    """The shipped params.yaml is read off its backend line, without YAML, and says what YAML reads there."""
    import yaml

    from ctune_ops.airflow.dags import _plain_backend, _top_level_block

    text = (REPO / "ctune_ops" / "resources" / "params.yaml").read_text()
    assert _plain_backend(_top_level_block(text, "train")) == yaml.safe_load(text)["train"]["backend"] == "local"
    assert _plain_backend(_top_level_block(text.replace("backend: local", "backend: kubernetes", 1),
                                           "train")) == "kubernetes"


def test_dag_files_name_the_line_of_a_wrong_backend(tmp_path: Path) -> None:
    from ctune_ops.airflow.dags import _train_backend

    (tmp_path / "params.yaml").write_text("train:\n  epochs: 3\n  backend: slurm\n")
    with pytest.raises(ConfigError, match=r"params.yaml:3: key 'train.backend'"):
        _train_backend(str(tmp_path))
