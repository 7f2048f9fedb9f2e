"""The torch-free Qwen2-VL / Qwen2.5-VL plugin against the composite plugin, which learns the same layout from
transformers: the same layout, the same output bytes, no torch or transformers imported, the same refusals."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from rmconvert import convert
from rmconvert import tiny_vlm as T
from rmconvert.cli import cli
from rmconvert.families.host import load_registry
from rmconvert.sources.checkpoint import open_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")

FAMILIES = [t for t in ("qwen2_vl", "qwen2_5_vl") if T.available(t)]
CASES = [pytest.param(t, released, id=f"{t}-{'released' if released else 'canonical'}") for t in FAMILIES
         for released in (True, False)]  # fmt: skip
LAYOUT_FIELDS = ("embedding", "lm_head", "dropped", "renamed", "tables", "vocab_fields", "media_ids", "head")


def _layouts(path):
    registry, ckpt = load_registry(), open_checkpoint(path)
    static, learned = registry.get("qwen2_vl").architecture, registry.get("composite").architecture
    return static.layout(ckpt), learned.layout(ckpt)


def _files(path):
    """Every output file's bytes; the manifest without the architecture that wrote it (and --arch)."""
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    manifest = json.loads(files.pop("rmconvert.json"))
    manifest.pop("architecture"), manifest["options"].pop("arch")
    return files, manifest


@pytest.mark.parametrize(("model_type", "released"), CASES)
def test_the_static_layout_is_the_one_transformers_gives(vlm_policy, model_type, released):
    static, learned = _layouts(vlm_policy(model_type, released))
    assert static.error is None and learned.error is None
    assert {f: getattr(static, f) for f in LAYOUT_FIELDS} == {f: getattr(learned, f) for f in LAYOUT_FIELDS}
    assert bool(static.renamed) == released
    # a LoRA adapter's module names, in either layout, load as the same keys under both plugins
    names = {n for layout in (True, False) for n in open_checkpoint(vlm_policy(model_type, layout)).tensors}
    assert {n: static.load_name(n) for n in names} == {n: learned.load_name(n) for n in names}


@pytest.mark.parametrize(("model_type", "released"), CASES)
def test_the_output_is_byte_identical_to_the_composite_plugins(vlm_policy, tmp_path, model_type, released):
    src = vlm_policy(model_type, released)
    fast, learned = convert(src, tmp_path / "fast"), convert(src, tmp_path / "learned", arch="composite")
    assert (fast["architecture"], learned["architecture"]) == ("qwen2_vl", "composite")
    assert _files(tmp_path / "fast") == _files(tmp_path / "learned")


def test_converting_a_qwen2_5_vl_imports_neither_torch_nor_transformers(vlm_policy, tmp_path, imported_by_convert):
    assert imported_by_convert(vlm_policy(FAMILIES[-1], True), tmp_path / "rm") == set()
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["architectures"] == [
        "Qwen2_5_VLForSequenceClassification" if FAMILIES[-1] == "qwen2_5_vl" else "Qwen2VLForSequenceClassification"
    ]


DAMAGE = {
    "vision layer missing": (lambda w: [w.pop(k) for k in list(w) if k.startswith("visual.blocks.1.")], "blocks: 1"),
    "vision layer cut short": (lambda w: w.pop(min(k for k in w if k.startswith("visual.blocks.1."))), "cut"),
    "merger missing": (lambda w: [w.pop(k) for k in list(w) if k.startswith("visual.merger.")], "merger"),
    "extra layer": (lambda w: w.update({"model.layers.2.x.weight": w["model.norm.weight"]}), "layers: 3"),
    "odd tensor": (lambda w: w.update({"visual.extra.weight": w["model.norm.weight"]}), "extra.weight"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_backbone_cut_short_or_with_extra_tensors_is_refused_by_both_plugins(vlm_policy, tmp_path, damage):
    spoil, expected = DAMAGE[damage]
    bad = tmp_path / "src"
    bad.mkdir()
    for file in vlm_policy(FAMILIES[-1], True).iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    weights = load_file(bad / "model.safetensors")
    spoil(weights)
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    for arch in ("auto", "composite"):
        result = CliRunner().invoke(cli, ["convert", str(bad), str(tmp_path / "dst"), "--arch", arch])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and str(bad) in lines[0], (arch, result.stderr)
        assert not (tmp_path / "dst").exists()
    static, _ = _layouts(bad)
    assert expected in str(static.error)
