"""Training rows as token ids with response-only labels, and the seeded, length-bucketed batch plan.

Why tokenise prompt and output apart: the loss belongs to the response only (the model must learn to answer, not
to repeat questions), so the prompt's tokens are labelled -100; tokenising the two halves separately, exactly as
the proxy scorer does (:func:`ctune_ops.selection.scorer.tokenize_rows`), makes the boundary exact and keeps the
train and score views of a row identical. A row longer than ``max_length`` keeps its prompt and loses the tail of
its response. The batch plan covers every epoch up front from one seeded RNG, so a resumed run replays the very
same batches (the plan is also saved in each checkpoint).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctune_ops.config import PromptConfig
from ctune_ops.records import read_jsonl

IGNORE_INDEX = -100  # the label torch's cross entropy skips: prompt tokens and padding
# ``selection`` of a row in data/selected/D.jsonl (the select stage writes it; absent = new): a row selected
# today, a replayed earlier row (both in the main epochs), a row for the rehearsal pass after them
SELECTION = "selection"
NEW, REPLAY, REHEARSE = "new", "replay", "rehearse"
# ``epochs`` of a row: the main epochs (0-based) it is trained in; absent = every epoch. The select stage gives
# replayed rows their own epochs when the replay is drawn anew for each epoch (``select.replay_per_epoch``)
EPOCHS = "epochs"
SORT_WINDOW_BATCHES = 16  # rows are sorted by length within windows of this many batches: little padding, still random


class TrainingDataError(ValueError):
    """A training row that cannot be used; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Example:
    """One training row: the token ids the model reads and the labels it is scored on."""

    input_ids: list[int]  # prompt + response + eos (cut to max_length)
    labels: list[int]  # IGNORE_INDEX over the prompt, the ids themselves over the response
    truncated: str  # "" | "output" | "prompt", as the scorer reports it

    @property
    def response_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def read_training_rows(path: Path, shown: str) -> list[dict[str, Any]]:
    """The rows of a training set (``data/selected/D.jsonl``), each checked for the fields training reads."""
    rows = []
    try:
        for number, row in enumerate(read_jsonl(path), start=1):
            if not isinstance(row, dict):
                raise TrainingDataError(f"{shown}:{number}: expected a JSON object, got {type(row).__name__}")
            for field in ("instruction", "output"):
                if not isinstance(row.get(field), str):
                    raise TrainingDataError(f"{shown}:{number}: field {field!r} must be a string")
            if not isinstance(row.get("input") or "", str):
                raise TrainingDataError(f"{shown}:{number}: field 'input' must be a string or absent")
            epochs = row.get(EPOCHS)
            if epochs is not None and not (isinstance(epochs, list) and epochs and all(
                    isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in epochs)):
                raise TrainingDataError(f"{shown}:{number}: field {EPOCHS!r} must be a non-empty list of epoch "
                                        f"numbers (0, 1, ...) or absent, got {epochs!r}")
            rows.append(row)
    except FileNotFoundError:
        raise TrainingDataError(f"{shown} does not exist: run the select stage for this date first") from None
    except ValueError as exc:
        if isinstance(exc, TrainingDataError):
            raise
        raise TrainingDataError(str(exc).replace(str(path), shown)) from None
    return rows


def encode_examples(tokenizer: Any, rows: Sequence[dict[str, Any]], prompt: PromptConfig,
                    max_length: int) -> list[Example]:
    """Token ids and response-only labels of each row (prompt rendered by ``prompt``, response then eos)."""
    from ctune_ops.selection.scorer import tokenize_rows

    if tokenizer.eos_token_id is None:
        raise TrainingDataError("the base model's tokenizer has no eos token; a response could never end")
    records = [{**row, "input": row.get("input") or ""} for row in rows]
    examples = []
    for tokens in tokenize_rows(tokenizer, records, prompt, max_length):
        ids = [*tokens.prompt, *tokens.output]
        labels = [IGNORE_INDEX] * len(tokens.prompt) + list(tokens.output)
        examples.append(Example(ids, labels, tokens.truncated))
    return examples


def plan_batches(lengths: Sequence[int], batch_size: int, epochs: int, seed: int,
                 epochs_of: Sequence[Sequence[int] | None] | None = None) -> list[list[int]]:
    """Micro-batches of row indices for all epochs: each epoch shuffles the rows, sorts them by length within
    windows, cuts batches and shuffles the batches, so rows of similar length share a batch (little padding)
    while the order stays random. ``epochs_of[i]`` (when given and not None) lists the epochs row ``i`` takes
    part in; a row listing none below ``epochs`` is not trained. Depends only on the lengths, the sizes, the
    epochs of each row and the seed."""
    rng = random.Random(seed)
    window = batch_size * SORT_WINDOW_BATCHES
    plan: list[list[int]] = []
    for epoch in range(epochs):
        order = [i for i in range(len(lengths))
                 if epochs_of is None or epochs_of[i] is None or epoch in epochs_of[i]]
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: (lengths[i], i))
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        plan += batches
    return plan


def collate(examples: Sequence[Example], batch: Sequence[int], pad_id: int) -> tuple[Any, Any, Any]:
    """``input_ids``, ``attention_mask`` and ``labels`` tensors of one micro-batch, right-padded."""
    import torch

    width = max(len(examples[i].input_ids) for i in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, index in enumerate(batch):
        example = examples[index]
        n = len(example.input_ids)
        input_ids[row, :n] = torch.as_tensor(example.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(example.labels)
    return input_ids, attention_mask, labels
