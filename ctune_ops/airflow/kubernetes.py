"""The training task on Kubernetes: a KubernetesPodOperator that runs ctune's training entrypoint in a GPU pod.

``train.backend: kubernetes`` moves the train stage off the Airflow worker: the pod runs the ctune image (the
repository's ``Dockerfile``) with the workspace's PersistentVolumeClaim mounted, and the very entrypoint the local
stage runs as a subprocess::

    python -m ctune_ops.training --workspace /workspace --date {{ batch date }}

which writes ``models/candidates/D/train_spec.json`` from the workspace's ``params.yaml`` and trains, so no other
task has to prepare the pod's input and a retried pod resumes from the checkpoints on the volume. The repair
task (a rehearsal pass when the gate kept production for forgetting, then the gate again) runs
``ctune stage repair --date D --no-lock`` in the same kind of pod. The pod does
not take the workspace file lock (flock is unreliable on network volumes): put the task in the ``ctune_workspace``
pool, like every other workspace task, so nothing else touches the workspace while it trains.

The cncf.kubernetes provider (3 s to import) and the kubernetes client are imported inside the functions: DAG
files import this module on every parse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ctune_ops.config import GPU_RESOURCE, CtuneConfig, TrainConfig

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import BaseOperator

# ctune's batch-date rule as a template (the plugin's macro), never {{ ds }}: runs without a logical date have no ds
BATCH_DATE_TEMPLATE = "{{ macros.ctune.batch_date(params, data_interval_start) }}"
TRAINING_COMMAND = ["python", "-m", "ctune_ops.training"]
POD_NAME = "ctune-train"
WORKSPACE_VOLUME = "workspace"
SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"
# No network at training time: models and data are on the volume; a hub look-up would only hang.
POD_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
POD_LABELS = {"app.kubernetes.io/name": "ctune", "app.kubernetes.io/component": "train"}
REPAIR_COMMAND = ["ctune", "stage", "repair"]
REPAIR_POD_NAME = "ctune-repair"
REPAIR_POD_LABELS = {**POD_LABELS, "app.kubernetes.io/component": "repair"}


def _train_config(config: CtuneConfig | TrainConfig) -> TrainConfig:
    return config.train if isinstance(config, CtuneConfig) else config


def training_pod_operator(
    *,
    config: CtuneConfig | TrainConfig,
    task_id: str = "train",
    date: str = BATCH_DATE_TEMPLATE,
    **kwargs: Any,
) -> KubernetesPodOperator:
    """A KubernetesPodOperator training day ``date`` (templated) as ``config.train.kubernetes`` describes.

    ``kwargs`` go to the operator as they are (``pool``, ``retries``, ``deferrable``, ``in_cluster``, ...) and
    override what the config sets.
    """
    mount = _train_config(config).kubernetes.workspace_mount_path
    return _pod_operator(config, task_id, POD_NAME, TRAINING_COMMAND, ["--workspace", mount, "--date", date],
                         {}, POD_LABELS, kwargs)


def repair_pod_operator(
    *,
    config: CtuneConfig | TrainConfig,
    task_id: str = "repair",
    date: str = BATCH_DATE_TEMPLATE,
    **kwargs: Any,
) -> KubernetesPodOperator:
    """The repair stage (``ctune stage repair``) in the same kind of GPU pod: it may train (a rehearsal pass of
    the day's candidate) and evaluate the result, so it needs the GPU the train task had. On a day the gate
    passed it only writes its report, in seconds once the pod runs."""
    from ctune_ops.pipeline import IN_POD_ENV

    mount = _train_config(config).kubernetes.workspace_mount_path
    return _pod_operator(config, task_id, REPAIR_POD_NAME, REPAIR_COMMAND,
                         ["--workspace", mount, "--date", date, "--no-lock"], {IN_POD_ENV: "1"},
                         REPAIR_POD_LABELS, kwargs)


def _pod_operator(config: CtuneConfig | TrainConfig, task_id: str, name: str, cmds: list[str],
                  arguments: list[str], env: dict[str, str], labels: dict[str, str],
                  kwargs: dict[str, Any]) -> KubernetesPodOperator:
    """A KubernetesPodOperator running ``cmds arguments`` in the ctune image on the workspace's volume."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    pod = _train_config(config).kubernetes
    limits = dict(pod.limits)
    if pod.gpus:
        limits[GPU_RESOURCE] = str(pod.gpus)  # extended resources are set as limits; requests default to them
    volumes = [
        k8s.V1Volume(name=WORKSPACE_VOLUME,
                     persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=pod.pvc_claim)),
        k8s.V1Volume(name=SHM_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=pod.shm_size)),
    ]
    volume_mounts = [
        k8s.V1VolumeMount(name=WORKSPACE_VOLUME, mount_path=pod.workspace_mount_path),
        k8s.V1VolumeMount(name=SHM_VOLUME, mount_path=SHM_PATH),
    ]
    tolerations = [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
                   for t in pod.tolerations]
    options: dict[str, Any] = {
        "task_id": task_id,
        "name": name,
        "namespace": pod.namespace,
        "kubernetes_conn_id": pod.kubernetes_conn_id,
        "image": pod.image,
        "image_pull_policy": pod.image_pull_policy,
        "cmds": list(cmds),
        "arguments": list(arguments),
        "env_vars": {**POD_ENV, **env},
        "labels": dict(labels),
        "container_resources": k8s.V1ResourceRequirements(requests=dict(pod.requests) or None,
                                                          limits=limits or None),
        "volumes": volumes,
        "volume_mounts": volume_mounts,
        "node_selector": dict(pod.node_selector) or None,
        "tolerations": tolerations or None,
        "service_account_name": pod.service_account,
        "security_context": k8s.V1PodSecurityContext(run_as_user=pod.run_as_user, run_as_non_root=True,
                                                     fs_group=pod.fs_group),
        "startup_timeout_seconds": pod.startup_timeout_seconds,
        "schedule_timeout_seconds": pod.schedule_timeout_seconds,
        "on_finish_action": pod.on_finish_action,
        "get_logs": True,
    }
    return KubernetesPodOperator(**{**options, **kwargs})


def train_operator(*, workspace: str, config: CtuneConfig, task_id: str = "train", **kwargs: Any) -> BaseOperator:
    """The DAG's train task for ``train.backend``: the local stage operator, or the GPU pod on Kubernetes."""
    if config.train.backend == "kubernetes":
        return training_pod_operator(config=config, task_id=task_id, **kwargs)
    from ctune_ops.airflow.operators import CtuneStageOperator

    return CtuneStageOperator(task_id=task_id, stage="train", workspace=workspace, **kwargs)
