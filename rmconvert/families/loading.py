"""Load a reward model with transformers, including architectures transformers has no class for."""

from __future__ import annotations

from pathlib import Path

from ..sources.checkpoint import read_config
from .host import Registry, load_registry
from .target import AUTO_CLASS, task_of_config


def register_classes(path: str | Path, registry: Registry | None = None) -> type:
    """Make ``AutoModelForSequenceClassification`` (``AutoModelForTokenClassification`` for a value model or a
    PRM) load the checkpoint at ``path``; returns its class."""
    config = read_config(Path(path))
    registered = (registry or load_registry()).resolve(config["model_type"], "auto", Path(path) / "config.json")
    return registered.architecture.register_with_transformers(config["model_type"], task_of_config(config))


def load_reward_model(path: str | Path, **kwargs):
    """``AutoModelForSequenceClassification.from_pretrained(path, **kwargs)`` after registering the
    sequence-classification class the checkpoint's architecture plugin provides (OLMoE, OLMo 2 on 4.x, ...);
    ``AutoModelForTokenClassification`` for a token classifier (``--head value`` or ``prm``)."""
    import transformers

    from .modeling import kept_class

    config, registry = read_config(Path(path)), kwargs.pop("registry", None)
    kept = kept_class(config)
    if kept is not None:  # a kept MLP head: rmconvert's class by name (no auto class holds it)
        return kept.from_pretrained(path, **kwargs)
    register_classes(path, registry)
    auto = getattr(transformers, AUTO_CLASS[task_of_config(config)])
    return auto.from_pretrained(path, **kwargs)


def fresh_weights(model):
    """``model`` in eval mode with freshly allocated weights. transformers may leave weights as views of the mapped
    files, where CPU kernels pick their code path by address alignment (MKL on AVX2 rounds a 1-row head
    differently 8 bytes off a 16-byte boundary): comparing two models' outputs, give both fresh weights so that only
    their values are compared."""
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
    return model.eval()
