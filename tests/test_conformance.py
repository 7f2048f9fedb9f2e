"""The plugin kit's conformance suite, run against every built-in architecture (as a plugin author would)."""

from __future__ import annotations

from rmconvert.conformance import ConformanceSuite


class TestLlama3(ConformanceSuite):
    kind = "llama3"
    architecture = "llama"


class TestOlmo2(ConformanceSuite):
    kind = "olmo2"
    architecture = "olmo2"


class TestOlmoe(ConformanceSuite):
    kind = "olmoe"
    architecture = "olmoe"


class TestGenericWithANativeClass(ConformanceSuite):
    kind = "qwen3_moe"
    architecture = "generic"


class TestGenericWithoutANativeClass(ConformanceSuite):
    kind = "granite"  # no GraniteForSequenceClassification in transformers: rmconvert builds it
    architecture = "generic"


class TestGenericWithAnotherHeadName(ConformanceSuite):
    kind = "gpt_neox"  # the LM head is embed_out, the backbone gpt_neox.*
    architecture = "generic"
