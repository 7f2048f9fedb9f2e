"""The transformers side: find, build and register sequence-classification classes.

Imported only when a model is loaded or a class name must be looked up: transformers is slow to
import and the conversion itself never needs it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache

from ..errors import CheckpointError, summary
from .target import AUTO_CLASS, PROCESS_REWARD_CLASSES, SEQUENCE, SUFFIX, TOKEN, class_of_config, task_of_class


def _mappings():
    from transformers.models.auto import modeling_auto

    return modeling_auto


#: In the causal-LM mapping but not causal: XLNet attends over the whole sequence by default
#: (``attn_type="bi"``), and its classifier is a sequence summary, not a ``score`` head.
BIDIRECTIONAL = {"xlnet"}


def is_decoder_only(model_type: str) -> bool:
    """A text-only model_type with a causal-LM class, no masked-LM or encoder-decoder class (bert and bart have
    a ``*ForCausalLM`` too, but their sequence classifiers are not a ``score`` head on the last token), and a
    sequence classifier or a backbone to build one on. Imports the configuration of ``model_type`` only."""
    auto = _mappings()
    if model_type not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in BIDIRECTIONAL:
        return False
    others = (
        auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
    )
    if any(model_type in names for names in others):
        return False
    native = model_type in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    if not native and not (_backbone_name(model_type) or "").endswith("Model"):
        return False
    return not _nests_models(model_type)


def is_composite(model_type: str) -> bool:
    """An image-text model_type whose generation class is a composite backbone (vision tower + projector +
    language model: transformers' ``*Model``), which its constructor builds as ``self.model`` (where the reward
    class loads it), plus an LM head, with a ``text_config``: a decoder-only vision-language policy a reward model
    can be made of. Not: BLIP, BLIP-2, InstructBLIP and Kosmos-2 (vision model, Q-Former or projection and
    language model side by side: no ``model``), encoder-decoders (Florence-2: ``is_encoder_decoder``; UDOP) and
    families without a composite ``*Model`` (Llama 4)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    auto = _mappings()
    names = getattr(auto, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {})
    if model_type not in names or model_type not in CONFIG_MAPPING:
        return False
    if model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return False
    if not (_backbone_name(model_type) or "").endswith("Model"):
        return False
    init = getattr(getattr(transformers, names[model_type], None), "__init__", None)
    if "model" not in getattr(getattr(init, "__code__", None), "co_names", ()):  # builds no ``self.model``
        return False
    config = CONFIG_MAPPING[model_type]
    if "text_config" not in (getattr(config, "sub_configs", None) or {}):
        return False
    from .structure import quiet_transformers

    try:
        with quiet_transformers():  # a default config may warn about what it lacks
            return not config().is_encoder_decoder
    except Exception:  # noqa: BLE001 (a default config transformers rejects says nothing of the family's shape)
        return True


def composite_model_types() -> set[str]:
    """Every :func:`is_composite` model_type (imports every image-text configuration class)."""
    return {t for t in getattr(_mappings(), "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {}) if is_composite(t)}


def decoder_only_model_types() -> set[str]:
    """Every :func:`is_decoder_only` model_type (imports every configuration class: slow)."""
    return {t for t in _mappings().MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if is_decoder_only(t)}


def _nests_models(model_type: str) -> bool:
    """Whether the config nests other models' configs (vision, audio, a text model inside); MPT's and DBRX's
    ``attn_config``/``ffn_config`` are groups of settings (no model_type of their own), not models."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return False
    subs = (getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {}).values()
    return any(isinstance(sub, str) or getattr(sub, "model_type", None) != "" for sub in subs)


def _backbone_name(model_type: str) -> str | None:
    """The ``AutoModel`` class name of a model_type (the first, where transformers lists several)."""
    names = _mappings().MODEL_MAPPING_NAMES.get(model_type)
    return names[0] if isinstance(names, (tuple, list)) else names


def config_attribute_map(model_type: str) -> dict[str, str]:
    """The config class's aliases (e.g. GPT-2 stores ``hidden_size`` as ``n_embd``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}))
    except KeyError:
        return {}


def native_class_name(model_type: str) -> str | None:
    """The installed transformers' own sequence-classification class name, if it has one."""
    return _mappings().MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)


def reward_class_name(model_type: str) -> str | None:
    """transformers' own sequence classifier of ``model_type`` when its head is one linear map of the backbone's
    output (most families' ``score``, CTRL's ``classifier``): the class a converted causal LM fills completely.
    None without a native class, or when its head holds more (ModernBERT-decoder on transformers 5.24 puts a dense
    layer and a norm before ``classifier``: layers no source holds, which would load random). A class that cannot
    be built from its family's default config (Cohere Compass) is trusted, as its ``score``."""
    from .structure import classifier_head, classifier_parameters

    native = native_class_name(model_type)
    if not native:
        return None
    head = classifier_parameters(model_type, native)
    return native if head is None or classifier_head(head) else None


def class_name(model_type: str, task: str = SEQUENCE) -> str:
    """The class a converted checkpoint of ``model_type`` names for ``task`` (rmconvert.families.target): the
    native one (:func:`reward_class_name`, :func:`token_class_name`), else one named after the backbone class:
    ``<Family>For{Sequence,Token}Classification``, or ``<Family>ScoreFor...`` where transformers' class of that
    name has another head."""
    native = token_class_name(model_type) if task == TOKEN else reward_class_name(model_type)
    if native:
        return native
    backbone = _backbone_name(model_type)
    if not backbone or not backbone.endswith("Model"):
        raise CheckpointError(f"transformers has no backbone class for model_type {model_type!r}")
    mapping = (
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"
        if task == TOKEN
        else "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    )
    other = model_type in getattr(_mappings(), mapping)
    return backbone[: -len("Model")] + ("Score" if other else "") + SUFFIX[task]


def _backbone_classes(model_type: str) -> tuple[type, type]:
    """The family's backbone class (``AutoModel``) and its ``PreTrainedModel`` base."""
    import transformers
    from transformers.modeling_utils import PreTrainedModel

    backbone = getattr(transformers, _backbone_name(model_type))
    return backbone, next(c for c in backbone.__mro__ if PreTrainedModel in c.__bases__)


def backbone_prefix(model_type: str) -> str:
    """Where a ``model_type``'s checkpoints keep the backbone (``model``, ``transformer``, ``gpt_neox``, ...)."""
    return _backbone_classes(model_type)[1].base_model_prefix or "model"  # e.g. Llama 4 leaves it empty


def build_sequence_classification_class(model_type: str, class_name: str, task: str = SEQUENCE) -> type:
    """A :class:`ScoreForSequenceClassification` over the family's backbone: ``<prefix>.*`` + ``score``; with
    ``task="token"`` a :class:`ScoreForTokenClassification` (``score`` with a bias, at every token)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from . import reward_head

    _, pretrained = _backbone_classes(model_type)
    # transformers inspects the defining module's source to decide which attention and experts kernels a
    # class may use: claim the family's module so the backbone computes exactly as the causal LM does.
    namespace = {
        "__module__": pretrained.__module__,
        "base_model_prefix": backbone_prefix(model_type),
        "config_class": CONFIG_MAPPING[model_type],
    }
    return type(class_name, (getattr(reward_head, BUILT_BASE[task]), pretrained), namespace)


#: The class rmconvert builds a family's classifier on, per task.
BUILT_BASE = {SEQUENCE: "ScoreForSequenceClassification", TOKEN: "ScoreForTokenClassification"}
#: Token-level classes with an MLP head, by the name their checkpoints (and vLLM) give them.
PROCESS_REWARD_BASE = {name: "ProcessRewardForTokenClassification" for name in PROCESS_REWARD_CLASSES}

_PROCESS_REWARD: dict[tuple[str, str], type] = {}


def process_reward_class(model_type: str, class_name: str) -> type:
    """The class of a kept MLP-head PRM (``Qwen2ForProcessRewardModel``) over the family's backbone. Not
    registered with an auto class: that would take the family's token classifier's place; loaded by name
    (:func:`rmconvert.load_reward_model`, or ``--portable``'s auto_map)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from . import reward_head

    if (model_type, class_name) not in _PROCESS_REWARD:
        _, pretrained = _backbone_classes(model_type)
        namespace = {
            "__module__": pretrained.__module__,
            "base_model_prefix": backbone_prefix(model_type),
            "config_class": CONFIG_MAPPING[model_type],
        }
        base = getattr(reward_head, PROCESS_REWARD_BASE[class_name])
        _PROCESS_REWARD[model_type, class_name] = type(class_name, (base, pretrained), namespace)
    return _PROCESS_REWARD[model_type, class_name]


_BUILT: dict[tuple[str, str], type] = {}


def _generation_key_mapping(model_type: str) -> dict[str, str]:
    """transformers 4.57's ``_checkpoint_conversion_mapping`` of a vision-language family's generation class
    (none on 5.x, where renames are keyed by model_type and apply to any class)."""
    auto = _mappings()
    name = getattr(auto, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {}).get(model_type)
    if not name:
        return {}
    import transformers

    return dict(getattr(getattr(transformers, name, None), "_checkpoint_conversion_mapping", None) or {})


def reward_class(model_type: str) -> type:
    """The reward class of ``model_type`` as transformers' own loading sees it: transformers' class
    (:func:`reward_class_name`), else the built one without the renames registration adds on 4.57, so that a
    converted checkpoint's names load on every transformers version (not registered here)."""
    import transformers

    native = reward_class_name(model_type)
    if native:
        return getattr(transformers, native)
    return build_sequence_classification_class(model_type, class_name(model_type))


def register_sequence_classification_class(model_type: str, class_name: str) -> type:
    """Register a class for ``model_type`` with ``AutoModelForSequenceClassification`` unless transformers' own
    is the reward class (:func:`reward_class_name`); a native class with another head is overridden."""
    return _register(model_type, class_name, SEQUENCE)


def register_token_classification_class(model_type: str, class_name: str) -> type:
    """Register a class for ``model_type`` with ``AutoModelForTokenClassification`` unless transformers' own is
    one linear map with a bias (:func:`token_class_name`)."""
    return _register(model_type, class_name, TOKEN)


def _register(model_type: str, class_name: str, task: str) -> type:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    native = reward_class_name(model_type) if task == SEQUENCE else token_class_name(model_type)
    if native:
        return getattr(transformers, native)
    if (model_type, task) not in _BUILT:
        cls = build_sequence_classification_class(model_type, class_name, task)
        legacy = _generation_key_mapping(model_type)
        if legacy:  # 4.57: the generation class's renames (LLaVA's released language_model.model.*) load too
            cls._checkpoint_conversion_mapping = legacy
        getattr(transformers, AUTO_CLASS[task]).register(CONFIG_MAPPING[model_type], cls, exist_ok=True)
        _BUILT[model_type, task] = cls
    return _BUILT[model_type, task]


def token_class_name(model_type: str) -> str | None:
    """transformers' own token classifier of ``model_type`` when its head is one linear map with a bias (most
    families' ``score``, GPT-2's and BLOOM's ``classifier``): the class a value model or PRM fills completely."""
    names = _mappings().MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.get(model_type)
    native = names[0] if isinstance(names, (tuple, list)) else names
    return native if native and _token_head(model_type, native) else None


def _token_head(model_type: str, class_name: str) -> str | None:
    """``X`` when the token classifier's head is exactly ``X.weight`` and ``X.bias``, else None; a class that
    cannot be built from its family's default config is trusted, as ``score`` (as :func:`reward_class_name`)."""
    from .structure import classifier_parameters

    head = classifier_parameters(model_type, class_name)
    if head is None:
        return "score"
    if len(head) == 2 and head[0].endswith(".weight") and head[1] == head[0][: -len("weight")] + "bias":
        return head[0][: -len(".weight")]
    return None


def token_score_name(model_type: str) -> str:
    """The weight of the head of the token classifier of ``model_type``: its native head's, else ``score.weight``."""
    native = token_class_name(model_type)
    return f"{_token_head(model_type, native)}.weight" if native else "score.weight"


PORTABLE_MODULE = "modeling_rmconvert"


def portable_module(model_type: str, class_name: str) -> str | None:
    """Source of a modeling file defining ``class_name`` (a sequence or token classifier, by its name) for
    ``--portable``; None when transformers' own class is the one (the checkpoint then needs no code)."""
    import inspect

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from . import reward_head

    task = task_of_class(class_name)
    # a kept MLP head: Qwen2ForRewardModel (a sequence classifier) or Qwen2ForProcessRewardModel (per token)
    kept = class_name.endswith("ForRewardModel") and class_name == kept_class_name(model_type)
    base = "MLPScoreForSequenceClassification" if kept else PROCESS_REWARD_BASE.get(class_name, BUILT_BASE[task])
    own = reward_class_name if task == SEQUENCE else token_class_name
    if not kept and class_name not in PROCESS_REWARD_BASE and own(model_type):
        return None
    _, pretrained = _backbone_classes(model_type)
    config = CONFIG_MAPPING[model_type]
    body = inspect.getsource(reward_head).split('"""', 2)[2].lstrip("\n")
    kind = "reward-model" if task == SEQUENCE else "token-classification"
    return f'''"""Written by rmconvert --portable: {class_name}, the {kind} class of {model_type!r}.

Load with {AUTO_CLASS[task]}.from_pretrained(path, trust_remote_code=True), or without
remote code through rmconvert.load_reward_model(path).
"""

{body}
from {pretrained.__module__} import {pretrained.__name__}  # noqa: E402
from {config.__module__} import {config.__name__}  # noqa: E402


class {class_name}({base}, {pretrained.__name__}):
    base_model_prefix = "{backbone_prefix(model_type)}"
    config_class = {config.__name__}
'''


@lru_cache(maxsize=32)
def _reward_build(model_type: str, config_json: str) -> tuple[Callable[[str], str], frozenset[str]]:
    import torch
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .structure import StructureError, _renamer, quiet_transformers

    try:
        with quiet_transformers():
            config = CONFIG_MAPPING[model_type].from_dict({**json.loads(config_json), "num_labels": 1})
            with torch.device("meta"):
                model = reward_class(model_type)(config)
    except Exception as exc:  # noqa: BLE001
        raise StructureError(f"transformers cannot build {model_type}'s reward class: {summary(exc, 200)}")
    return _renamer(model), frozenset(model.state_dict())


def reward_loading(config: dict) -> tuple[Callable[[str], str], frozenset[str]]:
    """How the reward class of ``config``'s family (native or built) loads a checkpoint: the key renaming it
    applies, and its state dict's keys."""
    from .structure import settings_key

    return _reward_build(*settings_key(config))


def kept_class_name(model_type: str) -> str:
    """The class name of a reward model whose MLP head is kept: ``Qwen2ForRewardModel`` for Qwen2 (vLLM and sglang
    serve it natively), else ``<Family>ForRewardModel``."""
    if model_type == "qwen2":
        return "Qwen2ForRewardModel"
    backbone = _backbone_name(model_type)
    if not backbone or not backbone.endswith("Model"):
        raise CheckpointError(f"transformers has no backbone class for model_type {model_type!r}")
    return backbone[: -len("Model")] + "ForRewardModel"


def kept_config(config: dict, heads) -> None:
    """config.json fields of a kept MLP head: its inner width (``score_inner_size``) and 1 label for vLLM."""
    config["score_inner_size"] = heads[0].shape[0]


def is_kept(config: dict) -> bool:
    """Whether a config describes a reward model with a kept MLP head (written by rmconvert)."""
    return type(config.get("score_inner_size")) is int


_KEPT: dict[str, type] = {}


def build_kept_class(model_type: str) -> type:
    """A :class:`MLPScoreForSequenceClassification` over the family's backbone (never registered with the Auto
    classes: a family's own sequence classifier stays what AutoModelForSequenceClassification loads)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .reward_head import MLPScoreForSequenceClassification

    if model_type not in _KEPT:
        _, pretrained = _backbone_classes(model_type)
        namespace = {
            "__module__": pretrained.__module__,
            "base_model_prefix": backbone_prefix(model_type),
            "config_class": CONFIG_MAPPING[model_type],
        }
        _KEPT[model_type] = type(
            kept_class_name(model_type), (MLPScoreForSequenceClassification, pretrained), namespace
        )
    return _KEPT[model_type]


def kept_class(config: dict) -> type | None:
    """The class of a checkpoint whose MLP head is kept, chosen by its target: ``Qwen2ForProcessRewardModel``
    (per token, :func:`process_reward_class`) or a kept reward model (``score_inner_size``, :func:`build_kept_class`);
    None for any other checkpoint."""
    name = class_of_config(config)
    if name in PROCESS_REWARD_CLASSES:
        return process_reward_class(config["model_type"], name)
    if is_kept(config):
        return build_kept_class(config["model_type"])
    return None
