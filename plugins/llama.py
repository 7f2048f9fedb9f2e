"""Llama 1/2/3.x (and Tulu, Skywork and other Llama-layout models)."""

from rmconvert import Architecture, hookimpl, schemas


class Llama(Architecture):
    name = "llama"
    model_types = ("llama",)
    sequence_classification_class = "LlamaForSequenceClassification"
    token_classification_class = "LlamaForTokenClassification"
    dropout_fields = ("attention_dropout",)
    schema = schemas.path("llama")


@hookimpl
def rmconvert_register_architectures(register):
    register(Llama())
