"""Tiny real checkpoints for tests and the demo: random weights, tokenizers built locally, no downloads."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

WORDS = [
    "the",
    "a",
    "reward",
    "model",
    "policy",
    "chosen",
    "rejected",
    "answer",
    "question",
    "good",
    "bad",
    "helpful",
    "harmless",
    "honest",
    "yes",
    "no",
    "token",
    "pad",
    "end",
    "of",
    "text",
    "user",
    "assistant",
    "system",
    "hello",
    "world",
    "is",
    "are",
    "was",
    "were",
    "be",
    "to",
    "in",
    "on",
    "at",
    "for",
    "with",
]


@dataclass(frozen=True)
class Recipe:
    """A tiny member of a model family, shaped like the real checkpoints' configs and tokenizers."""

    model_type: str
    specials: tuple[str, ...]  # first ids of the vocabulary
    tokens: int  # tokenizer size, specials included
    vocab_size: int  # config.vocab_size (>= tokens)
    eos: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    config_eos: tuple[str, ...] = ()  # config.eos_token_id as a list (Llama 3), else the eos id
    config: dict = field(default_factory=dict)


COMMON = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}

#: Sizes that make any family tiny; each applies only where the family's config has the field.
TINY = {
    **COMMON,
    "head_dim": 16,
    "rotary_dim": 16,  # GPT-J, CodeGen: at most the head width
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "sliding_window": 64,
    # multi-head latent attention (DeepSeek V2/V3, MiniCPM3, GLM-4 MoE lite)
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "n_group": 1,
    "topk_group": 1,
}

#: Sizes a server can run: vLLM's CPU attention rejects the tiny recipes' head_dim 16 and takes 64
#: (``build_checkpoint(kind, path, **SERVABLE)``).
SERVABLE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
}

RECIPES = {
    # Llama 3.1: no pad, eos list in config, unused <|finetune_right_pad_id|> in the vocabulary.
    "llama3": Recipe(
        "llama",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
        296,
        296,
        eos="<|eot_id|>",
        bos="<|begin_of_text|>",
        config_eos=("<|end_of_text|>", "<|eot_id|>"),
        config=COMMON,
    ),
    # Llama 2 / Tulu: no pad, vocabulary not a multiple of 8.
    "llama2": Recipe("llama", ("<unk>", "<s>", "</s>"), 293, 293, eos="</s>", bos="<s>", unk="<unk>", config=COMMON),
    # OLMo 2: <|pad|> set, vocabulary already padded past the tokenizer (must not shrink).
    "olmo2": Recipe(
        "olmo2",
        ("<|endoftext|>", "<|pad|>"),
        300,
        352,
        eos="<|endoftext|>",
        bos="<|endoftext|>",
        pad="<|pad|>",
        config=COMMON,
    ),
    # OLMoE: <|pad|> = 1, many experts stored per expert.
    "olmoe": Recipe(
        "olmoe",
        ("<|endoftext|>", "<|pad|>"),
        290,
        304,
        eos="<|endoftext|>",
        pad="<|pad|>",
        config={**COMMON, "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2},
    ),
    # Qwen 2.5 base: tied embeddings, pad == eos, spare embedding rows past the tokenizer.
    "qwen2": Recipe(
        "qwen2",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        299,
        304,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        config={**COMMON, "tie_word_embeddings": True},
    ),
    # Llama 3.0: no pad, no <|finetune_right_pad_id|> yet, reserved special tokens between the chat tokens.
    "llama30": Recipe(
        "llama",
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|reserved_special_token_2|>",
            "<|eot_id|>",
        ),
        296,
        296,
        eos="<|eot_id|>",
        bos="<|begin_of_text|>",
        config_eos=("<|end_of_text|>", "<|eot_id|>"),
        config=COMMON,
    ),
    # Qwen 2.5: pad == eos, and the spare special tokens of the real tokenizer (chat, vision, tools, FIM).
    "qwen25": Recipe(
        "qwen2",
        (
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        ),
        300,
        304,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        config={**COMMON, "tie_word_embeddings": True},
    ),
}


#: Families whose real tokenizers put special tokens at ids the model relies on, laid out the same way:
#: XGLM's pad id is also the zeroed row of its position table, and its checkpoints carry fairseq's
#: ``<s> <pad> </s> <unk>`` (pad = 1).
FAMILY_TOKENS = {
    "xglm": {
        "specials": ("<s>", "<pad>", "</s>", "<unk>"),
        "eos": "</s>",
        "bos": "<s>",
        "pad": "<pad>",
        "unk": "<unk>",
    },
    # configs that require an int pad or bos (the real checkpoints have one)
    "modernbert-decoder": {
        "specials": ("<|endoftext|>", "[PAD]"),
        "eos": "<|endoftext|>",
        "bos": "<|endoftext|>",
        "pad": "[PAD]",
    },
    "cwm": {"specials": ("<|begin_of_text|>", "<|end_of_text|>"), "eos": "<|end_of_text|>", "bos": "<|begin_of_text|>"},
}
#: Config fields that must follow the tiny sizes where no TINY field says so (GPT-Neo checks its per-layer
#: attention types against ``num_layers`` before its aliases are applied).
FAMILY_CONFIG = {
    "gpt_neo": {
        "num_layers": COMMON["num_hidden_layers"],
        "attention_types": [[["global", "local"], COMMON["num_hidden_layers"] // 2]],
    },
    # per-layer lists and sub-configs that must agree with the tiny sizes
    "zamba": {
        "num_hidden_layers": 4,  # two hybrid layers: the shared transformer is tied between them
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "layers_block_type": ["linear_attention", "hybrid"] * 2,
    },
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"], "hybrid_layer_ids": [1]},
    "mamba2": {"num_heads": 8, "n_groups": 1},  # hidden_size * expand == num_heads * head_dim
    "gemma3n_text": {
        "layer_types": ["sliding_attention", "full_attention"],
        "num_kv_shared_layers": 0,
        "vocab_size_per_layer_input": 304,
        "hidden_size_per_layer_input": 16,
    },
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {
        "d_model": COMMON["hidden_size"],  # read before the hidden_size alias is applied
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 96, "moe_num_experts": 4, "moe_top_k": 2},
    },
    "dots1": {"n_shared_experts": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "zaya": {"num_experts_per_tok": 1},  # the only routing it supports
    # an indexer scores keys with at most the query heads of key head 0; one layer of each attention kind
    "kolibri1_1": {
        "index_num_heads": COMMON["num_attention_heads"] // COMMON["num_key_value_heads"],
        "layer_types": ["sliding_attention", "indexed_attention"],
        "index_layers": [1],
        "kv_source_layers": [0, 1],
        "mlp_only_intermediate_size": 96,
    },
    # the LM head's rows: at most the (padded) vocabulary
    "inkling2_text": {"unpadded_vocab_size": 299},
    "inkling2_loop_text": {"unpadded_vocab_size": 299},
}
#: Any other family: no pad, so conversion adds one and grows the embedding.
DEFAULT_TOKENS = {"specials": ("<|endoftext|>", "<|im_end|>"), "eos": "<|endoftext|>"}


def recipe_for(kind: str) -> Recipe:
    """A named recipe, or for any other ``model_type`` a tiny member with a 299-token tokenizer (no pad unless
    the family's real checkpoints need one where it is, see FAMILY_TOKENS)."""
    if kind in RECIPES:
        return RECIPES[kind]
    from transformers import AutoConfig

    from .families.modeling import config_attribute_map

    # a field counts under its own name or an alias (GPT-2, CTRL and CodeGen store hidden_size as n_embd)
    fields = set(AutoConfig.for_model(kind).get_text_config().to_dict()) | set(config_attribute_map(kind))
    sizes = {k: v for k, v in TINY.items() if k in fields} | FAMILY_CONFIG.get(kind, {})
    if "kv_lora_rank" in sizes:  # latent attention keeps a key-value head per query head
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]
        if "head_dim" in sizes:  # and rotates head_dim = qk_rope_head_dim of each (DeepSeek V3, Youtu)
            sizes["head_dim"] = sizes["qk_rope_head_dim"]
    return Recipe(kind, tokens=299, vocab_size=304, config=sizes, **FAMILY_TOKENS.get(kind, DEFAULT_TOKENS))


def build_tokenizer(recipe: Recipe):
    """A byte-level BPE trained locally with ``tokenizers`` (as Llama 3, OLMo 2 and Qwen 2 use), as a
    transformers fast tokenizer of exactly ``recipe.tokens`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.tokens,
        special_tokens=list(recipe.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok.train_from_iterator(corpus, trainer)
    if tok.get_vocab_size() != recipe.tokens:
        raise AssertionError(f"trained {tok.get_vocab_size()} tokens, wanted {recipe.tokens}")
    roles = {"eos_token": recipe.eos, "bos_token": recipe.bos, "pad_token": recipe.pad, "unk_token": recipe.unk}
    roles = {k: v for k, v in roles.items() if v}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=["input_ids", "attention_mask"], **roles)


def build_checkpoint(
    kind: str,
    path: str | Path,
    *,
    dtype: str = "float32",
    labels: int | None = None,
    max_shard_size: str | None = None,
    seed: int = 0,
    **config,
) -> Path:
    """Save a tiny random causal LM, or a ``labels``-label reward model, at ``path``.

    ``kind`` is a key of RECIPES (shaped like the real family's checkpoints) or any transformers
    ``model_type``; ``config`` overrides config fields.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .families.modeling import class_name, register_sequence_classification_class

    recipe = recipe_for(kind)
    tokenizer = build_tokenizer(recipe)
    ids = tokenizer.get_vocab()
    eos = [ids[t] for t in recipe.config_eos] if recipe.config_eos else ids[recipe.eos]
    settings = {
        **recipe.config,
        "vocab_size": recipe.vocab_size,
        "eos_token_id": eos,
        "bos_token_id": ids.get(recipe.bos),
        "pad_token_id": ids.get(recipe.pad),
        **config,
    }
    if labels:
        settings["id2label"] = {i: f"LABEL_{i}" for i in range(labels)}
    model_config = AutoConfig.for_model(recipe.model_type, **settings)
    torch.manual_seed(seed)
    path = Path(path)
    if labels:
        name = class_name(recipe.model_type)
        model = register_sequence_classification_class(recipe.model_type, name)(model_config)
    else:
        model = AutoModelForCausalLM.from_config(model_config)
    model.to(getattr(torch, dtype)).save_pretrained(
        path, **({"max_shard_size": max_shard_size} if max_shard_size else {})
    )
    tokenizer.save_pretrained(path)
    return path


def snapshot(path: str | Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative name (to prove a directory unchanged)."""
    path = Path(path)
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


#: Files the Hub stores with Git LFS (their cache blob is named by the sha256); others are named by the git sha1.
LFS_SUFFIXES = (".safetensors", ".bin", ".model")


def git_blob_id(data: bytes) -> str:
    """The git object id of a file (``sha1("blob <size>\\0" + data)``): a non-LFS file's name in the Hub cache."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_hub_cache(checkpoint: str | Path, cache: str | Path, repo_id: str, ref: str = "main") -> Path:
    """Store the files of directory ``checkpoint`` in the Hugging Face cache ``cache`` as repo ``repo_id`` at
    branch ``ref``, as huggingface_hub writes a download; returns the snapshot directory.

    ``models--org--name/blobs/<id>`` holds each file once (id: sha256 for LFS files, else the git sha1),
    ``snapshots/<commit>/<file>`` links to it relatively, and ``refs/<ref>`` holds the commit hash (derived
    from the contents, so a different checkpoint gives a different commit).
    """
    checkpoint, repo = Path(checkpoint), Path(cache) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    blobs = {}
    for file in files:
        data = file.read_bytes()
        lfs = file.name.endswith(LFS_SUFFIXES)
        blobs[file.relative_to(checkpoint)] = hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blobs[file.relative_to(checkpoint)]).write_bytes(data)
    commit = hashlib.sha1(repr(sorted((str(k), v) for k, v in blobs.items())).encode()).hexdigest()
    snap = repo / "snapshots" / commit
    for name, blob in blobs.items():
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


def bin_name(name: str) -> str:
    """The ``.bin`` name transformers gives a safetensors weights file (``model-…`` -> ``pytorch_model-…``)."""
    return "pytorch_" + name.removesuffix(".safetensors") + ".bin"


def save_as_bin(src: str | Path, dst: str | Path, tied: dict[str, str] | None = None) -> Path:
    """Copy the checkpoint at ``src`` to ``dst`` with its weights saved by ``torch.save`` as ``.bin`` (sharded as
    the source is, with ``pytorch_model.bin.index.json``). ``tied`` maps an added tensor name to the tensor whose
    storage it shares (as an LM head tied to the embedding is pickled)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    index_path = src / "model.safetensors.index.json"
    names = sorted(json.loads(index_path.read_text())["weight_map"].values()) if index_path.exists() else []
    for name in sorted(set(names)) or ["model.safetensors"]:
        state = load_file(src / name)
        for alias, target in (tied or {}).items():
            if target in state:
                state[alias] = state[target]
        torch.save(state, dst / bin_name(name))
    if names:
        index = json.loads(index_path.read_text())
        index["weight_map"] = {k: bin_name(v) for k, v in index["weight_map"].items()}
        (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return dst


def load_base(base: str | Path, task_type: str = "CAUSAL_LM", labels: int = 1, dtype: str = "float32"):
    """``base`` loaded as PEFT loads it for ``task_type``: a causal LM (an image-text policy's generation class
    when its config has a vision tower), or a ``labels``-label classifier."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification

    torch_dtype = getattr(torch, dtype)
    if task_type == "SEQ_CLS":
        return AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels, dtype=torch_dtype)
    composite = "vision_config" in json.loads((Path(base) / "config.json").read_text())
    return (AutoModelForImageTextToText if composite else AutoModelForCausalLM).from_pretrained(base, dtype=torch_dtype)


def build_adapter(
    base: str | Path,
    path: str | Path,
    *,
    task_type: str = "CAUSAL_LM",
    labels: int = 1,
    dtype: str = "float32",
    adapter_dtype: str = "float32",
    vocab_size: int | None = None,
    seed: int = 0,
    **lora,
) -> Path:
    """Save a PEFT LoRA adapter of ``base`` at ``path``, as training would leave it (needs ``peft``).

    A and B are random and non-zero (``init_lora_weights=False``), seeded; the other trainable tensors
    (``modules_to_save`` copies such as the score head, biases under ``bias="all"``) get seeded noise, as
    training changes them. ``adapter_dtype`` "float32" is PEFT's default (it upcasts LoRA weights), else
    the LoRA weights keep the base's ``dtype``. ``vocab_size`` resizes the embedding first (new tokens).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_base(base, task_type, labels, dtype)
    if vocab_size:
        model.resize_token_embeddings(vocab_size)
    config = LoraConfig(task_type=task_type, init_lora_weights=False, **lora)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype == "float32")
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad and ".lora_" not in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    peft_model.save_pretrained(path)
    return Path(path)
