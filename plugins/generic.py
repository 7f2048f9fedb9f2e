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
        from rmconvert.modeling import decoder_only_model_types, native_class_name

        return tuple(sorted(t for t in decoder_only_model_types() if native_class_name(t)))

    def embedding_name(self, ckpt):
        if self.embedding in ckpt.tensors:
            return self.embedding
        vocab = text_config(ckpt.config).get("vocab_size")
        found = [
            n for n, t in ckpt.tensors.items() if len(t.shape) == 2 and t.shape[0] == vocab and not self.dropped(n)
        ]
        if len(found) != 1:
            raise CheckpointError(f"cannot tell the input embedding among {found} of [vocab_size, H]", ckpt.path)
        return found[0]


@hookimpl
def rmconvert_register_architectures(register):
    register(Generic())
