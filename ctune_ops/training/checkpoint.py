"""Training checkpoints: enough state to continue a killed run exactly where its last checkpoint left it.

A checkpoint is a folder ``step-NNNNNNNN`` in the spec's checkpoint directory, written whole into a temporary
sibling and renamed into place (a kill mid-write leaves the previous checkpoint intact), holding:

* ``adapter.safetensors`` -- the trainable (LoRA) tensors by parameter name;
* ``optimizer.pt`` -- AdamW's state (moments and step counts) and the RNG states of torch (CPU and CUDA);
* ``state.json`` -- the spec hash, the step, the loss curve so far, the batch plan, Python's RNG state and the
  wall time spent so far.

The learning-rate schedule is a pure function of the step (see :mod:`ctune_ops.training.loop`), so the step
counter is all of the scheduler's state. ``optimizer.pt`` is read with ``torch.load(weights_only=True)``: tensors
and plain containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctune_ops.training.spec import TrainingError
from ctune_ops.workspace import atomic_directory

log = logging.getLogger(__name__)

STEP_PREFIX = "step-"
STEP_DIGITS = 8
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


@dataclass
class Checkpoint:
    """The resumable state of a run after ``step`` optimizer steps."""

    spec_hash: str
    step: int
    losses: list[float]
    plan: list[list[int]]
    wall_s: float
    path: Path | None = None


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for child in directory.glob(f"{STEP_PREFIX}*"):
        suffix = child.name[len(STEP_PREFIX):]
        if child.is_dir() and suffix.isdigit() and (child / STATE_FILE).exists():
            found.append((int(suffix), child))
    return sorted(found)


def trainable_parameters(model: Any) -> list[tuple[str, Any]]:
    """The parameters training updates (the LoRA tensors), in the model's stable order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(directory: Path, checkpoint: Checkpoint, model: Any, optimizer: Any) -> Path:
    """Write ``checkpoint`` with the model's trainable tensors and the optimizer and RNG states; keep only it."""
    import torch
    from safetensors.torch import save_file

    target = directory / f"{STEP_PREFIX}{checkpoint.step:0{STEP_DIGITS}d}"
    with atomic_directory(target) as tmp:
        tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in trainable_parameters(model)}
        save_file(tensors, str(tmp / ADAPTER_FILE))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / OPTIMIZER_FILE)
        python_rng = random.getstate()
        state = {
            "spec_hash": checkpoint.spec_hash,
            "step": checkpoint.step,
            "losses": checkpoint.losses,
            "plan": checkpoint.plan,
            "wall_s": checkpoint.wall_s,
            "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
        }
        (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    for step, older in _step_dirs(directory):
        if step != checkpoint.step:
            shutil.rmtree(older, ignore_errors=True)
    return target


def find_checkpoint(directory: Path, spec_hash: str) -> Checkpoint | None:
    """The latest checkpoint of a run with ``spec_hash``; checkpoints of any other run are removed (logged)."""
    if not directory.exists():
        return None
    for leftover in directory.glob(f".{STEP_PREFIX}*"):  # a checkpoint being written when the run was killed
        shutil.rmtree(leftover, ignore_errors=True)
    found = _step_dirs(directory)
    if not found:
        return None
    step, path = found[-1]
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("spec_hash") != spec_hash:
        log.warning("checkpoints in %s belong to another spec, training data or production adapter "
                     "(spec hash %s, this run %s): removing them and starting from step 0",
                     directory, str(state.get("spec_hash"))[:12], spec_hash[:12])
        shutil.rmtree(directory)
        return None
    return Checkpoint(spec_hash, int(state["step"]), [float(x) for x in state["losses"]],
                      [list(map(int, batch)) for batch in state["plan"]], float(state["wall_s"]), path)


def restore_checkpoint(checkpoint: Checkpoint, model: Any, optimizer: Any) -> None:
    """Load the checkpoint's tensors into ``model``, its state into ``optimizer`` and every RNG it saved."""
    import torch
    from safetensors.torch import load_file

    if checkpoint.path is None:
        raise TrainingError("only a checkpoint read from disk (find_checkpoint) can be restored")
    tensors = load_file(str(checkpoint.path / ADAPTER_FILE))
    params = dict(trainable_parameters(model))
    if set(tensors) != set(params):
        raise TrainingError(f"{checkpoint.path / ADAPTER_FILE}: its tensors do not match the model's trainable "
                         "parameters; delete the checkpoint folder to start over")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
    saved = torch.load(checkpoint.path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    state = json.loads((checkpoint.path / STATE_FILE).read_text(encoding="utf-8"))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def clear_checkpoints(directory: Path) -> None:
    """Remove every checkpoint (after the run's adapter and report are written)."""
    shutil.rmtree(directory, ignore_errors=True)
