"""Loading the proxy that scores today's rows: the promoted one when there is one, else the proxy base.

``models/proxy`` (written at promotion) may hold a full model or a LoRA adapter over ``models.proxy_base``; either
way it loads from safetensors only. The device follows ``models.device`` (``auto``: CUDA when present).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctune_ops.stages import StageError
from ctune_ops.workspace import Workspace

PROMOTED_PROXY = "models/proxy"


@dataclass
class LoadedProxy:
    model: Any
    tokenizer: Any
    path: str
    version: str  # the cache key of everything this proxy computed: production version and where it came from


def pick_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise StageError("params.yaml: key 'models.device': cuda was asked for but torch sees no CUDA device")
    return setting


def proxy_location(ws: Workspace) -> tuple[str, bool]:
    """(where the current proxy is, whether it is a LoRA adapter over models.proxy_base)."""
    promoted = ws.root / PROMOTED_PROXY
    if (promoted / "adapter_config.json").exists():
        return str(promoted), True
    if (promoted / "config.json").exists():
        return str(promoted), False
    base = ws.model_path(ws.config.models.proxy_base)
    if Path(base).is_absolute() and not Path(base).exists():
        raise StageError(f"the proxy model {base} does not exist (models.proxy_base); run `ctune world bootstrap` "
                         "or point models.proxy_base at a model")
    return base, False


def load_scoring_model(base: str, adapter: str | None, device: str) -> tuple[Any, Any]:
    """An fp32 causal LM in eval mode on ``device``, with ``adapter`` (LoRA) merged into ``base`` when given
    (scoring needs no adapter bookkeeping), and the base's tokenizer. Loads safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device).eval(), AutoTokenizer.from_pretrained(base)


def load_proxy(ws: Workspace, threads: int = 0) -> LoadedProxy:
    import torch

    if threads:
        torch.set_num_threads(threads)
    config = ws.config.models
    path, is_adapter = proxy_location(ws)
    base = ws.model_path(config.proxy_base)
    try:
        model, tokenizer = load_scoring_model(base if is_adapter else path, path if is_adapter else None,
                                              pick_device(config.device))
    except OSError as exc:
        raise StageError(f"cannot load the proxy from {path}: {exc}") from None
    return LoadedProxy(model, tokenizer, path, f"{ws.current_version}:{ws.shown(path)}")
