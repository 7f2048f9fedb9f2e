"""``problem_type: regression``: serving stacks and transformers' pipeline return the reward, not a probability."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from rmconvert import convert, load_reward_model, validate

TEXTS = ["the answer is good and helpful", "no"]


@pytest.fixture(scope="module")
def outputs(build, tmp_path_factory):
    """(kind, head) -> converted reward model, for a built-in family and a generic one, and a reward model."""
    root = tmp_path_factory.mktemp("raw")
    out = {}
    for kind, spec in {"llama2": {}, "olmoe": {}, "qwen2": {}, "rm-2-label": {"labels": 2}}.items():
        src = build("llama3" if kind == "rm-2-label" else kind, **spec)
        for head in ("scalar", "bt"):
            out[kind, head] = root / f"{kind}-{head}"
            convert(src, out[kind, head], head=head)
    return out


@pytest.mark.parametrize("kind", ["llama2", "olmoe", "qwen2", "rm-2-label"])
@pytest.mark.parametrize("head", ["scalar", "bt"])
def test_every_output_is_a_regression_model(outputs, kind, head):
    path = outputs[kind, head]
    assert json.loads((path / "config.json").read_text())["problem_type"] == "regression"
    assert not any(f.code == "RM051" for f in validate(path))


@pytest.mark.parametrize("head", ["scalar", "bt"])
def test_text_classification_pipeline_returns_the_raw_reward(outputs, head):
    path = outputs["llama2", head]
    model = load_reward_model(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        logits = torch.cat([model(**tok(text, return_tensors="pt")).logits for text in TEXTS])
    scores = pipeline("text-classification", model=model, tokenizer=tok, top_k=None)(TEXTS)
    labels = logits.shape[1]
    served = torch.tensor(
        [[{s["label"]: s["score"] for s in row}[f"LABEL_{i}"] for i in range(labels)] for row in scores]
    )
    torch.testing.assert_close(served, logits, atol=1e-6, rtol=1e-6)  # without regression: sigmoid or softmax


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("problem_type"), "missing"),
        (lambda c: c.update(problem_type="single_label_classification"), "'single_label_classification'"),
    ],
    ids=["missing", "classification"],
)
def test_validate_warns_without_regression(outputs, tmp_path, edit, message):
    path = shutil.copytree(outputs["llama2", "scalar"], tmp_path / "rm")
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    (finding,) = [f for f in validate(path) if f.code == "RM051"]
    assert (finding.severity, finding.where, finding.message) == ("warning", "/problem_type", message)
    assert '"problem_type": "regression"' in finding.hint
