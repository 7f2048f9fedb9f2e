"""PEFT LoRA adapters merged while converting, tensor by tensor, exactly as PEFT's ``merge_and_unload()``.

Reading and planning, from ``adapter_config.json`` and safetensors headers only. A merged tensor is a
``Computed`` part that the engine's writer thread evaluates (:mod:`rmconvert.engine.lora_merge`, which imports
torch, only when an adapter is given). Tensors the adapter saved whole (``modules_to_save``: the score head,
``embed_tokens``, biases) replace the base's, byte for byte.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from ..dtypes import FLOAT_DTYPES
from ..errors import CheckpointError
from ..families.layout import Layout
from ..io.safetensors import Computed, OutTensor, TensorInfo
from ..sources.adapter import Adapter
from ..sources.checkpoint import Checkpoint, read_json, text_config
from .lora_merge import Delta, merged_bytes, read_range

PREFIX = "base_model.model."
HEAD = "score.weight"
TOKENIZER = "tokenizer.json"
#: Families whose transformer blocks are GPT-2 ``Conv1D`` layers (weights stored [in, out]); PEFT then
#: merges with ``fan_in_fan_out=True`` whatever the config says, and with False for ``nn.Linear``.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "decision_transformer", "imagegpt")
#: A modules_to_save copy under its wrapper's name, with the adapter's name when saved from memory
#: (``score.modules_to_save.default.weight``): the tensor it replaces is ``score.weight``.
MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.(?:[^.]+\.(?=[^.]+$))?")
LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_[AB]|lora_magnitude_vector)"
)


def pattern_key(patterns, name: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``name`` at a dot, else ``name``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def targeted(target_modules, name: str) -> bool:
    """Whether PEFT's ``target_modules`` (a regex string, a list of names, or all-linear) selects ``name``."""
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules or ())


def scaling(config: dict, module: str) -> tuple[int, float]:
    """(r, scaling) of ``module``: ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA, after the patterns."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(pattern_key(ranks, module), config["r"])
    alpha = alphas.get(pattern_key(alphas, module), config["lora_alpha"])
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@dataclass
class Merge:
    """What an adapter does to a base checkpoint: tensors merged, tensors replaced whole, the head."""

    adapter: Adapter
    checkpoint: Checkpoint  # the base as the engine should see it (replaced tensors, their sizes)
    parts: dict[str, OutTensor]  # base tensor name -> the merged or replaced tensor
    merged: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    head: str | None = None  # "adapter" when the score head comes from the adapter

    def warnings(self, base: Path) -> list[str]:
        """A tokenizer saved with the adapter that differs from BASE's: the output keeps BASE's."""
        ours, theirs = self.adapter.path / TOKENIZER, base / TOKENIZER
        if ours.is_file() and theirs.is_file() and ours.read_bytes() != theirs.read_bytes():
            problem = "the reward model has BASE's: if the adapter was trained with added tokens (a pad), convert"
            return [f"{ours} differs from BASE's {TOKENIZER}; {problem} a copy of BASE holding the adapter's tokenizer"]
        return []

    def report(self, hashes: dict[str, str] | None) -> dict:
        entry = {
            "path": str(self.adapter.path),
            "task_type": self.adapter.task_type,
            "merged": len(self.merged),
            "replaced": self.replaced,
            "head": self.head,
            "config": self.adapter.config,
        }
        if hashes is not None:
            entry["files"] = hashes
        return entry


def _locator(ckpt: Checkpoint, layout: Layout) -> Callable[[str], str | None]:
    """PEFT's module path + ``.weight`` (or ``.bias``) -> the base tensor it loads into, or None. A text family:
    the name itself or without its first part (``transformer.h.0...`` or ``h.0...``); a composite family: the
    tensor transformers loads as the same key (adapters name released, canonical or in-memory modules)."""
    if layout.load_name is not None:
        keys = {layout.load_name(n): n for n in ckpt.tensors}
        return lambda name: keys.get(layout.load_name(name))

    def base_name(name: str) -> str | None:
        short = name.split(".", 1)[1] if "." in name else None
        return name if name in ckpt.tensors else short if short in ckpt.tensors else None

    return base_name


def _model_module(layout: Layout, module: str) -> str:
    """The module's name in the model PEFT wraps (what ``target_modules`` and the patterns are matched against)."""
    return layout.load_name(module + ".weight").removesuffix(".weight") if layout.load_name else module


def _fits(adapter: Adapter, message: str, key: str) -> CheckpointError:
    return CheckpointError(f"{key}: {message}", adapter.weights)


def _deltas(adapter: Adapter, ckpt: Checkpoint, layout: Layout) -> dict[str, tuple[str, Delta]]:
    """Base tensor name -> (adapter module, update), every shape checked against the base and the config."""
    groups: dict[str, dict[str, TensorInfo]] = {}
    for key, info in adapter.tensors.items():
        match = LORA_KEY.fullmatch(key)
        if match and key.startswith(PREFIX):
            groups.setdefault(match["module"][len(PREFIX) :], {})[match["kind"]] = info
    config, conv1d = adapter.config, ckpt.model_type in CONV1D_MODEL_TYPES
    base_name = _locator(ckpt, layout)
    out: dict[str, tuple[str, Delta]] = {}
    for module, found in sorted(groups.items()):
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a = found.get("lora_embedding_A" if embedding else "lora_A.weight")
        b = found.get("lora_embedding_B" if embedding else "lora_B.weight")
        key = PREFIX + module
        if a is None or b is None:
            raise _fits(adapter, "has only one of LoRA's A and B", key)
        if not targeted(config.get("target_modules"), _model_module(layout, module)):
            raise _fits(adapter, "holds LoRA weights for a module that target_modules does not name", key)
        if len(a.shape) != 2 or len(b.shape) != 2 or a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
            raise _fits(
                adapter, f"A {a.dtype}{list(a.shape)} and B {b.dtype}{list(b.shape)} are not float matrices", key
            )
        r, scale = scaling(config, _model_module(layout, module))
        if a.shape[0] != b.shape[1]:
            raise _fits(adapter, f"A has rank {a.shape[0]} but B has rank {b.shape[1]}", key)
        if a.shape[0] != r:
            raise _fits(adapter, f"A and B have rank {a.shape[0]} but adapter_config.json gives r={r}", key)
        name = base_name(module + ".weight")
        if name is None and module.endswith("lm_head") and text_config(ckpt.config).get("tie_word_embeddings"):
            raise _fits(adapter, "LoRA on a tied lm_head changes the input embedding too: merge it with PEFT", key)
        if name is None:
            raise _fits(adapter, f"BASE has no tensor {module}.weight: is the adapter for another model?", key)
        weight = ckpt.tensors[name]
        transposed = embedding or (conv1d and not module.startswith(("lm_head", "score")))
        update = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if weight.shape != update:
            raise _fits(
                adapter,
                f"the update is {list(update)} but BASE's {name} is {list(weight.shape)}:"
                " the adapter does not fit this model",
                key,
            )
        if weight.dtype not in FLOAT_DTYPES:
            raise _fits(adapter, f"BASE's {name} has dtype {weight.dtype}", key)
        magnitude = found.get("lora_magnitude_vector")
        if bool(config.get("use_dora")) != (magnitude is not None):
            raise _fits(adapter, "use_dora in adapter_config.json and the DoRA magnitude vector disagree", key)
        if magnitude is not None:
            if embedding:
                raise _fits(adapter, "DoRA on an embedding is not merged by rmconvert: merge it with PEFT", key)
            rows = weight.shape[1] if transposed else weight.shape[0]
            if magnitude.shape != (rows,) or magnitude.dtype not in FLOAT_DTYPES:
                raise _fits(adapter, f"the DoRA magnitude is {list(magnitude.shape)}, not [{rows}]", key)
        out[name] = (module, Delta(a, b, scale, transposed, magnitude))
        if "lora_B.bias" in found:
            bias, lora_bias = base_name(module + ".bias"), found["lora_B.bias"]
            if bias is None:
                raise _fits(adapter, "has a LoRA bias (lora_bias) but BASE's layer has no bias", key)
            base_bias = ckpt.tensors[bias]
            floats = lora_bias.dtype in FLOAT_DTYPES and base_bias.dtype in FLOAT_DTYPES
            if lora_bias.shape != (b.shape[0],) or base_bias.shape != lora_bias.shape or not floats:
                raise _fits(
                    adapter,
                    f"the LoRA bias is {lora_bias.dtype}{list(lora_bias.shape)} but BASE's {bias} is"
                    f" {base_bias.dtype}{list(base_bias.shape)}: the adapter does not fit this model",
                    key,
                )
            out[bias] = (module, Delta(a, lora_bias, scale, False))  # DoRA leaves the bias as LoRA does
    return out


def _check_targets(adapter: Adapter, ckpt: Checkpoint, layout: Layout) -> None:
    """Every target_modules entry must name a module of BASE (under its name on disk or in the model)."""
    target = adapter.config.get("target_modules")
    names = set(ckpt.tensors) | ({layout.load_name(n) for n in ckpt.tensors} if layout.load_name else set())
    modules = {n.rsplit(".", 1)[0] for n in names if "." in n}
    modules |= {m.split(".", 1)[1] for m in modules if "." in m}
    if isinstance(target, list):
        for entry in target:
            if not isinstance(entry, str) or not any(targeted([entry], m) for m in modules):
                raise CheckpointError(f"target_modules entry {entry!r} matches no tensor of BASE", adapter.config_path)
    elif isinstance(target, str) and target != "all-linear":
        try:
            matched = any(targeted(target, m) for m in modules)
        except re.error as exc:
            raise CheckpointError(f"target_modules {target!r} is not a regex: {exc}", adapter.config_path) from None
        if not matched:
            raise CheckpointError(f"target_modules {target!r} matches no tensor of BASE", adapter.config_path)


def _check_model_type(adapter: Adapter, ckpt: Checkpoint) -> None:
    """An adapter trained on a local base of another model_type is refused before its shapes are looked at."""
    name = adapter.config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name or not (Path(name) / "config.json").is_file():
        return
    trained = read_json(Path(name) / "config.json", required=False) or {}
    if isinstance(trained.get("model_type"), str) and trained["model_type"] != ckpt.model_type:
        raise CheckpointError(
            f"the adapter was trained on a {trained['model_type']} model ({name}) but BASE is {ckpt.model_type}",
            adapter.config_path,
        )


def plan_merge(adapter: Adapter, ckpt: Checkpoint, layout: Layout) -> Merge:
    """What merging ``adapter`` into ``ckpt`` (whose layout is ``layout``) writes, planned from headers; raises
    CheckpointError on a misfit."""
    embedding = layout.embedding
    _check_model_type(adapter, ckpt)
    _check_targets(adapter, ckpt, layout)
    base_name = _locator(ckpt, layout)
    tensors, config = dict(ckpt.tensors), ckpt.config
    parts: dict[str, OutTensor] = {}
    replaced, head = [], None
    for key, info in sorted(adapter.tensors.items()):
        if not key.startswith(PREFIX) or LORA_KEY.fullmatch(key):
            if not key.startswith(PREFIX):
                raise _fits(adapter, f"is not a tensor of a PEFT model (names start with {PREFIX!r})", key)
            continue
        if ".original_module." in key:  # the base's layer beside a modules_to_save copy, which replaces it
            continue
        # a targeted layer saved whole, or the modules_to_save copy under its wrapper's name
        module_key = MODULES_TO_SAVE.sub(".", key[len(PREFIX) :].replace(".base_layer.", "."))
        if ".lora_" in module_key:
            raise _fits(adapter, "is a LoRA tensor rmconvert does not merge", key)
        if module_key == HEAD:
            if len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
                raise _fits(adapter, f"the score head is {info.dtype}{list(info.shape)}", key)
            tensors[HEAD] = replace(info, name=HEAD)
            head = "adapter"
            continue
        name = base_name(module_key)
        if name is None:
            raise _fits(adapter, f"BASE has no tensor {module_key}: is the adapter for another model?", key)
        base = ckpt.tensors[name]
        grows = name == embedding and len(info.shape) == 2 and info.shape[1:] == base.shape[1:]
        if info.shape != base.shape and not grows or info.dtype != base.dtype and info.dtype not in FLOAT_DTYPES:
            raise _fits(adapter, f"is {list(info.shape)} but BASE's {name} is {list(base.shape)}", key)
        tensors[name] = replace(info, name=name)
        parts[name] = OutTensor.copy_of(tensors[name])
        replaced.append(name)
        if name == embedding and info.shape[0] != base.shape[0]:
            config = {**config}
            if "text_config" in config and isinstance(config["text_config"], dict):
                config["text_config"] = {**config["text_config"]}
            text_config(config)["vocab_size"] = info.shape[0]
    if adapter.task_type == "SEQ_CLS":
        if head is None and (layout.head is None or layout.head.kind == "value"):
            raise CheckpointError(
                "a SEQ_CLS adapter without its score head (modules_to_save) on a causal-LM base: the trained"
                " head is not in the adapter and cannot be recovered (save the adapter with"
                ' modules_to_save=["score"], or give the reward model it was trained on as BASE)',
                adapter.weights,
            )
        if head is not None:  # the adapter's head defines the labels
            config = {k: v for k, v in config.items() if k not in ("id2label", "label2id", "num_labels")}
    # onto the tensors the adapter saved whole: LoRA on embed_tokens of a resized vocabulary saves its base layer
    deltas = _deltas(adapter, replace(ckpt, config=config, tensors=tensors), layout)
    for name, (_, delta) in deltas.items():
        base = tensors[name]
        parts[name] = OutTensor(
            name, base.dtype, base.shape, (Computed(partial(merged_bytes, base, delta), base.nbytes),)
        )
    merge = Merge(adapter, replace(ckpt, config=config, tensors=tensors), parts, sorted(deltas), sorted(replaced), head)
    return merge


def tensor_bytes(tensor: OutTensor) -> bytes:
    """All bytes of a planned tensor (byte ranges read, computed parts computed), for validate."""
    from ..io.safetensors import ByteRange, materialize

    chunks = [
        read_range(p.path, p.offset, p.length) if isinstance(p, ByteRange) else materialize(p) for p in tensor.parts
    ]
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
