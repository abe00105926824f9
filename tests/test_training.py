"""LoRA training (issue 5): response-only labels, resumable after SIGKILL, continuing the production adapter, the
train stage and its report. Everything runs on a tiny Llama (tens of thousands of parameters) with a tokenizer
trained on the test's own text, so each test takes seconds on two cores."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ctune_ops.records import write_jsonl
from ctune_ops.stages import StageError, run_stage
from ctune_ops.training.checkpoint import STATE_FILE
from ctune_ops.training.data import IGNORE_INDEX, encode_examples, plan_batches
from ctune_ops.training.spec import DEPLOYED_ADAPTER, spec_for_day, spec_path, write_spec
from ctune_ops.workspace import Workspace, init_workspace

from .conftest import set_params

DATE = "2026-01-02"
DRUGS = ("Zorvax", "Quenmid", "Plarotin", "Vexulan", "Drimacor", "Telvoxa")
CONDITIONS = ("Harnel syndrome", "Osk fever", "Bramwell palsy", "Tirith disease", "Culver rash", "Mennet ague")
DOSES = ("40 mg", "15 mg", "250 mg", "2 g", "75 mg", "5 mg")
# initializer_range 0.3, not Llama's 0.02: the embeddings, final norm and head stay frozen under LoRA, and with
# 0.02-sized head rows no hidden state can give a logit above ~0.6, so an untrained tiny base could never learn
TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.3}
TINY_VOCAB = 420
REPORT_FIELDS = {"rows", "tokens_seen", "response_tokens", "steps", "epochs", "wall_s", "loss_curve", "device",
                 "dtype", "resumed_from", "continued_from", "lora", "adapter", "spec_hash", "first_loss",
                 "final_loss"}
KILL_WAIT_S = 120


def fact_rows() -> list[dict[str, Any]]:
    """Rows teaching new facts: which drug treats which condition, and its dose (two wordings each)."""
    rows = []
    for k, (drug, condition, dose) in enumerate(zip(DRUGS, CONDITIONS, DOSES, strict=True)):
        rows += [
            {"id": f"t{k}", "instruction": f"Which drug treats {condition}?", "input": "",
             "output": f"{condition} is treated with {drug}.", "selection": "new"},
            {"id": f"u{k}", "instruction": f"What is {condition} treated with?", "input": "",
             "output": f"{drug} treats {condition}.", "selection": "new"},
            {"id": f"d{k}", "instruction": "What is the usual dose?", "input": drug,
             "output": f"The usual dose of {drug} is {dose}.", "selection": "replay"},
        ]
    return rows


def _build_tiny_base(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctune_ops.config import PromptConfig
    from ctune_ops.world.bootstrap import train_tokenizer, training_text

    prompt = PromptConfig()
    texts = [training_text(row, prompt) for row in fact_rows()] * 3
    tokenizer = train_tokenizer(texts, TINY_VOCAB, TINY_MODEL["max_position_embeddings"], directory)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_MODEL)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A workspace with a tiny base model and small, fast training settings (copied by each test)."""
    ws = init_workspace(tmp_path_factory.mktemp("tiny") / "ws").workspace
    _build_tiny_base(ws.root / "models" / "base")
    return set_params(ws, {"train": {
        "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.1}, "learning_rate": 0.01, "epochs": 12,
        "batch_size": 4, "max_length": 96, "checkpoint_every_steps": 10, "threads": 1,
    }})


@pytest.fixture
def ws(tiny_ws: Workspace, tmp_path: Path) -> Workspace:
    shutil.copytree(tiny_ws.root, tmp_path / "ws", symlinks=True)
    return Workspace(tmp_path / "ws")


def _write_day(ws: Workspace, rows: list[dict[str, Any]]) -> None:
    write_jsonl(ws.selected(DATE), rows)


def _adapter_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _response_nll(ws: Workspace, adapter: Path | None) -> float:
    """Mean NLL per response token of the day's rows under the base (+ adapter)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctune_ops.records import read_jsonl
    from ctune_ops.training.data import collate
    from ctune_ops.training.loop import Runtime, response_loss_sum

    base = ws.root / "models" / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    examples = encode_examples(tokenizer, list(read_jsonl(ws.selected(DATE))), ws.config.models.prompt, 96)
    batch = list(range(len(examples)))
    with torch.no_grad():
        total = response_loss_sum(model, *collate(examples, batch, tokenizer.pad_token_id), Runtime("cpu", "float32",
                                                                                                    None))
    return float(total) / sum(e.response_tokens for e in examples)


def _make_deployed_adapter(ws: Workspace, rank: int) -> Path:
    """A 'promoted' adapter in models/deployed whose B matrices are non-zero (so it changes the model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(ws.root / "models" / "base"),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.save_pretrained(ws.root / DEPLOYED_ADAPTER, safe_serialization=True)
    return ws.root / DEPLOYED_ADAPTER


def test_labels_cover_only_the_response(ws: Workspace) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ws.root / "models" / "base")
    prompt = ws.config.models.prompt
    rows = fact_rows()
    for row, example in zip(rows, encode_examples(tokenizer, rows, prompt, 96), strict=True):
        n_prompt = len(tokenizer(prompt.render(row["instruction"], row["input"]))["input_ids"])
        assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
        assert example.input_ids[-1] == tokenizer.eos_token_id and not example.truncated
        assert tokenizer.decode(example.input_ids[n_prompt:-1]) == row["output"]
    long_row = {**rows[0], "output": " ".join([rows[0]["output"]] * 20)}
    (cut,) = encode_examples(tokenizer, [long_row], prompt, 40)
    assert len(cut.input_ids) == 40 and cut.truncated == "output" and cut.labels[0] == IGNORE_INDEX

    lengths = [len(e.input_ids) for e in encode_examples(tokenizer, rows, prompt, 96)]
    plan = plan_batches(lengths, 4, 3, seed=5)
    assert plan == plan_batches(lengths, 4, 3, seed=5) != plan_batches(lengths, 4, 3, seed=6)
    per_epoch = len(plan) // 3
    for epoch in range(3):
        assert sorted(i for batch in plan[epoch * per_epoch:(epoch + 1) * per_epoch] for i in batch) == list(
            range(len(rows)))


def test_rows_naming_their_epochs_are_trained_in_those_only(ws: Workspace) -> None:
    """A row with ``epochs`` (the per-epoch replay) is in those epochs' batches and no other; rows without it are
    in every epoch, and a plan where no row names epochs is the plan of before."""
    from ctune_ops.training.loop import run_training

    lengths = [10, 12, 11, 30, 31, 29, 8]
    epochs_of = [None, None, [0], [1, 2], [2], [5], None]  # epoch 5 is beyond a 3-epoch run: never trained
    plan = plan_batches(lengths, 2, 3, seed=5, epochs_of=epochs_of)
    assert plan_batches(lengths, 2, 3, seed=5, epochs_of=[None] * len(lengths)) == plan_batches(lengths, 2, 3, 5)
    seen: dict[int, list[int]] = {}
    epoch, filled = 0, set()
    for batch in plan:  # batches follow each other epoch by epoch; an epoch ends once all its rows were seen
        want = {i for i, e in enumerate(epochs_of) if e is None or epoch in e}
        for i in batch:
            seen.setdefault(i, []).append(epoch)
        filled |= set(batch)
        if filled == want:
            epoch, filled = epoch + 1, set()
    assert epoch == 3
    assert seen == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0], 3: [1, 2], 4: [2], 6: [0, 1, 2]}

    rows = fact_rows()
    rows = [{**r, "epochs": [k % 12, (k + 5) % 12]} if r["selection"] == "replay" else r
            for k, r in enumerate(rows)]
    _write_day(ws, rows)
    report = run_training(spec_for_day(ws, DATE), ws.root, progress=lambda _: None)
    lengths = [len(e.input_ids) for e in encode_examples(_tokenizer(ws), rows, ws.config.models.prompt, 96)]
    assert report["tokens_seen"] == sum(n * (2 if "epochs" in r else 12) for n, r in zip(lengths, rows, strict=True))

    _write_day(ws, [*rows[:2], {**rows[2], "epochs": []}])
    with pytest.raises(StageError, match=rf"data/selected/{DATE}.jsonl:3: field 'epochs' must be a non-empty list"):
        run_stage(ws, "train", DATE)


def test_resume_after_sigkill_matches_an_uninterrupted_run(ws: Workspace, tmp_path: Path) -> None:
    import torch

    from ctune_ops.training.loop import run_training

    ws = set_params(ws, {"train": {"epochs": 40}})  # 18 rows / 4 -> 5 micro-batches x 40 = 200 steps
    reference_ws = Workspace(Path(shutil.copytree(ws.root, tmp_path / "reference", symlinks=True)))
    for target in (ws, reference_ws):
        _write_day(target, fact_rows())
    reference = run_training(spec_for_day(reference_ws, DATE), reference_ws.root, progress=lambda _: None)

    spec = write_spec(spec_for_day(ws, DATE), spec_path(ws, DATE))
    command = [sys.executable, "-m", "ctune_ops.training", "--spec", str(spec)]
    checkpoints = ws.candidates(DATE) / "checkpoints"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + KILL_WAIT_S
    while not any(checkpoints.glob("step-*/" + STATE_FILE)):
        assert process.poll() is None, f"training ended before its first checkpoint: {process.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (ws.candidates(DATE) / "adapter").exists()  # killed mid-run: no adapter, a checkpoint to resume

    resumed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from models/candidates/2026-01-02/checkpoints/step-" in resumed.stderr
    report = json.loads((ws.reports(DATE) / "train.json").read_text())
    assert 10 <= report["resumed_from"]["step"] < report["steps"] == reference["steps"] == 200
    assert report["loss_curve"] == pytest.approx(reference["loss_curve"], rel=1e-5)
    assert report["loss_curve"][-1] < 0.5 * report["loss_curve"][0]
    assert not checkpoints.exists()  # deleted after a successful finish
    got = _adapter_tensors(ws.candidates(DATE) / "adapter")
    want = _adapter_tensors(reference_ws.candidates(DATE) / "adapter")
    assert set(got) == set(want) and any("lora_B" in name for name in got)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7)


def test_train_stage_learns_the_days_new_facts(ws: Workspace) -> None:
    _write_day(ws, fact_rows())
    before = _response_nll(ws, None)
    result = run_stage(ws, "train", DATE)
    adapter = ws.candidates(DATE) / "adapter"
    after = _response_nll(ws, adapter)
    assert after < 0.5 * before, (before, after)

    report = json.loads((ws.reports(DATE) / "train.json").read_text())
    assert set(report) >= REPORT_FIELDS
    assert report["rows"] == 18 and report["rows_by_selection"] == {"new": 12, "replay": 6}
    assert report["steps"] == 12 * 5 == len(report["loss_curve"]) and report["resumed_from"] is None
    assert report["response_tokens"] < report["tokens_seen"]
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["continued_from"] is None
    assert report["lora"]["rank"] == 8 and len(report["lora"]["target_modules"]) == 7
    assert result.summary["rows"] == 18 and result.summary["final_loss"] == report["final_loss"]
    assert result.outputs == {"adapter": f"models/candidates/{DATE}/adapter", "report": f"reports/{DATE}/train.json",
                              "log": f"reports/{DATE}/train.log", "spec": f"models/candidates/{DATE}/train_spec.json"}
    assert "step 60/60" in (ws.reports(DATE) / "train.log").read_text()
    assert not (ws.candidates(DATE) / "checkpoints").exists()

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "models/base" and config["r"] == 8
    record = json.loads((adapter / "ctune_prompt.json").read_text())
    assert record["prompt"] == ws.config.models.prompt.model_dump() and record["response_suffix"] == "<|endoftext|>"
    spec = json.loads(spec_path(ws, DATE).read_text())
    assert spec["train_file"] == f"data/selected/{DATE}.jsonl" and not spec["base_model"].startswith("/")


def test_training_continues_the_production_adapter(ws: Workspace) -> None:
    import torch

    from ctune_ops.training.loop import run_training

    deployed = _make_deployed_adapter(ws, rank=4)
    ws = set_params(ws, {"train": {"learning_rate": 1e-9, "epochs": 1}})  # a step too small to move the weights
    _write_day(ws, fact_rows())
    report = run_training(spec_for_day(ws, DATE), ws.root, progress=lambda _: None)
    assert report["continued_from"] == {"adapter": "models/deployed", "version": "v0"}
    assert report["lora"]["rank"] == 4  # the deployed adapter's shape, not train.lora.rank
    want, got = _adapter_tensors(deployed), _adapter_tensors(ws.candidates(DATE) / "adapter")
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)
    assert any(float(t.abs().max()) > 0 for name, t in got.items() if "lora_B" in name)


def test_an_empty_training_set_keeps_the_production_adapter(ws: Workspace) -> None:
    import torch

    from ctune_ops.training.loop import run_training

    _write_day(ws, [])
    report = run_training(spec_for_day(ws, DATE), ws.root, progress=lambda _: None)
    assert report["rows"] == 0 and report["steps"] == 0 and report["loss_curve"] == []
    assert "new LoRA adapter that leaves the base model unchanged" in report["note"]
    fresh = _adapter_tensors(ws.candidates(DATE) / "adapter")
    assert all(float(t.abs().max()) == 0 for name, t in fresh.items() if "lora_B" in name)

    deployed = _make_deployed_adapter(ws, rank=4)
    report = run_training(spec_for_day(ws, DATE), ws.root, progress=lambda _: None)
    assert report["note"] == "no training rows: the candidate is the production adapter unchanged"
    want, got = _adapter_tensors(deployed), _adapter_tensors(ws.candidates(DATE) / "adapter")
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_a_checkpoint_of_another_spec_is_discarded(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    from ctune_ops.training.loop import run_training

    ws = set_params(ws, {"train": {"epochs": 1}})
    _write_day(ws, fact_rows())
    stale = ws.candidates(DATE) / "checkpoints" / "step-00000003"
    stale.mkdir(parents=True)
    (stale / STATE_FILE).write_text(json.dumps({"spec_hash": "another run", "step": 3}))
    with caplog.at_level("WARNING"):
        report = run_training(spec_for_day(ws, DATE), ws.root, progress=lambda _: None)
    assert "belong to another spec" in caplog.text and report["resumed_from"] is None
    assert not (ws.candidates(DATE) / "checkpoints").exists()


def test_train_stage_fails_clearly(ws: Workspace) -> None:
    with pytest.raises(StageError, match=f"data/selected/{DATE}.jsonl does not exist: run the select stage"):
        run_stage(ws, "train", DATE)
    _write_day(ws, [*fact_rows()[:1], {"id": "bad", "instruction": "Dose?", "output": 5}])
    with pytest.raises(StageError) as info:
        run_stage(ws, "train", DATE)
    message = str(info.value)
    assert f"the log is reports/{DATE}/train.log" in message
    assert f"data/selected/{DATE}.jsonl:2: field 'output' must be a string" in message

    k8s = set_params(ws, {"train": {"backend": "kubernetes"}})
    with pytest.raises(StageError, match="KubernetesPodOperator built by ctune_ops.airflow.kubernetes"):
        run_stage(k8s, "train", DATE)


def test_entrypoint_writes_the_days_spec_or_rejects_a_bad_one(ws: Workspace, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from ctune_ops.training.__main__ import main

    ws = set_params(ws, {"train": {"epochs": 1}})
    _write_day(ws, fact_rows())
    assert main(["--workspace", str(ws.root), "--date", DATE]) == 0  # what the Kubernetes pod runs
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 18 and summary["steps"] == 5 and summary["adapter"] == f"models/candidates/{DATE}/adapter"
    assert json.loads(spec_path(ws, DATE).read_text())["date"] == DATE
    assert (ws.candidates(DATE) / "adapter" / "adapter_model.safetensors").exists()

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"workspace": str(tmp_path), "date": DATE, "learning_rate": 1}))
    assert main(["--spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: invalid training spec" in err and "learning_rate: Extra inputs are not permitted" in err
    assert "base_model: Field required" in err
    with pytest.raises(SystemExit):
        main(["--date", DATE])


def _teacher_and_examples(ws: Workspace, top_k: int) -> tuple[Any, Any, list[Any], dict[int, Any], Any]:
    """Production (base + a non-trivial deployed adapter), the day's examples and its targets on the replay rows."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctune_ops.training.loop import Runtime, teacher_targets

    deployed = _make_deployed_adapter(ws, rank=4)
    base = ws.root / "models" / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(deployed))
    rows = fact_rows()
    examples = encode_examples(tokenizer, rows, ws.config.models.prompt, 96)
    replayed = [i for i, row in enumerate(rows) if row["selection"] == "replay"]
    runtime = Runtime("cpu", "float32", None)
    return model, tokenizer, examples, teacher_targets(model, examples, replayed, top_k, tokenizer.pad_token_id,
                                                        runtime, batch_size=2), runtime


@pytest.mark.parametrize("top_k", [5, None])  # None: the whole vocabulary
def test_distilled_rows_are_scored_against_productions_distribution(ws: Workspace, top_k: int | None) -> None:
    """A replay row's loss is cross-entropy against production's top-k distribution (the rest as one bucket); a
    new row's stays the NLL of its labels; both computed here independently of the loop's code."""
    import torch

    from ctune_ops.training.data import collate
    from ctune_ops.training.loop import response_loss_sum

    probe = _teacher_and_examples(ws, top_k or 10**6)
    model, tokenizer, examples, teacher, runtime = probe
    model.eval()
    batch = [0, 2, 3, 5]  # new, replay, new, replay
    input_ids, mask, labels = collate(examples, batch, tokenizer.pad_token_id)
    # the teacher is the model itself here, so the distilled loss is production's own (truncated) entropy
    with torch.no_grad():
        got = float(response_loss_sum(model, input_ids, mask, labels, runtime, [teacher.get(i) for i in batch]))
        log_q = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
    want = 0.0
    for row, index in enumerate(batch):
        scored = labels[row, 1:] != IGNORE_INDEX
        lq = log_q[row][scored]
        if index not in teacher:
            want -= float(lq.gather(-1, labels[row, 1:][scored][:, None]).sum())
            continue
        p = lq.exp()
        if top_k is None:
            want -= float((p * lq).sum())
        else:
            top_p, top_ids = p.topk(top_k, dim=-1)
            rest = 1 - top_p.sum(-1)
            want -= float((top_p * lq.gather(-1, top_ids)).sum() + (rest * torch.log(rest)).sum())
        assert teacher[index][0].shape == (int(scored.sum()), min(top_k or 10**6, lq.shape[-1]))
    assert got == pytest.approx(want, rel=1e-5)


def test_distilled_replay_keeps_production_on_the_replayed_rows(ws: Workspace) -> None:
    """Trained with ``replay_loss: distill``, the candidate stays closer to production on the replay rows than
    when they are trained on their labels (which the deployed adapter does not predict)."""
    import torch

    from ctune_ops.training.data import collate
    from ctune_ops.training.loop import run_training

    _make_deployed_adapter(ws, rank=4)
    _write_day(ws, fact_rows())
    model, tokenizer, examples, teacher, _ = _teacher_and_examples(ws, 10**6)
    replayed = sorted(teacher)
    input_ids, mask, labels = collate(examples, replayed, tokenizer.pad_token_id)
    scored = labels[:, 1:] != IGNORE_INDEX

    def kl_to_production(adapter: Path) -> float:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        candidate = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws.root / "models" / "base"),
                                              str(adapter)).eval()
        with torch.no_grad():
            log_q = candidate(input_ids=input_ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)[scored]
            log_p = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)[scored]
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())

    kl = {}
    for loss in ("labels", "distill"):
        ws = set_params(ws, {"train": {"replay_loss": loss}})
        report = run_training(spec_for_day(ws, DATE), ws.root, progress=lambda _: None)
        assert report["replay_loss"] == loss
        assert report["distilled_rows"] == (len(replayed) if loss == "distill" else 0)
        assert (report["teacher_tokens"] > 0) == (loss == "distill")
        kl[loss] = kl_to_production(ws.candidates(DATE) / "adapter")
    assert kl["distill"] < 0.5 * kl["labels"], kl


class _Interrupt(Exception):
    pass


def test_the_rehearsal_pass_follows_the_main_epochs_and_resumes_exactly(ws: Workspace, tmp_path: Path) -> None:
    """Rows marked ``rehearse`` get their own pass after the main epochs (its epochs, its learning-rate peak);
    a run stopped inside that pass resumes from its checkpoint to the very tensors of an uninterrupted run."""
    import math

    import torch

    from ctune_ops.training.loop import run_training

    rows = [{**r, "selection": "rehearse" if r["selection"] == "replay" else "new"} for r in fact_rows()]
    ws = set_params(ws, {"train": {"checkpoint_every_steps": 38, "rehearsal": {"epochs": 3, "learning_rate": 0.002}}})
    reference_ws = Workspace(Path(shutil.copytree(ws.root, tmp_path / "reference", symlinks=True)))
    for target in (ws, reference_ws):
        _write_day(target, rows)
    reference = run_training(spec_for_day(reference_ws, DATE), reference_ws.root, progress=lambda _: None)
    main_steps, rehearsal_steps = 12 * math.ceil(12 / 4), 3 * math.ceil(6 / 4)  # rows / batch_size per epoch
    assert reference["steps"] == main_steps + rehearsal_steps
    assert reference["rehearsal"]["rows"] == 6 and reference["rehearsal"]["steps"] == rehearsal_steps
    tokenizer_rows = encode_examples(_tokenizer(ws), rows, ws.config.models.prompt, 96)
    lengths = [len(e.input_ids) for e in tokenizer_rows]
    main_tokens = sum(n for n, r in zip(lengths, rows, strict=True) if r["selection"] == "new")
    assert reference["rehearsal"]["tokens_seen"] == 3 * (sum(lengths) - main_tokens)
    assert reference["tokens_seen"] == 12 * main_tokens + reference["rehearsal"]["tokens_seen"]

    def stop_at_step_40(message: str) -> None:  # after the checkpoint at step 38, inside the rehearsal pass
        if message.startswith("step 40/"):
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_training(spec_for_day(ws, DATE), ws.root, progress=stop_at_step_40)
    resumed = run_training(spec_for_day(ws, DATE), ws.root, progress=lambda _: None)
    assert resumed["resumed_from"]["step"] == 38 > main_steps
    assert resumed["loss_curve"] == pytest.approx(reference["loss_curve"], rel=1e-5)
    got = _adapter_tensors(ws.candidates(DATE) / "adapter")
    for name, tensor in _adapter_tensors(reference_ws.candidates(DATE) / "adapter").items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7)


def _tokenizer(ws: Workspace) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ws.root / "models" / "base")


def test_the_rest_bucket_still_pulls_a_confident_student_back() -> None:
    """Production leaves 10% of the mass outside its top k; a student that puts all but 1e-25 of it on the top k
    must get the full gradient towards the rest (as 1 - sum(top) in float32 the bucket is 0 and the pull is lost):
    d loss / d z_i = -0.1 * q_i / Q_rest + 0.9 * q_i = -0.1 / 47 per rest logit and position."""
    import torch

    from ctune_ops.training.loop import Runtime, response_loss_sum

    vocab, top_k = 50, 3
    logits = torch.full((1, 3, vocab), -60.0)
    logits[0, :, :top_k] = 0.0  # the student: the top 3 hold all but ~47 * e^-60 / 3 (1e-25) of the mass
    logits.requires_grad_(True)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201, ARG002
            return type("Out", (), {"logits": logits})()

    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    ids = torch.arange(top_k).repeat(2, 1)
    probs = torch.full((2, top_k), 0.3)  # production: 0.9 on the top 3, 0.1 elsewhere
    loss = response_loss_sum(Fixed(), torch.zeros((1, 3), dtype=torch.long), torch.ones((1, 3)), labels,
                             Runtime("cpu", "float32", None), [(ids, probs)])
    loss.backward()
    rest_grad = logits.grad[0, :2, top_k:]
    assert torch.isfinite(loss) and float(loss.detach()) > 2 * 0.1 * 50  # 0.1 * -log(1e-25) per position
    torch.testing.assert_close(rest_grad, torch.full_like(rest_grad, -0.1 / (vocab - top_k)), rtol=1e-3, atol=0)


def test_wrapping_a_model_in_lora_logs_no_deprecation_of_ctune_s_stack() -> None:
    """peft asks each model it wraps for transformers' deprecated ``is_gradient_checkpointing``; with ctune_ops
    imported (as every stage and operator is) that FutureWarning stays out of the task logs. The same process
    without ctune_ops shows the warning, so the check cannot pass by the warning going away on its own."""
    wrap = ("from transformers import LlamaConfig, LlamaForCausalLM; from peft import LoraConfig, get_peft_model; "
            "get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, "
            "num_attention_heads=2, intermediate_size=32)), LoraConfig(target_modules=['q_proj']))")
    message = "is_gradient_checkpointing` is deprecated"

    def stderr(code: str) -> str:
        run = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        return run.stderr

    assert message in stderr(wrap)
    assert message not in stderr("import ctune_ops; " + wrap)
