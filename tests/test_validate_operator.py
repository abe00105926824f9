"""The stage registry, `ctune stage` and the Airflow operators around the validate stage."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from ctune_ops.cli import main
from ctune_ops.stages import DVC_STAGE_NAMES, STAGE_NAMES, StageError, get_stage
from ctune_ops.workspace import Workspace

from .validate_support import install_tokenizer, line, outputs, record, train_small_tokenizer, write_day


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer") / "base")


@pytest.fixture
def ws(workspace: Workspace, tokenizer_dir: Path) -> Workspace:
    install_tokenizer(workspace, tokenizer_dir)
    return workspace


def test_registry() -> None:
    assert STAGE_NAMES[0] == "validate" and get_stage("validate").__module__ == "ctune_ops.stages.validate"
    assert get_stage("dedup").__module__ == "ctune_ops.stages.dedup"
    assert get_stage("train").__module__ == "ctune_ops.stages.train"
    assert get_stage("proxy").__module__ == "ctune_ops.stages.proxy"
    assert get_stage("evaluate").__module__ == "ctune_ops.stages.evaluate"
    assert get_stage("promote").__module__ == "ctune_ops.stages.promote"
    assert STAGE_NAMES[-1] == "promote" and "promote" not in DVC_STAGE_NAMES  # promote is no DVC stage
    with pytest.raises(StageError, match="unknown stage 'serve'"):
        get_stage("serve")


def test_cli_stage(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    date = "2026-03-01"
    write_day(ws, date, {"a.jsonl": line(record("a")) + b"\n{broken\n"})
    assert main(["stage", "validate", "--date", date, "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out
    summary, _ = json.JSONDecoder().raw_decode(out)
    assert summary == {"accepted": 1, "date": date, "quarantined": 1, "raw": 2, "reasons": {"invalid_json": 1}}
    assert f"quarantine: data/quarantine/{date}.jsonl" in out

    assert main(["stage", "validate", "--date", "2026-03-02", "--workspace", str(ws.root)]) == 2
    assert f"{ws.root}/incoming/2026-03-02 does not exist" in capsys.readouterr().err
    assert main(["stage", "evaluate", "--date", date, "--workspace", str(ws.root)]) == 2
    assert f"models/candidates/{date}/adapter does not exist: run the train stage" in capsys.readouterr().err
    # dedup on a workspace without the demo world: the default reference rows are missing, and it says so
    assert main(["stage", "dedup", "--date", date, "--workspace", str(ws.root)]) == 2
    assert "key 'select.trained_reference': world/corpus/day0.jsonl does not exist" in capsys.readouterr().err
    assert main(["stage", "validate", "--date", "03/01/2026", "--workspace", str(ws.root)]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_operator_runs_the_stage_for_the_runs_batch_date(ws: Workspace) -> None:
    from ctune_ops.airflow.operators import CtuneStageOperator, ValidateOperator

    date = "2026-03-03"
    write_day(ws, date, {"a.jsonl": line(record("a")) + b"\n" + line(record("b", output="")) + b"\n"})
    op = ValidateOperator(task_id="validate", workspace=str(ws.root))
    assert set(op.template_fields) == {"workspace", "date"} and op.stage == "validate"
    context = {"params": {}, "data_interval_start": dt.datetime(2026, 3, 3, tzinfo=dt.UTC)}
    summary = op.execute(context)
    assert summary == {"date": date, "raw": 2, "accepted": 1, "quarantined": 1, "reasons": {"blank_field": 1}}
    json.dumps(summary)  # XCom-serialisable
    assert outputs(ws, date)[2]["accepted"] == 1
    assert not (ws.root / ".ctune" / "lock").read_text()  # the lock was taken and released

    explicit = ValidateOperator(task_id="v2", workspace=str(ws.root), date=date)
    assert explicit.execute({"params": {}, "data_interval_start": None})["date"] == date
    with pytest.raises(StageError, match="2026-03-04 does not exist"):
        ValidateOperator(task_id="v3", workspace=str(ws.root)).execute({"params": {"date": "2026-03-04"}})

    with pytest.raises(StageError, match="run the train stage for this date first"):
        CtuneStageOperator(task_id="d", stage="evaluate", workspace=str(ws.root)).execute(context)
    with pytest.raises(ValueError, match="unknown ctune stage 'dedupe'"):
        CtuneStageOperator(task_id="x", stage="dedupe", workspace=str(ws.root))
