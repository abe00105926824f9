"""Provider metadata for Airflow's ``apache_airflow_provider`` entry point (``airflow providers list``)."""

from __future__ import annotations

from typing import Any

from ctune_ops import __version__

PLUGIN_CLASS = "ctune_ops.airflow.plugin.CtunePlugin"
# where the operators live, for provider listings and docs (Airflow imports none of them from here; the extra
# link reaches the API server through the plugin)
OPERATOR_MODULES = ["ctune_ops.airflow.operators", "ctune_ops.airflow.rollback"]


def get_provider_info() -> dict[str, Any]:
    """The dict Airflow validates against ``provider_info.schema.json``."""
    return {
        "package-name": "ctune",
        "name": "ctune",
        "description": f"Continual instruction tuning for a deployed LLM (ctune {__version__}).",
        "integrations": [
            {
                "integration-name": "ctune",
                "external-doc-url": "https://github.com/ctune/ctune",
                "tags": ["software"],
            }
        ],
        "operators": [{"integration-name": "ctune", "python-modules": OPERATOR_MODULES}],
        "plugins": [{"name": "ctune", "plugin-class": PLUGIN_CLASS}],
    }
