"""OLMoE. transformers has no OlmoeForSequenceClassification; rmconvert supplies one.

Expert tensors pass through in the layout they are stored in (per expert on disk).
"""

from rmconvert import Architecture, hookimpl, schemas


class Olmoe(Architecture):
    name = "olmoe"
    model_types = ("olmoe",)
    sequence_classification_class = "OlmoeForSequenceClassification"
    token_classification_class = "OlmoeForTokenClassification"
    dropout_fields = ("attention_dropout",)
    pad_tokens = ("<|pad|>",) + Architecture.pad_tokens
    schema = schemas.path("olmoe")


@hookimpl
def rmconvert_register_architectures(register):
    register(Olmoe())
