"""A reusable pytest suite that checks an architecture plugin end to end on a tiny random checkpoint.

A plugin's whole test module can be::

    from rmconvert.conformance import ConformanceSuite

    class TestGranite(ConformanceSuite):
        kind = "granite"          # a model_type (or a key of rmconvert.testing.RECIPES)
        architecture = "granite"  # the architecture name the plugin registers

Override ``build`` to shape the tiny checkpoint (e.g. add the tensors your plugin drops). Needs pytest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .doctor.validation import ERROR, validate
from .engine import convert
from .families.host import Registry
from .testing import build_checkpoint, snapshot

HEADS = ("scalar", "bt")


class ConformanceSuite:
    """Describe the source's tensors (the layout), convert with both heads, validate (schema, head, pad, vocabulary), load with transformers with no
    missing or unexpected keys, score padded batches like single sequences, compare the backbone with the
    source byte for byte and by hidden states, check the head rules, and check determinism."""

    kind: str = ""
    architecture: str = ""
    #: The plugins to use; None means every installed plugin (entry points included).
    registry: Registry | None = None

    def build(self, path: Path) -> Path:
        """Build the tiny source checkpoint at ``path``."""
        return build_checkpoint(self.kind, path)

    @pytest.fixture(scope="class")
    @classmethod
    def converted(cls, tmp_path_factory):
        root = tmp_path_factory.mktemp(f"conformance-{cls.kind}")
        source = cls().build(root / "source")
        reports = {head: convert(source, root / head, head=head, registry=cls.registry) for head in HEADS}
        return source, root, reports

    def test_the_plugin_converts_it(self, converted):
        _, _, reports = converted
        assert {r["architecture"] for r in reports.values()} == {self.architecture}

    @pytest.mark.parametrize("head", HEADS)
    def test_output_is_sound_loaded_and_against_the_source(self, converted, head):
        source, root, _ = converted
        errors = [
            f for f in validate(root / head, load=True, against=source, registry=self.registry) if f.severity == ERROR
        ]
        assert errors == []

    def test_the_layout_says_what_every_tensor_is(self, converted):
        """The plugin's :meth:`Architecture.layout` of the source: the embedding found, kept and [vocab, hidden];
        the LM head dropped; the reward head not yet there (a policy); the same layout asked twice."""
        from .families.host import load_registry
        from .sources.checkpoint import open_checkpoint

        source, _, _ = converted
        ckpt = open_checkpoint(source)
        arch = (self.registry or load_registry()).get(self.architecture).architecture
        layout = arch.layout(ckpt).require()
        assert layout == arch.layout(ckpt)
        assert layout.embedding in ckpt.tensors and layout.embedding not in layout.dropped
        assert ckpt.tensors[layout.embedding].shape == (layout.vocab_size, layout.hidden_size)
        assert layout.lm_head <= layout.dropped and layout.head is None
        assert set(layout.backbone(ckpt)) == set(ckpt.tensors) - layout.dropped

    def test_bt_head_is_zeros_then_the_scalar_head(self, converted):
        from safetensors import safe_open

        _, root, _ = converted
        heads = {}
        for head in HEADS:
            index = root / head / "model.safetensors.index.json"
            shard = (
                json.loads(index.read_text())["weight_map"]["score.weight"] if index.exists() else "model.safetensors"
            )
            with safe_open(root / head / shard, "pt") as f:
                heads[head] = f.get_tensor("score.weight")
        assert heads["scalar"].shape[0] == 1 and heads["bt"].shape[0] == 2
        assert not heads["bt"][0].any() and bool((heads["bt"][1] == heads["scalar"][0]).all())

    def test_conversion_is_deterministic(self, converted, tmp_path):
        source, root, _ = converted
        convert(source, tmp_path / "again", head="scalar", registry=self.registry)
        assert snapshot(tmp_path / "again") == snapshot(root / "scalar")
