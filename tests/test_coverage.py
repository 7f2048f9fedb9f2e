"""Families without a native sequence classifier, --portable, and the coverage script on a representative subset."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers

from rmconvert import convert, validate
from rmconvert.coverage import check, check_composite, main
from rmconvert.families.modeling import composite_model_types, decoder_only_model_types, native_class_name

#: A dense Llama-like, an MoE, absolute positions with tied weights, an LM head under another name, three
#: families that transformers has no sequence classifier for, a pad id that indexes the position table
#: (XGLM), and a recurrence that runs over pads (RWKV: right padding only).
SUBSET = ("mistral", "qwen3_moe", "gpt2", "gpt_neox", "granite", "glm4_moe", "cohere", "xglm", "rwkv")
#: Vision-language families built from their default configs shrunk: token ids moved into the tiny tokenizer
#: (PaliGemma, Aria); on 5.x a fused tensor split on load (Kimi K2.5) and an embedding of vocab_size + 8 rows
#: (Llama 3.2 Vision).
COMPOSITE_SUBSET = ("paligemma", "aria") + (("kimi_k25", "mllama") if transformers.__version__ >= "5" else ())


def test_the_subset_covers_families_without_a_native_class():
    assert {t for t in SUBSET if not native_class_name(t)} >= {"granite", "glm4_moe"}
    assert set(SUBSET) <= decoder_only_model_types()
    assert not {"bert", "bart", "t5", "xlnet"} & decoder_only_model_types()


@pytest.mark.parametrize("model_type", SUBSET)
def test_each_family_converts_loads_and_scores_padded_batches(model_type, tmp_path):
    outcome, detail = check(model_type, tmp_path)
    assert (outcome, detail.split(":")[0]) == ("ok", "generic"), detail


def test_a_family_that_cannot_be_left_padded_is_set_to_pad_right(build, tmp_path, writable_copy):
    """RWKV's recurrence runs over left pads (the reward really changes), so convert makes its tokenizer pad
    right, validate --load scores right-padded batches, and a tokenizer set back to left is an error."""
    import torch
    from transformers import AutoTokenizer

    from rmconvert import load_reward_model

    report = convert(build("rwkv"), tmp_path / "rm")
    assert any("right-padded batches only" in w for w in report["warnings"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert tok.padding_side == "right"
    assert not [f for f in validate(tmp_path / "rm", load=True) if f.severity == "error"]

    model = load_reward_model(tmp_path / "rm").eval()
    texts = ["the answer is good", "no"]
    with torch.no_grad():
        alone = torch.cat([model(**tok(t, return_tensors="pt")).logits for t in texts])
        tok.padding_side = "left"
        left = model(**tok(texts, return_tensors="pt", padding=True)).logits
    assert not torch.allclose(left, alone, atol=1e-4)

    rm = writable_copy(tmp_path / "rm", "left")
    config = json.loads((rm / "tokenizer_config.json").read_text())
    (rm / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    assert [(f.code, f.where) for f in validate(rm) if f.severity == "error"] == [("RM034", "/padding_side")]


def test_only_decoder_image_text_families_are_composite():
    assert {"llava", "paligemma", "qwen2_vl"} <= composite_model_types()
    assert not {"blip", "blip-2", "instructblip", "kosmos-2", "florence2"} & composite_model_types()


@pytest.mark.parametrize("model_type", COMPOSITE_SUBSET)
def test_each_composite_family_converts_and_loads(model_type, tmp_path):
    outcome, detail = check_composite(model_type, tmp_path)
    assert outcome == "ok", detail


def test_coverage_report_counts_and_lists_exceptions(capsys):
    main(["gpt2", "granite", "bert"])  # bert builds, but is no decoder-only reward-model backbone
    out = capsys.readouterr().out
    assert "2 of 3 buildable decoder-only model types convert and load (66.7%)" in out
    assert "| bert | failed | CheckpointError: " in out and "| gpt2 |" not in out


def test_portable_checkpoint_loads_with_remote_code_and_without_rmconvert(build, tmp_path):
    convert(build("olmoe"), tmp_path / "rm", portable=True)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoModelForSequenceClassification": "modeling_rmconvert.OlmoeForSequenceClassification"
    }
    code = (
        "import sys\n"
        "from transformers import AutoModelForSequenceClassification as A\n"
        f"m, info = A.from_pretrained({str(tmp_path / 'rm')!r}, trust_remote_code=True, output_loading_info=True)\n"
        "assert not any(info.values()), info\n"
        "assert 'rmconvert' not in sys.modules\n"
        "print(type(m).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OlmoeForSequenceClassification"
    assert {f.code for f in validate(tmp_path / "rm")} == {"RM004"}  # names remote code: reported, never run


def test_portable_writes_no_code_for_a_native_class(build, tmp_path):
    report = convert(build("qwen2"), tmp_path / "rm", portable=True)
    assert "modeling_rmconvert.py" not in report["files"]
    assert "auto_map" not in json.loads((tmp_path / "rm" / "config.json").read_text())
