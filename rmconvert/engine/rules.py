"""Head rules: how the source's head (a :class:`rmconvert.families.layout.Head`) or its LM head becomes ``score``.

Each rule reads only the Head the layout describes and the options; the bytes are row copies (``ByteRange``) or
rows computed by the writer (``Computed``: a negation, a fixed combination of rows in float64 rounded once to the
head's dtype). The table of head kinds and what each rule writes is docs/heads.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial

from ..dtypes import FLOAT_DTYPES, decode, encode
from ..errors import CheckpointError, UsageError
from ..families.layout import Head, Layout
from ..io.safetensors import DTYPE_BITS, ByteRange, Computed, OutTensor, TensorInfo
from ..sources.checkpoint import Checkpoint, text_config
from ..sources.tokenizer_files import TokenizerFiles
from .head import row

#: Where each kind comes from, for reports and messages.
SOURCES = {
    "score": "sequence classifier",
    "openrlhf": "OpenRLHF reward model",
    "value": "TRL / linear GRM value head",
    "starling": "Starling-RM (v_head)",
    "ultrarm": "UltraRM (regression_head)",
    "beaver": "Beaver / safe-rlhf (score_head)",
    "nemo": "NeMo reward model (rm_head)",
    "regression": "multi-objective regression layer",
    "gated": "ArmoRM / QRM gated multi-objective head",
    "mlp": "MLP head (Qwen2ForRewardModel / INF-ORM / GRM-sftreg)",
    "internlm2": "InternLM2 reward model (reward_token_id)",
    "tokens": "LM-head tokens",
}


@dataclass
class HeadPlan:
    """The head tensors to write and what the report says of them."""

    tensors: list[OutTensor]
    labels: tuple[str, ...]  # id2label, in row order
    how: str
    report: dict = field(default_factory=dict)  # added to report["head"]
    warnings: list[str] = field(default_factory=list)
    kept: bool = False  # an MLP head kept as it is (its own class)
    # a token classifier's bias made of the source head's by the weight's rule: (parts, dtype, how); None: zeros
    bias: tuple[tuple, str, str] | None = None


def _rows(info: TensorInfo, indices: list[int]):
    """Rows ``indices`` of a 2-D tensor, decoded as float64, read one at a time."""
    import numpy as np

    with open(info.path, "rb") as f:
        return np.stack(
            [
                decode(os.pread(f.fileno(), info.row_bytes, info.offset + i * info.row_bytes), info.dtype)
                for i in indices
            ]
        ).astype(np.float64)


def combination(info: TensorInfo, coefficients: tuple[tuple[int, float], ...], dtype: str) -> bytes:
    """``sum(c * row_i)`` over ``coefficients`` ((row, c), ...), in float64, rounded once to ``dtype``."""
    import numpy as np

    indices = [i for i, _ in coefficients]
    values = np.array([c for _, c in coefficients], dtype=np.float64)
    return encode(values @ _rows(info, indices), dtype)


def mean(info: TensorInfo, indices: tuple[int, ...], dtype: str) -> bytes:
    """The mean of rows ``indices`` (their float64 sum divided by their count), rounded once to ``dtype``."""
    return encode(_rows(info, list(indices)).sum(axis=0) / len(indices), dtype)


def negated(info: TensorInfo, index: int) -> bytes:
    """Row ``index`` negated (exact: the sign bit flips)."""
    return encode(-_rows(info, [index])[0], info.dtype)


def _bias_values(ckpt: Checkpoint, head: Head) -> list[float] | None:
    if not head.bias or head.bias not in ckpt.tensors:
        return None
    info = ckpt.tensors[head.bias]
    with open(info.path, "rb") as f:
        raw = os.pread(f.fileno(), info.nbytes, info.offset)
    return [float(v) for v in decode(raw, info.dtype)]


def bias_warnings(ckpt: Checkpoint, head: Head) -> list[str]:
    """The warning that a non-zero bias of ``head`` is dropped (transformers' score has none)."""
    bias = _bias_values(ckpt, head)
    if not bias or not any(bias):
        return []
    shown = ", ".join(f"{b:.6g}" for b in bias[:4]) + (", ..." if len(bias) > 4 else "")
    message = (
        f"{head.bias} [{shown}] dropped (transformers' score has no bias): rewards are shifted by a constant;"
        " preferences and rankings are unchanged"
    )
    return [message]


def resolve_tokens(tokens: tuple[str, ...], tok: TokenizerFiles) -> list[int]:
    """Each TOKEN's id, exactly: a vocabulary entry as written (case-sensitive), else text the tokenizer encodes as
    one token; digits are an id. A TOKEN that is several tokens or none is refused."""
    encoder = None
    ids = []
    for token in tokens:
        if token.isdigit():
            ids.append(int(token))
            continue
        if token in tok.ids:
            ids.append(tok.ids[token])
            continue
        if encoder is None:
            from tokenizers import Tokenizer

            encoder = Tokenizer.from_str(json.dumps(tok.tokenizer))
        found = encoder.encode(token, add_special_tokens=False).ids
        if len(found) != 1:
            pieces = encoder.encode(token, add_special_tokens=False).tokens
            what = f"{len(found)} tokens {pieces}" if found else "not in the vocabulary"
            raise UsageError(f"--head-from-tokens: {token!r} is {what}; give one token (case-sensitive) or its id")
        ids.append(found[0])
    if len(set(ids)) != len(ids):
        raise UsageError(f"--head-from-tokens {','.join(tokens)}: the same token twice (ids {ids})")
    return ids


def _lm_table(ckpt: Checkpoint, layout: Layout, hidden: int) -> TensorInfo:
    """The LM head's weight [vocab, H], or the input embedding when the LM head is tied to it."""
    heads = [ckpt.tensors[n] for n in sorted(layout.lm_head) if len(ckpt.tensors[n].shape) == 2]
    heads = [t for t in heads if t.shape[1] == hidden and t.dtype in FLOAT_DTYPES]
    if len(heads) == 1:
        return heads[0]
    if not heads and text_config(ckpt.config).get("tie_word_embeddings", True) and layout.embedding:
        return ckpt.tensors[layout.embedding]
    raise CheckpointError(
        f"--head-from-tokens: no single LM head [vocab, {hidden}] ({sorted(layout.lm_head) or 'none'}) and the"
        " embedding is not tied",
        ckpt.path,
    )


def _names(options, count: int, default: tuple[str, ...]) -> tuple[str, ...]:
    if options.label_names is not None:
        if len(options.label_names) != count:
            raise UsageError(f"--label-names gives {len(options.label_names)} name(s) for a head of {count} row(s)")
        return tuple(options.label_names)
    if len(default) == count:
        return default
    return tuple(f"LABEL_{i}" for i in range(count))


def _choose_one(layout: Layout) -> str:
    """The options that make one row of a multi-row head (a gated head's rows mix only through its gating)."""
    gated = layout.head is not None and layout.head.rule == "gated"
    return "choose one with --objective" + ("" if gated else " or --weights")


def _bt(options, layout: Layout, dtype: str, parts: list, hidden: int, labels: tuple[str, ...]):
    """``--head bt`` on a 1-row result: ``[zeros; w]``."""
    if options.head != "bt":
        return parts, labels, ""
    if len(parts) != 1:
        raise UsageError(
            f"--head bt makes a 2-label [zeros; w] head of one row; this head has {len(parts)}: {_choose_one(layout)}"
        )
    return [bytes(hidden * DTYPE_BITS[dtype] // 8), parts[0]], ("LABEL_0", labels[0]), ", as [zeros; w]"


def _target_names(options, labels: tuple[str, ...]) -> tuple[str, ...]:
    """A token classifier's labels are TRL's ``LABEL_i`` (a PRM's ``LABEL_1`` is the correct step) unless named."""
    return () if options.target.per_token else labels


def from_tokens(ckpt: Checkpoint, layout: Layout, options, hidden: int, tok: TokenizerFiles) -> HeadPlan:
    """``--head-from-tokens``: the LM head's rows of the tokens, or for two tokens ``row[second] - row[first]``
    (vLLM's ``from_2_way_softmax``: sigmoid of the reward is the 2-way softmax's second probability)."""
    if layout.head is not None:
        raise UsageError(
            f"--head-from-tokens makes score from an LM head; {ckpt.path} already has a reward head"
            f" ({layout.head.kind}: {layout.head.weight})"
        )
    table = _lm_table(ckpt, layout, hidden)
    ids = resolve_tokens(options.head_from_tokens, tok)
    for token, i in zip(options.head_from_tokens, ids):
        if not 0 <= i < table.shape[0]:
            raise UsageError(
                f"--head-from-tokens: {token!r} is id {i}, beyond the {table.shape[0]} rows of {table.name}"
            )
    row_bytes = table.row_bytes
    if len(ids) == 2 and options.head != "prm":  # a PRM keeps both rows: softmax over [NEG, POS], LABEL_1 = POS
        no, yes = ids
        coefficients = ((yes, 1.0), (no, -1.0))
        parts = [Computed(partial(combination, table, coefficients, table.dtype), row_bytes)]
        first, second = options.head_from_tokens
        labels, how = (second,), f"{table.name}[{yes}] - {table.name}[{no}] ({second!r} - {first!r}), rounded once"
    else:
        parts = [row(table, i) for i in ids]
        labels = tuple(options.head_from_tokens)
        how = f"rows {ids} of {table.name} ({', '.join(map(repr, options.head_from_tokens))})"
    labels = _names(options, len(parts), _target_names(options, labels))
    parts, labels, bt = _bt(options, layout, table.dtype, parts, hidden, labels)
    tensor = OutTensor(layout.score, table.dtype, (len(parts), hidden), tuple(parts))
    report = {
        "kind": "tokens",
        "rule": "difference" if len(ids) == 2 and options.head != "prm" else "rows",
        "tokens": dict(zip(options.head_from_tokens, ids)),
        "table": table.name,
    }
    return HeadPlan([tensor], labels, how + bt, report)


def _objective(head: Head, options, objectives: int) -> int:
    """The row (or quantile group) ``--objective NAME|k`` names."""
    value = options.objective
    names = head.labels or ()
    if value in names:
        return names.index(value)
    if value.lstrip("-").isdigit():
        k = int(value)
        if 0 <= k < objectives:
            return k
        raise UsageError(
            f"--objective {k} is out of range: the head has {objectives} objective(s), 0 to {objectives - 1}"
        )
    known = f"; its names are {', '.join(names)}" if names else "; the head names none: give a row number"
    raise UsageError(f"--objective {value!r} is not an objective of the head{known}")


def from_rows(ckpt: Checkpoint, layout: Layout, options, hidden: int) -> HeadPlan:
    """A linear head (rule ``rows`` or ``gated``): its rows, one row (``--objective``) or one fixed combination
    (``--weights``), negated for a cost model; QRM's quantile rows averaged per objective."""
    head = layout.head
    info = ckpt.tensors[head.weight]
    if len(info.shape) != 2 or info.shape[1] != hidden or info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{head.weight} is {info.dtype}{list(info.shape)}; a linear reward head is [rows, {hidden}]", info.path
        )
    rows, q = info.shape[0], head.quantiles
    id2label = ckpt.config.get("id2label")
    if head.kind == "score" and isinstance(id2label, dict) and len(id2label) != rows:
        raise CheckpointError(
            f"id2label has {len(id2label)} label{'' if len(id2label) == 1 else 's'} but {head.weight} has {rows} rows",
            ckpt.config_path,
        )
    if rows % q:
        raise CheckpointError(f"{head.weight} has {rows} rows, not a multiple of num_quantiles {q}", info.path)
    objectives = rows // q
    sign = -1.0 if head.negate else 1.0
    dtype, row_bytes = info.dtype, info.row_bytes
    source = SOURCES.get(head.kind, head.kind)
    report = {"kind": head.kind, "rule": head.rule}
    warnings = []

    def one(k: int, info=info, dtype=dtype):  # objective k: its row (negated for a cost model) or its quantiles' mean
        row_bytes = info.row_bytes
        if q > 1:
            indices = tuple(range(k * q, (k + 1) * q))
            return Computed(partial(mean, info, indices, dtype), row_bytes)
        if head.negate:
            return Computed(partial(negated, info, k), row_bytes)
        return row(info, k)

    # a token classifier keeps the source head's bias, made by the rule that makes the weight (an entry per row)
    bias_info = ckpt.tensors.get(head.bias) if head.bias and options.target.bias else None
    if bias_info is not None and (bias_info.shape != (rows,) or bias_info.dtype not in FLOAT_DTYPES):
        raise CheckpointError(f"{head.bias} is {bias_info.dtype}{list(bias_info.shape)}; expected [{rows}]", info.path)
    bias = None

    if options.weights is not None:
        if head.rule == "gated":
            raise UsageError(
                f"--weights: {head.weight} is gated ({source}): its objectives are mixed by weights a gating network"
                " computes from each prompt, so no fixed collapse reproduces its reward; --objective NAME|k gives one"
                " objective's reward"
            )
        if len(options.weights) != objectives:
            raise UsageError(f"--weights gives {len(options.weights)} weight(s) for a head of {objectives} row(s)")
        coefficients = tuple((i, sign * c) for i, c in enumerate(options.weights) if c)
        parts = [Computed(partial(combination, info, coefficients, dtype), row_bytes)]
        if bias_info is not None:
            size = bias_info.row_bytes
            bias = ((Computed(partial(combination, bias_info, coefficients, bias_info.dtype), size),), "weights")
        labels = ("reward",)
        how = f"{'-' if head.negate else ''}sum of weights x rows of {head.weight}, in float64 rounded once to {dtype}"
        report["weights"] = list(options.weights)
    elif options.objective is not None:
        k = _objective(head, options, objectives)
        parts = [one(k)]
        if bias_info is not None:
            bias = ((one(k, bias_info, bias_info.dtype),), f"entry {k}")
        labels = (head.labels[k],) if len(head.labels) == objectives else (f"LABEL_{k}",)
        what = f"quantile rows {k * q}..{(k + 1) * q - 1} averaged" if q > 1 else f"row {k}"
        how = f"objective {k}: {what} of {head.weight}" + (", negated (a cost model)" if head.negate else "")
        report["objective"] = k
    else:
        parts = [one(k) for k in range(objectives)]
        if bias_info is not None:
            bias = (tuple(one(k, bias_info, bias_info.dtype) for k in range(objectives)), "as the rows")
        labels = head.labels if len(head.labels) == objectives else ()
        how = f"{objectives} row(s) of {head.weight}" + (f", each the mean of its {q} quantile rows" if q > 1 else "")
        how += ", negated (a cost model)" if head.negate else ""
    if head.rule == "gated" and options.objective is None:
        warnings.append(
            f"{head.weight} is gated: the {objectives} objectives are written as {objectives} labels; the source's"
            " single reward mixes them with prompt-dependent gating weights, which no fixed head reproduces"
        )
    if head.negate:
        warnings.append(f"{head.weight} is a cost model's head (score_type cost): negated so that higher is better")
    dropped = bias_warnings(ckpt, head) if not options.target.bias else []
    if dropped:
        warnings += dropped
        report["bias"] = _bias_values(ckpt, head)
    labels = _names(options, len(parts), _target_names(options, labels))
    parts, labels, bt = _bt(options, layout, dtype, parts, hidden, labels)
    tensor = OutTensor(layout.score, dtype, (len(parts), hidden), tuple(parts))
    made = None
    if bias is not None:
        made = (bias[0], bias_info.dtype, f"{head.bias} {bias[1]}" + (", negated" if head.negate else ""))
    return HeadPlan([tensor], labels, f"{source}: {how}{bt}", report, warnings, bias=made)


def _refuse_mlp(ckpt: Checkpoint, head: Head, target) -> None:
    """An MLP head no linear ``score`` computes, for a target that has only one (a value model; a PRM of another
    class than Qwen2ForProcessRewardModel, or not of 2 labels)."""
    layers = sorted({n.rsplit(".", 1)[0] for n in head.tensors})
    raise CheckpointError(
        f"{'/'.join(layers)} is an MLP head (linear layers with a nonlinearity between them): no linear score"
        f" [labels, H] computes it, so it cannot become a {target.what} (--head {target.name});"
        " validate it as it is, or serve it with the code it was released with",
        ckpt.tensors[head.weight].path,
    )


def kept(ckpt: Checkpoint, layout: Layout, options, hidden: int) -> HeadPlan:
    """An MLP head written byte for byte under ``score.0`` / ``score.2`` (renamed from GRM's ``v_head.summary``):
    a reward model's (Qwen2ForRewardModel), or under ``--head prm`` a PRM's whose class holds it
    (Qwen2ForProcessRewardModel, 2 labels); any other token classifier is refused."""
    from ..families.target import PROCESS_REWARD_CLASSES, class_of_config

    head, target = layout.head, options.target
    if target.per_token and not (
        target.name == "prm"
        and class_of_config(ckpt.config) in PROCESS_REWARD_CLASSES
        and head.rows(ckpt) == target.labels
    ):
        _refuse_mlp(ckpt, head, target)
    if options.objective is not None or options.weights is not None or options.head == "bt":
        raise UsageError(
            f"{head.weight} is the last layer of an MLP head ({SOURCES['mlp']}): it is kept as it is, never sliced,"
            " collapsed or made a [zeros; w] head"
        )
    infos = [ckpt.tensors[n] for n, _ in head.kept]
    first, _, last, _ = infos
    inner = first.shape[0] if len(first.shape) == 2 else None
    if (
        len(first.shape) != 2
        or first.shape[1] != hidden
        or len(last.shape) != 2
        or last.shape[1] != inner
        or infos[1].shape != (inner,)
        or infos[3].shape != (last.shape[0],)
        or any(t.dtype not in FLOAT_DTYPES for t in infos)
    ):
        shapes = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in infos)
        raise CheckpointError(f"not an MLP head [I, {hidden}] + [I] -> [n, I] + [n]: {shapes}", first.path)
    tensors = [
        OutTensor(new, t.dtype, t.shape, (ByteRange(t.path, t.offset, t.nbytes),))
        for (_, new), t in zip(head.kept, infos)
    ]
    labels = _names(options, last.shape[0], ())
    layers = lambda names: "/".join(sorted({n.rsplit(".", 1)[0] for n in names}))
    sources, targets = [a for a, _ in head.kept], [b for _, b in head.kept]
    how = f"MLP head {layers(sources)} kept" + (f" as {layers(targets)}" if sources != targets else "")
    report = {"kind": "mlp", "rule": "kept", "inner": inner}
    return HeadPlan(tensors, labels, how, report, kept=True)


def plan_head(ckpt: Checkpoint, layout: Layout, options, hidden: int, tok: TokenizerFiles) -> HeadPlan | None:
    """The head of the reward model by the rule its kind and the options call for; None for the rules of before
    (a new head, or a 1- or 2-row score, OpenRLHF or value head under ``--head``), which engine/head.py writes."""
    head = layout.head
    if options.head_from_tokens is not None:
        return _for_target(from_tokens(ckpt, layout, options, hidden, tok), options, layout)
    if head is None:
        if options.objective is not None or options.weights is not None:
            given = "--objective" if options.objective is not None else "--weights"
            raise UsageError(f"{given} takes rows of a reward head; {ckpt.path} has none (a causal LM)")
        return None
    if head.refused:
        raise CheckpointError(f"{head.weight}: {head.refused}; convert cannot make it exact", ckpt.path)
    if head.rule == "trigger":
        raise CheckpointError(
            f"{head.weight} is read only at {head.read_at}, and transformers has no class for it: keep it as it is"
            " (vLLM's InternLM2ForRewardModel and sglang serve it; `rmconvert validate` checks reward_token_id)",
            ckpt.path,
        )
    if head.rule == "kept":
        return kept(ckpt, layout, options, hidden)
    rows = head.rows(ckpt)
    if head.kind in ("score", "openrlhf", "value") and rows in (1, 2) and not options.head_rule:
        return None
    return _for_target(from_rows(ckpt, layout, options, hidden), options, layout)


def _for_target(plan: HeadPlan, options, layout: Layout) -> HeadPlan:
    """A token classifier's head has the target's rows: 1 for ``--head value``, 2 for ``--head prm``."""
    target = options.target
    if target.per_token and len(plan.labels) != target.labels:
        raise UsageError(
            f"--head {target.name} makes a {target.what} of {target.labels} row(s); this head rule gives"
            f" {len(plan.labels)} ({plan.how}){': ' + _choose_one(layout) if target.labels == 1 else ''}"
        )
    return plan
