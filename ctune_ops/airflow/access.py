"""How a ctune operator reaches its workspace when it runs: open it, and how long to wait for its lock.

Both import the workspace module inside the call: the operator modules that use them are imported by DAG files
on every parse, which need neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctune_ops.workspace import Workspace


def open_workspace(path: str) -> Workspace:
    """The workspace at ``path`` (the operator's rendered ``workspace`` field); fails clearly when there is none."""
    from ctune_ops.workspace import Workspace

    return Workspace.open(path)


def lock_timeout(seconds: float | None) -> float:
    """The workspace lock's wait: the operator's ``lock_timeout_s``, else the workspace default."""
    from ctune_ops.workspace import LOCK_TIMEOUT_S

    return LOCK_TIMEOUT_S if seconds is None else seconds
