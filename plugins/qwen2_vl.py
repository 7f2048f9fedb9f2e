"""Qwen2-VL and Qwen2.5-VL (and Skywork-VL-Reward, ms-swift ``seq_cls`` outputs of them), described without
transformers, so that converting one imports neither torch nor transformers.

The ``composite`` plugin learns the same layout from transformers' own classes; ``tests/test_vlm_static.py``
holds the two to the same layout and the same output, byte for byte. Releases keep ``model.*`` (the language
model) + ``visual.*`` (the vision tower and its merger), which a ``*ForSequenceClassification`` would load as
random weights: they are written as ``model.language_model.*`` / ``model.visual.*``, what transformers itself
writes for these families.
"""

import re
from collections import defaultdict

from rmconvert import hookimpl
from rmconvert.errors import CheckpointError
from rmconvert.families.architecture import Architecture
from rmconvert.families.layout import Layout
from rmconvert.families.target import SEQUENCE
from rmconvert.plugins.composite import Composite
from rmconvert.sources.checkpoint import text_config

CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForSequenceClassification", "qwen2_vl": "Qwen2VLForSequenceClassification"}
LANGUAGE_MODEL, VISION = "model.language_model.", "model.visual."
EMBEDDING = LANGUAGE_MODEL + "embed_tokens.weight"
#: Released names -> the names the reward class loads.
RELEASED = {"model.": LANGUAGE_MODEL, "visual.": VISION}
#: Per part of the backbone: its layers' prefix, the config giving their number, the tensors outside the layers.
PARTS = {
    LANGUAGE_MODEL: ("layers", "num_hidden_layers", ("embed_tokens.weight", "norm.weight")),
    VISION: ("blocks", "depth", ("patch_embed.", "merger.")),
}


class Qwen2VL(Composite):
    name = "qwen2_vl"
    model_types = tuple(CLASSES)
    fallback = False
    claims = Architecture.claims

    def class_name(self, model_type, task=SEQUENCE):
        return CLASSES[model_type] if task == SEQUENCE else super().class_name(model_type, task)

    def _layout(self, ckpt, base: Layout) -> Layout:
        released = "model.embed_tokens.weight" in ckpt.tensors
        lm_head = {n for n in ckpt.tensors if n.startswith("lm_head.")}
        kept = {n: _renamed(n) if released else n for n in ckpt.tensors if n not in base.dropped | lm_head}
        _check_backbone(ckpt, kept)
        return Layout(
            **{
                **base.__dict__,
                "embedding": next(n for n, k in kept.items() if k == EMBEDDING),
                "lm_head": frozenset(lm_head),
                "dropped": base.dropped | lm_head,
                "renamed": {n: k for n, k in kept.items() if n != k},
                "load_name": _load_name,
            }
        )


def _renamed(name: str) -> str:
    return next((new + name[len(old) :] for old, new in RELEASED.items() if name.startswith(old)), name)


def _load_name(name: str) -> str:
    """The key a released or canonical name loads as (what a LoRA adapter's module names are matched by)."""
    return name if name.startswith((LANGUAGE_MODEL, VISION)) else _renamed(name)


def _check_backbone(ckpt, kept: dict[str, str]) -> None:
    """Every kept tensor is one of the language model's or the vision tower's, their layers are all there (as
    the config counts them) with the same tensors each, and so are the tensors outside the layers."""
    counts = {LANGUAGE_MODEL: text_config(ckpt.config).get("num_hidden_layers")}
    counts[VISION] = (ckpt.config.get("vision_config") or {}).get("depth")
    for part, (layers, field, outside) in PARTS.items():
        pattern = re.compile(rf"{re.escape(part)}{layers}\.(\d+)\.(.+)")
        per_layer, rest = defaultdict(set), set()
        for key in (k for k in kept.values() if k.startswith(part)):
            found = pattern.fullmatch(key)
            if found:
                per_layer[int(found[1])].add(found[2])
            else:
                rest.add(key[len(part) :])
        problem = None
        if set(per_layer) != set(range(counts[part] or 0)):
            problem = f"{part}{layers}: {len(per_layer)} layers, config.json's {field} is {counts[part]}"
        elif len({frozenset(s) for s in per_layer.values()}) > 1:
            problem = f"{part}{layers}: the layers hold different tensors (a layer cut short?)"
        elif missing := [o for o in outside if not any(r.startswith(o) for r in rest)]:
            problem = f"no tensor {part}{missing[0]}* (a backbone cut short?)"
        elif odd := sorted(r for r in rest if not r.startswith(outside)):
            problem = f"{part}{odd[0]} is no tensor of {ckpt.model_type}"
        if problem:
            raise CheckpointError(problem, ckpt.path)
    odd = sorted(n for n, k in kept.items() if not k.startswith(tuple(PARTS)))
    if odd:
        raise CheckpointError(f"{odd[0]!r} is no tensor of {ckpt.model_type}'s backbone", ckpt.path)


@hookimpl
def rmconvert_register_architectures(register):
    register(Qwen2VL())
