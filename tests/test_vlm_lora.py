"""LoRA adapters of vision-language policies (issue 16): merged while converting, bit-identical to PEFT's
``merge_and_unload()``, whatever names the adapter's keys use (the model's in memory, or the released checkpoint's).

The adapters are made by PEFT on tiny policies of :mod:`rmconvert.tiny_vlm` (non-zero A and B, fixed seeds); PEFT,
loaded only here, is the oracle: every backbone tensor of the loaded reward model has the bits of PEFT's merged
policy, and its image+text reward is ``score`` of that policy's backbone, bit for bit.
"""

from __future__ import annotations

import json
from importlib.metadata import version

import peft
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rmconvert import load_reward_model, validate
from rmconvert import tiny_vlm as T
from rmconvert.cli import cli
from rmconvert.families.loading import fresh_weights
from rmconvert.testing import build_adapter, load_base, snapshot

pytestmark = pytest.mark.filterwarnings("ignore")

TRANSFORMERS_4 = int(version("transformers").split(".")[0]) < 5
QWEN_LANGUAGE = r".*language_model.*\.(q_proj|v_proj|down_proj)"  # a regex on the model's names, as PEFT matches

# name: (model_type, released Qwen layout, LoraConfig arguments, whether the vision tower or projector is targeted)
CASES = {
    "qwen2_5_vl-released-language-regex": ("qwen2_5_vl", True, {"target_modules": QWEN_LANGUAGE}, False),
    "qwen2_5_vl-canonical-vision-patterns": ("qwen2_5_vl", False, {
        "target_modules": ["q_proj", "v_proj", "qkv", "attn.proj", "mlp.0", "mlp.2"], "use_rslora": True,
        "rank_pattern": {"qkv": 2}, "alpha_pattern": {"model.visual.merger.mlp.0": 3}}, True),
    "qwen2_5_vl-released-vision": ("qwen2_5_vl", True, {"target_modules": ["k_proj", "o_proj", "qkv", "mlp.2"]}, True),
    "llava-vision-projector": ("llava", False, {"target_modules": ["q_proj", "v_proj", "fc1", "linear_1", "linear_2"]},
                               True),
    "gemma3-all-linear": ("gemma3", False, {"target_modules": "all-linear"}, True),
}  # fmt: skip
VISION = ("visual.", "vision_tower.", "multi_modal_projector.")


def tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def released_names(adapter, model_type: str, dst):
    """A copy of ``adapter`` whose keys name the modules as released checkpoints (and transformers < 4.52) do:
    Qwen2.5-VL's ``model.*`` + ``visual.*``, LLaVA's and Gemma 3's ``language_model.model.*`` + ``vision_tower.*``."""
    if model_type == "qwen2_5_vl":
        renames = {"model.language_model.": "model.", "model.visual.": "visual."}
    else:
        renames = {"model.language_model.": "language_model.model.", "model.": ""}
    held = {}
    for key, value in load_file(adapter / "adapter_model.safetensors").items():
        rest = key.removeprefix("base_model.model.")
        old = next(o for o in renames if rest.startswith(o))
        held["base_model.model." + renames[old] + rest[len(old) :]] = value
    dst.mkdir()
    (dst / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    save_file(held, dst / "adapter_model.safetensors")
    return dst


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def convert(*args) -> dict:
    result = run("convert", *args, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module", params=[c for c in sorted(CASES) if T.available(CASES[c][0])])
def case(request, vlm_policy, tmp_path_factory):
    """(name, model_type, base, adapter, PEFT's merged policy, converted RM dir, report), built once."""
    model_type, released, lora, _ = CASES[request.param]
    base = vlm_policy(model_type, released)
    root = tmp_path_factory.mktemp(request.param)
    adapter = build_adapter(base, root / "adapter", r=4, lora_alpha=8, seed=1, **lora)
    merged = fresh_weights(peft.PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload())
    report = convert(base, root / "rm", "--adapter", adapter)
    return request.param, model_type, base, adapter, merged, root / "rm", report


def test_merge_is_bit_identical_to_peft(case):
    name, _, base, adapter, merged, dst, report = case
    rm, info = load_reward_model(dst, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    ours, theirs, before = (
        rm.model.state_dict(),
        merged.model.state_dict(),
        fresh_weights(load_base(base)).model.state_dict(),
    )
    assert set(ours) == set(theirs)
    embedding = rm.get_input_embeddings().weight
    changed = set()
    for key, value in ours.items():
        rows = theirs[key].shape[0] if value.data_ptr() == embedding.data_ptr() else None
        assert same_bits(value[:rows], theirs[key][:rows]), key
        if not same_bits(value[:rows], before[key][:rows]):
            changed.add(key)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        modules = {k.split(".lora_")[0] for k in f.keys() if ".lora_" in k}  # noqa: SIM118
    assert report["adapter"]["merged"] == len(modules) == len(changed) > 0
    assert any(k.startswith(VISION) for k in changed) == CASES[name][3], sorted(changed)


def test_image_text_reward_is_score_of_the_merged_policy(case):
    _, model_type, _, _, merged, dst, _ = case
    rm = fresh_weights(load_reward_model(dst))
    for seed in (0, 1):
        sample = T.image_inputs(merged, model_type, seed=seed)
        with torch.no_grad():
            assert torch.equal(rm(**sample).logits[0], rm.score(merged.model(**sample).last_hidden_state)[0, -1])


def test_released_key_names_merge_the_same(case, tmp_path):
    """An adapter naming the released checkpoint's modules (trained on transformers < 4.52, or saved so) merges into
    the same tensors, onto a base of either layout."""
    name, model_type, base, adapter, _, dst, _ = case
    old = released_names(adapter, model_type, tmp_path / "old")
    keys = {
        k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight"
        for k in load_file(old / "adapter_model.safetensors")
    }
    if model_type != "qwen2_5_vl" or CASES[name][1]:  # the names of the base's own files
        assert keys <= set(tensors(base))
    convert(base, tmp_path / "rm", "--adapter", old)
    assert tensors(tmp_path / "rm").keys() == tensors(dst).keys()
    assert all(same_bits(tensors(tmp_path / "rm")[k], v) for k, v in tensors(dst).items())
    if TRANSFORMERS_4:  # PEFT maps such keys itself on 4.57 (on 5.x, PEFT 0.21 leaves visual.* keys unloaded)
        theirs = fresh_weights(
            peft.PeftModel.from_pretrained(load_base(base), old).merge_and_unload()
        ).model.state_dict()
        ours = load_reward_model(tmp_path / "rm").model.state_dict()
        assert all(same_bits(v[: theirs[k].shape[0]], theirs[k]) for k, v in ours.items())


@pytest.mark.parametrize("model_type", ["llava", "gemma3"])
def test_vision_tower_names_of_the_other_transformers_version(vlm_policy, tmp_path, model_type):
    """transformers 4.57 names a CLIP/SigLIP tower's modules ``model.vision_tower.vision_model.*``, 5.x
    ``model.vision_tower.*``: on 5.x an adapter trained on 4.57 merges the same; 4.57 knows no rule for the 5.x
    names and the adapter is refused in one line (as PEFT on 4.57 would leave those keys unloaded)."""
    base = vlm_policy(model_type, False)
    adapter = build_adapter(base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj", "fc1"], seed=2)
    v4, v5 = "model.vision_tower.vision_model.", "model.vision_tower."
    held = load_file(adapter / "adapter_model.safetensors")
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    renamed = {k.replace(v5, v4) if not TRANSFORMERS_4 else k.replace(v4, v5): v for k, v in held.items()}
    assert renamed != held
    save_file(renamed, other / "adapter_model.safetensors")
    convert(base, tmp_path / "rm", "--adapter", adapter)
    result = run("convert", base, tmp_path / "rm-other", "--adapter", other)
    if TRANSFORMERS_4:
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output + result.stderr
        assert str(other / "adapter_model.safetensors") in result.stderr and "BASE has no tensor" in result.stderr
        assert not (tmp_path / "rm-other").exists()
    else:
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / "rm-other" / "model.safetensors").read_bytes() == (
            tmp_path / "rm" / "model.safetensors"
        ).read_bytes()


def test_validate_against_base_and_adapter_finds_a_flipped_bit(case, tmp_path):
    """``validate --against BASE --adapter ADAPTER`` recomputes the merge: no error on the output, RM125 on a merged
    tensor (the vision tower's where the adapter targets it) with one bit flipped."""
    import os
    import shutil

    _, _, base, adapter, _, dst, _ = case
    out = shutil.copytree(dst, tmp_path / "rm")
    assert [f for f in validate(out, against=base, adapter=adapter) if f.severity == "error"] == []
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        module = max(k.split(".lora_")[0] for k in f.keys()).removeprefix("base_model.model.")  # noqa: SIM118
    suffix = module.split(".", 2)[-1] + ".weight"
    (name,) = [n for n in tensors(out) if n.endswith("." + suffix)]
    raw = (out / "model.safetensors").read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    offset = start + json.loads(raw[8:start])[name]["data_offsets"][0]
    with open(out / "model.safetensors", "r+b") as f:
        os.pwrite(f.fileno(), bytes([os.pread(f.fileno(), 1, offset)[0] ^ 1]), offset)
    found = validate(out, against=base, adapter=adapter)
    assert [(f.code, f.where) for f in found if f.severity == "error"] == [("RM125", name)]


def test_convert_the_adapter_directory_itself(case, tmp_path):
    """``rmconvert convert ADAPTER DST``: the base named by base_model_name_or_path, the same bytes as --adapter."""
    _, _, base, adapter, _, dst, _ = case
    report = convert(adapter, tmp_path / "rm")
    assert report["source"] == str(base)
    assert {k: v for k, v in snapshot(tmp_path / "rm").items() if k != "rmconvert.json"} == {
        k: v for k, v in snapshot(dst).items() if k != "rmconvert.json"
    }


def test_reward_model_adapter_on_gemma3(vlm_policy, tmp_path):
    """A SEQ_CLS adapter trained on Gemma3ForSequenceClassification (transformers' own image-text reward class):
    its score head byte for byte, every tensor PEFT's merge, the image+text reward PEFT's merged model's, bit for bit."""
    base = vlm_policy("gemma3", False)
    adapter = build_adapter(base, tmp_path / "adapter", task_type="SEQ_CLS", r=2, lora_alpha=4, seed=3,
                            target_modules=["q_proj", "fc1"])  # fmt: skip
    report = convert(base, tmp_path / "rm", "--adapter", adapter)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        modules = {k.split(".lora_")[0] for k in f.keys() if ".lora_" in k}  # noqa: SIM118
    assert report["adapter"]["head"] == "adapter" and report["adapter"]["merged"] == len(modules) == 7
    rm = fresh_weights(load_reward_model(tmp_path / "rm"))
    merged = fresh_weights(peft.PeftModel.from_pretrained(load_base(base, "SEQ_CLS"), adapter).merge_and_unload())
    ours, theirs = rm.state_dict(), merged.state_dict()
    assert set(ours) == set(theirs)
    assert all(same_bits(v[: theirs[k].shape[0]], theirs[k]) for k, v in ours.items())
    sample = T.image_inputs(merged, "gemma3")
    with torch.no_grad():
        assert torch.equal(rm(**sample).logits, merged(**sample).logits)


#: damage -> (renamed from, to, the module then named that the base lacks); "target": a target_modules entry
BAD = {
    "language": ("layers.1.", "layers.7.", "model.language_model.layers.7.self_attn.k_proj"),
    "vision": ("blocks.1.", "blocks.5.", "model.visual.blocks.5.attn.qkv"),
    "target": (None, None, None),
}


@pytest.mark.parametrize("damage", sorted(BAD))
def test_an_adapter_that_does_not_fit_is_refused(vlm_policy, tmp_path, damage):
    """A LoRA key naming a module the base does not have (a layer or vision block past the last), or a
    target_modules entry naming none: one line naming the file, exit 1, nothing at DST."""
    base = vlm_policy("qwen2_5_vl", True)
    adapter = build_adapter(base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["k_proj", "qkv"])
    old, new, module = BAD[damage]
    if module is None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["k_proj", "c_attn"]}))
        expected = f"{adapter / 'adapter_config.json'}: target_modules entry 'c_attn' matches no tensor of BASE"
    else:
        held = load_file(adapter / "adapter_model.safetensors")
        save_file({k.replace(old, new): v for k, v in held.items()}, adapter / "adapter_model.safetensors")
        problem = f"BASE has no tensor {module}.weight: is the adapter for another model?"
        expected = f"{adapter / 'adapter_model.safetensors'}: base_model.model.{module}: {problem}"
    result = run("convert", base, tmp_path / "rm", "--adapter", adapter)
    assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr, result.output + result.stderr
    assert result.stderr.splitlines() == [f"rmconvert: error: {expected}"]
    assert not (tmp_path / "rm").exists()
