"""vLLM serves the reward models made of other heads (issue 17, docs/heads.md) and returns transformers' rewards:
an N-label head (raw logits under ``problem_type: regression``), a ``--head-from-tokens`` head, and a kept MLP
head served natively as ``Qwen2ForRewardModel``; all converted from a tiny Qwen2 (``tox -e vllm``).
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest

pytest.importorskip("vllm")

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from rmconvert import convert, load_reward_model
from rmconvert.testing import SERVABLE, build_checkpoint

ENGINE = {"dtype": "float32", "max_model_len": 128, "kv_cache_memory_bytes": 1 << 26, "enforce_eager": True}
TOLERANCE = 1e-4
PROMPTS = ["the answer is good and helpful", "no", "hello world, is the reward model honest?"]
LABELS = ["helpfulness", "correctness", "verbosity"]


class Case(NamedTuple):
    path: Path
    expected: torch.Tensor  # transformers' rewards of PROMPTS, one row each


def with_head(base: Path, dst: Path, head: dict, **config) -> Path:
    """``base`` without its LM head, plus ``head``, with ``config`` set."""
    shutil.copytree(base, dst)
    weights = {k: v for k, v in load_file(base / "model.safetensors").items() if not k.startswith("lm_head.")}
    save_file({**weights, **head}, dst / "model.safetensors", metadata={"format": "pt"})
    settings = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**settings, **config}))
    return dst


def transformers_rewards(path: Path) -> torch.Tensor:
    """Each prompt alone (no padding): the reward at its last token."""
    model = load_reward_model(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return torch.cat([model(**tok(p, return_tensors="pt")).logits for p in PROMPTS])


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    """Computed before any vLLM engine runs in this process (see test_vllm.py)."""
    root = tmp_path_factory.mktemp("heads")
    base = build_checkpoint("qwen2", root / "base", tie_word_embeddings=False, **SERVABLE)
    h = SERVABLE["hidden_size"]
    torch.manual_seed(5)
    out = {}
    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
    src = with_head(base, root / "n-label-src", {"score.weight": torch.randn(3, h)}, **labels)
    convert(src, root / "n-label")
    tokens = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
    no, yes = sorted(tokens, key=tokens.get)[40:42]  # two plain tokens of the tiny vocabulary
    convert(base, root / "tokens", head_from_tokens=f"{no},{yes}")
    mlp = {"score.0.weight": torch.randn(h, h) / h**0.5, "score.0.bias": torch.randn(h)}
    mlp |= {"score.2.weight": torch.randn(1, h) / h**0.5, "score.2.bias": torch.randn(1)}
    src = with_head(base, root / "qwen2-rm-src", mlp, architectures=["Qwen2ForRewardModel"])
    convert(src, root / "qwen2-rm")
    for name in ("n-label", "tokens", "qwen2-rm"):
        out[name] = Case(root / name, transformers_rewards(root / name))
    return out


def engine(path: Path):
    from vllm import LLM

    return LLM(model=str(path), runner="pooling", **ENGINE)


def served_as_expected(case: Case, labels: int) -> torch.Tensor:
    """vLLM's ``classify`` of PROMPTS on ``case``: ``labels`` values each, transformers' within TOLERANCE."""
    llm = engine(case.path)
    try:
        served = torch.tensor([o.outputs.probs for o in llm.classify(PROMPTS)])
    finally:
        del llm
        gc.collect()
    assert served.shape == case.expected.shape == (len(PROMPTS), labels)
    torch.testing.assert_close(served, case.expected, atol=TOLERANCE, rtol=TOLERANCE)
    return served


def test_n_label_head_served_as_raw_logits(cases):
    case = cases["n-label"]
    assert json.loads((case.path / "config.json").read_text())["id2label"] == {str(i): n for i, n in enumerate(LABELS)}
    served = served_as_expected(case, labels=3)
    assert (served < 0).any() and (served.sum(-1) - 1).abs().max() > 1e-2  # raw logits, not probabilities


def test_head_from_tokens_served(cases):
    served_as_expected(cases["tokens"], labels=1)


def test_kept_mlp_head_served_natively_as_qwen2_for_reward_model(cases):
    """vLLM's Qwen2ForRewardModel pools every token (ALL): the reward is the last token's value."""
    case = cases["qwen2-rm"]
    assert json.loads((case.path / "config.json").read_text())["architectures"] == ["Qwen2ForRewardModel"]
    llm = engine(case.path)
    try:
        outputs = llm.encode(PROMPTS, pooling_task="token_classify")
        served = torch.stack([torch.as_tensor(o.outputs.data)[-1].float() for o in outputs])
    finally:
        del llm
        gc.collect()
    assert served.shape == case.expected.shape == (len(PROMPTS), 1)
    torch.testing.assert_close(served, case.expected, atol=TOLERANCE, rtol=TOLERANCE)
