"""Any decoder-only model_type of the installed transformers, with or without a native sequence classifier.

Claims only what no specific plugin claims. The layout comes from transformers itself (see
:mod:`rmconvert.families.structure`): the causal-LM class built on the meta device names the input embedding, the output
head(s), the backbone and the key renames applied on load. Only when transformers cannot build the family are
the embedding and the heads told by shape and name, and an ambiguous case is an error naming both reasons.
"""

import re
from dataclasses import replace
from functools import cached_property

from rmconvert import Architecture, hookimpl
from rmconvert.errors import CheckpointError
from rmconvert.families.layout import describe
from rmconvert.sources.checkpoint import text_config

#: Fallback only. Output heads: a top-level module of these names (``lm_head``, GPT-NeoX's ``embed_out``, RWKV's
#: ``head``), or an ``unembed`` anywhere. (``output`` is not matched inside the backbone: RWKV's attention has one.)
OUTPUT_HEAD = re.compile(r"^(lm_head|embed_out|head|output)\.|(^|\.)unembed\.")


class Generic(Architecture):
    name = "generic"
    fallback = True

    @cached_property
    def right_padding_only(self) -> tuple[str, ...]:
        """RWKV warns that the attention mask "is unused in this model"; xLSTM takes none; RecurrentGemma's
        recurrent blocks take it and do not apply it. transformers 4's BioGPT classifier reads the reward at
        (non-pad tokens - 1), which is the last token only when padding is on the right."""
        from importlib.metadata import version

        transformers_4 = int(version("transformers").split(".")[0]) < 5
        return ("recurrent_gemma", "rwkv", "xlstm") + (("biogpt",) if transformers_4 else ())

    pad_in_positions = ("xglm",)

    @cached_property
    def model_types(self) -> tuple[str, ...]:
        """Every decoder-only family; those without a native class get one built (see rmconvert.families.modeling)."""
        from rmconvert.families.modeling import decoder_only_model_types

        return tuple(sorted(decoder_only_model_types()))

    def claims(self, model_type):
        """Whether ``model_type`` is a decoder-only family of the installed transformers, asked of it alone
        (listing :attr:`model_types` imports every configuration class of transformers: seconds)."""
        from rmconvert.families.modeling import is_decoder_only

        return is_decoder_only(model_type)

    def hidden_size(self, config):
        tc = text_config(config)
        if "hidden_size" in tc:
            return tc["hidden_size"]
        from rmconvert.families.modeling import config_attribute_map

        alias = config_attribute_map(config.get("model_type", "")).get("hidden_size")
        return tc.get(alias) if alias else None

    def score_name(self, model_type, task="sequence"):
        """``score.weight``, or the head transformers' native classifier names otherwise (CTRL: ``classifier``)."""
        if task != "sequence":
            return Architecture.score_name(self, model_type, task)
        from rmconvert.families.modeling import reward_class_name
        from rmconvert.families.structure import classifier_head, classifier_parameters

        native = reward_class_name(model_type)
        head = classifier_parameters(model_type, native) if native else None
        return (classifier_head(head) if head else None) or self.score

    def layout(self, ckpt):
        """The layout from transformers' structure of the family, computed once; by shape and name when
        transformers cannot build it."""
        try:
            embedding, outside, lm_head = self._layout(ckpt)
        except CheckpointError as exc:
            lm_head = {n for n in ckpt.tensors if n.startswith(self.lm_head_prefixes)}
            return replace(describe(self, ckpt, None, Architecture.dropped(self, ckpt), lm_head), error=exc)
        return describe(self, ckpt, embedding, Architecture.dropped(self, ckpt) | outside, lm_head)

    def _layout(self, ckpt) -> tuple[str, set[str], set[str]]:
        """(input embedding, tensors outside the reward model, LM head) from transformers' structure of the
        family."""
        from rmconvert.families.structure import StructureError, structure

        try:
            found = structure(ckpt.config)
        except StructureError as exc:
            return self._guess(ckpt, exc)
        loaded_as = {name: found.rename(name) for name in ckpt.tensors}
        embedding = [n for n, key in loaded_as.items() if key == found.embedding]
        if len(embedding) != 1:
            raise CheckpointError(
                f"{found.causal_lm} loads its input embedding {found.embedding} from"
                f" {'none of the tensors' if not embedding else embedding}",
                ckpt.path,
            )
        score = self.score_name(ckpt.model_type)
        outside = {n for n, key in loaded_as.items() if not found.in_backbone(key) and n != score}
        return embedding[0], outside, {n for n, key in loaded_as.items() if key in found.heads}

    def _guess(self, ckpt, why: CheckpointError) -> tuple[str, set[str], set[str]]:
        """The layout by shape and name, when transformers cannot build the family."""
        score = self.score_name(ckpt.model_type)
        vocab = text_config(ckpt.config).get("vocab_size")
        found = [self.embedding] if self.embedding in ckpt.tensors else [
            n
            for n, t in ckpt.tensors.items()
            if len(t.shape) == 2 and t.shape[0] == vocab and not OUTPUT_HEAD.search(n) and n != score
        ]  # fmt: skip
        if len(found) != 1:
            raise CheckpointError(
                f"{why.message}; and by shape, cannot tell the input embedding among {found} of [vocab_size, H]",
                ckpt.path,
            )
        prefix = found[0].split(".")[0] + "."
        outside = {n for n in ckpt.tensors if (not n.startswith(prefix) or OUTPUT_HEAD.search(n)) and n != score}
        return found[0], outside, {n for n in outside if OUTPUT_HEAD.search(n)}

    def dropped(self, ckpt):
        """Everything transformers' sequence classifier would not load: outside the backbone, or an output head."""
        return set(self.layout(ckpt).require().dropped)

    def embedding_name(self, ckpt):
        """The tensor transformers loads as the input embedding, whose rows are the vocabulary."""
        return self.layout(ckpt).require().embedding


@hookimpl
def rmconvert_register_architectures(register):
    register(Generic())
