"""Helpers shared by the validate tests: a small tokenizer, day folders, and reading a day's outputs."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from ctune_ops.config import CtuneConfig
from ctune_ops.records import read_jsonl
from ctune_ops.workspace import Workspace

TOKENIZER_VOCAB = 400  # small: trains in about a second, still a byte-level BPE like real deployments use
TOKENIZER_TEXTS = 1500


def train_small_tokenizer(out_dir: Path) -> Path:
    """A byte-level BPE tokenizer trained on the demo world's day-0 corpus (what `world bootstrap` does, smaller)."""
    from ctune_ops.world.bootstrap import train_tokenizer
    from ctune_ops.world.generate import corpus_rows
    from ctune_ops.world.knowledge import build_knowledge

    config = CtuneConfig()
    rows = corpus_rows(build_knowledge(config.world), config)
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows][:TOKENIZER_TEXTS]
    train_tokenizer(texts, TOKENIZER_VOCAB, config.models.max_length, out_dir)
    return out_dir


def install_tokenizer(ws: Workspace, tokenizer_dir: Path) -> None:
    """Put the tokenizer where models.base points, as a bootstrapped workspace has it."""
    shutil.copytree(tokenizer_dir, ws.root / "models" / "base", dirs_exist_ok=True)


def record(ident: str, instruction: str = "What does Raneoxin treat?", output: str = "It treats Brizior palsy.",
           **extra: Any) -> dict[str, Any]:
    return {"id": ident, "instruction": instruction, "input": "", "output": output, "source": "test",
            "created_at": "2026-02-01T00:00:00Z", **extra}


def line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def write_day(ws: Workspace, date: str, files: dict[str, bytes]) -> Path:
    folder = ws.incoming(date)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def outputs(ws: Workspace, date: str) -> tuple[list[dict], list[dict], dict]:
    """(accepted records, quarantine entries, report) of a validated day."""
    accepted = list(read_jsonl(ws.accepted(date)))
    quarantined = list(read_jsonl(ws.quarantine(date)))
    report = json.loads((ws.reports(date) / "validation.json").read_text())
    return accepted, quarantined, report


def placement(ws: Workspace, date: str) -> dict[tuple[str, int], str]:
    """(file, line) -> "accepted" or the quarantine reason; asserts that no unit is placed twice."""
    accepted, quarantined, _ = outputs(ws, date)
    keys = [(r["provenance"]["file"], r["provenance"]["line"]) for r in accepted]
    keys += [(q["file"], q["line"]) for q in quarantined]
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    assert not duplicates, f"units placed twice: {duplicates}"
    placed = {(r["provenance"]["file"], r["provenance"]["line"]): "accepted" for r in accepted}
    placed.update({(q["file"], q["line"]): q["reason"] for q in quarantined})
    return placed
