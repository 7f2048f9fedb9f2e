"""Plan a reward model from a checkpoint's headers and its layout: every decision made before a byte is written."""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field, replace

from ..dtypes import FLOAT_DTYPES
from ..errors import CheckpointError, PluginError, UsageError
from ..families.host import Registered
from ..families.layout import Head, Layout
from ..families.modeling import kept_class_name, kept_config
from ..families.target import Target, class_of_config
from ..io.hashing import sha256
from ..io.safetensors import Header, OutTensor, Repeat, TensorInfo
from ..sources.checkpoint import BIN_INDEX, INDEX, Checkpoint, read_json, text_config
from ..sources.tokenizer_files import TOKENIZER_CONFIG, TokenizerFiles
from .head import bias_parts, default_init_std, mean_row_part, merged_mean_row_parts, read_scalar, score_parts
from .merge import plan_merge
from .options import Options
from .pad import PadChoice, choose_pad, eos_ids
from .rules import SOURCES, bias_warnings, plan_head
from .shards import _plan_shards

MANIFEST = "rmconvert.json"

GENERATION_CONFIG = "generation_config.json"

#: Files never carried over: other weight formats, which would disagree with the converted weights.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".safetensors")


@dataclass
class Plan:
    """Everything the output will contain, decided before a byte is written."""

    checkpoint: Checkpoint
    registered: Registered
    json_files: dict[str, dict]
    generated: dict[str, bytes]  # other files written by rmconvert (the --portable modeling file)
    shards: dict[str, Header | list[OutTensor]]  # file name -> source shard copied whole, or tensors to assemble
    index: dict | None
    copies: list[str]
    report: dict = field(default_factory=dict)


def _value_head_bias(ckpt: Checkpoint, head: Head, hidden: int) -> float:
    """The value head's bias (0.0 without one), after checking its weight is [1, H] and its bias [1]."""
    weight, bias = ckpt.tensors[head.weight], ckpt.tensors.get(head.bias) if head.bias else None
    if weight.shape != (1, hidden) or weight.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{weight.name} is {weight.dtype}{list(weight.shape)}; a value head is [1, hidden_size={hidden}]",
            weight.path,
        )
    if bias is None:
        return 0.0
    if bias.shape != (1,) or bias.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{bias.name} is {bias.dtype}{list(bias.shape)}; a value head's bias is [1]", bias.path)
    return read_scalar(bias)


def _check_bias(ckpt: Checkpoint, head: Head, rows: int) -> None:
    """A token classifier's bias: [rows], a float."""
    bias = ckpt.tensors[head.bias]
    if bias.shape != (rows,) or bias.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{bias.name} is {bias.dtype}{list(bias.shape)}; the head's bias is [{rows}]", bias.path)


def _step_tag(ckpt: Checkpoint, text: str, pad: PadChoice, eos: set[int]) -> int:
    """The one token id of a PRM's step separator ``text``, which must be neither the pad nor an eos."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(ckpt.path / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise UsageError(
            f"--step-separator {text!r} is {len(ids)} tokens {ids}: a step tag must be one token of the vocabulary"
            " (a PRM's score is read at it)"
        )
    if ids[0] == pad.id or ids[0] in eos:
        role = "the pad" if ids[0] == pad.id else "an eos"
        raise UsageError(f"--step-separator {text!r} is token {ids[0]}, {role}: a step tag must be distinct from it")
    return ids[0]


def target_heads(
    target: Target,
    weights: tuple[OutTensor, ...],
    score_name: str,
    source_bias: TensorInfo | None,
    options: Options,
    made: tuple[tuple, str, str] | None = None,
) -> tuple[tuple[OutTensor, ...], str | None]:
    """The head tensors ``target`` writes from the weight a head rule made (``score.weight [labels, H]``, whatever
    rule made it: new, copied rows, a difference, a value head, LM-head rows), and how its bias was made (None
    without one). A sequence classifier writes the weight as it is; a token classifier writes it under its class's
    head name, plus ``.bias [labels]``: the source head's own bias by the weight's row rule, else zeros."""
    if not target.bias:
        return weights, None
    (weight,) = weights
    weight = replace(weight, name=score_name)
    labels = weight.shape[0]
    if made is not None:  # the bias a head rule made of the source's, by the weight's rule (rules.HeadPlan.bias)
        bias_bytes, bias_dtype, how = made
    else:
        bias_bytes, bias_dtype, how = bias_parts(source_bias, labels, weight.dtype, options.from_bt)
    bias = OutTensor(score_name[: -len("weight")] + "bias", bias_dtype, (labels,), bias_bytes)
    return (weight, bias), how


def _check_shapes(ckpt: Checkpoint, layout: Layout) -> tuple[int, int]:
    """(vocab_size, hidden_size), after checking the embedding and any head agree with config.json."""
    vocab, hidden, embedding = layout.vocab_size, layout.hidden_size, layout.embedding
    if type(vocab) is not int or type(hidden) is not int or vocab <= 0 or hidden <= 0:
        raise CheckpointError("vocab_size and hidden_size must be positive integers", ckpt.config_path)
    emb = ckpt.tensors[embedding]
    if emb.shape != (vocab, hidden):
        raise CheckpointError(
            f"{embedding} is {list(emb.shape)} but config.json says vocab_size={vocab}, hidden_size={hidden}",
            emb.path,
        )
    if emb.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{embedding} has dtype {emb.dtype}; expected one of {', '.join(FLOAT_DTYPES)}", emb.path)
    return vocab, hidden


def _check_head(ckpt: Checkpoint, layout: Layout, hidden: int) -> None:
    """A 1- or 2-row head taken by the rules of engine/head.py is [1 or 2, H] and id2label agrees (a value head
    is checked by _value_head_bias)."""
    head = layout.head.weight if layout.head else None
    score = ckpt.tensors[head] if head and layout.head.kind != "value" else None
    if score is not None:
        if len(score.shape) != 2 or score.shape[0] not in (1, 2) or score.shape[1] != hidden:
            raise CheckpointError(f"{head} is {list(score.shape)}; a reward head is [1 or 2, {hidden}]", score.path)
        if score.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{head} has dtype {score.dtype}", score.path)
        if layout.head.bias:
            _check_bias(ckpt, layout.head, score.shape[0])
        id2label = ckpt.config.get("id2label")
        if isinstance(id2label, dict) and len(id2label) != score.shape[0]:
            raise CheckpointError(
                f"id2label has {len(id2label)} label{'' if len(id2label) == 1 else 's'} but {head} has"
                f" {score.shape[0]} row{'' if score.shape[0] == 1 else 's'}",
                ckpt.config_path,
            )


def _grown(table: TensorInfo, merged: OutTensor | None, rows: int) -> OutTensor:
    """A vocabulary-indexed table grown to ``rows``: its rows as they are (or as the adapter merges them), then
    the mean row for each new one (taken as the writer merges, for a merged table)."""
    old = merged or OutTensor.copy_of(table)
    kept, mean = old.parts, mean_row_part(table)
    if old.parts != OutTensor.copy_of(table).parts:
        kept, mean = merged_mean_row_parts(old)
    return OutTensor(table.name, table.dtype, (rows, *table.shape[1:]), (*kept, Repeat(mean, rows - table.shape[0])))


#: Files whose ``image_token``/``video_token``/``audio_token`` name the placeholder a processor inserts.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def _check_media_tokens(ckpt: Checkpoint, layout: Layout, tok: TokenizerFiles) -> None:
    """Every image, video or audio token a processor inserts is a token of the tokenizer: the config's ids
    (``layout.media_ids``) and the processor files' token strings."""
    names = {i: t for t, i in tok.ids.items()}
    for token_id in sorted(layout.media_ids):
        if token_id not in names:
            raise CheckpointError(
                f"config.json's image/video/audio token id {token_id} is no token of the tokenizer"
                " (is this the model's tokenizer?)",
                tok.path / "tokenizer.json",
            )
    if not layout.media_ids:
        return
    for file in PROCESSOR_FILES:
        settings = read_json(ckpt.path / file, required=False) or {}
        for key in ("image_token", "video_token", "audio_token"):
            token = settings.get(key)
            if isinstance(token, str) and token not in tok.ids:
                raise CheckpointError(f"{key} {token!r} is no token of the tokenizer", ckpt.path / file)


def _keep_position_pad(ckpt: Checkpoint, pad: PadChoice, options: Options) -> None:
    """A family whose pad id indexes its position table (XGLM) scores every sequence differently under another
    pad id: the source's pad must stay."""
    source = text_config(ckpt.config).get("pad_token_id")
    if pad.id == source or options.pad_token == "keep":
        return
    problem = (
        f"{ckpt.model_type}'s pad id indexes its position table: pad {pad.token!r} (id {pad.id}) would move it from"
        f" {source} and change every reward"
    )
    if options.pad_token != "auto":
        raise UsageError(f"--pad-token {options.pad_token!r}: {problem}; use --pad-token keep")
    raise CheckpointError(
        f"{problem}; set pad_token_id to the model's pad (the real checkpoints' is 1)", ckpt.config_path
    )


def _output_config(
    ckpt: Checkpoint,
    registered: Registered,
    layout: Layout,
    target: Target,
    labels: tuple[str, ...],
    vocab: int,
    pad: PadChoice,
    dtype,
    cls: str,
    step_tag=None,
) -> dict:
    """config.json of the reward model (or value model, PRM: ``target``): class, labels, problem type, vocab,
    pad, no dropout, the step tag; the rest preserved. A composite config's text config gets the vocabulary sizes
    (every field of ``layout.vocab_fields``), the pad and the labels too (4.57's Qwen2-VL config reads attributes
    its text config has from there)."""
    config = copy.deepcopy(ckpt.config)
    arch = registered.architecture
    config["architectures"] = [cls]
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    # regression: servers and pipelines then return raw rewards, not sigmoid/softmax; a PRM's labels are classes
    config.pop("problem_type", None)
    if target.problem_type:
        config["problem_type"] = target.problem_type
    if target.per_token:  # a token classifier's dropout before score defaults to 0.1 when not set
        config["classifier_dropout"] = 0.0
    if step_tag is not None:
        config["step_tag_id"] = step_tag
    config.pop("num_labels", None)
    config.pop("value_head_prefix", None)
    for name in layout.vocab_fields:
        text_config(config)[name] = vocab
    if text_config(config) is not config:
        text_config(config)["id2label"], text_config(config)["label2id"] = config["id2label"], config["label2id"]
    for part in {id(config): config, id(text_config(config)): text_config(config)}.values():
        if pad.id is not None:
            part["pad_token_id"] = pad.id
        for name in arch.dropout_fields:
            if isinstance(part.get(name), (int, float)) and not isinstance(part[name], bool) and part[name]:
                part[name] = 0.0
        for key in ("dtype", "torch_dtype"):
            if dtype and key in part:
                part[key] = dtype
    arch.output_config(config)
    return config


def _plan_json(
    ckpt: Checkpoint,
    right_padding_only: bool,
    config: dict,
    tok: TokenizerFiles,
    generation_config,
    pad: PadChoice,
    options: Options,
) -> tuple[dict[str, dict], dict[str, bytes]]:
    """JSON files to write (config, tokenizer files the pad or padding side change) and generated code
    (--portable)."""
    json_files = {"config.json": config}
    generated = {}
    if options.portable:
        from ..families.modeling import PORTABLE_MODULE, portable_module

        source = portable_module(ckpt.model_type, config["architectures"][0])
        if source is not None:
            generated[f"{PORTABLE_MODULE}.py"] = source.encode()
            config["auto_map"] = {
                **config.get("auto_map", {}),
                options.target.auto_class: f"{PORTABLE_MODULE}.{config['architectures'][0]}",
            }
    if pad.token is not None and options.pad_token != "keep":
        originals = {
            "tokenizer.json": tok.tokenizer,
            "tokenizer_config.json": tok.tokenizer_config,
            "special_tokens_map.json": tok.special_tokens_map,
        }
        json_files.update({n: f for n, f in tok.with_pad(pad.token).items() if f != originals[n]})
    if right_padding_only:
        tokenizer_config = json_files.get(TOKENIZER_CONFIG, tok.tokenizer_config)
        if tokenizer_config.get("padding_side") != "right":
            json_files[TOKENIZER_CONFIG] = {**tokenizer_config, "padding_side": "right"}
    if generation_config is not None and "pad_token_id" in generation_config and pad.id is not None:
        json_files[GENERATION_CONFIG] = {**generation_config, "pad_token_id": pad.id}
    return json_files, generated


def plan_conversion(ckpt: Checkpoint, registered: Registered, options: Options, adapter=None) -> Plan:
    """Decide the output of converting ``ckpt`` with ``options``; reads only headers and small files.

    ``adapter`` (a :class:`rmconvert.engine.merge.Adapter`) is merged into ``ckpt`` first: the plan is that of the
    merged checkpoint, its merged tensors computed by the writers.
    """
    arch = registered.architecture
    if options.target.per_token and not arch.per_token_heads:
        raise CheckpointError(
            f"--head {options.head}: a token classifier of a vision-language model ({ckpt.model_type}) is not"
            " supported; convert with --text-only, or use --head scalar or bt",
            ckpt.config_path,
        )
    layout = arch.layout(ckpt).require()
    merge = None
    if adapter is not None:
        merge = plan_merge(adapter, ckpt, layout)
        ckpt = merge.checkpoint
        layout = arch.layout(ckpt).require()  # the merged checkpoint: an adapter may bring the head
    head, target = layout.head, options.target
    vocab, hidden = _check_shapes(ckpt, layout)
    tok = TokenizerFiles.read(ckpt.path)
    _check_media_tokens(ckpt, layout, tok)
    rule = plan_head(ckpt, layout, options, hidden, tok)  # None: the rules of engine/head.py
    if rule is None:
        _check_head(ckpt, layout, hidden)
    value_head = rule is None and head is not None and head.kind == "value"
    bias = _value_head_bias(ckpt, head, hidden) if value_head else None
    existing = ckpt.tensors[head.weight] if head and rule is None else None
    generation_config = read_json(ckpt.path / GENERATION_CONFIG, required=False)
    # a value head was read at the last attended token: like a causal LM, it gets a pad distinct from eos
    trained_pad = existing is not None and not value_head
    if rule is not None:
        trained_pad = head is not None and head.kind != "value"
    # a value model is fed the policy's ids: under auto, its pad is a token the vocabulary has (target.pad_rule)
    pad_mode = target.pad_rule if options.pad_token == "auto" else options.pad_token
    try:
        pad = choose_pad(pad_mode, tok, ckpt.config, generation_config, arch.pad_tokens, trained_pad, layout.media_ids)
    except CheckpointError:
        if pad_mode == options.pad_token:
            raise
        pad = choose_pad(
            options.pad_token, tok, ckpt.config, generation_config, arch.pad_tokens, trained_pad, layout.media_ids
        )
        grown = "the vocabulary grows past the policy's" if pad.is_new else "the pad is not the policy's"
        warning = f"no token of the vocabulary qualifies as pad (--pad-token existing): {grown}"
        pad = replace(pad, warnings=(*pad.warnings, warning))
    if ckpt.model_type in arch.pad_in_positions:
        _keep_position_pad(ckpt, pad, options)
    tokens = len(tok) + pad.is_new
    if tokens > 2 * vocab:
        raise CheckpointError(
            f"token ids reach {len(tok) - 1} but the embedding has {vocab} rows: is this the model's tokenizer?",
            ckpt.path / "tokenizer.json",
        )
    new_vocab = math.ceil(max(vocab, tokens) / 8) * 8
    labels = target.labels if rule is None else len(rule.labels)
    step_tag = None
    if options.step_separator is not None:
        step_tag = _step_tag(ckpt, options.step_separator, pad, eos_ids(ckpt.config, generation_config, tok))
    dropped = set(layout.dropped)
    if layout.embedding in dropped:
        raise PluginError(f"architecture {arch.name!r} drops the input embedding {layout.embedding}")

    replaced = dict(merge.parts) if merge else {}
    if new_vocab > vocab:  # the old rows as they are, then the mean row for each new one
        for name in layout.vocab_tables:
            replaced[name] = _grown(ckpt.tensors[name], replaced.get(name), new_vocab)
    emb = ckpt.tensors[layout.embedding]
    score_name = arch.score_name(ckpt.model_type, target.task)
    bias_how = None
    if rule is None:
        std = options.init_std if options.init_std is not None else default_init_std(hidden)
        score_dtype = existing.dtype if existing else emb.dtype
        parts, head_how = score_parts(existing, labels, hidden, score_dtype, std, options.seed, options.from_bt)
        if value_head:
            head_how = f"value head {head.weight}" + (" as [zeros; w]" if labels == 2 else "") + f" ({existing.dtype})"
        score = OutTensor(layout.score, score_dtype, (labels, hidden), tuple(parts))
        source_bias = ckpt.tensors[head.bias] if head is not None and head.bias else None
        heads, bias_how = target_heads(target, (score,), score_name, source_bias, options)
        names = tuple(f"LABEL_{i}" for i in range(labels))
    elif rule.kept:  # an MLP head's tensors written byte for byte, under its class's names
        heads, names, head_how = tuple(rule.tensors), rule.labels, rule.how
    else:  # a head rule's weight (and the bias its rule makes of the source's) as the target's head
        heads, bias_how = target_heads(target, tuple(rule.tensors), score_name, None, options, rule.bias)
        names, head_how = rule.labels, rule.how
    shards, index = _plan_shards(ckpt, dropped, replaced, list(heads), options, layout.renamed)

    cls = arch.class_name(ckpt.model_type, target.task)
    if rule is not None and rule.kept:  # the kept class the target names (Qwen2ForRewardModel, ...ProcessRewardModel)
        cls = class_of_config(ckpt.config) if target.per_token else kept_class_name(ckpt.model_type)
    config = _output_config(ckpt, registered, layout, target, names, new_vocab, pad, options.dtype, cls, step_tag)
    if rule is not None and rule.kept and not target.per_token:
        kept_config(config, heads)
    right_padding_only = ckpt.model_type in arch.right_padding_only
    json_files, generated = _plan_json(ckpt, right_padding_only, config, tok, generation_config, pad, options)
    skip = set(json_files) | set(generated) | {INDEX, BIN_INDEX, MANIFEST}
    copies = sorted(
        p.name
        for p in ckpt.path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in skip and not p.name.endswith(SKIPPED_SUFFIXES)
    )

    report = {
        "source": str(ckpt.path),
        "architecture": arch.name,
        "class": config["architectures"][0],
        "model_type": ckpt.model_type,
        "source_kind": "value-head model" if value_head else "reward model" if existing is not None else "causal LM",
        "head": {
            "from": existing.shape[0] if existing else None,
            "labels": labels,
            "how": head_how,
            **({"bias": bias_how} if bias_how else {}),
            **({"step_tag_id": step_tag} if step_tag is not None else {}),
        },
        "pad": {"token": pad.token, "id": pad.id, "action": pad.action, "reason": pad.reason},
        "vocab": {"from": vocab, "to": new_vocab, "tokenizer": tokens, "added_rows": new_vocab - vocab},
        "dtype": options.dtype or "unchanged",
        "dropped": sorted(dropped),
        "files": sorted([*shards, *json_files, *generated, *copies, *([INDEX] if index else []), MANIFEST]),
        "whole_file_copies": sorted(name for name, shard in shards.items() if isinstance(shard, Header)),
        "warnings": list(pad.warnings),
    }
    if rule is None and head is not None and head.bias and not value_head and not target.bias:
        report["warnings"] += bias_warnings(ckpt, head)  # a token classifier's score.bias, under a sequence target
    if rule is not None:
        report["source_kind"] = SOURCES[head.kind] if head is not None else "causal LM"
        report["head"] = {
            **report["head"],
            "from": head.rows(ckpt) if head else None,
            "names": list(names),
            **rule.report,
        }
        report["warnings"] += rule.warnings
        if layout.renamed:
            report["renamed"] = f"{len(layout.renamed)} backbone tensors under the family's names"
    if right_padding_only:
        report["warnings"].append(
            f"{ckpt.model_type}'s recurrence runs over pad tokens: score right-padded batches only"
            " (tokenizer padding_side is right)"
        )
    if target.per_token:
        report["target"] = target.what
    if value_head:
        report["value_head"] = {"file": existing.path.name, "bias": bias}
        if bias and not target.bias:
            report["warnings"].append(
                f"value head bias {bias:.6g} dropped (transformers' score has no bias): every reward is"
                f" {abs(bias):.6g} {'lower' if bias > 0 else 'higher'} than the value head's output; preferences and"
                " rankings are unchanged (see the README to add it back)"
            )
    if merge is not None:
        files = (adapter.config_path, adapter.weights) if options.hash_sources else ()
        hashes = {p.name: sha256(p, threading.Event()) for p in files}
        report["adapter"] = merge.report(hashes if options.hash_sources else None)
        report["source_kind"] += f" + {adapter.task_type or 'LoRA'} adapter"
        report["warnings"] += merge.warnings(ckpt.path)
    # a reward model's pad kept as it was trained is no warning (report["pad"]["reason"] says why); an unsound
    # one (an eos, none) carries its own warning in pad.warnings
    return Plan(ckpt, registered, json_files, generated, shards, index, copies, report)
