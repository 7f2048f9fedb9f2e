"""Conversion end to end on tiny real checkpoints: loads, exact backbone, head math, pad and vocab rules."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from rmconvert import convert, load_reward_model, validate
from rmconvert.engine.pad import EOS_WARNING
from rmconvert.families.loading import fresh_weights
from rmconvert.sources.checkpoint import open_checkpoint
from rmconvert.testing import snapshot

TEXTS = ["the answer is good", "hello world the reward model is helpful and honest yes", "no"]
SOURCES = {
    "llama3": {"kind": "llama3"},
    "llama2": {"kind": "llama2"},
    "olmo2": {"kind": "olmo2"},
    "olmoe": {"kind": "olmoe"},
    "qwen2-tied": {"kind": "qwen2"},
    "llama2-sharded": {"kind": "llama2", "max_shard_size": "100KB"},
    "rm-1-label": {"kind": "olmo2", "labels": 1},
    "rm-2-label": {"kind": "llama3", "labels": 2},
}


def source(build, name):
    spec = dict(SOURCES[name])
    return build(spec.pop("kind"), **spec)


def tensors(path):
    """Every tensor of a checkpoint, by name."""
    out = {}
    for shard in open_checkpoint(path).shards:
        with safe_open(shard.path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (a safe_open handle, not a dict)
    return out


def load(path):
    model, info = load_reward_model(path, output_loading_info=True)
    return model.eval(), info


def rewards(model, tok, texts=TEXTS, side="right"):
    tok.padding_side = side
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits


@pytest.fixture(scope="module")
def converted(build, tmp_path_factory):
    """``converted(name, **options)`` -> (source path, output path, report), cached per module."""
    cache = {}

    def _convert(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            dst = tmp_path_factory.mktemp("rm") / "out"
            src = source(build, name)
            cache[key] = (src, dst, convert(src, dst, **options))
        return cache[key]

    return _convert


@pytest.mark.parametrize("head", ["scalar", "bt"])
@pytest.mark.parametrize("name", list(SOURCES))
def test_output_loads_cleanly_validates_and_scores_batches_like_single_rows(converted, name, head):
    _, dst, report = converted(name, head=head)
    model, info = load(dst)
    assert {k: v for k, v in info.items() if v} == {}
    assert model.config.num_labels == report["head"]["labels"] == {"scalar": 1, "bt": 2}[head]
    # a [zeros; w] head is sound, with a warning that TRL's GRPO and RLOO read its zero column (RM152)
    assert [(f.code, f.severity) for f in validate(dst)] == ([("RM152", "warning")] if head == "bt" else [])
    tok = AutoTokenizer.from_pretrained(dst)
    assert tok.pad_token_id == model.config.pad_token_id == report["pad"]["id"]
    single = torch.cat([rewards(model, tok, [t]) for t in TEXTS])
    for side in ("right", "left"):
        torch.testing.assert_close(rewards(model, tok, side=side), single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama3", "llama2", "olmo2", "olmoe", "qwen2-tied", "llama2-sharded"])
def test_backbone_hidden_states_equal_the_source_causal_lm(converted, name):
    src, dst, _ = converted(name)
    policy = AutoModelForCausalLM.from_pretrained(src).eval()
    model, _ = load(dst)
    policy, model = fresh_weights(policy), fresh_weights(model)
    ids = AutoTokenizer.from_pretrained(src)(TEXTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = policy.base_model(ids).last_hidden_state
        actual = model.base_model(ids).last_hidden_state
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("name", list(SOURCES))
def test_unchanged_tensors_are_byte_identical_and_lm_head_is_gone(converted, name):
    src, dst, report = converted(name)
    before, after = tensors(src), tensors(dst)
    assert not any(k.startswith("lm_head.") for k in after)
    emb = "model.embed_tokens.weight"
    for key, value in before.items():
        if key.startswith("lm_head.") or key == "score.weight":
            continue
        rows = report["vocab"]["from"] if key == emb else len(value)
        assert torch.equal(after[key][:rows].view(torch.uint8), value.view(torch.uint8)), key
    assert set(after) == {k for k in before if not k.startswith("lm_head.")} | {"score.weight"}


def test_fresh_heads_follow_open_instruct_init_and_bt_is_zeros_then_w(converted):
    _, scalar_dst, _ = converted("llama2", head="scalar")
    _, bt_dst, _ = converted("llama2", head="bt")
    scalar, bt = tensors(scalar_dst)["score.weight"], tensors(bt_dst)["score.weight"]
    hidden = scalar.shape[1]
    expected = np.random.default_rng(0).standard_normal(hidden) / math.sqrt(hidden + 1)
    assert torch.equal(scalar, torch.from_numpy(expected.astype(np.float32)).unsqueeze(0))
    assert torch.equal(bt[0], torch.zeros(hidden)) and torch.equal(bt[1], scalar[0])


def test_bt_reward_equals_scalar_reward_both_readings(converted):
    _, scalar_dst, _ = converted("llama3", head="scalar")
    _, bt_dst, _ = converted("llama3", head="bt")
    tok = AutoTokenizer.from_pretrained(scalar_dst)
    r = rewards(load(scalar_dst)[0], tok)[:, 0]
    bt = rewards(load(bt_dst)[0], tok)
    assert torch.equal(bt[:, 0], torch.zeros(len(TEXTS)))  # the zeros row contributes exactly nothing
    assert torch.equal(bt[:, 1] - bt[:, 0], bt[:, 1])
    # same weights to the bit (see above); a [2, H] and a [1, H] matmul may round differently in the last bit
    torch.testing.assert_close(bt[:, 1], r, rtol=1e-6, atol=1e-6)


def test_seed_and_init_std_are_honoured(converted):
    base = tensors(converted("llama2")[1])["score.weight"]
    other_seed = tensors(converted("llama2", seed=1)[1])["score.weight"]
    double = tensors(converted("llama2", init_std=2 / math.sqrt(65))[1])["score.weight"]
    assert not torch.equal(base, other_seed)
    assert torch.equal(double, 2 * base)


def test_two_label_rm_to_scalar_takes_row_one_exactly(converted):
    src, dst, report = converted("rm-2-label", head="scalar")
    assert torch.equal(tensors(dst)["score.weight"], tensors(src)["score.weight"][1:2])
    assert report["head"]["from"] == 2
    tok = AutoTokenizer.from_pretrained(dst)
    source_model = load(src)[0]
    source_model.config.pad_token_id = tok.pad_token_id  # same pooling position on both sides
    torch.testing.assert_close(rewards(load(dst)[0], tok)[:, 0], rewards(source_model, tok)[:, 1], rtol=1e-6, atol=1e-6)


def test_two_label_rm_to_scalar_difference_mode(converted):
    src, dst, _ = converted("rm-2-label", head="scalar", from_bt="difference")
    w = tensors(src)["score.weight"]
    assert torch.equal(tensors(dst)["score.weight"], (w[1] - w[0]).unsqueeze(0))


def test_one_label_rm_to_bt_is_zeros_then_w_and_same_form_is_unchanged(converted):
    src, dst, _ = converted("rm-1-label", head="bt")
    w = tensors(src)["score.weight"]
    assert torch.equal(tensors(dst)["score.weight"], torch.cat([torch.zeros_like(w), w]))
    src, same, report = converted("rm-1-label", head="scalar")
    assert torch.equal(tensors(same)["score.weight"], w)
    # the trained pad, kept: said in the pad's reason, not as a warning (the source's pad is sound: not an eos)
    assert report["pad"]["action"] == "kept" and report["pad"]["reason"] == "the pad the reward model was trained with"
    assert report["warnings"] == []


@pytest.mark.parametrize(
    "name, pad, action, vocab",
    [
        ("llama3", "<|finetune_right_pad_id|>", "reused", (296, 296)),
        ("llama2", "<pad>", "added", (293, 296)),
        ("olmo2", "<|pad|>", "kept", (352, 352)),  # already padded past the tokenizer: never shrinks
        ("olmoe", "<|pad|>", "kept", (304, 304)),
        ("qwen2-tied", "<pad>", "added", (304, 304)),  # pad == eos in the source; new id fits a spare row
    ],
)
def test_pad_and_vocabulary_rules(converted, name, pad, action, vocab):
    _, dst, report = converted(name)
    config = json.loads((dst / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(dst)
    eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    assert (report["pad"]["token"], report["pad"]["action"]) == (pad, action)
    assert tok.pad_token == pad and config["pad_token_id"] == tok.pad_token_id not in eos
    assert (report["vocab"]["from"], config["vocab_size"]) == vocab
    assert config["vocab_size"] % 8 == 0 and config["vocab_size"] >= len(tok)
    assert config["vocab_size"] == math.ceil(max(vocab[0], len(tok)) / 8) * 8
    assert config["architectures"] == [report["class"]] and config["id2label"] == {"0": "LABEL_0"}


def test_new_embedding_rows_are_the_mean_of_the_old_rows_in_bf16(build, tmp_path):
    src = build("llama2", dtype="bfloat16")
    convert(src, tmp_path / "out")
    old = tensors(src)["model.embed_tokens.weight"]
    new = tensors(tmp_path / "out")["model.embed_tokens.weight"]
    assert new.dtype == torch.bfloat16 and new.shape[0] == 296
    mean = old.double().mean(0).float().to(torch.bfloat16)
    assert all(torch.equal(row, mean) for row in new[293:])
    assert tensors(tmp_path / "out")["score.weight"].dtype == torch.bfloat16


def test_tied_source_keeps_tie_flag_and_writes_no_lm_head(converted):
    _, dst, _ = converted("qwen2-tied")
    assert json.loads((dst / "config.json").read_text())["tie_word_embeddings"] is True
    assert not any(k.startswith("lm_head") for k in tensors(dst))


@pytest.mark.parametrize("mode, expected_action", [("eos", "eos"), ("keep", "keep"), ("<|im_end|>", "given")])
def test_explicit_pad_modes(build, tmp_path, mode, expected_action):
    report = convert(build("qwen2"), tmp_path / "out", pad_token=mode)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert report["pad"]["action"] == expected_action
    assert config["pad_token_id"] == tok.pad_token_id == report["pad"]["id"]
    if mode in ("eos", "keep"):  # the qwen2 source's pad is its eos
        assert config["pad_token_id"] == config["eos_token_id"]
        assert any("pad = eos" in w for w in report["warnings"])
        assert any(f.code == "RM032" for f in validate(tmp_path / "out"))
    if mode == "keep":  # a causal LM: its pad is kept as asked, no reward model was trained with it
        assert [w for w in report["warnings"] if "pad = eos" in w] == [
            EOS_WARNING + "; kept as asked (--pad-token keep)"
        ]


def test_new_pad_token_is_written_consistently_to_every_tokenizer_file(converted):
    _, dst, report = converted("llama2")
    tokenizer = json.loads((dst / "tokenizer.json").read_text())
    assert {"id": 293, "content": "<pad>"}.items() <= tokenizer["added_tokens"][-1].items()
    assert json.loads((dst / "tokenizer_config.json").read_text())["pad_token"] == "<pad>"
    if (dst / "special_tokens_map.json").exists():
        special = json.loads((dst / "special_tokens_map.json").read_text())["pad_token"]
        assert (special["content"] if isinstance(special, dict) else special) == "<pad>"
    assert len(AutoTokenizer.from_pretrained(dst)) == 294 == report["vocab"]["tokenizer"]


def test_dropout_fields_are_zeroed(build, tmp_path):
    convert(build("llama2", attention_dropout=0.1), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attention_dropout"] == 0.0


def test_same_source_and_options_give_byte_identical_output(build, tmp_path):
    src = build("llama2", max_shard_size="100KB")
    for name in ("a", "b"):
        convert(src, tmp_path / name, head="bt", seed=7)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    manifest = json.loads((tmp_path / "a" / "rmconvert.json").read_text())
    assert manifest["options"]["seed"] == 7 and manifest["architecture"]["name"] == "llama"
    assert set(manifest["source_files"]) >= {"config.json", "model.safetensors.index.json", "tokenizer.json"}


def test_sharded_output_has_an_exact_index_and_copies_untouched_shards_whole(converted):
    src, dst, report = converted("llama2-sharded")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    ckpt = open_checkpoint(dst)  # raises unless the weight_map is exact
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in ckpt.tensors.values())
    assert report["whole_file_copies"], "shards holding neither embedding nor head are copied as files"
    for name in report["whole_file_copies"]:
        assert (dst / name).read_bytes() in {p.read_bytes() for p in src.glob("*.safetensors")}


def test_source_is_untouched_and_outputs_are_0644(converted, build):
    src = build("llama2")
    before = snapshot(src)
    _, dst, _ = converted("llama2", head="bt", seed=3)
    assert snapshot(src) == before
    assert {oct(p.stat().st_mode & 0o777) for p in dst.iterdir()} == {"0o644"}
    assert oct(os.stat(dst).st_mode & 0o777) == "0o755"


def test_a_new_pad_token_asked_for_says_it_was_asked_for(build, tmp_path):
    """``--pad-token '<pad>'`` on Llama 3 adds ``<pad>`` as asked: the report must not claim the vocabulary holds
    no pad, as ``<|finetune_right_pad_id|>``, which auto reuses, is there."""
    report = convert(build("llama3"), tmp_path / "out", pad_token="<pad>")
    assert report["pad"] == {
        "token": "<pad>",
        "id": 296,
        "action": "added",
        "reason": "--pad-token TOKEN, not in the vocabulary",
    }
    assert convert(build("llama3"), tmp_path / "auto")["pad"]["action"] == "reused"


@pytest.mark.parametrize("token", ["<|finetune_right_pad_id|>", "<new-pad>"])
def test_a_reward_model_whose_pad_is_moved_by_pad_token_is_warned_about(build, tmp_path, token):
    """Following RM032's hint on a reward model moves where rewards are read: the conversion says so, whether the
    token is in the vocabulary or added; the same pad given again is no change and no warning."""
    src = build("llama3", labels=2)
    report = convert(src, tmp_path / "moved", pad_token=token)
    assert any("changed the reward model's pad" in w and "retrain" in w for w in report["warnings"])
    again = convert(tmp_path / "moved", tmp_path / "again", pad_token=token, head="bt")
    assert not any("changed the reward model's pad" in w for w in again["warnings"])
