"""Tiny real checkpoints for tests and the demo: random weights, tokenizers built locally, no downloads."""

from __future__ import annotations

import hashlib
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

    from .modeling import config_attribute_map

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

    from .modeling import register_sequence_classification_class, sequence_classification_class_name

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
        name = sequence_classification_class_name(recipe.model_type)
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
