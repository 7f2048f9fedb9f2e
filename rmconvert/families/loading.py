"""Load a reward model with transformers, including architectures transformers has no class for."""

from __future__ import annotations

from pathlib import Path

from ..sources.checkpoint import read_config
from .host import Registry, load_registry


def register_classes(path: str | Path, registry: Registry | None = None) -> type:
    """Make ``AutoModelForSequenceClassification`` load the checkpoint at ``path``; returns its class."""
    config = read_config(Path(path))
    registered = (registry or load_registry()).resolve(config["model_type"], "auto", Path(path) / "config.json")
    return registered.architecture.register_with_transformers(config["model_type"])


def load_reward_model(path: str | Path, **kwargs):
    """``AutoModelForSequenceClassification.from_pretrained(path, **kwargs)`` after registering the
    sequence-classification class the checkpoint's architecture plugin provides (OLMoE, OLMo 2 on 4.x, ...)."""
    from transformers import AutoModelForSequenceClassification

    from .modeling import build_kept_class, is_kept

    config = read_config(Path(path))
    if is_kept(config):  # a kept MLP head (Qwen2ForRewardModel, ...): rmconvert's class, whatever the family's
        kwargs.pop("registry", None)
        return build_kept_class(config["model_type"]).from_pretrained(path, **kwargs)
    register_classes(path, kwargs.pop("registry", None))
    return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
