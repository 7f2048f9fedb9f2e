"""What every tensor of one checkpoint is: the single description the engine, ``validate`` and the LoRA planner read.

An architecture computes it once per checkpoint (:meth:`rmconvert.Architecture.layout`); a new kind of source
or head is a new way of filling it in, not a new question asked of the plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CheckpointError
from ..sources.checkpoint import VALUE_HEAD, Checkpoint, text_config


@dataclass(frozen=True)
class Head:
    """A reward head the source already has.

    ``kind`` says whose layout it is: ``score`` (the family's sequence classifier; with ``bias``, a token
    classifier's), ``openrlhf`` (``<value_head_prefix>.weight``), ``value`` (TRL's ``v_head.summary``, inline
    or in a side file) or ``mlp`` (layers with a nonlinearity between them: Qwen2.5-Math-RM/PRM's
    ``score.0``/``score.2``; ``weight`` is the last layer's). Every kind but ``mlp`` is a linear map.
    """

    kind: str
    weight: str
    bias: str | None = None
    tensors: frozenset[str] = frozenset()  # every tensor of the head (dropped from the backbone)
    read_at: str = "last non-pad token"

    def rows(self, ckpt: Checkpoint) -> int | None:
        """Rows of the head's weight (None unless it is 2-D)."""
        shape = ckpt.tensors[self.weight].shape
        return shape[0] if len(shape) == 2 else None


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

    @property
    def vocab_tables(self) -> tuple[str, ...]:
        """The tensors indexed by token id, which grow with the vocabulary (the input embedding)."""
        return (self.embedding,) if self.embedding else ()

    def backbone(self, ckpt: Checkpoint) -> dict[str, str]:
        """Every tensor kept in the reward model: source name -> its name in the output."""
        return {n: self.renamed.get(n, n) for n in ckpt.tensors if n not in self.dropped}

    def require(self) -> Layout:
        """This layout, or the CheckpointError that says why it is incomplete."""
        if self.error is not None:
            raise self.error
        return self


def find_head(ckpt: Checkpoint, score: str) -> Head | None:
    """The reward head ``ckpt`` already has: the family's ``score``, OpenRLHF's ``<value_head_prefix>.weight``,
    or TRL's value head ``v_head.summary.weight`` (inline, or in a value_head file beside the weights)."""
    prefix = ckpt.config.get("value_head_prefix")
    if isinstance(prefix, str) and f"{prefix}.weight" in ckpt.tensors:
        return Head("openrlhf", f"{prefix}.weight", tensors=frozenset({f"{prefix}.weight"}))
    if score not in ckpt.tensors and VALUE_HEAD + "weight" in ckpt.tensors:
        bias = VALUE_HEAD + "bias" if VALUE_HEAD + "bias" in ckpt.tensors else None
        tensors = frozenset(n for n in ckpt.tensors if n.startswith("v_head."))
        return Head("value", VALUE_HEAD + "weight", bias, tensors)
    if score in ckpt.tensors:
        bias = score[: -len("weight")] + "bias" if score.endswith(".weight") else None
        bias = bias if bias in ckpt.tensors else None  # a token classifier's (TRL's PRMTrainer output)
        return Head("score", score, bias, tensors=frozenset({score, bias} - {None}))
    for prefix in ("score.", VALUE_HEAD):  # Qwen2.5-Math-RM/PRM's score.0/score.2, GRM's v_head.summary.0/.2
        layers = sorted({n[len(prefix) :].split(".")[0] for n in ckpt.tensors if n.startswith(prefix)})
        if len(layers) > 1 and all(x.isdigit() for x in layers):
            tensors = frozenset(n for n in ckpt.tensors if n.startswith(prefix))
            return Head("mlp", f"{prefix}{layers[-1]}.weight", tensors=tensors)
    return None


def describe(arch, ckpt: Checkpoint, embedding: str | None, outside: set[str], lm_head: set[str]) -> Layout:
    """The layout of ``ckpt`` under ``arch`` from its input embedding, the tensors outside the reward model and the
    LM head's; ``embedding`` None means it could not be told (:meth:`Layout.require` then raises ``error``)."""
    score = arch.score_name(ckpt.model_type)
    head = find_head(ckpt, score)
    dropped = set(outside) | (head.tensors if head else set())
    return Layout(
        model_type=ckpt.model_type,
        embedding=embedding,
        score=score,
        head=head,
        lm_head=frozenset(lm_head),
        dropped=frozenset(dropped),
        hidden_size=arch.hidden_size(ckpt.config),
        vocab_size=text_config(ckpt.config).get("vocab_size"),
    )
