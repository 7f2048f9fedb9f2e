"""Vision-language reward models (issue 16): tiny policies of every composite family built locally, converted, loaded
by transformers, scored on image+text inputs against the policy's own backbone."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from rmconvert import convert, load_reward_model, validate
from rmconvert import tiny_vlm as T
from rmconvert.cli import cli
from rmconvert.errors import CheckpointError
from rmconvert.families.loading import fresh_weights
from rmconvert.families.modeling import reward_class_name

pytestmark = pytest.mark.filterwarnings("ignore")

FAMILIES = [t for t in T.FAMILIES if T.available(t)]
TRANSFORMERS_4 = int(version("transformers").split(".")[0]) < 5
LEGACY = ("qwen2_vl", "qwen2_5_vl")  # released as model.* + visual.*


def tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """``policies(model_type, legacy=False)`` -> (policy dir, converted RM dir, report), cached."""
    cache = {}

    def _get(model_type, legacy=False, **options):
        key = (model_type, legacy, tuple(sorted(options.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(model_type)
            src = T.build_policy(model_type, root / "src")
            if model_type in LEGACY:
                T.qwen_layout(src, canonical=not legacy)
            cache[key] = (src, root / "rm", convert(src, root / "rm", **options))
        return cache[key]

    return _get


CASES = [pytest.param(t, legacy, id=f"{t}{'' if t not in LEGACY else '-released' if legacy else '-canonical'}") for t in FAMILIES
         for legacy in ((True, False) if t in LEGACY else (False,))]  # fmt: skip


@pytest.mark.parametrize(("model_type", "legacy"), CASES)
def test_image_text_reward_is_score_of_the_policy_backbone(policies, model_type, legacy):
    _, dst, _ = policies(model_type, legacy)
    rm, info = load_reward_model(dst, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    rm = fresh_weights(rm)
    policy = fresh_weights(T.build_model(model_type))  # the same seed: the source's weights
    sample = T.image_inputs(policy, model_type, seed=0)
    with torch.no_grad():
        expected = rm.score(policy.model(**sample).last_hidden_state)[0, -1]
        reward = rm(**sample).logits[0]
    assert torch.equal(reward, expected)
    other = {**T.image_inputs(policy, model_type, seed=1), "input_ids": sample["input_ids"]}
    other = {
        k: sample[k] if k in ("attention_mask", "mm_token_type_ids", "token_type_ids") else v for k, v in other.items()
    }
    with torch.no_grad():
        assert not torch.equal(rm(**other).logits[0], reward), "another image must change the reward"
    # a right-padded batch reads each reward where the single row does
    pad = rm.config.get_text_config().pad_token_id
    short = T.image_inputs(policy, model_type, seed=2, words=2)
    with torch.no_grad():
        batched = rm(**T.batch([sample, short], pad)).logits
        single = torch.cat([reward[None], rm(**short).logits])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("model_type", "legacy"), CASES)
def test_backbone_bytes_kept_renamed_only_where_the_reward_class_needs_it(policies, model_type, legacy):
    src, dst, report = policies(model_type, legacy)
    before, after = tensors(src), tensors(dst)
    lm_head = {k for k in before if k.startswith(("lm_head.", "language_model.lm_head."))}
    assert set(report["dropped"]) == lm_head
    # transformers 4.57's built classes load only the canonical model.* names: written so on 4.57 (they load on 5.x
    # too); on 5.x the released names load into every class and are kept (they load on 4.57 too: rmconvert's class
    # registers the generation class's renames)
    canonical = (legacy and model_type in LEGACY) or (TRANSFORMERS_4 and reward_class_name(model_type) is None)
    expected = {}
    for name in set(before) - lm_head:
        if not canonical or name.startswith(("model.language_model.", "model.visual.", "model.vision_tower.")):
            name_out = name
        elif model_type in LEGACY:
            name_out = (
                "model." + name if name.startswith("visual.") else name.replace("model.", "model.language_model.", 1)
            )
        elif name.startswith("language_model.model."):
            name_out = "model.language_model." + name[len("language_model.model.") :]
        else:
            name_out = name if name.startswith("model.") else "model." + name
        expected[name_out] = before[name]
    assert set(after) == set(expected) | {"score.weight"}
    embedding = next(
        k
        for k in after
        if k.endswith(("language_model.embed_tokens.weight", "text_model.embed_tokens.weight"))
        or k == "language_model.model.embed_tokens.weight"
    )
    for name, value in expected.items():
        rows = len(value) if name != embedding else report["vocab"]["from"]
        assert torch.equal(after[name][:rows].view(torch.uint8), value.view(torch.uint8)), name
    assert after["score.weight"].shape == (1, 64)


def test_released_qwen2_vl_names_would_load_the_language_model_random(policies):
    """The regression guard: the reward class loads model.* (released names) as missing + unexpected."""
    from rmconvert.families.modeling import reward_loading

    src, dst, _ = policies("qwen2_vl", True)
    loads_as, keys = reward_loading(json.loads((src / "config.json").read_text()))
    unloaded = [n for n in tensors(src) if loads_as(n) not in keys and "lm_head" not in n]
    assert len(unloaded) == 26  # 2 layers x 12 + embedding + norm
    assert all(loads_as(n) in keys for n in tensors(dst))


@pytest.mark.parametrize("model_type", [t for t in ("qwen2_vl", "gemma3", "llava", "gemma4") if t in FAMILIES])
def test_config_keeps_pad_labels_and_vocab_in_the_text_config(policies, model_type):
    _, dst, report = policies(model_type)
    config = json.loads((dst / "config.json").read_text())
    text = config["text_config"]
    assert text["pad_token_id"] == report["pad"]["id"] is not None
    assert text["pad_token_id"] not in {T.IMAGE, T.VIDEO, T.START, T.END, text.get("eos_token_id")}
    assert text["vocab_size"] == report["vocab"]["to"] and text["vocab_size"] % 8 == 0
    assert text["id2label"] == config["id2label"] == {"0": "LABEL_0"}
    assert config["architectures"] == [report["class"]]
    if model_type == "gemma4":
        assert text["pad_token_id"] == 0, "Gemma 4's pad is part of its computation: kept"


def test_gemma4_grows_both_vocabulary_tables_together(tmp_path):
    if "gemma4" not in FAMILIES:
        pytest.skip("transformers has no Gemma 4")
    src = tmp_path / "src"
    T.build_policy("gemma4", src)

    def shrink(config):  # 306 rows: the output has 312
        config["text_config"]["vocab_size"] = config["text_config"]["vocab_size_per_layer_input"] = 306

    from safetensors.numpy import load_file, save_file

    weights = load_file(src / "model.safetensors")
    for name in ("model.language_model.embed_tokens.weight", "model.language_model.embed_tokens_per_layer.weight"):
        weights[name] = weights[name][:306].copy()
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    T.save_config_json(src, shrink)
    report = convert(src, tmp_path / "rm")
    assert report["vocab"] == {"from": 306, "to": 312, "tokenizer": report["vocab"]["tokenizer"], "added_rows": 6}
    after = tensors(tmp_path / "rm")
    assert after["model.language_model.embed_tokens.weight"].shape[0] == 312
    assert after["model.language_model.embed_tokens_per_layer.weight"].shape[0] == 312
    text = json.loads((tmp_path / "rm" / "config.json").read_text())["text_config"]
    assert text["vocab_size"] == text["vocab_size_per_layer_input"] == 312
    _, info = load_reward_model(tmp_path / "rm", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}


def test_reruns_are_byte_identical(policies, tmp_path):
    src, dst, _ = policies("qwen2_5_vl", True)
    convert(src, tmp_path / "again")
    for file in dst.iterdir():
        if file.name != "rmconvert.json":
            assert (tmp_path / "again" / file.name).read_bytes() == file.read_bytes(), file.name


def _cli(*args):
    """The ``rmconvert`` CLI in-process; stdout and stderr apart."""
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("damage", ["missing", "extra"])
def test_vision_tower_tensors_missing_or_extra_are_refused(policies, tmp_path, damage):
    from safetensors.numpy import load_file, save_file

    src, _, _ = policies("llava")
    bad = tmp_path / "src"
    bad.mkdir()
    for file in src.iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    weights = load_file(bad / "model.safetensors")
    vision = sorted(k for k in weights if "vision_tower" in k)
    if damage == "missing":
        del weights[vision[-1]]
    else:
        weights["vision_tower.vision_model.extra.weight"] = weights[vision[-1]]
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    result = _cli("convert", bad, tmp_path / "dst")
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], lines
    assert ("no tensor for" if damage == "missing" else "extra.weight") in lines[0]
    assert not (tmp_path / "dst").exists()
    with pytest.raises(CheckpointError):
        convert(bad, tmp_path / "dst2")


# --- reward heads the source already has ---------------------------------------------------------


def _copy(src, dst):
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _head_source(policies, tmp_path, model_type, head_name, head, legacy=True, config=None):
    """A policy of ``model_type`` without its LM head, with ``head`` at ``head_name`` (ms-swift seq_cls)."""
    from safetensors.numpy import load_file, save_file

    src = _copy(policies(model_type, legacy)[0], tmp_path / "src")
    weights = {k: v for k, v in load_file(src / "model.safetensors").items() if "lm_head" not in k}
    weights[head_name] = head.numpy()
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    T.save_config_json(src, lambda c: c.update(config or {}))
    return src


def _reward(path, model_type, seed=0):
    rm = fresh_weights(load_reward_model(path))
    sample = T.image_inputs(rm, model_type, seed=seed)
    with torch.no_grad():
        return rm, sample, rm(**sample).logits[0]


def test_skywork_vl_reward_value_head_beside_a_released_qwen2_5_vl(policies, tmp_path):
    """Skywork-VL-Reward: a full Qwen2.5-VL (released names, lm_head) + value_head.safetensors (TRL's v_head)."""
    from safetensors.torch import save_file

    src = _copy(policies("qwen2_5_vl", True)[0], tmp_path / "src")
    weight, bias = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)), torch.tensor([0.25])
    save_file({"v_head.summary.weight": weight, "v_head.summary.bias": bias}, src / "value_head.safetensors")
    result = _cli("validate", src)
    assert "RM015" in result.stdout
    report = convert(src, tmp_path / "rm")
    assert report["source_kind"] == "value-head model" and report["value_head"]["bias"] == 0.25
    assert any("0.25" in w for w in report["warnings"])
    after = tensors(tmp_path / "rm")
    assert torch.equal(after["score.weight"], weight)
    assert not [k for k in after if k.startswith(("visual.", "lm_head", "v_head"))]
    _, sample, reward = _reward(tmp_path / "rm", "qwen2_5_vl")
    policy = fresh_weights(T.build_model("qwen2_5_vl"))
    with torch.no_grad():  # the value head's output at the last token, less its bias
        value = policy.model(**sample).last_hidden_state[0, -1] @ weight[0]
    torch.testing.assert_close(reward[0], value, atol=1e-5, rtol=1e-5)
    assert not [f for f in validate(tmp_path / "rm", against=src, load=True) if f.severity == "error"]


@pytest.mark.parametrize(
    ("model_type", "head_name"), [("qwen3_vl", "score.weight"), ("llava", "language_model.score.weight")]
)
def test_ms_swift_seq_cls_vlm_becomes_a_loadable_reward_model(policies, tmp_path, model_type, head_name):
    """ms-swift seq_cls: score [2, H] present, architectures still the generation class; 2 -> 1 takes row 1."""
    head = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    generation = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "llava": "LlavaForConditionalGeneration"}
    config = {"architectures": [generation[model_type]], "id2label": {"0": "LABEL_0", "1": "LABEL_1"}}
    src = _head_source(policies, tmp_path, model_type, head_name, head, config=config)
    codes = {f.code for f in validate(src)}
    assert "RM132" in codes
    bt = convert(src, tmp_path / "bt", head="bt")
    scalar = convert(src, tmp_path / "scalar")
    assert bt["source_kind"] == scalar["source_kind"] == "reward model"
    assert torch.equal(tensors(tmp_path / "bt")["score.weight"], head)
    assert torch.equal(tensors(tmp_path / "scalar")["score.weight"], head[1:])
    assert json.loads((tmp_path / "scalar" / "config.json").read_text())["architectures"] == [scalar["class"]]
    _, _, two = _reward(tmp_path / "bt", model_type)
    _, _, one = _reward(tmp_path / "scalar", model_type)
    torch.testing.assert_close(one[0], two[1], atol=1e-5, rtol=1e-6)  # a [1, H] and a [2, H] matmul
    assert not [f for f in validate(tmp_path / "scalar") if f.severity == "error"]


# --- validate ----------------------------------------------------------------------------------


def test_validate_passes_a_converted_vlm_and_loads_image_probes(policies):
    _, dst, _ = policies("qwen2_5_vl", True)
    found = [(f.code, f.severity) for f in validate(dst, load=True)]
    assert [c for c, sev in found if sev == "error"] == []


def test_validate_against_compares_renamed_tensors_hidden_states_and_rewards_with_images(policies):
    src, dst, _ = policies("qwen2_5_vl", True)
    assert validate(dst, against=src, load=True) == [f for f in validate(dst) if f.severity == "warning"]


@pytest.mark.parametrize(
    ("damage", "code"),
    [("released-names", "RM130"), ("pad-top-only", "RM131"), ("pad-is-image", "RM133"), ("image-out", "RM134")],
)
def test_validate_reports_vlm_defects(policies, tmp_path, damage, code):
    from safetensors.numpy import load_file, save_file

    _, dst, _ = policies("qwen2_vl", False)
    rm = _copy(dst, tmp_path / "rm")
    if damage == "released-names":
        T.qwen_layout(rm, canonical=False)
        weights = load_file(rm / "model.safetensors")
        save_file(weights, rm / "model.safetensors", metadata={"format": "pt"})
    elif damage == "pad-top-only":
        T.save_config_json(rm, lambda c: c["text_config"].pop("pad_token_id"))
    elif damage == "pad-is-image":
        T.save_config_json(
            rm, lambda c: (c.update(pad_token_id=T.IMAGE), c["text_config"].update(pad_token_id=T.IMAGE))
        )
    else:
        T.save_config_json(rm, lambda c: c.update(image_token_id=400))
    found = validate(rm)
    assert code in {f.code for f in found if f.severity == "error"}, found


# --- --text-only -------------------------------------------------------------------------------

TEXT_ONLY = {
    "gemma3": "Gemma3TextForSequenceClassification",
    "qwen3_5": "Qwen3_5TextForSequenceClassification",
    "llava": "LlamaForSequenceClassification",
    "internvl": "Qwen2ForSequenceClassification",
    "mistral3": "MistralForSequenceClassification",
    "smolvlm": "LlamaForSequenceClassification",
    "gemma4": "Gemma4TextForSequenceClassification",
}


@pytest.mark.parametrize("model_type", [t for t in TEXT_ONLY if t in FAMILIES])
def test_text_only_writes_a_text_reward_model_of_the_language_models_family(policies, tmp_path, model_type):
    src = policies(model_type)[0]
    report = convert(src, tmp_path / "rm", text_only=True)
    assert report["class"] == TEXT_ONLY[model_type]
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert "vision_config" not in config and "text_config" not in config
    rm, info = load_reward_model(tmp_path / "rm", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    before, after = tensors(src), tensors(tmp_path / "rm")
    assert not [k for k in after if "vision" in k or "projector" in k or "connector" in k]
    language_model = [k for k in before if ("language_model" in k or "text_model" in k) and "lm_head" not in k]
    assert len(after) == len(language_model) + 1
    policy = fresh_weights(T.build_model(model_type))
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        expected = fresh_weights(rm).score(policy.model(input_ids=ids).last_hidden_state)[:, -1]
        assert torch.equal(rm(input_ids=ids).logits, expected)
    assert not [f for f in validate(tmp_path / "rm", load=True) if f.severity == "error"]


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [("qwen2_vl", "qwen2_vl_text"), pytest.param("qwen3_5_moe", "keeps", id="qwen3_5_moe-fused-experts")],
)
def test_text_only_is_refused_where_the_language_model_cannot_run_alone(policies, tmp_path, model_type, reason):
    if model_type not in FAMILIES:
        pytest.skip(f"transformers has no {model_type}")
    src = policies(model_type, True)[0]
    result = _cli("convert", src, tmp_path / "dst", "--text-only")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0] and "config.json" in lines[0], lines
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("head", ["prm", "value"])
def test_token_classifier_heads_are_refused_for_a_vlm(policies, tmp_path, head):
    src = policies("qwen2_5_vl", True)[0]
    result = _cli("convert", src, tmp_path / "dst", "--head", head)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--head {head}" in lines[0] and "config.json" in lines[0], lines
    assert not (tmp_path / "dst").exists()


# --- sources and outputs -----------------------------------------------------------------------


def test_bin_weights_and_processor_files_convert(policies, tmp_path):
    """A .bin policy (released Qwen2.5-VL names) converts to the renamed safetensors; processor files and the chat
    template are carried over byte for byte."""
    from rmconvert.testing import save_as_bin

    src = save_as_bin(policies("qwen2_5_vl", True)[0], tmp_path / "src")
    processor = {"preprocessor_config.json": b'{"image_processor_type": "Qwen2VLImageProcessor"}\n'}
    processor["chat_template.jinja"] = b"{% for m in messages %}{{ m.content }}{% endfor %}"
    for name, data in processor.items():
        (src / name).write_bytes(data)
    convert(src, tmp_path / "rm")
    for name, data in processor.items():
        assert (tmp_path / "rm" / name).read_bytes() == data
    assert not validate(tmp_path / "rm", load=True)  # with processor files: no RM135 either
    assert all(k.startswith(("model.language_model.", "model.visual.", "score.")) for k in tensors(tmp_path / "rm"))


@pytest.mark.skipif(TRANSFORMERS_4, reason="4.57's built classes load the released names through rmconvert only")
def test_portable_vlm_loads_with_remote_code(policies, tmp_path):
    from transformers import AutoModelForSequenceClassification

    src = policies("llava")[0]
    convert(src, tmp_path / "rm", portable=True)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm", trust_remote_code=True, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}
    assert type(model).__module__.startswith("transformers_modules")
    _, sample, reward = _reward(tmp_path / "rm", "llava")
    with torch.no_grad():
        assert torch.equal(fresh_weights(model)(**sample).logits[0], reward)


@pytest.mark.parametrize("damage", ["processor", "config"])
def test_an_image_token_the_tokenizer_lacks_is_refused(policies, tmp_path, damage):
    bad = _copy(policies("llava")[0], tmp_path / "src")
    if damage == "processor":
        (bad / "processor_config.json").write_text('{"image_token": "<no-such-image-token>"}')
        where = "processor_config.json"
    else:
        T.save_config_json(bad, lambda c: c.update(image_token_index=310))
        where = "tokenizer.json"
    result = _cli("convert", bad, tmp_path / "dst")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0] and "no token of the tokenizer" in lines[0], lines
    assert not (tmp_path / "dst").exists()


def test_processor_round_trip_scores_a_pil_image(tmp_path):
    """LLaVA with its processor saved beside the policy: the reward model's own processor (carried over) turns a
    PIL image and a prompt into inputs whose reward is ``score`` of the policy's backbone."""
    pil = pytest.importorskip("PIL.Image")
    import transformers
    from transformers import AutoProcessor, LlavaProcessor

    image_processor = getattr(transformers, "LlavaImageProcessorPil", None) or transformers.CLIPImageProcessor
    src = T.build_policy("llava", tmp_path / "src")
    processor = LlavaProcessor(
        image_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        transformers.AutoTokenizer.from_pretrained(src),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(src)
    convert(src, tmp_path / "rm")
    rm = fresh_weights(load_reward_model(tmp_path / "rm"))
    policy = fresh_weights(T.build_model("llava"))
    loaded = AutoProcessor.from_pretrained(tmp_path / "rm")
    images = [pil.new("RGB", (40, 40), (200, 30, 30)), pil.new("RGB", (40, 40), (20, 160, 90))]
    rewards = []
    for image in images:
        inputs = dict(loaded(images=[image], text=["<s> <image> w5 w6 w7"], return_tensors="pt"))
        assert int((inputs["input_ids"] == T.IMAGE).sum()) == 16  # (32 / 8)^2 patches, CLS dropped
        with torch.no_grad():
            reward = rm(**inputs).logits[0]
            assert torch.equal(reward, rm.score(policy.model(**inputs).last_hidden_state)[0, -1])
        rewards.append(reward)
    assert not torch.equal(*rewards)
