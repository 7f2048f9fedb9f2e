"""Tiny vision-language policies, built locally from transformers' own classes (tests, coverage, the benchmark).

Text: hidden 64, 2 layers, a 320-row vocabulary with the image tokens at 300-303; vision: hidden 32, 2 layers.
:func:`build_policy` saves a random policy (``AutoModelForImageTextToText``) and a word-level tokenizer that knows
the family's image tokens; :func:`image_inputs` makes the inputs of one image+text sample without a processor
(the image-token count asked of the model itself), as every family's forward takes them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

IMAGE, VIDEO, START, END = 300, 301, 302, 303
VOCAB = 320
TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
V = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
Q = {"depth": 2, "hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 64, "num_heads": 4}
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
QWEN_IDS = {
    "image_token_id": IMAGE,
    "video_token_id": VIDEO,
    "vision_start_token_id": START,
    "vision_end_token_id": END,
}
QWEN3 = {"head_dim": 16, "rope_parameters": {**MROPE, "mrope_interleaved": True}}
MOE = {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}
QWEN35 = {
    "head_dim": 16,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "layer_types": ["linear_attention", "full_attention"],
    "rope_parameters": {**MROPE, "mrope_interleaved": True, "partial_rotary_factor": 1.0},
}
GEMMA = {"head_dim": 16, "sliding_window": 64, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}

#: model_type -> (text overrides, vision overrides, top-level overrides).
CONFIGS: dict[str, tuple[dict, dict, dict]] = {
    "qwen2_vl": (
        {"rope_parameters": MROPE},
        {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2, "patch_size": 14},
        QWEN_IDS,
    ),
    "qwen2_5_vl": (
        {"rope_parameters": MROPE},
        {**Q, "patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1]},
        QWEN_IDS,
    ),
    "qwen3_vl": (
        QWEN3,
        {**Q, "patch_size": 16, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
        QWEN_IDS,
    ),
    "qwen3_vl_moe": (
        {**QWEN3, **MOE},
        {**Q, "patch_size": 16, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
        QWEN_IDS,
    ),
    "qwen3_5": (QWEN35, {**Q, "patch_size": 16, "num_position_embeddings": 64}, QWEN_IDS),
    "qwen3_5_moe": (
        {**QWEN35, **MOE, "shared_expert_intermediate_size": 32},
        {**Q, "patch_size": 16, "num_position_embeddings": 64},
        QWEN_IDS,
    ),
    "gemma3": (
        {**GEMMA, "query_pre_attn_scalar": 16},
        {**V, "image_size": 32, "patch_size": 8},
        {"mm_tokens_per_image": 4, "image_token_index": IMAGE, "boi_token_index": START, "eoi_token_index": END},
    ),
    "llava": (
        {"model_type": "llama"},
        {"model_type": "clip_vision_model", **V, "image_size": 32, "patch_size": 8, "projection_dim": 32},
        {"image_token_index": IMAGE, "vision_feature_layer": -1},
    ),
    "llava_next": (
        {"model_type": "llama"},
        {"model_type": "clip_vision_model", **V, "image_size": 32, "patch_size": 8, "projection_dim": 32},
        {"image_token_index": IMAGE, "vision_feature_layer": -1, "image_grid_pinpoints": [[32, 32], [32, 64]]},
    ),
    "mistral3": (
        {"model_type": "mistral", "head_dim": 16, "tie_word_embeddings": False},
        {"model_type": "pixtral", **V, "head_dim": 8, "image_size": 64, "patch_size": 8},
        {"image_token_index": 10, "spatial_merge_size": 2, "tie_word_embeddings": False},
    ),
    "smolvlm": (
        {"model_type": "llama"},
        {**V, "image_size": 32, "patch_size": 8},
        {"image_token_id": IMAGE, "scale_factor": 2},
    ),
    "idefics3": (
        {"model_type": "llama"},
        {**V, "image_size": 32, "patch_size": 8},
        {"image_token_id": IMAGE, "scale_factor": 2},
    ),
    "internvl": (
        {"model_type": "qwen2", "tie_word_embeddings": False},
        {**V, "image_size": [32, 32], "patch_size": [8, 8]},
        {"image_token_id": IMAGE, "image_seq_length": 4, "downsample_ratio": 0.5},
    ),
    "gemma4": (
        {
            **GEMMA,
            "vocab_size_per_layer_input": VOCAB,
            "hidden_size_per_layer_input": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        {**V, "num_key_value_heads": 4, "head_dim": 8, "patch_size": 8, "pooling_kernel_size": 2},
        {
            "image_token_id": IMAGE,
            "boi_token_id": START,
            "eoi_token_id": END,
            "video_token_id": VIDEO,
            # the audio placeholders too, inside the tokenizer (their defaults are past the tiny vocabulary)
            "audio_token_id": 297,
            "boa_token_id": 298,
            "eoa_token_index": 299,
        },
    ),
}
#: The families of issue 16: image+text rewards exact on transformers 5.24.
FAMILIES = tuple(CONFIGS)
#: Image token id of each family's tiny config (Mistral 3's default is 10).
IMAGE_TOKEN = {t: CONFIGS[t][2].get("image_token_id", CONFIGS[t][2].get("image_token_index")) for t in CONFIGS}


def _transformers_4() -> bool:
    from importlib.metadata import version

    return int(version("transformers").split(".")[0]) < 5


def available(model_type: str) -> bool:
    """Whether the installed transformers has ``model_type``'s composite backbone (4.57 lacks Gemma 4, Qwen 3.5)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def tiny_config(model_type: str, text_overrides: dict | None = None, **top):
    """The tiny composite config of ``model_type`` (``text_overrides``: settings of its text config)."""
    from transformers import AutoConfig

    text, vision, extra = CONFIGS[model_type]
    text = {**text, **(text_overrides or {})}
    if model_type.startswith(("qwen", "gemma")):
        text = {**TEXT, **text}
        text.pop("model_type", None)
    else:
        text = {**TEXT, **text}
    if model_type in ("qwen3_vl_moe", "qwen3_5_moe"):
        text.pop("intermediate_size")
    if "rope_parameters" in text and _transformers_4():  # 4.57 names them rope_scaling and rope_theta
        rope = dict(text.pop("rope_parameters"))
        text["rope_theta"] = rope.pop("rope_theta")
        if model_type.startswith("qwen2"):
            rope = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        text["rope_scaling"] = rope
    return AutoConfig.for_model(model_type, text_config=text, vision_config=dict(vision), **extra, **top)


def build_model(model_type: str, seed: int = 0, text_overrides: dict | None = None, **top):
    """A random tiny generation model of ``model_type`` (Gemma 3's zero-initialised projector randomised)."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(model_type, text_overrides, **top)).eval()
    projector = getattr(getattr(model.model, "multi_modal_projector", None), "mm_input_projection_weight", None)
    if projector is not None:
        with torch.no_grad():
            projector.normal_(0, 0.2)
    return model


#: Language-model and other sub-model settings that make a family's default config tiny (where it has them).
TINY_TEXT = {**{k: v for k, v in TEXT.items() if k != "vocab_size"}, "head_dim": 16, **MOE}
TINY_OTHER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "depth": 2,
    "num_attention_heads": 4,
    "num_heads": 4,
    "d_model": 32,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
}
#: Config fields holding token ids (pad, bos, eos, the image/video/audio placeholders).
TOKEN_FIELD = re.compile(r"token_(id|ids|index)$")


def _shrunk(settings: dict, tiny: dict) -> dict:
    """``settings`` with ``tiny``'s values for the keys it has (its other sizes equal to its hidden size follow it,
    its key/value heads its heads where they were as many), its per-layer lists and layer-indexed dicts cut to 2
    layers, and every nested config shrunk: ``text_config`` as a language model, the others (vision, audio,
    Q-Former, ...) by :data:`TINY_OTHER`."""
    layers = next(
        (settings[k] for k in ("num_hidden_layers", "depth", "encoder_layers") if type(settings.get(k)) is int), None
    )
    hidden, heads = settings.get("hidden_size"), settings.get("num_attention_heads")
    out = {}
    for key, value in settings.items():
        sub = TINY_TEXT if key == "text_config" else TINY_OTHER
        if isinstance(value, dict) and "model_type" in value:
            value = _shrunk(value, sub)
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value) and layers:
            value = {k: _shrunk(v, tiny) if isinstance(v, dict) else v for k, v in value.items() if int(k) < 2}
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            value = [_shrunk(v, tiny) for v in value]
        elif key in tiny and type(value) is int:
            value = tiny[key] if key != "num_key_value_heads" or value != heads else tiny["num_attention_heads"]
        elif "hidden_size" in tiny and type(value) is int and value == hidden:
            value = tiny["hidden_size"]
        if isinstance(value, list) and layers and len(value) == layers > 2:
            value = value[:2]
        out[key] = value
    return out


def _configs(settings: dict):
    """``settings`` and every dict nested in it."""
    yield settings
    for value in settings.values():
        if isinstance(value, dict):
            yield from _configs(value)


def _token_fields(settings: dict):
    """(dict, key) of every token-id field of ``settings`` and its nested configs."""
    for key, value in settings.items():
        if isinstance(value, dict):
            yield from _token_fields(value)
        elif isinstance(key, str) and TOKEN_FIELD.search(key) and (type(value) is int or isinstance(value, list)):
            yield settings, key


def shrunk_config(model_type: str):
    """The default config of ``model_type`` made tiny: :func:`_shrunk`, a :data:`VOCAB`-row vocabulary (every
    ``*vocab_size*`` field equal to the text config's) and every token id outside :func:`tokenizer_for`'s
    0-303 moved to a free id inside it (the same id to the same new id)."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type).to_dict()
    settings = _shrunk(default, {})
    text = settings.get("text_config") or {}
    hidden = (default.get("text_config") or {}).get("hidden_size")
    for part in _configs(settings):  # sizes of the vision tower's output, the projector's: the language model's
        for key, value in part.items():
            if part is not text and key not in TINY_OTHER and type(value) is int and value == hidden:
                part[key] = TINY_TEXT["hidden_size"]
            elif key == "mrope_section":
                part[key] = MROPE["mrope_section"]
    vocab = text.get("vocab_size", settings.get("vocab_size"))
    for part in (settings, text):
        for key, value in part.items():
            if isinstance(key, str) and "vocab_size" in key and value == vocab:
                part[key] = VOCAB
    fields = list(_token_fields(settings))
    ids = {i for part, key in fields for i in (part[key] if isinstance(part[key], list) else [part[key]])}
    free = (i for i in range(IMAGE - 1, 2, -1) if i not in ids)
    moved = {i: next(free) for i in sorted(i for i in ids if type(i) is int and not 0 <= i <= END)}
    for part, key in fields:
        value = part[key]
        part[key] = [moved.get(i, i) for i in value] if isinstance(value, list) else moved.get(value, value)
    return type(AutoConfig.for_model(model_type)).from_dict(settings)


def tokenizer_for(model_type: str):
    """A word-level fast tokenizer: <unk> 0, <s> 1, </s> 2, words, and the family's image tokens at their ids
    (ids 0-303, no hole: transformers renumbers the tokens added after a hole)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    image = IMAGE_TOKEN.get(model_type, IMAGE)
    specials = {"<image>": image, "<video>": VIDEO, "<vision_start>": START, "<vision_end>": END}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, END + 1) if i not in specials.values()})  # no holes
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return fast


def build_policy(model_type: str, path: str | Path, seed: int = 0, text_overrides: dict | None = None, **top) -> Path:
    """Save a tiny policy of ``model_type`` (safetensors, config, tokenizer) at ``path``; returns it."""
    path = Path(path)
    model = build_model(model_type, seed, text_overrides, **top)
    model.save_pretrained(path)
    tokenizer_for(model_type).save_pretrained(path)
    return path


def qwen_layout(path: str | Path, canonical: bool) -> None:
    """Rewrite a saved Qwen2-VL/2.5-VL policy into the released layout (``model.*`` + ``visual.*``, what
    transformers 4.57 and 5.x write for the generation class) or the canonical one (``model.language_model.*`` +
    ``model.visual.*``, what the sequence classifier loads)."""
    from safetensors.numpy import load_file, save_file

    path = Path(path)
    tensors = load_file(path / "model.safetensors")
    renamed = {}
    for name, value in tensors.items():
        for prefix in ("model.language_model.", "model.visual.", "model.", "visual."):
            if name.startswith(prefix):
                rest = name[len(prefix) :]
                vision = prefix in ("model.visual.", "visual.")
                if canonical:
                    name = ("model.visual." if vision else "model.language_model.") + rest
                else:
                    name = ("visual." if vision else "model.") + rest
                break
        renamed[name] = value
    save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})


def image_inputs(model, model_type: str, seed: int = 0, words: int = 5) -> dict:
    """One image+text sample for ``model`` (see :func:`rmconvert.doctor.images.image_sample`)."""
    from .doctor.images import image_sample

    return image_sample(model, model_type, seed, words)


def save_config_json(path: str | Path, change) -> None:
    """Apply ``change(config)`` to ``path``/config.json."""
    file = Path(path) / "config.json"
    config = json.loads(file.read_text())
    change(config)
    file.write_text(json.dumps(config, indent=2))


def batch(samples: list[dict], pad: int) -> dict:
    """Samples as one right-padded batch (see :func:`rmconvert.doctor.images.batch`)."""
    from .doctor.images import batch as batched

    return batched(samples, pad)
