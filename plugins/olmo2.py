"""OLMo 2. transformers 4.57 has no Olmo2ForSequenceClassification; rmconvert supplies one."""

from rmconvert import Architecture, hookimpl, schemas


class Olmo2(Architecture):
    name = "olmo2"
    model_types = ("olmo2",)
    sequence_classification_class = "Olmo2ForSequenceClassification"
    token_classification_class = "Olmo2ForTokenClassification"
    dropout_fields = ("attention_dropout",)
    pad_tokens = ("<|pad|>",) + Architecture.pad_tokens
    schema = schemas.path("olmo2")


@hookimpl
def rmconvert_register_architectures(register):
    register(Olmo2())
