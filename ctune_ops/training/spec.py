"""The training spec: everything one training run needs, as a JSON file the entrypoint reads.

Why a file and not the workspace's params: the same run must be reproducible locally (a subprocess of the train
stage) and inside a Kubernetes pod, where the workspace is mounted at another path. So every path in the spec is
relative to the workspace root (a hub id or an absolute path stays as written), the root is given separately
(``--workspace``, defaulting to the spec's ``workspace``), and the spec holds the hyperparameters themselves, not
a pointer to params.yaml. A checkpoint remembers the hash of the spec (and of the data and the adapter it
continues), so a changed spec never resumes a stale checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ctune_ops.config import AdapterTrainHyperparameters, PromptConfig
from ctune_ops.workspace import Workspace, atomic_write_text

SPEC_FORMAT = 1
SPEC_FILE = "train_spec.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
REPORT_FILE = "train.json"
LOG_FILE = "train.log"
REPAIR_DIR = "repair"  # models/candidates/D/repair: the repair stage's run (ctune_ops/stages/repair.py)
REPAIR_ROWS = "rows.jsonl"
REPAIR_REPORT = "repair_train.json"  # its log: the same name, .log (repair_report(...).with_suffix)
REPAIR_ROUND_DIR = "round"  # repair/round2, repair_train_round2.json: the repair's later rounds
DEPLOYED_ADAPTER = "models/deployed"  # the promoted LoRA adapter (DESIGN §2); absent before the first promotion
ADAPTER_CONFIG = "adapter_config.json"
HASH_CHUNK_BYTES = 1 << 20
# Fields that do not change what is trained: where the workspace is mounted and how many CPU threads run.
_NOT_HASHED = frozenset({"workspace", "threads"})


class SpecError(ValueError):
    """A spec file that cannot be read, or names inputs that do not exist; says which file and field."""


class TrainingError(RuntimeError):
    """Training cannot start or finish: a model that does not load, a device that is not there, a checkpoint that
    does not fit the model. The message names the file or spec field."""


class TrainSpec(BaseModel):
    """One training run. Paths are relative to the workspace root unless absolute (or a hub id, for the base)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = SPEC_FORMAT
    workspace: str = Field(description="the workspace root when the spec was written; --workspace overrides it")
    date: str
    base_model: str = Field(description="the frozen base: a workspace path, an absolute path or a hub id")
    production_adapter: str | None = Field(description="adapter to continue (models/deployed), None = a new LoRA")
    production_version: str
    train_file: str
    output_dir: str
    report: str
    checkpoint_dir: str
    prompt: PromptConfig
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=0, ge=0)
    hyper: AdapterTrainHyperparameters

    def path(self, root: Path, relative: str) -> Path:
        """``relative`` (a path of this spec) resolved against the workspace ``root``."""
        return Path(relative) if os.path.isabs(relative) else root / relative

    def base_location(self, root: Path) -> str:
        """Where to load the base from: the workspace path when it exists there, else the value itself."""
        candidate = self.path(root, self.base_model)
        return str(candidate) if candidate.exists() else self.base_model

    def identity(self) -> str:
        """Canonical JSON of what decides the result (everything but the mount point and thread count)."""
        return json.dumps(self.model_dump(mode="json", exclude=set(_NOT_HASHED)), sort_keys=True)


def file_digest(path: Path) -> str:
    """sha256 of a file, read in chunks (training sets and adapters can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def spec_hash(spec: TrainSpec, root: Path) -> str:
    """Hash of the spec's identity, the training rows and the adapter it continues: equal hash, equal run.

    The base model's weights are not hashed (a 7B base is 14 GB); its location is part of the spec, and the
    base is frozen by design.
    """
    digest = hashlib.sha256(spec.identity().encode("utf-8"))
    train_file = spec.path(root, spec.train_file)
    if train_file.exists():
        digest.update(file_digest(train_file).encode("ascii"))
    if spec.production_adapter is not None:
        adapter = spec.path(root, spec.production_adapter)
        for item in sorted(adapter.glob("*")):
            if item.is_file():
                digest.update(f"{item.name}:{file_digest(item)}".encode())
    return digest.hexdigest()


def _relative(ws: Workspace, path: Path) -> str:
    return path.relative_to(ws.root).as_posix()


def deployed_adapter(ws: Workspace) -> str | None:
    """``models/deployed`` when it holds a LoRA adapter (written at promotion), else None."""
    return DEPLOYED_ADAPTER if (ws.root / DEPLOYED_ADAPTER / ADAPTER_CONFIG).exists() else None


def _spec(ws: Workspace, date: str, *, continues: str | None, train_file: Path, folder: Path,
          report: Path) -> TrainSpec:
    """A spec from the workspace's params.yaml: continue ``continues`` (or a new LoRA) on ``train_file``, writing
    the adapter and checkpoints under ``folder`` and the report to ``report``."""
    config = ws.config
    train = config.train
    base = config.models.base
    base_path = Path(base) if os.path.isabs(base) else ws.root / base
    if base_path.is_relative_to(ws.root) and base_path.exists():
        base = _relative(ws, base_path)  # relative, so the spec also works where the workspace is mounted elsewhere
    return TrainSpec(
        workspace=str(ws.root),
        date=date,
        base_model=base,
        production_adapter=continues,
        production_version=ws.current_version,
        train_file=_relative(ws, train_file),
        output_dir=_relative(ws, folder / ADAPTER_DIR),
        report=_relative(ws, report),
        checkpoint_dir=_relative(ws, folder / CHECKPOINT_DIR),
        prompt=config.models.prompt,
        device=config.models.device,
        threads=train.threads,
        hyper=AdapterTrainHyperparameters.model_validate(
            train.model_dump(include=set(AdapterTrainHyperparameters.model_fields))),
    )


def spec_for_day(ws: Workspace, date: str) -> TrainSpec:
    """The spec of day ``date``'s training run, from the workspace's params.yaml and its deployed adapter."""
    return _spec(ws, date, continues=deployed_adapter(ws), train_file=ws.selected(date), folder=ws.candidates(date),
                 report=ws.reports(date) / REPORT_FILE)


def repair_folder(ws: Workspace, date: str, round_no: int = 1) -> Path:
    """``models/candidates/D/repair``: the repair stage's rows, spec and repaired adapter of its first round;
    round ``n > 1`` has the same in ``repair/round<n>`` (the whole folder is the stage's one DVC output)."""
    folder = ws.candidates(date) / REPAIR_DIR
    return folder if round_no == 1 else folder / f"{REPAIR_ROUND_DIR}{round_no}"


def repair_report(ws: Workspace, date: str, round_no: int = 1) -> Path:
    """``reports/D/repair_train.json`` (round 1), ``repair_train_round<n>.json`` (round n): the runs' reports."""
    name = REPAIR_REPORT if round_no == 1 else REPAIR_REPORT.replace(".json", f"_{REPAIR_ROUND_DIR}{round_no}.json")
    return ws.reports(date) / name


def spec_for_repair(ws: Workspace, date: str, round_no: int = 1) -> TrainSpec:
    """Round ``round_no`` of the repair stage: the day's candidate adapter (round 1) or the previous round's
    continued on the rehearsal rows the round chose (every row marked ``rehearse``, so the run is the rehearsal
    pass alone)."""
    folder = repair_folder(ws, date, round_no)
    continues = ws.candidates(date) if round_no == 1 else repair_folder(ws, date, round_no - 1)
    return _spec(ws, date, continues=_relative(ws, continues / ADAPTER_DIR), train_file=folder / REPAIR_ROWS,
                 folder=folder, report=repair_report(ws, date, round_no))


def spec_path(ws: Workspace, date: str) -> Path:
    """Where the train stage (and the pod) write day ``date``'s spec: beside its candidate adapter."""
    return ws.candidates(date) / SPEC_FILE


def write_spec(spec: TrainSpec, path: Path) -> Path:
    """Write ``spec`` as JSON (atomically) and return the path."""
    atomic_write_text(path, spec.model_dump_json(indent=1) + "\n")
    return path


def read_spec(path: Path) -> TrainSpec:
    """Load and validate a spec file; a problem raises :class:`SpecError` naming the file and the fields."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such training spec") from None
    try:
        return TrainSpec.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(top level)'}: {error['msg']}" for error in exc.errors()
        )
        raise SpecError(f"{path}: invalid training spec: {problems}") from None
