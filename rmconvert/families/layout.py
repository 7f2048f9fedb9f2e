"""What every tensor of one checkpoint is: the single description the engine, ``validate`` and the LoRA planner read.

An architecture computes it once per checkpoint (:meth:`rmconvert.Architecture.layout`); a new kind of source
or head is a new way of filling it in, not a new question asked of the plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import CheckpointError
from ..sources.checkpoint import VALUE_HEAD, Checkpoint, text_config

#: How a head's output becomes the reward model's ``score`` (docs/heads.md): ``rows`` copies (or, as asked, slices,
#: collapses or negates) the rows of a bias-free linear map read at the last token; ``gated`` is a linear map whose
#: rows are exportable one by one but whose reward mixes them with input-dependent weights (never collapsed);
#: ``kept`` is an MLP written byte for byte under ``score.0`` / ``score.2``; ``trigger`` is read only at a reward
#: token the caller appends (kept as it is: ``validate`` checks it, ``convert`` refuses).
RULES = ("rows", "gated", "kept", "trigger")


class HeadError(CheckpointError):
    """The reward head cannot be told: several heads, or a head-like tensor of an unknown shape."""


@dataclass(frozen=True)
class Head:
    """A reward head the source already has: what it is, where its reward is read and how it becomes ``score``.

    ``kind`` says whose layout it is (the table in docs/heads.md): ``score`` (the family's sequence classifier,
    1 to N rows), ``openrlhf`` (``<value_head_prefix>.weight``), ``value`` (TRL's or a linear GRM's
    ``v_head.summary``, inline or in a side file), ``starling`` (``v_head.weight``), ``ultrarm``
    (``regression_head.weight``), ``beaver`` (``score_head``), ``nemo`` (``rm_head``), ``regression`` (an ungated
    ``regression_layer``), ``gated`` (ArmoRM / QRM), ``mlp`` (Qwen2ForRewardModel's ``score.0/.2`` or GRM-sftreg's
    ``v_head.summary.0/.2``) and ``internlm2`` (``v_head.weight`` read at ``reward_token_id``). ``rule`` is one
    of RULES.
    """

    kind: str
    weight: str
    bias: str | None = None
    tensors: frozenset[str] = frozenset()  # every tensor of the head (dropped from the backbone)
    read_at: str = "last non-pad token"
    rule: str = "rows"
    negate: bool = False  # a cost model (lower = better): its rows are negated so that higher = better
    quantiles: int = 1  # rows per objective (QRM: the objective's reward is the mean of its quantile rows)
    labels: tuple[str, ...] = ()  # the names the source gives its rows (or objectives), if any
    kept: tuple[tuple[str, str], ...] = ()  # rule kept: (source tensor, output tensor), in order
    refused: str | None = None  # why convert cannot make a reward model of it (an affine normaliser, ...)

    def rows(self, ckpt: Checkpoint) -> int | None:
        """Rows of the head's weight (None unless it is 2-D); for a kept MLP, of its last layer."""
        shape = ckpt.tensors[self.kept[-2][0] if self.rule == "kept" else self.weight].shape
        return shape[0] if len(shape) == 2 else None

    def objectives(self, ckpt: Checkpoint) -> int | None:
        """Rewards the head gives (rows, or rows / quantiles)."""
        rows = self.rows(ckpt)
        return rows // self.quantiles if rows is not None else None


@dataclass(frozen=True)
class Layout:
    """What each tensor of a checkpoint is, in the reward model to be made of it.

    ``embedding`` is None when it cannot be told; ``error`` then says why (:meth:`require` raises it), so that
    ``validate`` reports it while ``convert`` refuses.
    """

    model_type: str
    embedding: str | None  # the input embedding: its rows are the vocabulary
    score: str  # the reward head's name in the output (the family's sequence classifier loads it)
    head: Head | None  # the source's own reward head, if any
    lm_head: frozenset[str]  # the language-model head's tensors
    dropped: frozenset[str]  # tensors with no place in the reward model: the LM head, the old head, extras
    hidden_size: int | None
    vocab_size: int | None
    renamed: dict[str, str] = field(default_factory=dict)  # backbone tensors written under another name
    error: CheckpointError | None = None
    tables: tuple[str, ...] = ()  # other tensors indexed by token id (Gemma 4's embed_tokens_per_layer)
    #: the text config's fields that hold a vocabulary size (Gemma 4's vocab_size_per_layer_input too)
    vocab_fields: tuple[str, ...] = ("vocab_size",)
    #: token ids the model's inputs hold besides text (image, video, audio placeholders): never the pad
    media_ids: frozenset[int] = frozenset()
    #: composite families: a tensor name (released, canonical or in-memory) -> the key the family's generation
    #: class loads it as, so that a LoRA adapter's module names find their base tensors whatever names it uses
    load_name: Callable[[str], str] | None = None

    @property
    def vocab_tables(self) -> tuple[str, ...]:
        """The tensors indexed by token id, which grow with the vocabulary (the input embedding first)."""
        return ((self.embedding,) if self.embedding else ()) + self.tables

    @property
    def head_tensors(self) -> frozenset[str]:
        """Every tensor of the source's own reward head (none without one)."""
        return self.head.tensors if self.head else frozenset()

    def backbone(self, ckpt: Checkpoint) -> dict[str, str]:
        """Every tensor kept in the reward model: source name -> its name in the output."""
        return {n: self.renamed.get(n, n) for n in ckpt.tensors if n not in self.dropped}

    def require(self) -> Layout:
        """This layout, or the CheckpointError that says why it is incomplete."""
        if self.error is not None:
            raise self.error
        return self


def _with(ckpt: Checkpoint, *names: str) -> tuple[str, ...] | None:
    """``names`` when every one is a tensor of ``ckpt``."""
    return names if all(n in ckpt.tensors for n in names) else None


def _prefixed(ckpt: Checkpoint, prefix: str) -> frozenset[str]:
    return frozenset(n for n in ckpt.tensors if n.startswith(prefix))


def _linear(kind: str, ckpt: Checkpoint, weight: str, bias: str | None = None, **fields) -> Head:
    bias = bias if bias and bias in ckpt.tensors else None
    return Head(kind, weight, bias, frozenset({weight, *([bias] if bias else [])}), **fields)


def _names(value, count: int | None = None) -> tuple[str, ...]:
    """Label names a source config carries (a list, or an id2label of meaningful names)."""
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value, key=lambda k: int(k) if str(k).isdigit() else 0)]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return ()
    if all(v.startswith("LABEL_") for v in value) or (count is not None and len(value) != count):
        return ()
    return tuple(value)


def _mlp(kind: str, ckpt: Checkpoint, prefix: str) -> Head | None:
    """A two-layer MLP head ``<prefix>0`` -> ReLU -> ``<prefix>2``, both with a bias (kept under ``score.``)."""
    names = _with(ckpt, *(f"{prefix}{i}.{p}" for i in (0, 2) for p in ("weight", "bias")))
    if names is None:
        return None
    kept = tuple((n, "score." + n[len(prefix) :]) for n in names)
    last = f"{prefix}2.weight"
    return Head(kind, last, f"{prefix}2.bias", _prefixed(ckpt, prefix), rule="kept", kept=kept)


def _beaver(ckpt: Checkpoint) -> Head:
    """safe-rlhf's LlamaForScore: ``score_head`` (``bias``), a cost model negated, a normaliser refused."""
    config = ckpt.config
    cost = config.get("score_type") == "cost"
    refused = None
    if config.get("do_normalize"):
        refused = (
            f"score_head's outputs go through a {config.get('normalizer_type') or 'an'} affine normaliser"
            " (do_normalize: true): its scale folds into the rows but its -mean shift is a bias transformers' score"
            " cannot hold"
        )
    head = _linear("beaver", ckpt, "score_head.weight", "score_head.bias", negate=cost, refused=refused)
    return replace(head, tensors=head.tensors | _prefixed(ckpt, "normalizer."))


def _candidates(ckpt: Checkpoint, score: str) -> list[Head]:
    """Every head ``ckpt`` holds, recognised by tensor names and shapes (never from ``architectures``)."""
    config, found = ckpt.config, []
    prefix = config.get("value_head_prefix")
    if isinstance(prefix, str) and f"{prefix}.weight" in ckpt.tensors:
        found.append(Head("openrlhf", f"{prefix}.weight", tensors=frozenset({f"{prefix}.weight"})))
    if score in ckpt.tensors:
        bias = score[: -len("weight")] + "bias" if score.endswith("weight") else None
        rows = ckpt.tensors[score].shape[0] if len(ckpt.tensors[score].shape) == 2 else None
        found.append(_linear("score", ckpt, score, bias, labels=_names(config.get("id2label"), rows)))
    elif head := _mlp("mlp", ckpt, "score."):
        found.append(head)
    if VALUE_HEAD + "weight" in ckpt.tensors and score not in ckpt.tensors:
        bias = VALUE_HEAD + "bias" if VALUE_HEAD + "bias" in ckpt.tensors else None
        found.append(Head("value", VALUE_HEAD + "weight", bias, _prefixed(ckpt, "v_head.")))
    elif head := _mlp("mlp", ckpt, VALUE_HEAD):
        found.append(head)
    if "v_head.weight" in ckpt.tensors:
        if isinstance(config.get("reward_token_id"), int):
            read_at = f"the reward token {config['reward_token_id']} the caller appends"
            found.append(_linear("internlm2", ckpt, "v_head.weight", rule="trigger", read_at=read_at))
        else:
            found.append(_linear("starling", ckpt, "v_head.weight"))
    if "regression_head.weight" in ckpt.tensors:
        found.append(_linear("ultrarm", ckpt, "regression_head.weight"))
    if "score_head.weight" in ckpt.tensors:
        found.append(_beaver(ckpt))
    for weight in ("rm_head.weight", "model.rm_head.weight"):
        if weight in ckpt.tensors:
            found.append(_linear("nemo", ckpt, weight, weight[: -len("weight")] + "bias"))
    if "regression_layer.weight" in ckpt.tensors:
        gating = _prefixed(ckpt, "gating.") | _prefixed(ckpt, "reward_transform_matrix")
        quantiles = config.get("num_quantiles") if gating else None
        quantiles = quantiles if type(quantiles) is int and quantiles > 0 else 1
        names = _names(config.get("objective_names") or config.get("objectives"))
        head = _linear(
            "gated" if gating else "regression",
            ckpt,
            "regression_layer.weight",
            rule="gated" if gating else "rows",
            quantiles=quantiles,
            labels=names,
        )
        if gating:
            read_at = "last non-pad token, mixed by a gating network read at the end of the prompt"
            head = replace(head, tensors=head.tensors | gating, read_at=read_at)
        found.append(head)
    return found


def find_head(ckpt: Checkpoint, score: str) -> Head | None:
    """The reward head ``ckpt`` already has (one of the kinds of :class:`Head`), or None for a causal LM.

    An OpenRLHF ``<value_head_prefix>.weight`` is the head whatever else there is, as the family's ``score`` is
    over a TRL value head; any other two heads are ambiguous (:class:`HeadError`)."""
    found = _candidates(ckpt, score)
    if found and found[0].kind == "openrlhf":
        return found[0]
    if len(found) > 1:
        raise HeadError(
            f"several reward heads: {', '.join(f'{h.kind} ({h.weight})' for h in found)}; remove all but one",
            ckpt.path,
        )
    head = found[0] if found else None
    if head is not None and head.kind != "score" and head.rule != "kept":
        shape = ckpt.tensors[head.weight].shape
        if len(shape) != 2:
            raise HeadError(f"{head.weight} is {list(shape)}: not a reward head [rows, hidden_size]", ckpt.path)
    return head


#: Backbone prefixes some reward models save under another name (Starling-RM-34B: ``transformer.*`` for a Llama
#: whose classifier loads ``model.*``): the name found -> the family's.
ALIASES = {"transformer.": "model."}


def backbone_alias(ckpt: Checkpoint, embedding: str) -> dict[str, str]:
    """Source name -> family name for every tensor of a backbone saved under an alias prefix (none when the
    family's input embedding is there under its own name)."""
    if embedding in ckpt.tensors:
        return {}
    for alias, prefix in ALIASES.items():
        if embedding.startswith(prefix) and alias + embedding[len(prefix) :] in ckpt.tensors:
            return {n: prefix + n[len(alias) :] for n in ckpt.tensors if n.startswith(alias)}
    return {}


def aliased_view(ckpt: Checkpoint, names: dict[str, str]) -> Checkpoint:
    """``ckpt`` with its tensors under the family's names (``names``: source -> family), for the layout only."""
    tensors = {names.get(n, n): replace(t, name=names.get(n, n)) for n, t in ckpt.tensors.items()}
    return replace(ckpt, tensors=tensors)


def from_view(layout: Layout, names: dict[str, str]) -> Layout:
    """A layout computed on :func:`aliased_view`, in the source's names, the alias written as ``renamed``."""
    back = {v: k for k, v in names.items()}
    source = lambda n: back.get(n, n)
    return replace(
        layout,
        embedding=source(layout.embedding) if layout.embedding else None,
        lm_head=frozenset(map(source, layout.lm_head)),
        dropped=frozenset(map(source, layout.dropped)),
        tables=tuple(map(source, layout.tables)),
        renamed={**{k: v for k, v in names.items() if v not in layout.dropped}, **layout.renamed},
    )


def describe(arch, ckpt: Checkpoint, embedding: str | None, outside: set[str], lm_head: set[str]) -> Layout:
    """The layout of ``ckpt`` under ``arch`` from its input embedding, the tensors outside the reward model and the
    LM head's; ``embedding`` None means it could not be told (:meth:`Layout.require` then raises ``error``)."""
    score = arch.score_name(ckpt.model_type)
    try:
        head, error = find_head(ckpt, score), None
    except HeadError as exc:
        head, error = None, exc
    dropped = set(outside) | (head.tensors if head else set())
    layout = Layout(
        model_type=ckpt.model_type,
        embedding=embedding,
        score=score,
        head=head,
        lm_head=frozenset(lm_head),
        dropped=frozenset(dropped),
        hidden_size=arch.hidden_size(ckpt.config),
        vocab_size=text_config(ckpt.config).get("vocab_size"),
    )
    return replace(layout, error=error) if error is not None and embedding is not None else layout
