"""``ctune world bootstrap``: a tokenizer and two tiny Llama-style models pretrained from scratch on day 0.

Why from scratch: no model can be downloaded here, and a model that never saw the world's invented names makes the
world measurable (it knows exactly the day-0 facts). Both models are saved with ``save_pretrained`` (safetensors)
and loaded everywhere with ``AutoModelForCausalLM.from_pretrained(path)``, the same code that loads a hub model
from a local path in a real deployment. The training loop reads top to bottom: batches of whole rows (each row
starts at position 0, as it will in scoring, training and evaluation), AdamW, warm-up then cosine decay.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctune_ops.config import CtuneConfig, PromptConfig, TinyModelConfig
from ctune_ops.records import read_jsonl
from ctune_ops.workspace import Workspace, WorkspaceError, atomic_directory, atomic_write_text
from ctune_ops.world.knowledge import ROLES, Fact, render
from ctune_ops.world.templates import ANSWER_FAMILY, QUESTION_FAMILY

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
LOG_EVERY_STEPS = 50
GRAD_CLIP = 1.0
ADAM_BETAS = (0.9, 0.95)
SORT_WINDOW_BATCHES = 32  # rows are sorted by length within windows of this many batches: little padding, still random


def training_text(row: dict[str, Any], prompt: PromptConfig) -> str:
    """The text a causal LM is trained on for one record: prompt, then the response."""
    return prompt.render(row["instruction"], row.get("input", "")) + row["output"]


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int, out_dir: Path) -> Any:
    """A byte-level BPE tokenizer (any input encodes, nothing is unknown) saved as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
    )
    fast.save_pretrained(out_dir)
    return fast


def build_model(spec: TinyModelConfig, tokenizer: Any, max_length: int, seed: int) -> Any:
    """A freshly initialised Llama-style causal LM of the configured size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Row indices grouped into batches of similar length, in random order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * SORT_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class PretrainResult:
    parameters: int
    steps: int
    tokens: int
    wall_s: float
    first_loss: float
    final_loss: float


def pretrain(
    model: Any,
    encoded: list[list[int]],
    spec: TinyModelConfig,
    pad_id: int,
    seed: int,
    progress: Callable[[str], None] = log.info,
) -> PretrainResult:
    """Next-token pretraining on whole rows; loss on every real token, padding masked."""
    import torch

    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(encoded) / spec.batch_size)
    total_steps = max(1, round(spec.epochs * steps_per_epoch))
    warmup = max(1, int(total_steps * spec.warmup_fraction))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, betas=ADAM_BETAS, weight_decay=spec.weight_decay
    )

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    lengths = [len(ids) for ids in encoded]
    model.train()
    step, tokens, losses, start = 0, 0, [], time.perf_counter()
    while step < total_steps:
        for batch in _batches(lengths, spec.batch_size, rng):
            if step >= total_steps:
                break
            width = max(lengths[i] for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids = encoded[index]
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            labels = input_ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += int(mask.sum())
            step += 1
            if step % LOG_EVERY_STEPS == 0 or step == total_steps:
                recent = sum(losses[-LOG_EVERY_STEPS:]) / len(losses[-LOG_EVERY_STEPS:])
                progress(f"step {step}/{total_steps} loss {recent:.3f} ({time.perf_counter() - start:.0f}s)")
    model.eval()
    tail = losses[-LOG_EVERY_STEPS:]
    return PretrainResult(
        parameters=sum(p.numel() for p in model.parameters()),
        steps=step,
        tokens=tokens,
        wall_s=round(time.perf_counter() - start, 1),
        first_loss=round(losses[0], 4),
        final_loss=round(sum(tail) / len(tail), 4),
    )


def tokenizer_texts(facts: list[Fact], corpus: list[dict[str, Any]], prompt: PromptConfig) -> list[str]:
    """The world's text: the day-0 corpus and every fact in every wording of its family."""
    texts = [training_text(row, prompt) for row in corpus]
    for fact in facts:
        for q in range(QUESTION_FAMILY):
            texts.append(training_text(render(fact, q, q % ANSWER_FAMILY), prompt))
    return texts


def _load_facts(ws: Workspace) -> list[Fact]:
    data = json.loads((ws.world_dir / "knowledge.json").read_text(encoding="utf-8"))
    return [Fact(**fact) for fact in data["facts"]]


def bootstrap_models(
    ws: Workspace, commit: bool = True, progress: Callable[[str], None] = log.info
) -> dict[str, Any]:
    """Train the tokenizer, the base model and the proxy on the world's day-0 corpus; save, version, commit."""
    import torch

    config: CtuneConfig = ws.config
    corpus_path = ws.world_dir / "corpus" / "day0.jsonl"
    if not corpus_path.exists():
        raise WorkspaceError(f"{corpus_path} is missing: run `ctune world generate --workspace {ws.root}` first")
    boot, prompt, max_length = config.bootstrap, config.models.prompt, config.models.max_length
    torch.set_num_threads(boot.threads or os.cpu_count() or 1)
    corpus = list(read_jsonl(corpus_path))
    started = time.perf_counter()
    report: dict[str, Any] = {"corpus_rows": len(corpus), "roles": list(ROLES)}
    targets = {"base": config.models.base, "proxy": config.models.proxy_base}
    for name, rel in targets.items():
        if os.path.isabs(rel) or not rel.startswith("models/"):
            raise WorkspaceError(f"models.{'proxy_base' if name == 'proxy' else 'base'} is {rel!r}; bootstrap "
                                 "writes the tiny models into the workspace, so it must be a models/... path")

    with tempfile.TemporaryDirectory() as tok_dir:  # saved for real beside each model below
        tokenizer = train_tokenizer(
            tokenizer_texts(_load_facts(ws), corpus, prompt), boot.vocab_size, max_length, Path(tok_dir)
        )
    report["vocab_size"] = len(tokenizer)
    texts = [training_text(row, prompt) for row in corpus]
    encoded = [ids[: max_length - 1] + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    report["corpus_tokens"] = sum(len(ids) for ids in encoded)

    for name, spec in (("base", boot.base), ("proxy", boot.proxy)):
        progress(f"pretraining {name} model")
        model = build_model(spec, tokenizer, max_length, boot.seed)
        result = pretrain(model, encoded, spec, tokenizer.pad_token_id, boot.seed,
                          progress=lambda msg, n=name: progress(f"{n}: {msg}"))
        with atomic_directory(ws.root / targets[name]) as out:
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
        report[name] = result.__dict__ | {"path": targets[name], "config": spec.model_dump()}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report_path = ws.root / "reports" / "bootstrap.json"
    atomic_write_text(report_path, json.dumps(report, indent=1) + "\n")
    if commit:
        with ws.lock(purpose="world bootstrap"):
            tracked = ws.dvc_add(list(targets.values()))
            ws.commit("bootstrap: tokenizer, base and proxy models pretrained on day 0",
                      [*tracked, "reports/bootstrap.json"])
    return report
