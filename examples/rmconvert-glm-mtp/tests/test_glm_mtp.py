"""The example plugin tested as its author would: rmconvert's conformance suite on a tiny GLM-4.5-style
checkpoint that carries a multi-token-prediction (MTP) layer, and the same source converted without the plugin.

Run from the repository root with ``tox -e example`` (rmconvert and this example installed as wheels).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rmconvert
from rmconvert.checkpoint import open_checkpoint
from rmconvert.conformance import ConformanceSuite
from rmconvert.host import get_plugin_manager, load_registry
from rmconvert.testing import build_checkpoint

INDEX = "model.safetensors.index.json"


def mtp_prefix(path: Path) -> str:
    """``model.layers.{num_hidden_layers}.``: where GLM-4.5 stores its (first) MTP layer."""
    return f"model.layers.{json.loads((path / 'config.json').read_text())['num_hidden_layers']}."


def build_with_mtp_layer(path: Path, **options) -> Path:
    """A tiny random glm4_moe causal LM whose checkpoint also holds one MTP layer, as GLM-4.5's does: a decoder
    layer shaped like the last (MoE) one, plus ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.norm``
    (the names vLLM and SGLang load GLM-4.5's MTP weights by), in the last shard; the index is rewritten to match.
    ``options`` go to ``rmconvert.testing.build_checkpoint``."""
    path = build_checkpoint("glm4_moe", path, num_nextn_predict_layers=1, **options)
    config = json.loads((path / "config.json").read_text())
    hidden, last, mtp = config["hidden_size"], f"model.layers.{config['num_hidden_layers'] - 1}.", mtp_prefix(path)
    index = json.loads((path / INDEX).read_text()) if (path / INDEX).exists() else None
    shards = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    shapes = {n[len(last) :]: t.shape for n, t in open_checkpoint(path).tensors.items() if n.startswith(last)}
    shapes |= {"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden)}
    shapes |= {"shared_head.norm.weight": (hidden,)}
    generator = torch.Generator().manual_seed(1)
    added = {mtp + name: torch.randn(shape, generator=generator) for name, shape in sorted(shapes.items())}

    target = path / shards[-1]
    with safe_open(target, "pt") as f:
        metadata = f.metadata()
    save_file(load_file(target) | added, target.with_suffix(".tmp"), metadata=metadata)
    os.replace(target.with_suffix(".tmp"), target)
    if index:
        index["weight_map"] = dict(sorted((index["weight_map"] | dict.fromkeys(added, target.name)).items()))
        index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in added.values())
        if "total_parameters" in index["metadata"]:
            index["metadata"]["total_parameters"] += sum(t.numel() for t in added.values())
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return path


class TestGlmMtp(ConformanceSuite):
    kind = "glm4_moe"
    architecture = "glm-mtp"

    def build(self, path):
        return build_with_mtp_layer(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_with_mtp_layer(tmp_path_factory.mktemp("glm-mtp") / "source")


def mtp_tensors(path: Path, prefix: str) -> set[str]:
    return {name for name in open_checkpoint(path).tensors if name.startswith(prefix)}


def test_the_plugin_is_installed_through_its_entry_point():
    entry = load_registry().for_model_type("glm4_moe")
    assert (entry.architecture.name, entry.plugin, entry.distribution, entry.version) == (
        "glm-mtp",
        "glm-mtp",
        "rmconvert-glm-mtp",
        "0.1.0",
    )


def test_without_the_plugin_the_mtp_layer_is_kept_and_loading_reports_it(source, tmp_path):
    builtin = load_registry(get_plugin_manager(autoload=False))
    prefix = mtp_prefix(source)
    report = rmconvert.convert(source, tmp_path / "rm", registry=builtin)
    assert report["architecture"] == "generic"
    assert mtp_tensors(tmp_path / "rm", prefix) == mtp_tensors(source, prefix) != set()
    errors = [f for f in rmconvert.validate(tmp_path / "rm", load=True, registry=builtin) if f.severity == "error"]
    assert [f.code for f in errors] == ["RM101"]
    assert errors[0].where.startswith(prefix)


def test_with_the_plugin_the_mtp_layer_is_dropped_and_loading_is_clean(source, tmp_path):
    prefix = mtp_prefix(source)
    report = rmconvert.convert(source, tmp_path / "rm")
    assert report["architecture"] == "glm-mtp"
    assert set(report["dropped"]) == mtp_tensors(source, prefix) | {"lm_head.weight"}
    assert mtp_tensors(tmp_path / "rm", prefix) == set()
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert [f for f in rmconvert.validate(tmp_path / "rm", load=True) if f.severity == "error"] == []
