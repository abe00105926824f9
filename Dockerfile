# syntax=docker/dockerfile:1
# The ctune image. One image runs both the Airflow tasks (ctune stages, DVC, lm-eval) and the GPU training pod
# (`python -m ctune_ops.training`, see ctune_ops/airflow/kubernetes.py), so what trains is exactly what was tested.
#
#   docker build -t ctune:latest .                              # GPU training image (CUDA torch)
#   docker build --build-arg TORCH_VARIANT=cpu -t ctune:cpu .   # CPU-only image (Airflow workers, CI)
#
# Why python:3.11-slim and not an nvidia/cuda base: torch from PyPI is the CUDA build, and it brings its CUDA
# runtime, cuBLAS, cuDNN and NCCL as nvidia-* wheels pinned exactly (==) by torch's own metadata. The GPU node
# provides only the driver (through the NVIDIA device plugin / container toolkit), so a CUDA base image would
# add gigabytes without adding anything torch uses. The CPU variant takes torch==X+cpu from PyTorch's CPU index
# instead (the same build constraints.txt pins for development), a fraction of the size.
# Every Python package is pinned: ctune's direct dependencies in setup.cfg, the whole tree in constraints.txt
# (its torch line is swapped for the chosen variant).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_VERSION=26.3
ARG CTUNE_UID=1000

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1

# git: every workspace is a git + DVC repository; curl: the compose health checks
RUN apt-get update \
 && apt-get install -y --no-install-recommends git curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ctune
COPY setup.cfg pyproject.toml constraints.txt README.md ./
COPY ctune_ops ./ctune_ops
COPY dags ./dags

RUN case "${TORCH_VARIANT}" in \
        cuda) torch_pin="torch==${TORCH_VERSION}"; index="" ;; \
        cpu)  torch_pin="torch==${TORCH_VERSION}+cpu"; index="--extra-index-url ${TORCH_CPU_INDEX}" ;; \
        *)    echo "TORCH_VARIANT must be cuda or cpu, not ${TORCH_VARIANT}" >&2; exit 1 ;; \
    esac \
 && sed "s/^torch==.*/${torch_pin}/" constraints.txt > /tmp/constraints.txt \
 && grep -qx "${torch_pin}" /tmp/constraints.txt \
 && python -m pip install "pip==${PIP_VERSION}" \
 && python -m pip install ${index} -c /tmp/constraints.txt ".[production]" \
 && rm /tmp/constraints.txt \
 && python -c "import ctune_ops.airflow.kubernetes, ctune_ops.training.spec"

# a non-root user; its uid is train.kubernetes.run_as_user and fs_group in params.yaml
RUN groupadd --gid "${CTUNE_UID}" ctune \
 && useradd --uid "${CTUNE_UID}" --gid "${CTUNE_UID}" --create-home --shell /usr/sbin/nologin ctune \
 && mkdir -p /workspace /opt/airflow \
 && chown ctune:ctune /workspace /opt/airflow
USER ctune

# the workspace volume is mounted here (train.kubernetes.workspace_mount_path), so `ctune stage NAME --date D`
# works with its default --workspace .
WORKDIR /workspace

# no ENTRYPOINT: Airflow, docker compose and the KubernetesPodOperator give the command (`ctune ...`,
# `airflow ...`, `python -m ctune_ops.training ...`)
CMD ["ctune", "--help"]
