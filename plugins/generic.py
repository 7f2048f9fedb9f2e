"""Any decoder-only model_type of the installed transformers, with or without a native sequence classifier.

Claims only what no specific plugin claims. The embedding is found by shape, so families that do not
keep it at ``model.embed_tokens`` (e.g. ``transformer.wte``) convert too.
"""

import re
from functools import cached_property

from rmconvert import Architecture, hookimpl
from rmconvert.checkpoint import text_config
from rmconvert.errors import CheckpointError

#: Output heads: a top-level module of these names (``lm_head``, GPT-NeoX's ``embed_out``, RWKV's ``head``), or an
#: ``unembed`` anywhere. (``output`` is not matched inside the backbone: RWKV's attention has one.)
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

    @cached_property
    def model_types(self) -> tuple[str, ...]:
        """Every decoder-only family; those without a native class get one built (see rmconvert.modeling)."""
        from rmconvert.modeling import decoder_only_model_types

        return tuple(sorted(decoder_only_model_types()))

    def hidden_size(self, config):
        tc = text_config(config)
        if "hidden_size" in tc:
            return tc["hidden_size"]
        from rmconvert.modeling import config_attribute_map

        alias = config_attribute_map(config.get("model_type", "")).get("hidden_size")
        return tc.get(alias) if alias else None

    def dropped(self, ckpt):
        """Everything outside the backbone (where the embedding is): a classifier is the backbone plus ``score``."""
        prefix = self.embedding_name(ckpt).split(".")[0] + "."
        outside = {n for n in ckpt.tensors if not n.startswith(prefix) or OUTPUT_HEAD.search(n)}
        return super().dropped(ckpt) | outside - {"score.weight"}

    def embedding_name(self, ckpt):
        """The one [vocab_size, H] tensor that is not an output head (``lm_head``, ``embed_out``, ``unembed``)."""
        if self.embedding in ckpt.tensors:
            return self.embedding
        vocab = text_config(ckpt.config).get("vocab_size")
        found = [
            n
            for n, t in ckpt.tensors.items()
            if len(t.shape) == 2 and t.shape[0] == vocab and not OUTPUT_HEAD.search(n) and n != "score.weight"
        ]
        if len(found) != 1:
            raise CheckpointError(f"cannot tell the input embedding among {found} of [vocab_size, H]", ckpt.path)
        return found[0]


@hookimpl
def rmconvert_register_architectures(register):
    register(Generic())
