"""The LoRA training run: continue the production adapter on the day's rows, checkpointed and resumable.

Read it top to bottom (:func:`run_training`): load the frozen base and the adapter to continue (the deployed one,
or a new LoRA when nothing is deployed yet), tokenise the rows with response-only labels, plan every epoch's
length-bucketed batches from one seeded RNG, then the loop -- learning rate from a pure function of the step,
gradient accumulation over micro-batches with the loss summed over response tokens and divided by the step's
response-token count (every response token weighs the same, however rows fall into batches), gradient clipping,
AdamW, a checkpoint every ``checkpoint_every_steps``. At the end the adapter (safetensors, with the prompt
template beside it) and ``reports/D/train.json`` are written atomically and the checkpoints deleted.

Determinism: the same spec on the same machine gives the same tensors whether or not the run was killed and
resumed. Seeds are set before the adapter is created, the batch plan is fixed up front, and a checkpoint restores
weights, optimizer and every RNG (dropout draws from torch's). On CUDA, bf16 autocast is used when the GPU supports
it (the frozen base is loaded in bf16, LoRA weights stay fp32); on the CPU everything is fp32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctune_ops.config import AdapterTrainHyperparameters
from ctune_ops.training.checkpoint import (
    Checkpoint,
    clear_checkpoints,
    find_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    trainable_parameters,
)
from ctune_ops.training.data import (
    EPOCHS,
    IGNORE_INDEX,
    NEW,
    REHEARSE,
    REPLAY,
    Example,
    collate,
    encode_examples,
    plan_batches,
    read_training_rows,
)
from ctune_ops.training.spec import ADAPTER_CONFIG, TrainingError, TrainSpec, spec_hash
from ctune_ops.workspace import atomic_directory, atomic_write_text

log = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)
LOG_EVERY_STEPS = 10
PROMPT_RECORD = "ctune_prompt.json"  # the prompt template the adapter was trained with, beside its weights
PROMPT_RECORD_FORMAT = 1
ADAPTER_NAME = "default"
PEFT_MODEL_CARD = "README.md"
LOSS_DIGITS = 6  # first/final loss in the report; the curve keeps full precision
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # the setting NVIDIA documents for reproducible cuBLAS results
LOG_TINY = -87.0  # ~log of float32's smallest normal number: where a log-probability is clamped


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision the run computes."""

    device: str
    base_dtype: str  # the frozen base's weights
    autocast_dtype: str | None  # mixed precision of the forward pass, None = plain fp32


def pick_runtime(setting: str) -> Runtime:
    """CUDA (bf16 autocast where supported) when asked for or, with ``auto``, when present; else fp32 CPU."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise TrainingError("spec field 'device' (models.device) is cuda, but torch sees no CUDA device")
    if setting == "cpu" or not torch.cuda.is_available():
        return Runtime("cpu", "float32", None)
    if torch.cuda.is_bf16_supported():
        return Runtime("cuda", "bfloat16", "bfloat16")
    return Runtime("cuda", "float32", None)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine or linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress)


def load_model(spec: TrainSpec, root: Path, runtime: Runtime) -> tuple[Any, Any]:
    """The frozen base with a trainable LoRA adapter: the production adapter to continue, else a new one."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = spec.base_location(root)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        base = AutoModelForCausalLM.from_pretrained(location, use_safetensors=True,
                                                    dtype=getattr(torch, runtime.base_dtype))
    except OSError as exc:
        raise TrainingError(f"cannot load the base model {location} (spec field 'base_model'): {exc}") from None
    if tokenizer.pad_token_id is None:  # padding is masked out everywhere; any id will do
        tokenizer.pad_token = tokenizer.eos_token
    base.config.use_cache = False  # no generation while training; the cache only costs memory
    base.to(runtime.device)
    lora = spec.hyper.lora
    if spec.production_adapter is not None:
        adapter = spec.path(root, spec.production_adapter)
        try:
            model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        except (OSError, ValueError) as exc:
            raise TrainingError(f"cannot load the production adapter {adapter} "
                                f"(spec field 'production_adapter'): {exc}") from None
        shape = model.peft_config[ADAPTER_NAME]
        if (shape.r, shape.lora_alpha) != (lora.rank, lora.alpha):
            log.info("continuing the production adapter with its own shape (r=%s, alpha=%s); train.lora "
                     "(r=%s, alpha=%s) applies to new adapters only", shape.r, shape.lora_alpha, lora.rank,
                     lora.alpha)
    else:
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
        try:
            model = get_peft_model(base, config)
        except ValueError as exc:
            raise TrainingError(f"train.lora.target_modules {lora.target_modules} do not fit the base model "
                                f"{location}: {exc}") from None
    return model, tokenizer


# per example index: production's top-k token ids and probabilities at each response position, (positions, k)
TeacherTargets = dict[int, tuple[Any, Any]]


def _logits(model: Any, input_ids: Any, attention_mask: Any, runtime: Runtime) -> Any:
    import torch

    with torch.autocast(runtime.device, dtype=getattr(torch, runtime.autocast_dtype or "float32"),
                        enabled=runtime.autocast_dtype is not None):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def teacher_targets(model: Any, examples: Sequence[Example], indices: Sequence[int], top_k: int, pad_id: int,
                    runtime: Runtime, batch_size: int) -> TeacherTargets:
    """The model's own top-``top_k`` next-token distribution at every response position of ``indices``.

    Called before the first optimizer step, when the model is still production, with dropout off (the model's
    mode is restored after). The positions are those the loss scores (logit ``t`` predicts label ``t + 1``), in
    order."""
    import torch

    targets: TeacherTargets = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():  # not inference_mode: its tensors could not enter the training loss's graph
        for start in range(0, len(indices), batch_size):
            batch = list(indices[start : start + batch_size])
            input_ids, attention_mask, labels = (t.to(runtime.device) for t in collate(examples, batch, pad_id))
            logits = _logits(model, input_ids, attention_mask, runtime)[:, :-1].float()
            scored = labels[:, 1:] != IGNORE_INDEX
            for row, index in enumerate(batch):
                probs, ids = logits[row][scored[row]].softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
                targets[index] = (ids, probs)
    model.train(was_training)
    return targets


def response_loss_sum(model: Any, input_ids: Any, attention_mask: Any, labels: Any, runtime: Runtime,
                      teacher: Sequence[tuple[Any, Any] | None] | None = None) -> Any:
    """Summed next-token loss over the labelled (response) positions of one micro-batch.

    A row with ``teacher`` targets (production's top-k ids and probabilities per response position) is scored by
    cross-entropy against that distribution, the mass outside the top k as one bucket; the others by NLL of
    their labels."""
    import torch

    logits = _logits(model, input_ids, attention_mask, runtime)[:, :-1]
    targets = labels[:, 1:]
    distilled = [row for row, t in enumerate(teacher or ()) if t is not None]
    if distilled:
        targets = targets.clone()
        targets[distilled] = IGNORE_INDEX
    total = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    for row in distilled:
        ids, probs = teacher[row]
        scores = logits[row][labels[row, 1:] != IGNORE_INDEX].float()
        log_norm = scores.logsumexp(-1)
        top = scores.gather(-1, ids) - log_norm[:, None]
        rest_p = (1.0 - probs.sum(-1)).clamp(min=0.0)
        # log of the mass outside the top k, from the logits themselves: 1 - sum(exp(top)) cancels to 0 in
        # float32 once the student is confident, and would cut the gradient that pulls it back
        rest_log_q = (scores.scatter(-1, ids, float("-inf")).logsumexp(-1) - log_norm).clamp(min=LOG_TINY)
        total = total - (probs * top).sum() - (rest_p * rest_log_q).sum()
    return total


def optimizer_step(model: Any, optimizer: Any, params: list[Any], examples: Sequence[Example],
                   micro_batches: Sequence[Sequence[int]], pad_id: int, runtime: Runtime,
                   max_grad_norm: float, teacher: TeacherTargets | None = None) -> float:
    """One optimizer step over ``micro_batches`` (gradient accumulation); returns the step's mean response loss.

    Each micro-batch's summed loss is divided by the step's response-token count, so accumulation weighs every
    token the same however the rows fall into micro-batches. Rows in ``teacher`` are distilled (see
    :func:`response_loss_sum`)."""
    import torch

    step_tokens = sum(examples[i].response_tokens for batch in micro_batches for i in batch)
    step_loss = 0.0
    for batch in micro_batches:
        input_ids, attention_mask, labels = (t.to(runtime.device) for t in collate(examples, batch, pad_id))
        loss_sum = response_loss_sum(model, input_ids, attention_mask, labels, runtime,
                                     [teacher.get(i) for i in batch] if teacher else None)
        (loss_sum / step_tokens).backward()
        step_loss += loss_sum.item()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss / step_tokens


def save_adapter(model: Any, spec: TrainSpec, tokenizer: Any, out_dir: Path) -> None:
    """The adapter as safetensors, plus the prompt template it was trained with, replacing ``out_dir`` whole.

    The folder's bytes depend on the training only: ``adapter_config.json`` names the base as the spec does (a
    workspace path, not where this process found it) with its module list sorted (peft writes a set), and peft's
    template model card, which holds this machine's absolute paths and nothing else, is left out.
    """
    record = {
        "format": PROMPT_RECORD_FORMAT,
        "prompt": spec.prompt.model_dump(),
        "response_suffix": tokenizer.eos_token,
        "max_length": spec.hyper.max_length,
        "base_model": spec.base_model,
        "loss": "response tokens only",
    }
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        config_path = tmp / ADAPTER_CONFIG
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = spec.base_model
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / PEFT_MODEL_CARD).unlink(missing_ok=True)
        (tmp / PROMPT_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Phase:
    """A run of optimizer steps with one learning-rate schedule: the main epochs, or the rehearsal pass."""

    first_batch: int  # index into the plan
    batches: int
    first_step: int
    steps: int
    warmup_steps: int
    learning_rate: float


def _plan(examples: Sequence[Example], rows: Sequence[dict[str, Any]], indices: Sequence[int], batch_size: int,
          epochs: int, seed: int) -> list[list[int]]:
    """The batch plan of the rows ``indices`` (row indices of ``examples``), each in the epochs it names."""
    batches = plan_batches([len(examples[i].input_ids) for i in indices], batch_size, epochs, seed,
                           [rows[i].get(EPOCHS) for i in indices])
    return [[indices[j] for j in batch] for batch in batches]


def _phases(main_batches: int, rehearsal_batches: int, hyper: AdapterTrainHyperparameters) -> list[Phase]:
    """The main phase and the rehearsal pass (no steps when it has no rows); steps never straddle the two."""
    phases, first_batch, first_step = [], 0, 0
    for batches, peak in ((main_batches, hyper.learning_rate),
                          (rehearsal_batches, hyper.rehearsal.learning_rate)):
        steps = math.ceil(batches / hyper.grad_accumulation)
        phases.append(Phase(first_batch, batches, first_step, steps, int(steps * hyper.warmup_fraction), peak))
        first_batch, first_step = first_batch + batches, first_step + steps
    return phases


def run_training(spec: TrainSpec, root: Path, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train (or resume training) the adapter of ``spec`` in the workspace at ``root``; returns the report.

    No training rows: the candidate is the production adapter unchanged (re-saved; a new LoRA, identical to the
    base, when nothing is deployed), so evaluation and promotion see a complete candidate and keep production.
    """
    # deterministic cuBLAS (torch.use_deterministic_algorithms needs it); read when CUDA initialises, so set now
    os.environ.setdefault(CUBLAS_WORKSPACE_ENV, CUBLAS_WORKSPACE_CONFIG)
    import torch

    started = time.perf_counter()
    hyper = spec.hyper
    rows = read_training_rows(spec.path(root, spec.train_file), spec.train_file)
    runtime = pick_runtime(spec.device)
    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        # -- model, data, plan ---------------------------------------------------------------------------------
        random.seed(hyper.seed)
        torch.manual_seed(hyper.seed)  # a new LoRA's initial A matrices and the dropout masks draw from this
        model, tokenizer = load_model(spec, root, runtime)
        examples = encode_examples(tokenizer, rows, spec.prompt, hyper.max_length)
        # the main epochs over new and replayed rows, then the rehearsal pass over the rows marked for it
        main = [i for i, row in enumerate(rows) if row.get("selection") != REHEARSE]
        rehearsed = [i for i, row in enumerate(rows) if row.get("selection") == REHEARSE]
        main_plan = _plan(examples, rows, main, hyper.batch_size, hyper.epochs, hyper.seed)
        plan = main_plan + _plan(examples, rows, rehearsed, hyper.batch_size, hyper.rehearsal.epochs,
                                 hyper.seed + 1)
        phases = _phases(len(main_plan), len(plan) - len(main_plan), hyper)
        total_steps = sum(phase.steps for phase in phases)
        params = [p for _, p in trainable_parameters(model)]
        # production's own distributions on the replayed rows, before any step changes it (a resumed run
        # recomputes them here, before the checkpoint's weights are restored)
        replayed = [i for i, row in enumerate(rows) if row.get("selection") == REPLAY]
        teacher = (teacher_targets(model, examples, replayed, hyper.distill_top_k, tokenizer.pad_token_id,
                                   runtime, hyper.batch_size) if hyper.replay_loss == "distill" else None)
        optimizer = torch.optim.AdamW(params, lr=hyper.learning_rate, betas=ADAM_BETAS,
                                      weight_decay=hyper.weight_decay)

        # -- resume from the last checkpoint of this very run, if any -----------------------------------------
        fingerprint = spec_hash(spec, root)
        checkpoint_dir = spec.path(root, spec.checkpoint_dir)
        step, losses, wall_before, resumed_from = 0, [], 0.0, None
        checkpoint = find_checkpoint(checkpoint_dir, fingerprint)
        if checkpoint is not None:
            restore_checkpoint(checkpoint, model, optimizer)
            if checkpoint.plan != plan:  # the spec hash matched, so this is a bug, not a user error
                raise TrainingError(f"{checkpoint.path}: its batch plan is not this run's")
            step, losses, wall_before = checkpoint.step, checkpoint.losses, checkpoint.wall_s
            resumed_from = {"checkpoint": f"{spec.checkpoint_dir}/{checkpoint.path.name}", "step": step}
            progress(f"resuming from {resumed_from['checkpoint']} (step {step}/{total_steps})")
        progress(f"training {len(rows)} rows: {total_steps} steps of {hyper.grad_accumulation} x "
                 f"{hyper.batch_size} rows, {hyper.epochs} epochs, on {runtime.device}")

        # -- the loop ------------------------------------------------------------------------------------------
        model.train()
        loop_started = time.perf_counter()
        while step < total_steps:
            phase = next(p for p in phases if step < p.first_step + p.steps)
            local = step - phase.first_step
            lr = learning_rate(local, phase.steps, phase.warmup_steps, phase.learning_rate, hyper.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            first = phase.first_batch + local * hyper.grad_accumulation
            micro_batches = plan[first : min(first + hyper.grad_accumulation, phase.first_batch + phase.batches)]
            losses.append(optimizer_step(model, optimizer, params, examples, micro_batches, tokenizer.pad_token_id,
                                         runtime, hyper.max_grad_norm, teacher))
            step += 1
            if step % LOG_EVERY_STEPS == 0 or step == total_steps:
                recent = losses[-LOG_EVERY_STEPS:]
                progress(f"step {step}/{total_steps} loss {sum(recent) / len(recent):.4f} lr {lr:.2e} "
                         f"({time.perf_counter() - loop_started:.1f}s)")
            if step % hyper.checkpoint_every_steps == 0 and step < total_steps:
                save_checkpoint(checkpoint_dir, Checkpoint(
                    fingerprint, step, losses, plan, wall_before + time.perf_counter() - loop_started),
                    model, optimizer)
        model.eval()
        train_wall_s = wall_before + time.perf_counter() - loop_started

        # -- outputs: the adapter, then the report, then the checkpoints go ------------------------------------
        out_dir = spec.path(root, spec.output_dir)
        save_adapter(model, spec, tokenizer, out_dir)
        shape = model.peft_config[ADAPTER_NAME]
        processed = [i for batch in plan for i in batch]
        selection = Counter(str(row.get("selection", NEW)) for row in rows)
        report = {
            "date": spec.date,
            "rows": len(rows),
            "rows_by_selection": dict(sorted(selection.items())),
            "truncated_rows": sum(1 for e in examples if e.truncated),
            "tokens_seen": sum(len(examples[i].input_ids) for i in processed),
            "response_tokens": sum(examples[i].response_tokens for i in processed),
            "steps": total_steps,
            "micro_batches": len(plan),
            "epochs": hyper.epochs,
            "batch_size": hyper.batch_size,
            "grad_accumulation": hyper.grad_accumulation,
            "learning_rate": hyper.learning_rate,
            "replay_loss": hyper.replay_loss,
            "distilled_rows": len(teacher or {}),
            "teacher_tokens": sum(len(examples[i].input_ids) for i in (teacher or {})),  # one forward pass each
            "schedule": hyper.schedule,
            "warmup_steps": phases[0].warmup_steps,
            "rehearsal": {"rows": len(rehearsed), "steps": phases[1].steps, "epochs": hyper.rehearsal.epochs,
                          "tokens_seen": sum(len(examples[i].input_ids) for b in plan[len(main_plan):] for i in b),
                          "learning_rate": hyper.rehearsal.learning_rate, "warmup_steps": phases[1].warmup_steps},
            "loss_curve": losses,
            "first_loss": round(losses[0], LOSS_DIGITS) if losses else None,
            "final_loss": round(losses[-1], LOSS_DIGITS) if losses else None,
            "wall_s": round(time.perf_counter() - started, 2),
            "train_wall_s": round(train_wall_s, 2),
            "device": runtime.device,
            "dtype": runtime.autocast_dtype or "float32",
            "base_dtype": runtime.base_dtype,
            "resumed_from": resumed_from,
            "continued_from": (None if spec.production_adapter is None else
                               {"adapter": spec.production_adapter, "version": spec.production_version}),
            "lora": {"rank": shape.r, "alpha": shape.lora_alpha, "dropout": shape.lora_dropout,
                     "target_modules": (shape.target_modules if isinstance(shape.target_modules, str)
                                        else sorted(shape.target_modules))},
            "trainable_parameters": sum(p.numel() for p in params),
            "base_model": spec.base_model,
            "adapter": spec.output_dir,
            "spec_hash": fingerprint,
            "note": None if rows else ("no training rows: the candidate is the production adapter unchanged"
                                       if spec.production_adapter else
                                       "no training rows and no deployed adapter: the candidate is a new LoRA "
                                       "adapter that leaves the base model unchanged"),
        }
        atomic_write_text(spec.path(root, spec.report), json.dumps(report, indent=1, sort_keys=True) + "\n")
        clear_checkpoints(checkpoint_dir)
        progress(f"wrote {spec.output_dir} and {spec.report}: {total_steps} steps, loss "
                 f"{report['first_loss']} -> {report['final_loss']}, {report['wall_s']}s")
        return report
    finally:  # a caller in the same process (a test, a notebook) gets its torch settings back
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
