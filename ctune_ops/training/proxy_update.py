"""Training the proxy in step with the deployed model (DESIGN §3.6), on the same day's training set.

Why in step: the select stage asks the proxy "does production already know this row?". After a promotion the
answer changes for the rows just trained, so the proxy must learn them too, or tomorrow it would select them
again. The loop is the train stage's (same batches, response-only loss, schedule), run in the stage's process:
a proxy is small by design, so it needs neither a subprocess nor checkpoints. ``proxy.method: full`` fine-tunes
every weight of a tiny proxy; ``lora`` trains (or continues) a LoRA adapter over ``models.proxy_base``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ctune_ops.config import PromptConfig, ProxyConfig
from ctune_ops.training.checkpoint import trainable_parameters
from ctune_ops.training.data import EPOCHS, NEW, SELECTION, encode_examples, plan_batches
from ctune_ops.training.loop import ADAM_BETAS, learning_rate, optimizer_step, pick_runtime, teacher_targets
from ctune_ops.workspace import atomic_directory

log = logging.getLogger(__name__)
LOG_EVERY_STEPS = 50
LOSS_DIGITS = 4


def load_trainable_proxy(location: str, is_adapter: bool, proxy_base: str, config: ProxyConfig,
                         device: str) -> tuple[Any, Any]:
    """The current proxy, ready to train by ``config.method``.

    full: a promoted LoRA proxy is merged into its base first (the result is a plain full model); lora: a
    promoted adapter is continued, a full proxy gets a new adapter.
    """
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(proxy_base if is_adapter else location, use_safetensors=True,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(proxy_base if is_adapter else location)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    if is_adapter:
        model = PeftModel.from_pretrained(model, location, is_trainable=config.method == "lora")
        if config.method == "full":
            model = model.merge_and_unload()
    elif config.method == "lora":
        lora = config.lora
        model = get_peft_model(model, LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
            bias="none", task_type="CAUSAL_LM"))
    return model.to(device), tokenizer


def train_proxy(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], prompt: PromptConfig,
                config: ProxyConfig, device: str, progress: Callable[[str], None] = log.info,
                teacher_model: Any | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place on ``rows`` (loss on response tokens only); returns the run's figures.

    With ``teacher_model`` (the candidate; ``proxy.new_loss: distill``), the rows selected today learn its
    next-token distributions instead of their labels (:func:`ctune_ops.training.loop.teacher_targets`, one
    forward pass of the teacher per row, before the first step)."""
    import torch

    started = time.perf_counter()
    runtime = pick_runtime(device)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    examples = encode_examples(tokenizer, rows, prompt, config.max_length)
    # rows naming their epochs (a replay drawn per training epoch) join the proxy's epochs of the same numbers:
    # with proxy.epochs below train.epochs, the draws of the later training epochs are left out (8 of 12 by
    # default), so each proxy epoch keeps the training's mix of new and replayed rows
    plan = plan_batches([len(e.input_ids) for e in examples], config.batch_size, config.epochs, config.seed,
                        [row.get(EPOCHS) for row in rows])
    distilled = ([i for i, row in enumerate(rows) if row.get(SELECTION, NEW) == NEW]
                 if teacher_model is not None else [])
    teacher = (teacher_targets(teacher_model, examples, distilled, config.distill_top_k, tokenizer.pad_token_id,
                               runtime, config.batch_size) if distilled else None)
    total_steps = math.ceil(len(plan) / config.grad_accumulation)
    warmup_steps = int(total_steps * config.warmup_fraction)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=ADAM_BETAS, weight_decay=config.weight_decay)
    losses: list[float] = []
    model.train()
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, warmup_steps, config.learning_rate, config.schedule)
        micro_batches = plan[step * config.grad_accumulation : (step + 1) * config.grad_accumulation]
        losses.append(optimizer_step(model, optimizer, params, examples, micro_batches, tokenizer.pad_token_id,
                                     runtime, config.max_grad_norm, teacher))
        if (step + 1) % LOG_EVERY_STEPS == 0 or step + 1 == total_steps:
            recent = losses[-LOG_EVERY_STEPS:]
            progress(f"proxy step {step + 1}/{total_steps} loss {sum(recent) / len(recent):.4f}")
    model.eval()
    return {
        "method": config.method,
        "rows": len(rows),
        "steps": total_steps,
        "epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "trainable_parameters": sum(p.numel() for p in params),
        "response_tokens": sum(examples[i].response_tokens for batch in plan for i in batch),
        "tokens_seen": sum(len(examples[i].input_ids) for batch in plan for i in batch),
        "distilled_rows": len(distilled),
        "teacher_tokens": sum(len(examples[i].input_ids) for i in distilled),  # one teacher forward pass each
        "first_loss": round(losses[0], LOSS_DIGITS) if losses else None,
        "final_loss": round(losses[-1], LOSS_DIGITS) if losses else None,
        "loss_curve": losses,
        "wall_s": round(time.perf_counter() - started, 2),
        "device": runtime.device,
    }


def save_proxy(model: Any, tokenizer: Any, out_dir: Path, base_name: str) -> None:
    """The proxy as safetensors (a full model with its tokenizer, or a LoRA adapter), replacing ``out_dir``.

    An adapter's config names its base as ``base_name`` (``models.proxy_base`` as configured, a workspace path),
    not where this process found it, so the folder's bytes do not depend on the machine."""
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").unlink(missing_ok=True)  # peft's template model card: absolute paths, nothing else
        adapter_config = tmp / "adapter_config.json"
        if adapter_config.exists():
            config = json.loads(adapter_config.read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = base_name
            adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
