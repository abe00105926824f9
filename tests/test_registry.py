"""Promote, keep and rollback on a copy of the small world (issue 6): versions that DVC and git restore byte for
byte, a promote killed between any two steps that finishes when run again, the locks, a poisoned day the gate
rejects, and the CLI's versions and status tables.

One module-scoped workspace goes through the story in order: day 1 promoted (v1), day 2 promoted (v2), rollback to
v1, then a poisoned day 3 that the real gate must keep out. Days 1 and 2 pass an opened gate: these tests are about
what promotion does, and whether the small world's day-1 candidate is within 0.03 of the base's retention depends
on the machine (within 0.03 of 0.97 where these tests were written, 0.97 -> 0.927 on another); the poisoned day
runs the gate as configured.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ctune_ops import cli
from ctune_ops.registry import (
    DEPLOYED,
    PROMOTE_STEPS,
    PROXY,
    VERSIONED,
    Registry,
    promote,
    read_journal,
    rollback,
    tree_manifest,
)
from ctune_ops.selection.history import NOT_TRAINED, SELECTED, TRAINED, History
from ctune_ops.stages import run_stage
from ctune_ops.workspace import Workspace, WorkspaceError
from ctune_ops.world.poison import write_poisoned_day
from tests.conftest import set_params
from tests.test_proxy_stage import SMALL_TRAIN

DAY1, DAY2, DAY3 = "2026-01-01", "2026-01-02", "2026-01-03"
PIPELINE = ("validate", "dedup", "score", "select", "train", "proxy", "evaluate", "repair")
OPEN_GATE = {"evaluate": {"tolerance": 1.0, "min_gain": -1.0, "drift_tolerance": None}}
POISONED_FACTS = 12


def _copy(ws: Workspace, root: Path) -> Workspace:
    shutil.copytree(ws.root, root, symlinks=True)
    return Workspace.open(root)


def _production(ws: Workspace) -> dict[str, dict[str, str]]:
    return {target: tree_manifest(ws.root / target) for target in (DEPLOYED, PROXY)}


def _decisions(ws: Workspace, date: str) -> dict[str, tuple[str, str | None]]:
    with History(ws.history_db, ws.config.dedup) as history:
        return history.decisions(date)


def _run_day(ws: Workspace, date: str) -> None:
    for stage in PIPELINE:
        run_stage(ws, stage, date)


@pytest.fixture(scope="module")
def evaluated(small_world, tmp_path_factory) -> Workspace:  # noqa: ANN001
    """Day 1 through evaluate and repair (not needed: the gate is open), not promoted: the starting point of every
    promote below."""
    ws = set_params(_copy(small_world, tmp_path_factory.mktemp("registry") / "ws"), {**SMALL_TRAIN, **OPEN_GATE})
    _run_day(ws, DAY1)
    return ws


@pytest.fixture(scope="module")
def story(evaluated, tmp_path_factory) -> dict:  # noqa: ANN001
    """v1 from day 1, v2 from day 2; what each looked like when promoted."""
    ws = _copy(evaluated, tmp_path_factory.mktemp("story") / "ws")
    first = promote(ws, DAY1)
    v1 = {target: tree_manifest(ws.root / target) for target in VERSIONED}
    _run_day(ws, DAY2)
    second = promote(ws, DAY2)
    v2 = {target: tree_manifest(ws.root / target) for target in VERSIONED}
    return {"ws": ws, "outcomes": (first, second), "v1": v1, "v2": v2}


def test_promote_installs_versions_and_tags(evaluated, story) -> None:  # noqa: ANN001
    ws = story["ws"]
    first, second = story["outcomes"]
    assert (first.decision, first.version, first.parent) == ("promote", "v1", "v0")
    assert (second.decision, second.version, second.parent) == ("promote", "v2", "v1")
    # v1 installed exactly the day-1 candidates
    assert story["v1"][DEPLOYED] == tree_manifest(evaluated.candidates(DAY1) / "adapter")
    assert story["v1"][PROXY] == tree_manifest(evaluated.candidates(DAY1) / "proxy")
    assert (ws.root / "CURRENT").read_text().strip() == "v2"
    assert ws.git("tag", "--list").stdout.split() == ["v1", "v2"]
    assert ws.git("status", "--porcelain", "--untracked-files=no").stdout == ""
    registry = Registry.load(ws)
    entry = registry.version("v1")
    assert entry["date"] == DAY1 and entry["gate"]["decision"] == "promote"
    assert set(entry["metrics"]) == {"ctune_retention", "ctune_target"}
    assert entry["funnel"]["training_rows"] == len(evaluated.selected(DAY1).read_text().splitlines())
    assert entry["models"][DEPLOYED]["files"] == story["v1"][DEPLOYED]
    assert entry["data"][f"data/accepted/{DAY1}.jsonl"]
    # the day's rows: selected -> trained in v1; none left selected
    decisions = _decisions(ws, DAY1)
    assert (TRAINED, "v1") in decisions.values() and all(d != SELECTED for d, _ in decisions.values())
    # pushed: the remote holds the deployed adapter's directory object
    md5 = entry["models"][DEPLOYED]["dvc_md5"]
    assert (ws.root / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]).exists()
    # the day's reports and the pipeline's record are committed
    tracked = ws.git("ls-files", f"reports/{DAY1}", "dvc.lock", "state.dvc").stdout.split()
    assert {f"reports/{DAY1}/eval.json", "dvc.lock", "state.dvc"} <= set(tracked)


def test_promote_twice_changes_nothing(story) -> None:  # noqa: ANN001
    ws = story["ws"]
    head = ws.git("rev-parse", "HEAD").stdout
    again = promote(ws, DAY2)
    assert again.already and again.version == "v2"
    assert ws.git("rev-parse", "HEAD").stdout == head


def _kept_for_a_shallow_fall(evaluated: Workspace, root: Path) -> tuple[Workspace, dict]:
    """A copy of the evaluated day 1 whose eval.json says what the gate writes when the candidate's retention is
    0.02 below its floor: keep (the repair stage's case); and that report."""
    ws = _copy(evaluated, root)
    path = ws.reports(DAY1) / "eval.json"
    report = json.loads(path.read_text())
    retention = next(c for c in report["checks"] if c["task"] == "ctune_retention")
    retention.update(floor=round(retention["candidate"] + 0.02, 4), passed=False)
    path.write_text(json.dumps({**report, "decision": "keep"}))
    return ws, report


def test_a_repaired_candidate_is_what_promote_installs(evaluated, tmp_path) -> None:  # noqa: ANN001
    """The gate kept day 1 for a shallow fall of retention (eval.json as the gate writes it when the candidate is
    0.02 below the floor); the repair stage rehearses known rows, judges the repaired adapter again (with this
    workspace's open gate: promote), and promote installs that adapter, not the day's first candidate."""
    ws, report = _kept_for_a_shallow_fall(evaluated, tmp_path / "ws")

    result = run_stage(ws, "repair", DAY1)
    repair = json.loads((ws.reports(DAY1) / "repair.json").read_text())
    assert result.summary["attempted"] and repair["attempted"] and repair["reason"] is None
    assert repair["first"] == {"decision": "keep", "adapter": f"models/candidates/{DAY1}/adapter",
                               "failed": ["ctune_retention"]}
    folder = ws.candidates(DAY1) / "repair"
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    known = {row_id for row_id, (d, _) in _decisions(ws, DAY1).items() if d == "known"}
    rehearsed = repair["rehearsed"]
    assert {r["selection"] for r in rows} == {"rehearse"} and len(rows) == rehearsed["rows"]
    assert rehearsed["known_today"] == len(known) and rehearsed["trained_before"] == 40
    assert {str(r["id"]) for r in rows[: len(known)]} == known
    trained = json.loads((ws.reports(DAY1) / "repair_train.json").read_text())
    assert trained["rows_by_selection"] == {"rehearse": len(rows)} and trained["rehearsal"]["rows"] == len(rows)
    assert trained["continued_from"]["adapter"] == f"models/candidates/{DAY1}/adapter"
    repaired = tree_manifest(folder / "adapter")
    assert repaired and repaired != tree_manifest(ws.candidates(DAY1) / "adapter")
    assert repair["candidate"]["adapter"] == f"models/candidates/{DAY1}/repair/adapter"
    assert repair["decision"] == "promote" and repair["production"]["scores"] == report["production"]["scores"]

    outcome = promote(ws, DAY1)
    assert (outcome.decision, outcome.version) == ("promote", "v1")
    assert tree_manifest(ws.root / DEPLOYED) == repaired
    entry = Registry.load(ws).version("v1")
    assert entry["repair"]["attempted"] and entry["repair"]["rows"] == len(rows)
    assert entry["metrics"] == {task: scores["acc"] for task, scores in repair["candidate"]["scores"].items()}
    assert ws.git("status", "--porcelain", "--untracked-files=no").stdout == ""


def test_a_repair_still_short_gets_a_second_round(evaluated, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A first rehearsal that leaves the candidate short, but within repair.max_shortfall, is continued by a
    second round on the first one's adapter with other earlier rows; the last round's gate decides, and the
    report adds up both rounds. (The first round's verdict is made a shallow fall here; everything else is the
    real training and gate.)"""
    from ctune_ops.stages import repair as repair_stage

    ws, report = _kept_for_a_shallow_fall(evaluated, tmp_path / "ws")
    real_judge = repair_stage.judge

    def first_round_short(ws_, date, adapter):  # noqa: ANN001, ANN202
        verdict = real_judge(ws_, date, adapter)
        if adapter == ws_.candidates(date) / "repair" / "adapter":
            check = next(c for c in verdict["checks"] if c["task"] == "ctune_retention")
            check.update(floor=round(check["candidate"] + 0.01, 4), passed=False)
            verdict["decision"] = "keep"
        return verdict

    monkeypatch.setattr(repair_stage, "judge", first_round_short)
    result = run_stage(ws, "repair", DAY1)
    repair = json.loads((ws.reports(DAY1) / "repair.json").read_text())
    assert result.summary["rounds"] == 2
    rounds = repair["rehearsed"]["rounds"]
    assert [(r["round"], r["decision"]) for r in rounds] == [(1, "keep"), (2, "promote")]
    assert rounds[0]["failed"] == ["ctune_retention"] and rounds[1]["failed"] == []
    folder = ws.candidates(DAY1) / "repair"
    assert repair["candidate"]["adapter"] == rounds[1]["adapter"] == f"models/candidates/{DAY1}/repair/round2/adapter"
    second = json.loads((ws.reports(DAY1) / "repair_train_round2.json").read_text())
    assert second["continued_from"]["adapter"] == f"models/candidates/{DAY1}/repair/adapter"
    one, two = ([json.loads(line) for line in (f / "rows.jsonl").read_text().splitlines()]
                for f in (folder, folder / "round2"))
    assert repair["rehearsed"]["rows"] == len(one) + len(two)
    assert repair["rehearsed"]["train"]["tokens_seen"] == sum(r["tokens_seen"] for r in rounds) > 0
    earlier = {str(r["id"]) for r in one[-40:]}, {str(r["id"]) for r in two[-40:]}
    assert earlier[0] != earlier[1]  # the second round rehearses other earlier facts

    outcome = promote(ws, DAY1)
    assert (outcome.decision, outcome.version) == ("promote", "v1")
    assert tree_manifest(ws.root / DEPLOYED) == tree_manifest(folder / "round2" / "adapter")


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from ctune_ops.registry import promote
    from ctune_ops.workspace import Workspace

    def kill(step):
        if step == sys.argv[3]:
            os.kill(os.getpid(), signal.SIGKILL)

    promote(Workspace.open(sys.argv[1]), sys.argv[2], after_step=kill)
""")


@pytest.mark.parametrize("step", PROMOTE_STEPS)
def test_promote_killed_after_any_step_resumes(evaluated, story, tmp_path, step) -> None:  # noqa: ANN001
    ws = _copy(evaluated, tmp_path / "ws")
    killed = subprocess.run([sys.executable, "-c", _KILLER, str(ws.root), DAY1, step], cwd=ws.root,
                            capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    journal = read_journal(ws)
    assert journal is not None and journal["done"] == step and journal["version"] == "v1"
    with pytest.raises(WorkspaceError, match="interrupted.*ctune promote --date 2026-01-01"):
        run_stage(ws, "validate", DAY1)
    with pytest.raises(WorkspaceError, match="interrupted"):
        rollback(ws, "v1")

    finished = promote(ws, DAY1)
    assert (finished.decision, finished.version, finished.already) == ("promote", "v1", False)
    assert read_journal(ws) is None
    assert _production(ws) == {t: story["v1"][t] for t in (DEPLOYED, PROXY)}
    assert (ws.root / "CURRENT").read_text().strip() == "v1"
    assert ws.git("tag", "--list").stdout.split() == ["v1"]
    assert [e["kind"] for e in Registry.load(ws).entries] == ["promote"]
    assert ws.git("status", "--porcelain", "--untracked-files=no").stdout == ""
    assert {d for d, _ in _decisions(ws, DAY1).values()} == {d for d, _ in _decisions(story["ws"], DAY1).values()}


def test_workspace_lock_makes_a_second_operation_wait(evaluated, tmp_path) -> None:  # noqa: ANN001
    ws = _copy(evaluated, tmp_path / "ws")
    released = tmp_path / "released"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from ctune_ops.workspace import Workspace
        with Workspace.open({str(ws.root)!r}).lock(purpose="test holder"):
            print("held", flush=True)
            time.sleep(2)
            open({str(released)!r}, "w").close()
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceError, match="locked by pid .* test holder"), ws.lock(timeout_s=0.3):
            pass
        assert cli.main(["promote", "--date", DAY1, "--workspace", str(ws.root)]) == 0
        assert released.exists()  # promote ran only after the holder let go
    finally:
        holder.wait(timeout=30)
    assert (ws.root / "CURRENT").read_text().strip() == "v1"


def test_dvc_lock_is_waited_on_then_refused_clearly(evaluated, tmp_path) -> None:  # noqa: ANN001
    ws = _copy(evaluated, tmp_path / "ws")
    released = tmp_path / "released"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from dvc.repo import Repo
        repo = Repo({str(ws.root)!r})
        repo.lock.lock()
        print("held", flush=True)
        time.sleep(8)  # longer than DVC's own retries (about 3 s) before it gives up
        open({str(released)!r}, "w").close()
        repo.lock.unlock()
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceError, match=r"DVC's repository lock .*\.dvc/tmp/lock is held"):
            ws.run_dvc("status", lambda repo: repo.status(), timeout_s=0.5)
        outcome = promote(ws, DAY1)  # waits for DVC's lock instead of failing half way
        assert released.exists() and outcome.version == "v1"
    finally:
        holder.wait(timeout=30)
    assert read_journal(ws) is None
    assert ws.git("status", "--porcelain", "--untracked-files=no").stdout == ""


def test_rollback_restores_exact_bytes_and_reopens_later_rows(story) -> None:  # noqa: ANN001
    ws = story["ws"]
    assert any(d == TRAINED for d, _ in _decisions(ws, DAY2).values())
    outcome = rollback(ws, "v1")
    assert (outcome.version, outcome.previous) == ("v1", "v2")
    assert (ws.root / "CURRENT").read_text().strip() == "v1"
    assert {t: tree_manifest(ws.root / t) for t in VERSIONED} == story["v1"]
    assert _decisions(ws, DAY2) == {}  # v1's history never saw day 2: its rows are eligible again
    entries = Registry.load(ws).entries
    assert entries[-1]["kind"] == "rollback" and entries[-1]["from"] == "v2" and entries[-1]["version"] == "v1"
    assert Registry.load(ws).day_outcome(DAY2) is None and Registry.load(ws).day_outcome(DAY1)["version"] == "v1"
    assert ws.git("status", "--porcelain", "--untracked-files=no").stdout == ""
    assert rollback(ws, "v1").already
    with pytest.raises(WorkspaceError, match="no version 'v9'.*v1, v2"):
        rollback(ws, "v9")


def test_git_checkout_and_dvc_checkout_by_hand_give_the_same_bytes(story, tmp_path) -> None:  # noqa: ANN001
    clone = tmp_path / "clone"
    source = story["ws"].root
    subprocess.run(["git", "clone", "-q", str(source), str(clone)], check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    for version in ("v1", "v2"):
        subprocess.run(["git", "checkout", "-q", version], cwd=clone, check=True)
        # a fresh clone has no DVC cache: its objects come from the remote, as for a user on another machine
        subprocess.run([*dvc, "remote", "modify", "--local", "local", "url", str(source / "dvc-remote")],
                       cwd=clone, check=True, env=env)
        subprocess.run([*dvc, "pull", "-q", "-f"], cwd=clone, check=True, env=env)
        restored = {t: tree_manifest(clone / t) for t in VERSIONED}
        assert restored == story[version], version
        entry = Registry.load(Workspace(clone)).version(version)
        for path, sha in entry["data"].items():
            assert tree_manifest(clone / path) == {Path(path).name: sha}, path
    # both versions are in the clone's cache now: plain `git checkout vK && dvc checkout` switches between them
    for version in ("v1", "v2", "v1"):
        subprocess.run(["git", "checkout", "-q", version], cwd=clone, check=True)
        subprocess.run([*dvc, "checkout", "-q", "-f"], cwd=clone, check=True, env=env)
        assert {t: tree_manifest(clone / t) for t in VERSIONED} == story[version], version


def test_poisoned_day_is_rejected_and_production_is_untouched(story) -> None:  # noqa: ANN001
    ws = set_params(story["ws"], {"evaluate": {"tolerance": 0.03, "min_gain": 0.0, "drift_tolerance": 0.03}})
    if ws.current_version != "v1":  # this test continues the story after the rollback
        rollback(ws, "v1")
    write_poisoned_day(ws, DAY3, facts=POISONED_FACTS)
    before = {t: tree_manifest(ws.root / t) for t in (DEPLOYED, PROXY)}
    _run_day(ws, DAY3)
    report = json.loads((ws.reports(DAY3) / "eval.json").read_text())
    assert report["decision"] == "keep" and "ctune_retention" in [c["task"] for c in report["checks"]
                                                                 if not c["passed"]], report["checks"]
    # the retention floor is also the base model's own score (v0's, cached since day 1) - 0.03
    cache = json.loads((ws.root / "state" / "eval_scores.json").read_text())
    from ctune_ops.stages.evaluate import production_identity

    identity = f"production={production_identity(ws, base_only=True)}:"
    (base,) = [s["acc"] for key, s in cache["v0"].items() if key.startswith("ctune_retention:") and identity in key]
    retention = next(c for c in report["checks"] if c["task"] == "ctune_retention")
    assert retention["base"] == round(base, 4)
    assert abs(retention["floor"] - (max(retention["production"], base) - 0.03)) < 1e-4
    # the repair stage ran too: neither refusing to repair nor a rehearsal may let the poison in
    repair = json.loads((ws.reports(DAY3) / "repair.json").read_text())
    assert repair["decision"] == "keep", repair
    outcome = promote(ws, DAY3)
    assert (outcome.decision, outcome.version) == ("keep", "v1")
    assert _production(ws) == before and (ws.root / "CURRENT").read_text().strip() == "v1"
    assert ws.git("tag", "--list").stdout.split() == ["v1", "v2"]
    decisions = {d for d, _ in _decisions(ws, DAY3).values()}
    assert NOT_TRAINED in decisions and SELECTED not in decisions and TRAINED not in decisions
    assert f"reports/{DAY3}/eval.json" in ws.git("ls-files", f"reports/{DAY3}").stdout.split()
    last = Registry.load(ws).entries[-1]
    assert last["kind"] == "keep" and "ctune_retention" in last["gate"]["failed"]


def test_cli_versions_and_status(story, capsys) -> None:  # noqa: ANN001
    root = str(story["ws"].root)
    assert cli.main(["versions", "--workspace", root]) == 0
    table = capsys.readouterr().out
    assert "v0" in table and "v1" in table and "v2" in table and "ctune_retention" in table
    current = [line for line in table.splitlines() if line.startswith("*")]
    assert len(current) == 1 and current[0].split()[1] == story["ws"].current_version
    assert cli.main(["status", "--workspace", root, "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["current"] == story["ws"].current_version and state["last_day"]["date"]
    assert cli.main(["rollback", "v7", "--workspace", root]) == 2
    assert "no version 'v7'" in capsys.readouterr().err
