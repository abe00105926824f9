from __future__ import annotations

from pathlib import Path

import pytest

from ctune_ops.cli import main
from ctune_ops.config import ConfigError, CtuneConfig, load_config, parse_config, read_yaml
from ctune_ops.workspace import resource_text


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(read_yaml(text), source="p.yaml", text=text)
    return str(info.value)


def test_shipped_params_are_the_defaults() -> None:
    assert parse_config(read_yaml(resource_text("params.yaml"))) == CtuneConfig()


@pytest.mark.parametrize("name", ["params.yaml", "dvc.yaml"])
def test_repository_copies_are_the_shipped_files(name: str) -> None:
    """The repository root shows the files ``ctune init`` copies (DESIGN's layout); they must not drift apart."""
    assert (Path(__file__).resolve().parents[1] / name).read_text() == resource_text(name)


def test_unknown_key_names_file_line_and_key() -> None:
    message = _error("world:\n  seed: 1\n  rows_per_dya: 5\n")
    assert "p.yaml:3" in message and "world.rows_per_dya" in message and "unknown key" in message


def test_wrong_type_says_what_was_expected() -> None:
    message = _error("bootstrap:\n  base:\n    hidden_size: wide\n")
    assert "p.yaml:3" in message and "bootstrap.base.hidden_size" in message
    assert "valid integer" in message and "'wide'" in message


def test_missing_required_value_is_named() -> None:
    message = _error("world:\n  questions: {train: 4, eval: 3}\n")
    assert "world.questions.reappear" in message and "missing" in message


def test_mix_must_add_up() -> None:
    assert "add up to 1.0" in _error("world:\n  mix: {new: 0.5}\n")


def test_dates_stay_text_and_are_checked() -> None:
    assert parse_config(read_yaml("batch:\n  date: 2026-02-03\n")).batch.date == "2026-02-03"
    assert "YYYY-MM-DD" in _error("batch:\n  date: 2026-02-30\n")


def test_top_level_must_be_a_mapping() -> None:
    assert "mapping" in _error("- a\n- b\n")


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("world: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such params file"):
        load_config(tmp_path / "absent.yaml")


def test_prompt_placeholders_are_checked() -> None:
    assert "placeholder" in _error('models:\n  prompt:\n    without_input: "{question}"\n')


def test_cli_config_check(workspace, capsys) -> None:
    assert main(["config", "check", "--workspace", str(workspace.root)]) == 0
    (workspace.root / "params.yaml").write_text("world:\n  days_ahead: 3\n")
    assert main(["config", "check", "--workspace", str(workspace.root)]) == 2
    err = capsys.readouterr().err
    assert "params.yaml:2" in err and "world.days_ahead" in err


def test_score_batch_bound_follows_the_device() -> None:
    """CPU batches are bounded by ``cpu_batch_tokens`` (cache-sized), GPU batches by ``batch_tokens``."""
    score = parse_config(read_yaml("score:\n  batch_tokens: 5000\n  cpu_batch_tokens: 700\n")).score
    assert (score.tokens_per_batch("cpu"), score.tokens_per_batch("cuda")) == (700, 5000)
