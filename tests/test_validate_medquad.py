"""Real data: MedQuAD's NIH answers, split into days, through the validate stage.

No real answer may be quarantined for its length or for ordinary medical text (doses, ranges, years, OMIM
numbers, gene names); every PHI quarantine must be explained by a named pattern. Organisations' toll-free
helplines (1-800-..., 888-...) are allowed by ``validate.phi_allow``; other phone numbers and e-mail addresses of
organisations cannot be told apart from a patient's by pattern, so they are quarantined, and the test prints them.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from ctune_ops.config import DEFAULT_PHI_ALLOW, DEFAULT_PHI_PATTERNS
from ctune_ops.stages.validate import run as validate
from ctune_ops.workspace import Workspace

from .validate_support import install_tokenizer, outputs, placement, train_small_tokenizer, write_day

MEDQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "medquad" / "medquad_shared.jsonl"
DAYS = ("2026-04-01", "2026-04-02", "2026-04-03", "2026-04-04")
MAX_QUARANTINED_SHARE = 0.001  # a handful of rows in 12,886, each explained below


@pytest.mark.skipif(not MEDQUAD.is_file(), reason=f"MedQuAD is not available at {MEDQUAD}")
def test_medquad_days(workspace: Workspace, tmp_path: Path) -> None:
    install_tokenizer(workspace, train_small_tokenizer(tmp_path / "tokenizer"))
    lines = [raw for raw in MEDQUAD.read_bytes().split(b"\n") if raw]
    size = -(-len(lines) // len(DAYS))
    for index, date in enumerate(DAYS):
        chunk = lines[index * size : (index + 1) * size]
        write_day(workspace, date, {"medquad.jsonl": b"\n".join(chunk) + b"\n"})

    reasons: Counter[str] = Counter()
    quarantined_rows = []
    for date in DAYS:
        result = validate(workspace, date)
        assert len(placement(workspace, date)) == result.summary["raw"]
        reasons.update(result.summary["reasons"])
        quarantined_rows += outputs(workspace, date)[1]
    accepted = sum(1 for date in DAYS for _ in outputs(workspace, date)[0])

    print(f"\nMedQuAD: {len(lines)} rows, {accepted} accepted, {len(quarantined_rows)} quarantined: {dict(reasons)}")
    allow = re.compile("|".join(DEFAULT_PHI_ALLOW.values()))
    for entry in quarantined_rows:
        print(f"  {entry['id']}: {entry['reason']}: {entry['message']}")
        assert entry["reason"].startswith("phi_"), entry  # never length, never anything but PHI
        name = entry["reason"].removeprefix("phi_")
        assert name in DEFAULT_PHI_PATTERNS and f"pattern(s) {name}" in entry["message"]
        matches = [m.group(0) for m in re.finditer(DEFAULT_PHI_PATTERNS[name], allow.sub(" ", entry["raw"]))]
        assert matches, entry
        print(f"    matched: {matches}")
    assert accepted + len(quarantined_rows) == len(lines)
    assert len(quarantined_rows) <= MAX_QUARANTINED_SHARE * len(lines)
    tokens = outputs(workspace, DAYS[0])[2]["tokens"]
    assert tokens["method"] == "byte-bound"
