"""Versions of a workspace: ``registry.json``, ``CURRENT``, promote and rollback (DESIGN §2, §3.8, Rollback).

A version ``vN`` is a git tag whose commit holds ``models/deployed.dvc``, ``models/proxy.dvc`` and ``state.dvc`` (the
adapter, the proxy and the selection history), ``dvc.lock`` (the day's data as the pipeline's outputs) and the
day's reports; ``git checkout vN && dvc checkout`` restores all of it byte for byte. ``registry.json`` is the
append-only log of what happened: one entry per promoted version, per kept day and per rollback, each promoted
version with the sha256 of every file it installed, so a rollback can prove it restored exactly those bytes.

Promote and rollback are sequences of idempotent steps. Before the first step changes anything, the plan (date,
decision, version number, the candidate's file hashes) is written to ``.ctune/journal.json``; a process killed
between any two steps leaves that journal behind, every stage refuses to run while it exists, and running the same
command again finishes the plan. So the workspace is at the old version, or resumable to the new one, never half.
The caller holds the workspace lock (:meth:`Workspace.lock`); DVC's own fail-fast repository lock is waited on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctune_ops.workspace import (
    BASE_VERSION,
    CURRENT_FILE,
    JOURNAL_FILE,
    Workspace,
    WorkspaceError,
    atomic_directory,
    atomic_write_text,
)

REGISTRY_FILE = "registry.json"
REGISTRY_SCHEMA = 1
DEPLOYED = "models/deployed"  # the production adapter
PROXY = "models/proxy"  # the proxy in step with it
STATE = "state"  # history.sqlite (decisions, trained-by versions) and the eval score cache
VERSIONED = (DEPLOYED, PROXY, STATE)
PROMOTE, KEEP, ROLLBACK = "promote", "keep", "rollback"
PROMOTE_STEPS = ("install", "history", "dvc", "push", "registry", "git")
ROLLBACK_STEPS = ("restore", "registry", "git")
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")

log = logging.getLogger(__name__)
StepHook = Callable[[str], None]


# -- hashes ------------------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_manifest(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path`` (a file gives one entry named after it); {} if absent."""
    if path.is_file():
        return {path.name: file_sha256(path)}
    if not path.is_dir():
        return {}
    return {p.relative_to(path).as_posix(): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


def manifest_digest(manifest: dict[str, str]) -> str:
    """One sha256 for a whole folder: of its sorted (path, sha256) list."""
    return hashlib.sha256(json.dumps(sorted(manifest.items())).encode()).hexdigest()


# -- the registry file -------------------------------------------------------------------------------------------
@dataclass
class Registry:
    """``registry.json``: the append-only list of promote, keep and rollback entries, oldest first."""

    entries: list[dict[str, Any]]

    @classmethod
    def load(cls, ws: Workspace) -> Registry:
        path = ws.root / REGISTRY_FILE
        if not path.exists():
            return cls([])
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise WorkspaceError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); restore it with "
                                 f"`git checkout -- {REGISTRY_FILE}`") from None
        if not isinstance(data, dict) or data.get("schema") != REGISTRY_SCHEMA or not isinstance(
                data.get("entries"), list):
            raise WorkspaceError(f"{path}: expected an object with 'schema': {REGISTRY_SCHEMA} and a list "
                                 "'entries'")
        return cls(data["entries"])

    def save(self, ws: Workspace) -> None:
        text = json.dumps({"schema": REGISTRY_SCHEMA, "entries": self.entries}, indent=1, sort_keys=True)
        atomic_write_text(ws.root / REGISTRY_FILE, text + "\n")

    def versions(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["kind"] == PROMOTE]

    def version(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.versions() if e["version"] == name), None)

    def next_version(self) -> str:
        numbers = [int(e["version"][1:]) for e in self.versions()]
        return f"v{max(numbers, default=0) + 1}"

    def day_outcome(self, date: str) -> dict[str, Any] | None:
        """The promote or keep entry of ``date`` still in force, or None. Rolling back to vK reopens the days
        recorded after vK was promoted: their rows are gone from vK's history, so they may be processed again."""
        live: dict[str, tuple[int, dict[str, Any]]] = {}
        for index, entry in enumerate(self.entries):
            if entry["kind"] == ROLLBACK:
                restored = next(i for i, e in enumerate(self.entries)
                                if e["kind"] == PROMOTE and e["version"] == entry["version"])
                live = {d: (i, e) for d, (i, e) in live.items() if i <= restored}
            else:
                live[entry["date"]] = (index, entry)
        return live[date][1] if date in live else None

    def last_day(self) -> dict[str, Any] | None:
        return next((e for e in reversed(self.entries) if e["kind"] in (PROMOTE, KEEP)), None)


# -- journal -----------------------------------------------------------------------------------------------------
def read_journal(ws: Workspace) -> dict[str, Any] | None:
    """The plan of an interrupted promote or rollback, or None."""
    path = ws.root / JOURNAL_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def interrupted_message(journal: dict[str, Any]) -> str:
    if journal["operation"] == PROMOTE:
        return (f"promote of {journal['date']} ({journal['decision']}, {journal['version']}) was interrupted after "
                f"step {journal.get('done') or 'none'}; finish it with `ctune promote --date {journal['date']}`")
    return (f"rollback to {journal['version']} was interrupted after step {journal.get('done') or 'none'}; "
            f"finish it with `ctune rollback {journal['version']}`")


def refuse_if_interrupted(ws: Workspace) -> None:
    """Stages must not run on a workspace whose promote or rollback is half done."""
    journal = read_journal(ws)
    if journal is not None:
        raise WorkspaceError(f"workspace {ws.root}: {interrupted_message(journal)}")


def _write_journal(ws: Workspace, journal: dict[str, Any]) -> None:
    atomic_write_text(ws.root / JOURNAL_FILE, json.dumps(journal, indent=1, sort_keys=True) + "\n")


def _run_steps(ws: Workspace, journal: dict[str, Any], steps: tuple[str, ...],
               actions: dict[str, Callable[[], None]], after_step: StepHook | None) -> None:
    """Run the steps after the journal's last done one, recording each in the journal as it completes."""
    done = journal.get("done")
    start = steps.index(done) + 1 if done else 0
    for step in steps[start:]:
        actions[step]()
        journal["done"] = step
        _write_journal(ws, journal)
        log.info("%s %s: step %s done", journal["operation"], journal["version"], step)
        if after_step is not None:
            after_step(step)
    (ws.root / JOURNAL_FILE).unlink()


# -- DVC -----------------------------------------------------------------------------------------------------------
# -- promote -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromoteOutcome:
    """What promote did: ``decision`` promote or keep; ``version`` is production afterwards; ``already`` when the
    day had been recorded before and nothing changed."""

    date: str
    decision: str
    version: str
    parent: str
    already: bool = False


def day_files(ws: Workspace, date: str) -> list[Path]:
    """The day's data files (DESIGN §2), whose sha256 a registry entry records."""
    return [ws.accepted(date), ws.quarantine(date), ws.unique(date), ws.scored(date), ws.selected(date)]


def _read_report(ws: Workspace, date: str, name: str) -> dict[str, Any]:
    """A report promote cannot do without."""
    report = ws.report(date, name)
    if not report:
        raise WorkspaceError(f"{ws.shown(ws.reports(date) / name)} does not exist: run the stage that writes it "
                             f"for {date} first")
    return report


def _deciding_report(ws: Workspace, date: str) -> dict[str, Any]:
    """The gate report that decides the day: the repaired candidate's when the repair stage ran, else eval.json."""
    from ctune_ops.stages import StageError
    from ctune_ops.stages.repair import deciding_report

    _read_report(ws, date, "eval.json")
    try:
        return deciding_report(ws, date)
    except StageError as exc:
        raise WorkspaceError(str(exc)) from None


def _candidate_sources(ws: Workspace, date: str, evaluation: dict[str, Any]) -> dict[str, Path]:
    """Production path -> the candidate folder installed over it: the adapter the gate judged (the day's, or
    the repaired one), the day's proxy."""
    return {DEPLOYED: ws.root / evaluation["candidate"]["adapter"], PROXY: ws.candidates(date) / "proxy"}


def _plan_promote(ws: Workspace, date: str, registry: Registry) -> dict[str, Any]:
    evaluation = _deciding_report(ws, date)
    current = ws.current_version
    evaluated_against = evaluation["production"]["version"]
    if evaluated_against != current:
        raise WorkspaceError(f"reports/{date}/eval.json compared the candidate with {evaluated_against}, but "
                             f"production is now {current}; run the evaluate stage for {date} again")
    decision = evaluation["decision"]
    journal: dict[str, Any] = {
        "operation": PROMOTE, "date": date, "decision": decision, "parent": current,
        "version": registry.next_version() if decision == PROMOTE else current,
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "done": None,
    }
    if decision == PROMOTE:
        candidates, sources = {}, {}
        for target, source in _candidate_sources(ws, date, evaluation).items():
            if target == PROXY and not ws.config.proxy.update:
                continue  # static selection: the promoted proxy stays
            if not source.is_dir():
                raise WorkspaceError(f"{ws.shown(source)} does not exist: run the "
                                     f"{'train' if target == DEPLOYED else 'proxy'} stage for {date} first")
            candidates[target], sources[target] = tree_manifest(source), ws.shown(source)
        journal["candidates"], journal["sources"] = candidates, sources
    return journal


def _install(ws: Workspace, journal: dict[str, Any]) -> None:
    """Copy the day's candidates over production (each folder replaced whole), unless already there."""
    for target, wanted in journal["candidates"].items():
        if tree_manifest(ws.root / target) == wanted:
            continue
        source = ws.root / journal["sources"][target]
        if tree_manifest(source) != wanted:
            raise WorkspaceError(f"{ws.shown(source)} changed since promote began; rerun train, proxy and evaluate "
                                 f"for {journal['date']}, then delete {JOURNAL_FILE} and promote again")
        with atomic_directory(ws.root / target) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)


def _mark_history(ws: Workspace, journal: dict[str, Any]) -> None:
    from ctune_ops.stages.dedup import open_history

    with open_history(ws) as history:
        if journal["decision"] == PROMOTE:
            history.mark_trained(journal["date"], journal["version"])
        else:
            history.mark_not_trained(journal["date"])


def _check_state_closed(ws: Workspace) -> None:
    for side in SQLITE_SIDE_FILES:
        path = ws.history_db.with_name(ws.history_db.name + side)
        if path.exists() and path.stat().st_size:
            raise WorkspaceError(f"{ws.shown(path)} is not empty: another process has the history database open; "
                                 "stop it before versioning state/")


def _record_dvc(ws: Workspace, journal: dict[str, Any]) -> None:
    """The day's pipeline outputs into dvc.lock and the cache; production and state/ with ``dvc add``."""
    _check_state_closed(ws)
    record_stage(ws, journal["date"])
    ws.dvc_add([t for t in VERSIONED if (ws.root / t).exists()])


def _skips_outputs(ws: Workspace) -> bool:
    """Whether a stage legitimately writes no output: ``proxy.update: false`` makes no candidate proxy."""
    return not ws.config.proxy.update


def record_stage(ws: Workspace, date: str, stage: str | None = None) -> None:
    """Record DVC stage ``stage`` of day ``date`` (every stage when None) in ``dvc.lock`` (``dvc commit``): its
    deps, params and outputs as they are now, so ``dvc status`` knows what ran and ``dvc repro`` reruns only what
    changed. A day run without the repair stage (a caller from before it, or one that leaves it out) has no
    repair folder: every other stage is recorded, the repair stage not."""
    import yaml

    from ctune_ops.training.spec import repair_folder
    from ctune_ops.workspace import DVC_FILE

    stages = list((yaml.safe_load((ws.root / DVC_FILE).read_text(encoding="utf-8")) or {}).get("stages") or {})
    if stage is not None and stage not in stages:
        raise WorkspaceError(f"{ws.shown(ws.root / DVC_FILE)} has no stage {stage!r} (written by an earlier "
                             f"ctune): add it from ctune_ops/resources/{DVC_FILE}")
    names = [stage] if stage is not None else [
        name for name in stages if name != "repair" or repair_folder(ws, date).is_dir()]
    ws.set_batch_date(date)

    def commit(repo: Any) -> None:
        for name in names:
            repo.commit(name, force=True, allow_missing=_skips_outputs(ws))

    ws.run_dvc(f"commit {stage or 'of every stage'} (recording {date} in dvc.lock)", commit)


def _push(ws: Workspace) -> None:
    ws.run_dvc(f"push to remote {ws.config.workspace.dvc_remote_name!r}", lambda repo: repo.push())


def _dvc_md5(ws: Workspace, target: str) -> str | None:
    path = ws.root / f"{target}.dvc"
    if not path.exists():
        return None
    import yaml

    outs = yaml.safe_load(path.read_text(encoding="utf-8")).get("outs") or [{}]
    return outs[0].get("md5")


def _day_entry(ws: Workspace, journal: dict[str, Any]) -> dict[str, Any]:
    date = journal["date"]
    evaluation = _deciding_report(ws, date)
    repair = ws.report(date, "repair.json")
    selection = _read_report(ws, date, "selection.json")
    entry: dict[str, Any] = {
        "kind": journal["decision"], "date": date, "version": journal["version"], "parent": journal["parent"],
        "at": journal["at"],
        "metrics": {task: scores.get(evaluation["rule"]["metric"])
                    for task, scores in evaluation["candidate"]["scores"].items()},
        "production_metrics": {task: scores.get(evaluation["rule"]["metric"])
                               for task, scores in evaluation["production"]["scores"].items()},
        "gate": {"decision": evaluation["decision"], "rule": evaluation["rule"]["text"],
                 "failed": [c["task"] for c in evaluation["checks"] if not c["passed"]]},
        "repair": repair and {"attempted": repair["attempted"], "reason": repair["reason"],
                              "first": repair["first"], "rows": (repair.get("rehearsed") or {}).get("rows", 0)},
        "funnel": selection["funnel"],
        "tokens": {"selected": selection["selected_tokens"], "unique": selection["unique_tokens"]},
        "data": {ws.shown(p): file_sha256(p) for p in day_files(ws, date) if p.exists()},
    }
    train, proxy = ws.report(date, "train.json"), ws.report(date, "proxy.json")
    if train:
        entry["train"] = {key: train.get(key) for key in ("rows", "steps", "tokens_seen", "response_tokens", "wall_s",
                                                          "device")}
    if proxy:
        alignment = proxy.get("alignment") or {}
        entry["proxy"] = {"spearman_rho": alignment.get("spearman_rho"), "flagged": alignment.get("flagged"),
                          "trained_below_tau": proxy.get("trained_below_tau")}
    manifests = {target: tree_manifest(ws.root / target) for target in VERSIONED}
    entry["models"] = {target: {"sha256": manifest_digest(m), "files": m, "dvc_md5": _dvc_md5(ws, target)}
                       for target, m in manifests.items()}
    return entry


def _write_registry(ws: Workspace, journal: dict[str, Any]) -> None:
    registry = Registry.load(ws)
    if not any(e.get("at") == journal["at"] and e["kind"] == journal["decision"] and e.get("date") == journal["date"]
               for e in registry.entries):
        registry.entries.append(_day_entry(ws, journal))
        registry.save(ws)
    if journal["decision"] == PROMOTE:
        atomic_write_text(ws.root / CURRENT_FILE, journal["version"] + "\n")


def _git_paths(ws: Workspace, date: str) -> list[str]:
    candidates = [REGISTRY_FILE, CURRENT_FILE, "params.yaml", "dvc.lock", ".gitignore", "models/.gitignore",
                  "data", f"reports/{date}", *(f"{t}.dvc" for t in VERSIONED)]
    return [p for p in candidates if (ws.root / p).exists()]


def _git_commit(ws: Workspace, journal: dict[str, Any]) -> None:
    date, version = journal["date"], journal["version"]
    if journal["decision"] == PROMOTE:
        message = f"promote {date}: {version} (parent {journal['parent']})"
    else:
        message = f"keep {date}: the gate rejected the candidate; production stays {version}"
    ws.commit(message, _git_paths(ws, date))
    if journal["decision"] == PROMOTE and ws.git("rev-parse", "-q", "--verify", f"refs/tags/{version}",
                                                 check=False).returncode != 0:
        ws.git("tag", "-a", version, "-m", message)


def promote(ws: Workspace, date: str, after_step: StepHook | None = None) -> PromoteOutcome:
    """Promote day ``date``'s candidate (or keep production, as ``reports/D/eval.json`` decided) and version it.

    Resumes an interrupted promote of the same day; refuses while another day's promote or a rollback is half
    done; does nothing for a day already recorded. ``after_step`` is called with each step's name once it is
    done (progress, and the fault tests' kill switch).
    """
    journal = read_journal(ws)
    if journal is not None and (journal["operation"] != PROMOTE or journal["date"] != date):
        raise WorkspaceError(f"workspace {ws.root}: {interrupted_message(journal)}")
    registry = Registry.load(ws)
    if journal is None:
        recorded = registry.day_outcome(date)
        if recorded is not None:
            return PromoteOutcome(date, recorded["kind"], ws.current_version, recorded["parent"], already=True)
        journal = _plan_promote(ws, date, registry)
        _write_journal(ws, journal)
    promoting = journal["decision"] == PROMOTE
    actions = {
        "install": (lambda: _install(ws, journal)) if promoting else (lambda: None),
        "history": lambda: _mark_history(ws, journal),
        "dvc": lambda: _record_dvc(ws, journal),
        "push": lambda: _push(ws),
        "registry": lambda: _write_registry(ws, journal),
        "git": lambda: _git_commit(ws, journal),
    }
    _run_steps(ws, journal, PROMOTE_STEPS, actions, after_step)
    return PromoteOutcome(date, journal["decision"], journal["version"], journal["parent"])


# -- rollback ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RollbackOutcome:
    version: str
    previous: str
    already: bool = False


def _restore(ws: Workspace, journal: dict[str, Any], entry: dict[str, Any]) -> None:
    """vK's .dvc files from its tag, their data from the DVC cache (or the remote), checked against the registry."""
    version = journal["version"]
    for target in VERSIONED:  # not versioned in vK (a static proxy never promoted): back to nothing, as then
        if entry["models"][target]["dvc_md5"] is None:
            shutil.rmtree(ws.root / target, ignore_errors=True)
            ws.git("rm", "-q", "--cached", "--ignore-unmatch", f"{target}.dvc")
            (ws.root / f"{target}.dvc").unlink(missing_ok=True)
    dvc_files = [f"{t}.dvc" for t in VERSIONED if entry["models"][t]["dvc_md5"] is not None]
    ws.git("checkout", f"refs/tags/{version}", "--", *dvc_files)
    try:
        ws.run_dvc(f"checkout {' '.join(dvc_files)}", lambda repo: repo.checkout(targets=dvc_files, force=True))
    except WorkspaceError:  # objects missing from the local cache: fetch them from the remote, then check out
        ws.run_dvc(f"pull of {version} from remote {ws.config.workspace.dvc_remote_name!r}",
                lambda repo: repo.pull(targets=dvc_files, force=True))
    for target in VERSIONED:
        restored = tree_manifest(ws.root / target)
        if restored != entry["models"][target]["files"]:
            differing = sorted(set(restored.items()) ^ set(entry["models"][target]["files"].items()))
            raise WorkspaceError(f"rollback to {version}: {target} does not match the registry's sha256 of it "
                                 f"(differing: {[name for name, _ in differing][:5]})")


def _write_rollback_entry(ws: Workspace, journal: dict[str, Any]) -> None:
    registry = Registry.load(ws)
    if not any(e.get("at") == journal["at"] and e["kind"] == ROLLBACK for e in registry.entries):
        registry.entries.append({"kind": ROLLBACK, "version": journal["version"], "from": journal["previous"],
                                 "at": journal["at"]})
        registry.save(ws)
    atomic_write_text(ws.root / CURRENT_FILE, journal["version"] + "\n")


def rollback(ws: Workspace, version: str, after_step: StepHook | None = None) -> RollbackOutcome:
    """Make ``version`` production again: its adapter, proxy and state/ exactly, CURRENT, a registry entry and a
    commit. Rows trained after it are absent from its history, so later days may select them again."""
    journal = read_journal(ws)
    if journal is not None and (journal["operation"] != ROLLBACK or journal["version"] != version):
        raise WorkspaceError(f"workspace {ws.root}: {interrupted_message(journal)}")
    registry = Registry.load(ws)
    entry = registry.version(version)
    if entry is None:
        known = ", ".join(e["version"] for e in registry.versions()) or "none yet"
        hint = " (v0, the base before any promotion, has no recorded state)" if version == BASE_VERSION else ""
        raise WorkspaceError(f"no version {version!r} in {REGISTRY_FILE}{hint}; promoted versions: {known}")
    if journal is None:
        current = ws.current_version
        if current == version:
            return RollbackOutcome(version, current, already=True)
        journal = {"operation": ROLLBACK, "version": version, "previous": current, "done": None,
                   "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        _write_journal(ws, journal)
    actions = {
        "restore": lambda: _restore(ws, journal, entry),
        "registry": lambda: _write_rollback_entry(ws, journal),
        "git": lambda: ws.commit(f"rollback: {journal['previous']} -> {version}",
                                 [REGISTRY_FILE, CURRENT_FILE, *(f"{t}.dvc" for t in VERSIONED
                                                                 if (ws.root / f"{t}.dvc").exists())]),
    }
    _run_steps(ws, journal, ROLLBACK_STEPS, actions, after_step)
    return RollbackOutcome(version, journal["previous"])


# -- reading -------------------------------------------------------------------------------------------------------
def versions_table(ws: Workspace) -> list[dict[str, Any]]:
    """One row per version, v0 (the base) first: date, parent, metrics, training rows, and which is current."""
    registry = Registry.load(ws)
    current = ws.current_version
    rows: list[dict[str, Any]] = []
    promoted = registry.versions()
    base_metrics = promoted[0]["production_metrics"] if promoted else {}
    rows.append({"version": BASE_VERSION, "date": None, "parent": None, "metrics": base_metrics,
                 "training_rows": None, "current": current == BASE_VERSION})
    for entry in promoted:
        rows.append({"version": entry["version"], "date": entry["date"], "parent": entry["parent"],
                     "metrics": entry["metrics"], "training_rows": entry["funnel"].get("training_rows"),
                     "current": current == entry["version"]})
    return rows


def status(ws: Workspace) -> dict[str, Any]:
    """The current version, the last day's outcome, and any interrupted operation."""
    registry = Registry.load(ws)
    journal = read_journal(ws)
    last = registry.last_day()
    rollbacks = [e for e in registry.entries if e["kind"] == ROLLBACK]
    return {
        "current": ws.current_version,
        "last_day": None if last is None else {
            "date": last["date"], "outcome": last["kind"], "version": last["version"],
            "failed": last["gate"]["failed"], "metrics": last["metrics"], "funnel": last["funnel"]},
        "last_rollback": rollbacks[-1] if rollbacks else None,
        "interrupted": interrupted_message(journal) if journal else None,
    }
