"""vLLM serves rmconvert's token classifiers (``tox -e vllm``): a ``--head prm`` model with STEP pooling at its
step tag, ``--head value`` models at every token (ALL pooling), and a kept ``Qwen2ForProcessRewardModel``; the
scores must equal transformers' per-token scores (``rmconvert.load_reward_model``) of the same texts. Without
vLLM installed the module is skipped."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from rmconvert import convert, load_reward_model
from rmconvert.testing import SERVABLE

ENGINE = {"dtype": "float32", "max_model_len": 128, "kv_cache_memory_bytes": 1 << 26, "enforce_eager": True}
TOLERANCE = 1e-4
#: Texts of steps, each ended by the step separator (TRL's PRMTrainer appends it after every step).
TEXTS = ["the answer is good\nand helpful\n", "no\n", "hello world\nis the reward model honest?\n"]


def transformers_scores(path: Path) -> list[torch.Tensor]:
    """Per-token logits [T, labels] of each text, one by one."""
    model = load_reward_model(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [model(**tok(text, return_tensors="pt")).logits[0] for text in TEXTS]


def token_ids(path: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(path)
    return [tok(text).input_ids for text in TEXTS]


def served(path: Path, pooler_config: dict | None = None) -> list[torch.Tensor]:
    """``LLM.encode(..., pooling_task="token_classify")`` of the texts; the engine is released afterwards."""
    from vllm import LLM

    llm = LLM(model=str(path), runner="pooling", pooler_config=pooler_config, **ENGINE)
    try:
        return [torch.as_tensor(out.outputs.data) for out in llm.encode(TEXTS, pooling_task="token_classify")]
    finally:
        del llm
        gc.collect()


def qwen_process_reward_model(build, root: Path) -> Path:
    """Qwen2ForProcessRewardModel's layout (score.0 [H, H] + b, ReLU, score.2 [2, H] + b) on a tiny Qwen 2."""
    base = build("qwen2", **SERVABLE)
    src = Path(shutil.copytree(base, root / "qwen-prm-src"))
    config = json.loads((src / "config.json").read_text())
    hidden = config["hidden_size"]
    gen = torch.Generator().manual_seed(5)
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if not k.startswith("lm_head.")}
    tensors |= {"score.0.weight": torch.randn(hidden, hidden, generator=gen) / hidden**0.5}
    tensors |= {"score.0.bias": torch.randn(hidden, generator=gen) / 10}
    tensors |= {"score.2.weight": torch.randn(2, hidden, generator=gen) / hidden**0.5}
    tensors |= {"score.2.bias": torch.randn(2, generator=gen) / 10}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config.update(architectures=["Qwen2ForProcessRewardModel"], tie_word_embeddings=False)
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.fixture(scope="module")
def models(build, tmp_path_factory) -> dict[str, tuple[Path, list[torch.Tensor]]]:
    """name -> (converted model, transformers' per-token scores), computed before any vLLM engine runs."""
    root = tmp_path_factory.mktemp("token")
    out = {}
    convert(build("llama3", **SERVABLE), root / "prm", head="prm", step_separator="\n")
    convert(build("llama3", labels=1, **SERVABLE), root / "value", head="value")
    convert(build("qwen2", labels=1, **SERVABLE), root / "qwen2-value", head="value")
    convert(qwen_process_reward_model(build, root), root / "qwen-prm", head="prm", step_separator="\n")
    for name in ("prm", "value", "qwen2-value", "qwen-prm"):
        out[name] = (root / name, transformers_scores(root / name))
    return out


@pytest.mark.parametrize("name", ["prm", "qwen-prm"])
def test_a_prm_is_served_at_its_step_tags(models, name):
    """STEP pooling with the step_tag_id rmconvert recorded: P(correct step) at each tag, transformers' softmax."""
    path, expected = models[name]
    tag = json.loads((path / "config.json").read_text())["step_tag_id"]
    got = served(path, {"pooling_type": "STEP", "step_tag_id": tag})
    for ids, scores, ours in zip(token_ids(path), expected, got):
        at_tags = scores[torch.tensor(ids) == tag].softmax(-1)
        assert at_tags.shape[0] >= 1
        torch.testing.assert_close(ours.reshape(at_tags.shape), at_tags, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("name", ["value", "qwen2-value"])
def test_a_value_model_is_served_at_every_token(models, name):
    """token_classify with ALL pooling: the raw value (problem_type regression) at every token."""
    path, expected = models[name]
    for scores, ours in zip(expected, served(path)):
        torch.testing.assert_close(ours.reshape(scores.shape), scores, atol=TOLERANCE, rtol=TOLERANCE)
