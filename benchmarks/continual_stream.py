"""The headline experiment (issue 8): compute saved versus accuracy, ctune against no filter, a static proxy and
random selection, on the demo world's stream. The same as ``ctune experiment``; see ``ctune_ops/experiment.py``.

    .venv/bin/python benchmarks/continual_stream.py                        # 7 days, demo sizes
    .venv/bin/python benchmarks/continual_stream.py --small                # 2 days, small world (CI)

Writes ``<workspace>/reports/experiment/`` (results.json, results.md, PNG plots); the arms' workspaces go beside
the base workspace (``<workspace>-arms/``).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ctune_ops.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
