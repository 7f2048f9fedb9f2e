"""Any decoder-only model_type the installed transformers can load as ``*ForSequenceClassification``.

Claims only what no specific plugin claims. The embedding is found by shape, so families that do not
keep it at ``model.embed_tokens`` (e.g. ``transformer.wte``) convert too.
"""

from functools import cached_property

from rmconvert import Architecture, hookimpl
from rmconvert.checkpoint import text_config
from rmconvert.errors import CheckpointError


class Generic(Architecture):
    name = "generic"
    fallback = True

    @cached_property
    def model_types(self) -> tuple[str, ...]:
        from transformers.models.auto import modeling_auto as auto

        decoder_only = set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        return tuple(sorted(decoder_only & set(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)))

    def embedding_name(self, ckpt):
        if self.embedding in ckpt.tensors:
            return self.embedding
        vocab = text_config(ckpt.config).get("vocab_size")
        found = [n for n, t in ckpt.tensors.items() if len(t.shape) == 2 and t.shape[0] == vocab and not self.dropped(n)]
        if len(found) != 1:
            raise CheckpointError(f"cannot tell the input embedding among {found} of [vocab_size, H]", ckpt.path)
        return found[0]


@hookimpl
def rmconvert_register_architectures(register):
    register(Generic())
