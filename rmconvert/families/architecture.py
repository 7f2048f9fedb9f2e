"""What a plugin tells the engine about a model family: names, tensors, tokens, schema."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .. import schemas
from ..errors import CheckpointError
from ..sources.checkpoint import text_config
from .layout import Layout, aliased_view, backbone_alias, describe, from_view
from .target import SEQUENCE, TOKEN

#: Special tokens that serve as a pad when a tokenizer already carries one (Llama 3.1, OLMo 2, OLMoE, ...).
PAD_TOKENS = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]")

#: Config fields that hold a dropout probability, across transformers' decoder-only families.
DROPOUT_FIELDS = (
    "attention_dropout",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "dropout",
)


class Architecture:
    """Describes one model family; the engine does the conversion from this description.

    Subclass it, set the class attributes, and register an instance from the
    ``rmconvert_register_architectures`` hook. Override a method only for an odd layout.
    """

    #: Unique name, used by ``--arch``.
    name: str = ""
    #: config.json ``model_type`` values this architecture converts.
    model_types: tuple[str, ...] = ()
    #: Class name written to config.json ``architectures``; None asks transformers' mapping.
    sequence_classification_class: str | None = None
    #: Class name of the token classifier (``--head value`` / ``prm``); None asks transformers' mapping.
    token_classification_class: str | None = None
    #: The input embedding tensor, whose rows are the vocabulary.
    embedding: str = "model.embed_tokens.weight"
    #: The reward head of the sequence-classification class: ``[1 or 2, hidden_size]``, no bias.
    score: str = "score.weight"
    #: Tensor name prefixes of the language-model head, dropped from a reward model.
    lm_head_prefixes: tuple[str, ...] = ("lm_head.",)
    #: Other tensor name prefixes to drop (e.g. multi-token-prediction layers).
    drop_prefixes: tuple[str, ...] = ()
    #: Config fields set to 0.0 when present (open-instruct trains reward models without dropout).
    dropout_fields: tuple[str, ...] = DROPOUT_FIELDS
    #: Existing special tokens to reuse as the pad, in order of preference.
    pad_tokens: tuple[str, ...] = PAD_TOKENS
    #: model_types whose recurrence runs over pad tokens (their layers ignore the attention mask), so only
    #: right-padded batches score exactly: their tokenizers are set to pad on the right.
    right_padding_only: tuple[str, ...] = ()
    #: model_types whose pad id is part of the model (XGLM's position table skips it): a converted reward model
    #: keeps the source's pad id, and a --pad-token that would move it is refused.
    pad_in_positions: tuple[str, ...] = ()
    #: Whether ``--head prm`` / ``value`` (a token classifier of the family) can be converted.
    per_token_heads: bool = True
    #: JSON schema (draft 2020-12) the reward-model config.json must satisfy.
    schema: Path = schemas.path("reward-model")
    #: True only for a catch-all architecture, consulted after every specific one.
    fallback: bool = False

    def claims(self, model_type: str) -> bool:
        """Whether this architecture converts checkpoints of ``model_type``."""
        return model_type in self.model_types

    def class_name(self, model_type: str, task: str = SEQUENCE) -> str:
        """The class name for config.json ``architectures``: the sequence classifier, or with ``task="token"``
        the token classifier (rmconvert.families.target)."""
        explicit = self.token_classification_class if task == TOKEN else self.sequence_classification_class
        if explicit:
            return explicit
        from .modeling import class_name

        return class_name(model_type, task)

    def score_name(self, model_type: str, task: str = SEQUENCE) -> str:
        """Name of the head's weight the class of ``model_type`` for ``task`` loads (its bias: ``.bias`` in place
        of ``.weight``, for a token classifier)."""
        if task == TOKEN and not self.token_classification_class:
            from .modeling import token_score_name

            return token_score_name(model_type)
        return self.score

    def embedding_name(self, ckpt) -> str:
        """Name of the input embedding tensor of ``ckpt`` (a :class:`rmconvert.sources.checkpoint.Checkpoint`)."""
        if self.embedding not in ckpt.tensors:
            raise CheckpointError(f"no tensor {self.embedding!r}: the {self.name} layout expects it", ckpt.path)
        return self.embedding

    def hidden_size(self, config: dict) -> int | None:
        """The model width from config.json (a family may name it otherwise, e.g. GPT-2's ``n_embd``)."""
        return text_config(config).get("hidden_size")

    def dropped(self, ckpt) -> set[str]:
        """Names of ``ckpt``'s tensors that have no place in the reward model (the LM head, ...)."""
        return {n for n in ckpt.tensors if n.startswith(self.lm_head_prefixes + self.drop_prefixes)}

    def layout(self, ckpt) -> Layout:
        """What every tensor of ``ckpt`` is (:class:`rmconvert.families.layout.Layout`), computed once per
        checkpoint; the engine, ``validate`` and the LoRA planner read only this. The default describes the
        checkpoint with :meth:`embedding_name`, :meth:`dropped`, :meth:`score_name` and :meth:`hidden_size`:
        override those for an odd layout, or this method to compute everything at once. A backbone saved under an
        alias prefix (:data:`rmconvert.families.layout.ALIASES`) is described under the family's names and written
        under them (``renamed``)."""
        names = backbone_alias(ckpt, self.embedding)
        if names:
            return from_view(self._described(aliased_view(ckpt, names)), names)
        return self._described(ckpt)

    def _described(self, ckpt) -> Layout:
        lm_head = {n for n in ckpt.tensors if n.startswith(self.lm_head_prefixes)}
        try:
            embedding, outside = self.embedding_name(ckpt), self.dropped(ckpt)
        except CheckpointError as exc:
            return replace(describe(self, ckpt, None, lm_head, lm_head), error=exc)
        return describe(self, ckpt, embedding, outside, lm_head)

    def text_only(self, ckpt):
        """``ckpt`` seen as a checkpoint of its language model's own text family (``--text-only``): the
        vision-language families override it; any other refuses."""
        raise CheckpointError(
            f"--text-only: {ckpt.model_type} is not a vision-language model (it is text-only already)", ckpt.config_path
        )

    def output_config(self, config: dict) -> None:
        """Adjust the reward model's config.json in place, after the engine's own changes (default: none)."""

    def register_with_transformers(self, model_type: str, task: str = SEQUENCE) -> type:
        """Make ``AutoModelForSequenceClassification`` (``AutoModelForTokenClassification`` with ``task="token"``)
        load ``model_type``; returns the class."""
        from .modeling import register_sequence_classification_class, register_token_classification_class

        if task == TOKEN:
            return register_token_classification_class(model_type, self.class_name(model_type, TOKEN))
        return register_sequence_classification_class(model_type, self.class_name(model_type))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
