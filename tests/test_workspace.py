from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from ctune_ops.cli import main
from ctune_ops.workspace import (
    LAYOUT_DIRS,
    Workspace,
    WorkspaceError,
    atomic_write_text,
    init_workspace,
)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_init_creates_git_dvc_workspace(tmp_path: Path) -> None:
    result = init_workspace(tmp_path / "ws")
    ws = result.workspace
    assert result.created
    for rel in LAYOUT_DIRS:
        assert (ws.root / rel).is_dir()
    assert (ws.root / "params.yaml").is_file() and (ws.root / "dvc.yaml").is_file()
    assert ws.git("log", "--oneline").stdout.count("\n") == 1
    assert ws.git("status", "--porcelain").stdout == ""
    config = (ws.root / ".dvc" / "config").read_text()
    assert "url = ../dvc-remote" in config and "remote = local" in config
    assert (ws.root / "dvc-remote").is_dir()
    assert "/dvc-remote/" in (ws.root / ".gitignore").read_text()
    from dvc.repo import Repo

    with Repo(str(ws.root)) as repo:
        assert repo.config["remote"]["local"]["url"] == str(ws.root / "dvc-remote")


def test_init_again_changes_nothing(tmp_path: Path, capsys) -> None:
    root = tmp_path / "ws"
    assert main(["init", str(root)]) == 0
    before = _tree_digest(root)
    assert main(["init", str(root)]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert _tree_digest(root) == before


def test_init_refuses_a_non_empty_directory(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(WorkspaceError, match="not empty"):
        init_workspace(tmp_path)
    assert main(["init", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_init_into_an_existing_empty_directory(tmp_path: Path) -> None:
    assert init_workspace(tmp_path).created


def test_open_explains_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="not a ctune workspace.*params.yaml"):
        Workspace.open(tmp_path)


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]


def test_lock_waits_then_fails_naming_the_holder(workspace: Workspace) -> None:
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with workspace.lock(purpose="holder-task"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    try:
        with pytest.raises(WorkspaceError, match="locked by .*holder-task"), workspace.lock(timeout_s=0.5):
            pass
    finally:
        release.set()
        thread.join()
    with workspace.lock(timeout_s=1):  # free again
        pass
