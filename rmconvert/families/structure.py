"""A family's checkpoint layout, read from transformers itself: the causal-LM class built on the meta device.

transformers knows where each family keeps its input embedding (``get_input_embeddings``), its output head(s)
(``get_output_embeddings``, the tied-weight keys), its backbone (``base_model_prefix``) and which checkpoint keys
it renames on load (transformers 5: the conversion mapping; 4.57: ``_checkpoint_conversion_mapping`` and the
legacy gamma/beta renames). :func:`structure` builds the class from the checkpoint's config without memory or
weights and never with remote code; the generic plugin decides from it what is backbone, what is dropped and
where the vocabulary lives. Imported only for families without a specific plugin (it imports torch).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache, lru_cache

from ..errors import CheckpointError, summary


@contextmanager
def quiet_transformers():
    """No progress bars ("Loading weights") or warnings from transformers in validate's report; the loading
    info and exceptions carry what matters. Restores the caller's settings."""
    from transformers.utils import logging

    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


class StructureError(CheckpointError):
    """transformers cannot build the family's causal-LM class from this config."""


@dataclass(frozen=True)
class Structure:
    """What the causal-LM class of a family says about its checkpoints, in the model's own key names."""

    model_type: str
    causal_lm: str  # the class name
    prefix: str  # the backbone's module (``base_model_prefix``)
    embedding: str  # the input embedding's weight
    heads: frozenset[str]  # the output head(s)' parameters, tied or not
    keys: frozenset[str]  # every key of the causal LM's state dict
    rename: Callable[[str], str]  # a checkpoint key -> the key transformers loads it as
    vocab_tables: tuple[str, ...] = ()  # composite: other tables indexed by token id (Gemma 4's per-layer one)
    ignored: tuple[str, ...] = ()  # patterns of checkpoint keys the class ignores on load (Qwen 3.5's mtp.*)
    shapes: dict | None = None  # key -> shape of the class's state dict (only where asked: text-only views)
    split: Callable[[str], tuple[str, ...]] = lambda key: ()  # a renamed key -> the others its converter makes

    def targets(self, key: str) -> tuple[str, ...]:
        """Every key a checkpoint key loads as: its :attr:`rename`, and the rest of a fused tensor's split."""
        return (renamed := self.rename(key), *self.split(renamed))

    def in_backbone(self, model_key: str) -> bool:
        return model_key.startswith(self.prefix + ".") and model_key not in self.heads


def _module_names(model) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules(remove_duplicate=False)}


def _splitter(model) -> Callable[[str], tuple[str, ...]]:
    """For a key a one-to-many converter names (its first target, e.g. Kimi K2.5's fused ``wqkv`` as ``q_proj``),
    the keys of its other targets (``k_proj``, ``v_proj``); transformers 5 only."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return lambda key: ()
    splits = [
        t.target_patterns
        for t in get_model_conversion_mapping(model)
        if isinstance(t, WeightConverter) and len(t.target_patterns) > 1
    ]

    def split(key: str) -> tuple[str, ...]:
        for first, *rest in splits:
            if isinstance(first, str) and first in key:
                return tuple(key.replace(first, other) for other in rest)
        return ()

    return split


def _renamer(model) -> Callable[[str], str]:
    """The key renaming transformers applies when it loads a checkpoint into ``model``."""
    keys = model.state_dict()
    prefix = model.base_model_prefix
    try:  # transformers 5: the conversion mapping (renamings, then at most one converter), prefix added or removed
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4.57: the legacy renames and the class's own mapping
        mapping = dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})

        def rename(key: str) -> str:
            key = model._fix_state_dict_key_on_load(key)[0]
            for pattern, replacement in mapping.items():
                key, n = re.subn(pattern, replacement, key)
                if n:
                    break
            if prefix and key not in keys and f"{prefix}.{key}" in keys:
                key = f"{prefix}.{key}"
            return key

        return rename
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return lambda key: rename_source_key(key, renamings, converters, prefix or None, keys)[0]


@lru_cache(maxsize=32)
def _build(model_type: str, config_json: str, composite: bool = False) -> Structure:
    import torch
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    settings = json.loads(config_json)
    mapping = "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING" if composite else "MODEL_FOR_CAUSAL_LM_MAPPING"
    try:
        with quiet_transformers():  # a meta model warns about what it would do with real weights
            config_class = CONFIG_MAPPING[model_type]
            config = config_class.from_dict(settings)
            cls = getattr(modeling_auto, mapping)[config_class]
            with torch.device("meta"):
                model = cls(config)
    except Exception as exc:  # noqa: BLE001 (whatever transformers raises: the caller falls back, naming it)
        what = "image-text generation class" if composite else "causal LM"
        raise StructureError(f"transformers cannot build {model_type}'s {what}: {summary(exc, 200)}")
    names = _module_names(model)
    embedding = model.get_input_embeddings()
    if names.get(id(embedding)) is None or not hasattr(embedding, "weight"):
        raise StructureError(f"{cls.__name__} has no input embedding module")
    embedding_name = f"{names[id(embedding)]}.weight"
    heads = set()
    output = model.get_output_embeddings()
    if output is not None and id(output) in names:
        heads |= {f"{names[id(output)]}.{k}" for k in output.state_dict()}
    tied = getattr(model, "_tied_weights_keys", None) or ()
    heads |= set(tied)  # transformers 5: {target: source}; 4.57: a list of targets
    heads.discard(embedding_name)
    prefix = model.base_model_prefix
    if not prefix or not hasattr(model, prefix):  # e.g. a class that leaves it empty: the embedding's top module
        prefix = embedding_name.split(".")[0]
    keys = frozenset(model.state_dict())
    tables = ()
    if composite:  # every table indexed by token id: the embedding's module and its siblings of as many rows
        language_model = names[id(embedding)].rpartition(".")[0]
        rows = embedding.weight.shape[0]
        tables = tuple(
            f"{name}.weight"
            for name, module in model.named_modules()
            if name.startswith(language_model + ".")
            and isinstance(module, torch.nn.Embedding)
            and module.weight.shape[0] == rows
            and f"{name}.weight" != embedding_name
        )
    built = Structure(model_type, cls.__name__, prefix, embedding_name, frozenset(heads), keys, _renamer(model))
    ignored = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return (
        replace(built, vocab_tables=tables, ignored=ignored, shapes=shapes, split=_splitter(model))
        if composite
        else replace(built, shapes=shapes)
    )


def settings_key(config: dict) -> tuple[str, str]:
    settings = {k: v for k, v in config.items() if k not in ("auto_map", "architectures")}
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise StructureError("config.json has no model_type")
    try:
        return model_type, json.dumps(settings, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise StructureError(f"config.json cannot be serialised: {exc}") from None


def structure(config: dict, composite: bool = False) -> Structure:
    """The layout of ``config``'s family (cached per model_type and config); StructureError when transformers
    cannot build it. Never runs checkpoint code: ``auto_map`` is ignored, the class is transformers' own.
    ``composite``: the image-text generation class (vision tower + projector + language model) rather than
    the causal LM."""
    return _build(*settings_key(config), composite)


@cache
def classifier_parameters(model_type: str, class_name: str) -> tuple[str, ...] | None:
    """The parameters of transformers' own sequence classifier ``class_name`` outside the backbone (its head),
    built on the meta device from the family's default config; None when it cannot be built so."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        with quiet_transformers(), torch.device("meta"):
            model = getattr(transformers, class_name)(CONFIG_MAPPING[model_type](num_labels=1))
    except Exception:  # noqa: BLE001 (no answer: the caller keeps its default)
        return None
    prefix = model.base_model_prefix
    if not prefix or not hasattr(model, prefix):  # 4.57's Gemma3ForSequenceClassification leaves it empty
        prefix = _module_names(model).get(id(model.get_input_embeddings()), "").split(".")[0]
    return tuple(n for n, _ in model.named_parameters() if not n.startswith(prefix + "."))


def classifier_head(parameters: tuple[str, ...]) -> str | None:
    """The head's weight when the head is one plain linear map (e.g. CTRL's ``classifier.weight``), else None."""
    return parameters[0] if len(parameters) == 1 and parameters[0].endswith(".weight") else None
