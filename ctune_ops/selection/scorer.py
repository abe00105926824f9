"""The proxy scorer: per-row ``L_cond``, ``L_out``, ``ppl`` and ``ifd`` from batched forward passes.

Every IFD implementation we know of (Superfiltering, Cherry, Data-Juicer) runs two forward passes per row at batch
size 1. Here rows are sorted by length and cut into batches of bounded padded size, padding is masked, the model
runs under ``torch.inference_mode()``, and the vocabulary projection -- for a small proxy a large share of the
work -- is applied only at the positions whose next token is scored. A row is two sequences:

* conditioned: ``prompt + output + eos``, scored on ``output + eos``;
* direct:      ``start + output + eos``, scored on the same tokens (``start`` is the tokenizer's BOS, else EOS).

A row longer than ``max_length`` keeps its prompt and loses the output's tail (recorded as ``truncated``); both
sequences then score the same kept tokens, so ``ifd = exp(L_cond - L_out)`` compares like with like.

The forward's matrix products run in float32, or in bfloat16 under autocast (``score.dtype``; ``auto``: bfloat16
on CUDA); the log-softmax and the sums are float32 either way.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

from ctune_ops.config import PromptConfig, ScoreConfig

FLOAT32, BFLOAT16 = "float32", "bfloat16"  # the values of score.dtype once auto is resolved


@dataclass(frozen=True)
class RowTokens:
    """One record as token ids: what the conditioned and direct passes read and score."""

    prompt: list[int]
    output: list[int]  # kept output tokens, eos included when it fits
    output_total: int  # output tokens before truncation (eos included)
    truncated: str  # "" | "output" (tail cut) | "prompt" (the prompt alone did not fit)

    @property
    def output_key(self) -> str:
        """Cache key of the direct pass: the kept output tokens (the proxy version is added by the cache)."""
        return hashlib.sha256(np.asarray(self.output, dtype=np.int64).tobytes()).hexdigest()


def tokenize_rows(tokenizer: Any, records: Sequence[dict[str, Any]], prompt: PromptConfig,
                  max_length: int) -> list[RowTokens]:
    """Token ids of prompt and output for each record, cut to ``max_length`` keeping the prompt."""
    prompts = [prompt.render(r["instruction"], r.get("input", "")) for r in records]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
    output_ids = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"] if prompts else []
    eos = tokenizer.eos_token_id
    rows = []
    for p, o in zip(prompt_ids, output_ids, strict=True):
        o = [*o, eos]
        truncated = ""
        if len(p) > max_length - 1:  # the prompt alone leaves no room: keep its head, score one output token
            p, truncated = p[: max_length - 1], "prompt"
        room = max_length - len(p)
        if len(o) > room:
            truncated = truncated or "output"
        rows.append(RowTokens(p, o[:room], len(o), truncated))
    return rows


def start_token(tokenizer: Any) -> int:
    """The token the direct pass starts from, so that every output token is predicted from something."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_token(tokenizer: Any) -> int:
    """The id that pads a batch (masked, never scored): the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def plan_batches(lengths: Sequence[int], batch_tokens: int, batch_rows: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most ``batch_rows`` rows and ``batch_tokens`` padded
    tokens (a single row longer than that gets a batch of its own). Depends on the lengths only, so the same
    rows always get the same batches and the same floating-point results."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = lengths[index]  # ascending: the newest row is the widest
        if current and (len(current) + 1 > batch_rows or (len(current) + 1) * width > batch_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def batch_tokens_for(model: Any, score: ScoreConfig) -> int:
    """The padded-token bound of a batch for ``model``, by the device its weights are on
    (:meth:`ScoreConfig.tokens_per_batch`); ``next(model.parameters())`` works for a PeftModel and a plain model."""
    return score.tokens_per_batch(next(model.parameters()).device.type)


def _head_only_ok(model: Any) -> bool:
    """Whether logits are a plain linear map of the trunk's last hidden state (then we project only what
    we score); models with logit soft-capping or scaling take the ordinary full forward."""
    config = model.config
    plain = getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
    return plain and model.get_output_embeddings() is not None and hasattr(model, "base_model")


def sequence_losses(
    model: Any,
    sequences: Sequence[Sequence[int]],
    scored_from: Sequence[int],
    pad_id: int,
    batch_tokens: int,
    batch_rows: int,
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
    dtype: str = FLOAT32,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean next-token NLL of ``sequences[i][scored_from[i]:]`` (each token predicted from all before it), and
    how many tokens that mean is over. ``scored_from[i] >= 1``. ``workers`` > 1 (CPU only): that many batches run
    at once, each operator on one thread (see :func:`cpu_workers_for`). ``dtype`` ``bfloat16``: the forward runs
    under autocast (see :func:`compute_dtype_for`)."""
    import torch

    device = next(model.parameters()).device
    autocast = dtype == BFLOAT16
    head_only = _head_only_ok(model)
    trunk = model.base_model if head_only else None
    head = model.get_output_embeddings() if head_only else None

    def batch_losses(batch: list[int]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, positions, targets = [], [], []
        for r, index in enumerate(batch):
            seq = sequences[index]
            ids[r, : len(seq)] = torch.as_tensor(seq)
            mask[r, : len(seq)] = 1
            first = scored_from[index]
            rows += [r] * (len(seq) - first)
            positions += range(first - 1, len(seq) - 1)  # the position that predicts each scored token
            targets += seq[first:]
        row_t = torch.as_tensor(rows, device=device)
        pos_t = torch.as_tensor(positions, device=device)
        tgt_t = torch.as_tensor(targets, device=device)
        # both per thread: a worker thread needs its own
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if head_only:
                hidden = trunk(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                logits = head(hidden[row_t, pos_t]).float()
            else:
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[row_t, pos_t].float()
            nll = torch.nn.functional.cross_entropy(logits, tgt_t, reduction="none")
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, row_t, nll.double())
            n = torch.bincount(row_t, minlength=len(batch))
        return (sums.cpu() / n.cpu().clamp(min=1)).numpy(), n.cpu().numpy()

    means = np.zeros(len(sequences), dtype=np.float64)
    counts = np.zeros(len(sequences), dtype=np.int64)
    batches = plan_batches([len(s) for s in sequences], batch_tokens, batch_rows)
    with _batch_runner(workers if device.type == "cpu" else 1) as run:
        for batch, (batch_means, batch_counts) in zip(batches, run(batch_losses, batches), strict=True):
            means[batch], counts[batch] = batch_means, batch_counts
            if progress:
                progress(len(batch))
    return means, counts


def compute_dtype_for(model: Any, score: ScoreConfig) -> str:
    """``float32`` or ``bfloat16``: ``score.dtype``, where ``auto`` is bfloat16 on a CUDA device that supports it.

    Why bfloat16 on a GPU: a 0.5B proxy in float32 leaves the tensor cores idle, and scoring is a filter whose
    threshold (tau_known) is recomputed each day with the same scorer, so a shared 0.01-0.02 shift in the NLLs
    moves rows only at the margin. On the CPU ``auto`` keeps float32: autocast gains less there (the demo proxy on
    2 cores with AMX: 1.3-1.5x) and the one-row reference holds to 1e-4."""
    if score.dtype != "auto":
        return score.dtype
    device = next(model.parameters()).device
    if device.type != "cuda":
        return FLOAT32
    import torch

    return BFLOAT16 if torch.cuda.is_bf16_supported() else FLOAT32


class ScoringSettings(TypedDict):
    """The keyword arguments :func:`score_rows` and :func:`sequence_losses` take from ``score`` for one model."""

    batch_tokens: int
    batch_rows: int
    workers: int
    dtype: str


def scoring_settings(model: Any, score: ScoreConfig) -> ScoringSettings:
    """How ``model`` scores under ``score``: every caller (the score stage, the proxy stage's calibration losses,
    the benchmark) resolves the settings here, so all of them score a row the same way."""
    return ScoringSettings(batch_tokens=batch_tokens_for(model, score), batch_rows=score.batch_rows,
                           workers=cpu_workers_for(score), dtype=compute_dtype_for(model, score))


def cache_version(proxy_version: str, dtype: str) -> str:
    """The key of cached ``L_out`` values: the proxy's version, and the precision unless it is float32 (so the
    caches of float32 runs stay valid, and a change of ``score.dtype`` never mixes the two)."""
    return proxy_version if dtype == FLOAT32 else f"{proxy_version}@{dtype}"


def cpu_workers_for(score: ScoreConfig) -> int:
    """How many batches the CPU scores at once: ``score.cpu_workers``, else one per torch thread.

    Why: the proxy's operators are small (the demo's: 128 wide, a few thousand tokens a batch), and two threads
    on one operator barely beat one (2 cores: 1.15-1.6x); one batch per core with single-threaded operators
    keeps both cores busy (2 cores, alternating runs, best of 7 and 5: 2,000 world rows 2.01 -> 1.60 s, 400
    MedQuAD rows 6.26 -> 5.22 s; an earlier machine with faster cores measured no gain, and no loss). A batch's
    numbers do not depend on which worker ran it (the same losses to the bit on those rows)."""
    import torch

    return score.cpu_workers or torch.get_num_threads()


@contextmanager
def _batch_runner(workers: int) -> Iterator[Callable[[Callable[[Any], Any], list[Any]], Iterator[Any]]]:
    """A ``map`` over batches: the builtin one for one worker; else a thread pool of ``workers`` threads, torch's
    intra-op threads set to one while it runs (threads started then inherit it) and restored after."""
    if workers <= 1:
        yield map
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="ctune-score") as pool:
            yield pool.map
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class Scores:
    """Per-row scores, aligned with the input records."""

    l_cond: np.ndarray
    l_out: np.ndarray
    ppl: np.ndarray
    ifd: np.ndarray
    scored_tokens: np.ndarray
    l_out_cached: np.ndarray


def score_rows(
    model: Any,
    tokenizer: Any,
    rows: Sequence[RowTokens],
    batch_tokens: int,
    batch_rows: int,
    cached: dict[str, float] | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
    dtype: str = FLOAT32,
) -> Scores:
    """Scores of tokenized rows; ``cached`` maps :attr:`RowTokens.output_key` to a known ``L_out``.

    Each distinct uncached output is run once (many rows of a day share an answer).
    """
    pad = pad_token(tokenizer)
    cached = dict(cached or {})
    cond_seqs = [[*r.prompt, *r.output] for r in rows]
    l_cond, counts = sequence_losses(model, cond_seqs, [len(r.prompt) for r in rows], pad, batch_tokens,
                                     batch_rows, progress, workers, dtype)
    start = start_token(tokenizer)
    todo: dict[str, list[int]] = {}
    for r in rows:
        key = r.output_key
        if key not in cached and key not in todo:
            todo[key] = [start, *r.output]
    if todo:
        keys = sorted(todo)
        losses, _ = sequence_losses(model, [todo[k] for k in keys], [1] * len(keys), pad, batch_tokens,
                                    batch_rows, progress, workers, dtype)
        fresh = dict(zip(keys, losses.tolist(), strict=True))
    else:
        fresh = {}
    l_out = np.array([cached.get(r.output_key, fresh.get(r.output_key, math.nan)) for r in rows], dtype=np.float64)
    was_cached = np.array([r.output_key in cached for r in rows], dtype=bool)
    return Scores(l_cond, l_out, np.exp(l_cond), np.exp(l_cond - l_out), counts, was_cached)


def reference_losses(model: Any, tokenizer: Any, row: RowTokens) -> tuple[float, float]:
    """(L_cond, L_out) of one row the plain way: no batching, no padding, the full model called directly.
    What a one-row-at-a-time filter computes; tests hold the batched scorer to it."""
    import torch

    def mean_nll(seq: list[int], first: int) -> float:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([seq])).logits[0].float()
        logprobs = torch.log_softmax(logits[first - 1 : len(seq) - 1], dim=-1)
        return float(-logprobs.gather(1, torch.tensor(seq[first:])[:, None]).mean())

    return (mean_nll([*row.prompt, *row.output], len(row.prompt)),
            mean_nll([start_token(tokenizer), *row.output], 1))
