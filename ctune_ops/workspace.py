"""A ctune workspace: one git + DVC repository per deployment, its layout, atomic writes and its lock.

Why a class of paths: every stage, the CLI, the operators and the tests must agree on where a day's files live;
spelling a path in two places is how pipelines silently read stale data.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctune_ops import PARAMS_FILE

if TYPE_CHECKING:  # the config module builds every pydantic model when imported; DAG files need none of it
    from ctune_ops.config import CtuneConfig

DVC_FILE = "dvc.yaml"
LOCK_FILE = ".ctune/lock"
JOURNAL_FILE = ".ctune/journal.json"  # an interrupted promote or rollback, resumed by running it again
MARKER_FILE = ".ctune/workspace"
CURRENT_FILE = "CURRENT"  # the served version, written by promote and rollback
BASE_VERSION = "v0"  # the base model, before the first promotion
LOCK_TIMEOUT_S = 600.0
LOCK_POLL_S = 0.2
DVC_LOCK_POLL_S = 0.5

# Folders of DESIGN §2 that exist from day one, so users and stages see the layout before any data arrives.
LAYOUT_DIRS = (
    "incoming",
    "data/accepted",
    "data/quarantine",
    "data/unique",
    "data/scored",
    "data/selected",
    "state",
    "models",
    "reports",
    "eval",
    "world",
)

DVC_CONFIG = """\
[core]
    analytics = false
    autostage = true
    remote = {name}
['remote "{name}"']
    url = {url}
"""

GITIGNORE = """\
# ctune workspace: code-free, data tracked by DVC, small text by git
/dvc-remote/
/.ctune/lock
/.ctune/journal.json
/.airflow/
/models/candidates/
/.lmeval-cache/
*.tmp
__pycache__/
"""


_BATCH_DATE = re.compile(r"^(\s+date:\s*)([^#\s]*)(.*\n?)$")


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def quiet_dvc() -> Iterator[None]:
    """Silence DVC's informational log lines (its CLI hints make no sense inside ctune's own commands)."""
    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        dvc_logger.setLevel(level)


class WorkspaceError(RuntimeError):
    """The directory is not a usable workspace, or a workspace operation cannot proceed; says which and why."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the new one, never a part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files; give them the mode a plain open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` whole, on error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class Workspace:
    """An opened workspace; ``root`` is absolute. Paths are methods so that a date is always explicit."""

    root: Path

    @classmethod
    def open(cls, directory: str | Path) -> Workspace:
        """Open an existing workspace, failing with a message that says what is missing."""
        root = Path(directory).resolve()
        missing = [name for name in (PARAMS_FILE, DVC_FILE, ".dvc", ".git") if not (root / name).exists()]
        if missing:
            raise WorkspaceError(
                f"{root} is not a ctune workspace (missing {', '.join(missing)}); create one with `ctune init {root}`"
            )
        return cls(root)

    @cached_property
    def config(self) -> CtuneConfig:
        from ctune_ops.config import load_config

        return load_config(self.root / PARAMS_FILE)

    def reload(self) -> Workspace:
        """A fresh handle whose config is read again from disk."""
        return Workspace(self.root)

    # -- layout ---------------------------------------------------------------------------------------------
    def incoming(self, date: str) -> Path:
        return self.root / "incoming" / date

    def accepted(self, date: str) -> Path:
        return self.root / "data" / "accepted" / f"{date}.jsonl"

    def quarantine(self, date: str) -> Path:
        return self.root / "data" / "quarantine" / f"{date}.jsonl"

    def unique(self, date: str) -> Path:
        return self.root / "data" / "unique" / f"{date}.jsonl"

    def scored(self, date: str) -> Path:
        return self.root / "data" / "scored" / f"{date}.parquet"

    def selected(self, date: str) -> Path:
        return self.root / "data" / "selected" / f"{date}.jsonl"

    def reports(self, date: str) -> Path:
        return self.root / "reports" / date

    def candidates(self, date: str) -> Path:
        return self.root / "models" / "candidates" / date

    def report(self, date: str, name: str) -> dict[str, Any]:
        """The JSON report ``reports/<date>/<name>``; {} when that stage has not written it."""
        path = self.reports(date) / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    @property
    def current_version(self) -> str:
        """The version in production (the ``CURRENT`` file); ``v0``, the base model, before any promotion."""
        path = self.root / CURRENT_FILE
        return path.read_text(encoding="utf-8").strip() if path.exists() else BASE_VERSION

    @property
    def history_db(self) -> Path:
        return self.root / "state" / "history.sqlite"

    @property
    def world_dir(self) -> Path:
        """The demo world's knowledge base, corpus and ground truth; the pipeline never reads ``world/truth``."""
        return self.root / "world"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def shown(self, path: str | Path) -> str:
        """``path`` as reports and messages show it: relative to the workspace when inside it, else as given
        (so a report does not depend on where the workspace is mounted)."""
        path = Path(path)
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def model_path(self, spec: str) -> str:
        """A models.* value as a loadable location: workspace-relative paths become absolute, hub ids stay."""
        candidate = Path(spec) if os.path.isabs(spec) else self.root / spec
        return str(candidate) if candidate.exists() else spec

    # -- locking --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, timeout_s: float = LOCK_TIMEOUT_S, purpose: str = "") -> Iterator[None]:
        """Hold the workspace lock; everything that runs DVC or git here takes it, so they never interleave.

        DVC's own repo lock fails at once when taken; this one waits up to ``timeout_s`` and then fails with a
        message naming the holder, so two tasks on one workspace queue instead of corrupting it.
        """
        path = self.root / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+", encoding="utf-8") as handle:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        handle.seek(0)
                        holder = handle.read().strip() or "unknown"
                        raise WorkspaceError(
                            f"workspace {self.root} is locked by {holder}; waited {timeout_s:.0f}s"
                        ) from None
                    time.sleep(LOCK_POLL_S)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} {purpose}".strip())
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def set_batch_date(self, date: str) -> bool:
        """Write ``batch.date: "date"`` into params.yaml (what ``${batch.date}`` in dvc.yaml reads), keeping the
        file's comments and layout; returns False when it already says so."""
        path = self.root / "params.yaml"
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        in_batch = False
        for number, line in enumerate(lines):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not line[0].isspace():
                in_batch = line.split("#")[0].strip() == "batch:"
                continue
            match = _BATCH_DATE.match(line)
            if in_batch and match:
                new = f'{match.group(1)}"{date}"{match.group(3)}'
                if new == line:
                    return False
                lines[number] = new
                atomic_write_text(path, "".join(lines))
                self.__dict__.pop("config", None)  # the cached config no longer matches the file
                return True
        raise WorkspaceError(f"{path}: no 'date:' key under 'batch:'; add `batch:\n  date: null` (DVC's "
                             "${batch.date} reads it)")

    # -- git ------------------------------------------------------------------------------------------------
    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run git in the workspace as the configured committer."""
        cfg = self.config.workspace
        env = {
            **os.environ,
            "GIT_AUTHOR_NAME": cfg.git_user_name,
            "GIT_AUTHOR_EMAIL": cfg.git_user_email,
            "GIT_COMMITTER_NAME": cfg.git_user_name,
            "GIT_COMMITTER_EMAIL": cfg.git_user_email,
        }
        result = subprocess.run(
            ["git", *args], cwd=self.root, env=env, capture_output=True, text=True, check=False
        )
        if check and result.returncode != 0:
            raise WorkspaceError(f"git {' '.join(args)} failed in {self.root}: {result.stderr.strip()}")
        return result

    def commit(self, message: str, paths: list[str]) -> bool:
        """Stage ``paths`` and commit them; returns False when nothing changed."""
        self.git("add", "--", *paths)
        if self.git("diff", "--cached", "--quiet", check=False).returncode == 0:
            return False
        self.git("commit", "-q", "-m", message)
        return True

    def run_dvc(self, action: str, operation: Callable[[Any], Any], timeout_s: float = LOCK_TIMEOUT_S) -> Any:
        """``operation(repo)`` on the workspace's DVC repo, waiting while DVC's own lock is held.

        DVC's repository lock fails at once when another DVC process holds it (a user's ``dvc status``, a crashed
        command's leftover); the operations ctune runs are idempotent, so one is retried until ``timeout_s`` and
        then fails naming the lock file. Any other DVC failure becomes a WorkspaceError naming ``action``.
        """
        from dvc.lock import LockError
        from dvc.repo import Repo

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # DVC resolves stages and targets against the working directory, not the repo it was given
                with quiet_dvc(), contextlib.chdir(self.root), Repo(str(self.root)) as repo:
                    return operation(repo)
            except LockError:
                if time.monotonic() >= deadline:
                    raise WorkspaceError(
                        f"dvc {action}: DVC's repository lock {self.root / '.dvc/tmp/lock'} is held by another DVC "
                        f"process; waited {timeout_s:.0f}s. If no DVC command is running there, the lock is stale: "
                        "delete that file and run the command again") from None
                time.sleep(DVC_LOCK_POLL_S)
            except Exception as exc:  # DVC raises many exception types; each means the operation did not happen
                raise WorkspaceError(f"dvc {action} failed in {self.root}: {exc}") from exc

    def dvc_add(self, targets: list[str]) -> list[str]:
        """``dvc add`` the targets (folders or files); returns the .dvc files to commit with git."""
        paths = [str(self.root / t) for t in targets]
        self.run_dvc(f"add {' '.join(targets)}", lambda repo: repo.add(paths))
        return [f"{t}.dvc" for t in targets] + [str(Path(t).parent / ".gitignore") for t in targets]


def resource_text(name: str) -> str:
    """A file shipped in ``ctune_ops/resources`` (the default params.yaml and dvc.yaml)."""
    return resources.files("ctune_ops").joinpath("resources", name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class InitResult:
    workspace: Workspace
    created: bool
    message: str


def _is_workspace(root: Path) -> bool:
    return all((root / name).exists() for name in (PARAMS_FILE, DVC_FILE, ".dvc", ".git", MARKER_FILE))


def init_workspace(directory: str | Path) -> InitResult:
    """Create the git + DVC workspace of DESIGN §2 in ``directory``; on an existing workspace change nothing.

    The new workspace gets the default ``params.yaml`` and ``dvc.yaml``, the folder layout, a ``.gitignore``,
    a local DVC remote at ``dvc-remote/`` inside it (set as default) and a first commit. It is built in a
    temporary sibling folder and moved into place at the end, so a failure leaves nothing half made.
    """
    root = Path(directory).resolve()
    if _is_workspace(root):
        return InitResult(Workspace(root), False, f"{root} is already a ctune workspace; nothing changed")
    if root.exists() and not root.is_dir():
        raise WorkspaceError(f"{root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        raise WorkspaceError(
            f"{root} exists, is not empty and is not a ctune workspace; choose an empty or new directory"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.", suffix=".init") as tmp:
        build = Path(tmp) / "ws"
        remote_url = _lay_out(build)
        if root.exists():
            root.rmdir()
        build.rename(root)
    return InitResult(Workspace(root), True, f"created ctune workspace {root} (DVC remote: {remote_url})")


def _lay_out(root: Path) -> str:
    """Write a complete workspace into the empty folder ``root``; returns the DVC remote's URL."""
    root.mkdir()
    atomic_write_text(root / PARAMS_FILE, resource_text("params.yaml"))
    atomic_write_text(root / DVC_FILE, resource_text("dvc.yaml"))
    atomic_write_text(root / ".gitignore", GITIGNORE)
    for rel in LAYOUT_DIRS:  # no placeholder files: DVC refuses to track folders that git already tracks
        (root / rel).mkdir(parents=True, exist_ok=True)
    ws = Workspace(root)
    settings = ws.config.workspace  # fails before any git/DVC work if the shipped params are broken
    ws.git("init", "-q", "-b", "main")

    from dvc.repo import Repo

    remote_url = settings.dvc_remote_url
    if not os.path.isabs(remote_url) and "://" not in remote_url:
        (root / remote_url).mkdir(parents=True, exist_ok=True)
        remote_url = os.path.join("..", remote_url)  # DVC resolves local remotes relative to .dvc/
    with quiet_dvc(), Repo.init(str(root)):
        pass
    with open(root / ".dvc" / "config", "a", encoding="utf-8") as handle:  # written as text: no path rewriting
        handle.write(DVC_CONFIG.format(name=settings.dvc_remote_name, url=remote_url))
    atomic_write_text(root / MARKER_FILE, "ctune workspace\n")
    ws.commit("ctune init: workspace layout, params.yaml, dvc.yaml, DVC with a local remote", ["."])
    return remote_url
