"""The batched scorer against a plain one-row-at-a-time reference, on the small world's proxy."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ctune_ops.records import read_jsonl
from ctune_ops.selection.scorer import (
    batch_tokens_for,
    cache_version,
    compute_dtype_for,
    cpu_workers_for,
    plan_batches,
    reference_losses,
    score_rows,
    scoring_settings,
    tokenize_rows,
)


@pytest.fixture(scope="module")
def proxy(small_world):  # noqa: ANN001, ANN201
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = small_world.model_path(small_world.config.models.proxy_base)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _mixed_rows(small_world, count: int = 40) -> list[dict]:  # noqa: ANN001
    """Rows of the world's corpus with lengths spread out: some with input, some long, a few repeated answers."""
    rng = random.Random(3)
    rows = list(read_jsonl(small_world.world_dir / "corpus" / "day0.jsonl"))[::7][:count]
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row["input"] = " ".join(rng.choice(row["output"].split()) for _ in range(rng.randrange(3, 30)))
        if i % 5 == 0:
            row["output"] = " ".join([row["output"]] * rng.randrange(2, 5))
        row.setdefault("input", "")
    rows[-1]["output"] = rows[0]["output"]  # a repeated answer is scored once
    return rows


def test_batched_scores_equal_one_row_reference(small_world, proxy) -> None:  # noqa: ANN001
    model, tokenizer = proxy
    prompt = small_world.config.models.prompt
    rows = tokenize_rows(tokenizer, _mixed_rows(small_world), prompt, max_length=64)
    lengths = [len(r.prompt) + len(r.output) for r in rows]
    assert len(set(lengths)) > 10 and any(r.truncated == "output" for r in rows)
    assert all(len(r.prompt) + len(r.output) <= 64 for r in rows)
    # small batches so that several batches, padding and mixed widths are exercised
    scores = score_rows(model, tokenizer, rows, batch_tokens=400, batch_rows=7)
    reference = np.array([reference_losses(model, tokenizer, r) for r in rows])
    assert np.abs(scores.l_cond - reference[:, 0]).max() < 1e-4
    assert np.abs(scores.l_out - reference[:, 1]).max() < 1e-4
    assert np.allclose(scores.ifd, np.exp(reference[:, 0] - reference[:, 1]), rtol=1e-4)
    assert np.allclose(scores.ppl, np.exp(reference[:, 0]), rtol=1e-4)
    assert (scores.scored_tokens == [len(r.output) for r in rows]).all()


def test_batches_on_worker_threads_score_as_one_thread_does(small_world, proxy) -> None:  # noqa: ANN001
    """Several batches at once on the CPU (one thread per operator): the same scores, the same order, the
    progress of every row, and torch's thread count as it was before."""
    import torch

    model, tokenizer = proxy
    rows = tokenize_rows(tokenizer, _mixed_rows(small_world), small_world.config.models.prompt, max_length=64)
    threads = torch.get_num_threads()
    serial = score_rows(model, tokenizer, rows, batch_tokens=400, batch_rows=7, workers=1)
    seen: list[int] = []
    pooled = score_rows(model, tokenizer, rows, batch_tokens=400, batch_rows=7, progress=seen.append, workers=3)
    assert torch.get_num_threads() == threads
    assert sum(seen) == len(rows) + len({r.output_key for r in rows}) and len(seen) > 6
    assert np.abs(pooled.l_cond - serial.l_cond).max() < 1e-6
    assert np.abs(pooled.l_out - serial.l_out).max() < 1e-6
    assert (pooled.scored_tokens == serial.scored_tokens).all()
    assert cpu_workers_for(small_world.config.score) == threads  # 0: one worker per torch thread
    assert cpu_workers_for(small_world.config.score.model_copy(update={"cpu_workers": 1})) == 1


def test_bfloat16_autocast_scores_near_float32(small_world, proxy) -> None:  # noqa: ANN001
    """``score.dtype: bfloat16`` runs the forward under autocast (it changes the losses: not a no-op) and stays
    within a few hundredths of the float32 reference; ``auto`` keeps float32 on the CPU; the L_out cache keys
    of the two precisions differ, float32's being the proxy version alone."""
    model, tokenizer = proxy
    score = small_world.config.score
    rows = tokenize_rows(tokenizer, _mixed_rows(small_world), small_world.config.models.prompt, max_length=64)
    reference = np.array([reference_losses(model, tokenizer, r) for r in rows])
    half = score_rows(model, tokenizer, rows, batch_tokens=400, batch_rows=7, workers=2, dtype="bfloat16")
    for column, losses in ((0, half.l_cond), (1, half.l_out)):
        assert 1e-4 < np.abs(losses - reference[:, column]).max() < 0.05
    assert score.dtype == "auto" and compute_dtype_for(model, score) == "float32"
    assert compute_dtype_for(model, score.model_copy(update={"dtype": "bfloat16"})) == "bfloat16"
    assert cache_version("v3:models/proxy", "float32") == "v3:models/proxy"
    assert cache_version("v3:models/proxy", "bfloat16") == "v3:models/proxy@bfloat16"


def test_cached_output_losses_are_used(small_world, proxy) -> None:  # noqa: ANN001
    model, tokenizer = proxy
    rows = tokenize_rows(tokenizer, _mixed_rows(small_world, 10), small_world.config.models.prompt, 256)
    cached = {rows[0].output_key: 123.0}
    scores = score_rows(model, tokenizer, rows, batch_tokens=4096, batch_rows=64, cached=cached)
    assert scores.l_out[0] == 123.0 and scores.l_out[-1] == 123.0  # the last row repeats the first's answer
    assert scores.l_out_cached.tolist() == [r.output_key == rows[0].output_key for r in rows]
    assert not scores.l_out_cached[1:-1].any()


def test_plan_batches_bounds_padding() -> None:
    lengths = [5, 90, 12, 300, 7, 64, 64, 1]
    batches = plan_batches(lengths, batch_tokens=200, batch_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 200


def test_batch_bound_follows_the_model_device(small_world, proxy) -> None:  # noqa: ANN001
    """A model on the CPU gets ``cpu_batch_tokens``; the bound is read from where its weights are."""
    model, _ = proxy
    score = small_world.config.score
    assert next(model.parameters()).device.type == "cpu"
    assert batch_tokens_for(model, score) == score.cpu_batch_tokens != score.batch_tokens
    assert scoring_settings(model, score) == {"batch_tokens": score.cpu_batch_tokens, "batch_rows": score.batch_rows,
                                              "workers": cpu_workers_for(score), "dtype": "float32"}
