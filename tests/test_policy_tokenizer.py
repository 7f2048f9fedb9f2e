"""``--pad-token existing`` keeps the policy's vocabulary; ``validate --policy`` checks that it did."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from rmconvert import convert, validate
from rmconvert.cli import cli


def ids(path):
    """token -> id of the tokenizer at ``path``, as transformers loads it."""
    return AutoTokenizer.from_pretrained(path).get_vocab()


@pytest.mark.parametrize(
    "kind, pad, action, reason",
    [
        ("llama2", "<unk>", "reused", "the unknown token"),  # only <unk> <s> </s>: never bos or eos
        ("qwen25", "<|fim_pad|>", "reused", "pad-like special token"),  # not <|image_pad|>, <|vision_pad|>, eos
        ("llama30", "<|reserved_special_token_0|>", "reused", "reserved special token"),
        ("llama3", "<|finetune_right_pad_id|>", "reused", "a pad token already in the vocabulary"),
        ("olmo2", "<|pad|>", "kept", "the configured pad"),
    ],
)
def test_existing_pad_keeps_the_policys_vocabulary(build, tmp_path, kind, pad, action, reason):
    src = build(kind)
    report = convert(src, tmp_path / "rm", pad_token="existing")
    dst = tmp_path / "rm"
    config = json.loads((dst / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(dst)
    eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    assert (report["pad"]["token"], report["pad"]["action"]) == (pad, action)
    assert reason in report["pad"]["reason"] and report["pad"]["reason"].startswith("--pad-token existing")
    assert tok.pad_token == pad and config["pad_token_id"] == tok.pad_token_id == report["pad"]["id"]
    assert tok.pad_token_id not in eos and tok.pad_token_id != tok.bos_token_id
    assert ids(dst) == ids(src) and report["vocab"]["tokenizer"] == len(tok)
    findings = validate(dst, policy=src)
    assert [f for f in findings if f.severity == "error"] == [], findings


def test_existing_pad_of_a_reward_model_is_kept(build, tmp_path):
    report = convert(build("olmo2", labels=1), tmp_path / "rm", pad_token="existing")
    assert (report["pad"]["token"], report["pad"]["action"]) == ("<|pad|>", "kept")
    assert not any("moves where rewards are read" in w for w in report["warnings"])


def test_existing_pad_replacing_a_reward_models_eos_pad_warns(build, tmp_path):
    report = convert(build("qwen25", labels=1), tmp_path / "rm", pad_token="existing")
    assert (report["pad"]["token"], report["pad"]["action"]) == ("<|fim_pad|>", "reused")
    assert any("moves where rewards are read" in w for w in report["warnings"])


def test_auto_pad_that_adds_a_token_fails_the_policy_check(build, tmp_path):
    src = build("llama2")
    convert(src, tmp_path / "rm")  # auto adds <pad> = 293
    findings = validate(tmp_path / "rm", policy=src)
    vocabulary = [f for f in findings if f.code == "RM070"]
    assert len(vocabulary) == 1 and vocabulary[0].severity == "error"
    assert "'<pad>' = 293" in vocabulary[0].message and "not in the policy's" in vocabulary[0].message
    assert "--pad-token existing" in vocabulary[0].hint
    assert not any(f.code == "RM071" for f in findings)  # 296 rows cover the policy's 293 ids


def test_policy_with_more_tokens_than_the_embedding(build, tmp_path):
    src = build("llama2")
    convert(src, tmp_path / "rm", pad_token="existing")  # 296 rows
    policy = shutil.copytree(src, tmp_path / "policy")
    tokenizer = json.loads((policy / "tokenizer.json").read_text())
    for i, token_id in enumerate(range(293, 300)):  # the policy added tokens after the reward model was made
        tokenizer["added_tokens"].append({"id": token_id, "content": f"<tool_{i}>", "special": True})
    (policy / "tokenizer.json").write_text(json.dumps(tokenizer))
    findings = {f.code: f for f in validate(tmp_path / "rm", policy=policy)}
    assert "'<tool_0>' = 293" in findings["RM070"].message and "of the policy's missing" in findings["RM070"].message
    assert findings["RM071"].where == "model.embed_tokens.weight" and "ids reach 299" in findings["RM071"].message


def test_policy_tokens_at_other_ids(build, tmp_path):
    src = build("llama2")
    convert(src, tmp_path / "rm", pad_token="existing")
    policy = shutil.copytree(src, tmp_path / "policy")
    tokenizer = json.loads((policy / "tokenizer.json").read_text())
    first, second = tokenizer["added_tokens"][1:3]  # <s> and </s> swapped
    first["id"], second["id"] = second["id"], first["id"]
    (policy / "tokenizer.json").write_text(json.dumps(tokenizer))
    (message,) = [f.message for f in validate(tmp_path / "rm", policy=policy) if f.code == "RM070"]
    assert "2 ('</s>' = 1 here 2, '<s>' = 2 here 1) at other ids" in message  # the policy's ids, then ours


def test_cli_reports_the_pad_choice_and_the_policy_check(build, tmp_path):
    src = build("llama30")
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(src), str(tmp_path / "rm"), "--pad-token", "existing"])
    assert result.exit_code == 0, result.stderr
    assert "pad '<|reserved_special_token_0|>' = 2 (reused: --pad-token existing: a reserved" in result.stderr
    result = runner.invoke(cli, ["validate", str(tmp_path / "rm"), "--policy", str(src)])
    assert result.exit_code == 0 and "RM07" not in result.stdout, result.stdout
