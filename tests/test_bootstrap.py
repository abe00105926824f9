"""Tiny models: saved as safetensors, versioned with DVC, reloaded with from_pretrained, measured with lm-eval."""

from __future__ import annotations

import json

from ctune_ops import lmeval
from ctune_ops.records import read_jsonl
from ctune_ops.workspace import Workspace
from ctune_ops.world.measure import evaluate_world_model, world_task_files


def test_models_reload_with_from_pretrained(small_world: Workspace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((small_world.root / "reports" / "bootstrap.json").read_text())
    for name, spec in (("base", small_world.config.bootstrap.base), ("proxy", small_world.config.bootstrap.proxy)):
        folder = small_world.root / report[name]["path"]
        assert (folder / "model.safetensors").exists()
        assert not list(folder.glob("*.bin")), "pickle weights must never be written"
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.hidden_size == spec.hidden_size
        assert model.config.num_hidden_layers == spec.num_layers
        assert sum(p.numel() for p in model.parameters()) == report[name]["parameters"]
        assert report[name]["final_loss"] < report[name]["first_loss"] / 2
        ids = tokenizer("### Instruction:\nWhat is the standard adult dose of", return_tensors="pt")
        with torch.inference_mode():
            logits = model(**ids).logits
        assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_models_are_versioned_with_dvc(small_world: Workspace) -> None:
    for path in (small_world.config.models.base, small_world.config.models.proxy_base):
        assert (small_world.root / f"{path}.dvc").exists()
    assert small_world.git("status", "--porcelain").stdout == ""
    assert "bootstrap" in small_world.git("log", "-1", "--format=%s").stdout


def test_tokenizer_encodes_anything(small_world: Workspace) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_world.root / small_world.config.models.base)
    text = "Ünïcode, emoji 🙂 and an unseen word Zqxjvbn 555-123-4567"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_lm_eval_runs_the_generated_tasks(small_world: Workspace, tmp_path, monkeypatch, capfd) -> None:
    monkeypatch.chdir(tmp_path)  # no git repository here, as a stage's working directory under Airflow
    scores = evaluate_world_model(small_world, model="base", limit=40)
    assert "not a git repository" not in capfd.readouterr().err  # lm-eval's `git describe` kept quiet
    assert set(scores) == {"ctune_retention", "ctune_target", "ctune_new"}
    files = {path.stem: path.with_suffix(".jsonl") for path in world_task_files(small_world)}
    for task, row in scores.items():
        assert row["n"] == min(40, len(list(read_jsonl(files[task]))))
        assert 0.0 <= row["acc"] <= 1.0
    # even the small test model knows its day-0 facts better than facts it never saw
    assert scores["ctune_retention"]["acc"] > scores["ctune_target"]["acc"]


def test_task_yaml_survives_a_moved_workspace(small_world: Workspace, tmp_path) -> None:
    import shutil

    retention = world_task_files(small_world)[0]
    moved = tmp_path / "moved"
    shutil.copytree(retention.parent, moved)
    yaml_path = moved / retention.name  # as if the workspace had lived at /old/place when the YAML was written
    yaml_path.write_text(yaml_path.read_text().replace(str(small_world.root), "/old/place"))
    config = lmeval.load_task(yaml_path)
    assert config["dataset_kwargs"]["data_files"]["test"] == str(moved / "ctune_retention.jsonl")


def test_lm_eval_records_the_workspace_commit(small_world: Workspace, tmp_path, monkeypatch) -> None:
    from lm_eval import evaluator

    monkeypatch.chdir(tmp_path)
    original = evaluator.get_git_commit_hash
    with lmeval._git_hash_of(world_task_files(small_world)[0].parent):
        recorded = evaluator.get_git_commit_hash()
    assert recorded == small_world.git("describe", "--always").stdout.strip()
    assert evaluator.get_git_commit_hash is original
    with lmeval._git_hash_of(tmp_path):  # tasks outside any repository: nothing recorded, nothing printed
        assert evaluator.get_git_commit_hash() is None
