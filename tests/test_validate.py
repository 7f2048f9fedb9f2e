"""``rmconvert validate`` finds each known reward-model defect, with its code, file and field."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rmconvert import convert, validate
from rmconvert.cli import cli


def edit_json(path, **changes):
    """Set (or, with value None, remove) keys of a JSON file."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        data.pop(key, None) if value is None else data.__setitem__(key, value)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def good_rm(build, tmp_path_factory):
    dst = tmp_path_factory.mktemp("rm") / "rm"
    convert(build("llama2", max_shard_size="100KB"), dst)
    return dst


def codes(path):
    return {(f.code, f.file, f.where) for f in validate(path)}


def test_a_converted_checkpoint_is_valid(good_rm):
    result = CliRunner().invoke(cli, ["validate", str(good_rm), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"path": str(good_rm), "valid": True, "findings": []}


def damage_pad_is_eos(rm):
    edit_json(rm / "config.json", pad_token_id=2)
    edit_json(rm / "tokenizer_config.json", pad_token="</s>")


def damage_no_id2label(rm):
    edit_json(rm / "config.json", id2label=None, label2id=None)


def damage_vocab_not_multiple_of_8(rm):
    edit_json(rm / "config.json", vocab_size=297)


def damage_pad_out_of_range(rm):
    edit_json(rm / "config.json", pad_token_id=999)


def damage_pad_disagrees_with_tokenizer(rm):
    edit_json(rm / "tokenizer_config.json", pad_token="<unk>")


def damage_index_without_metadata(rm):
    edit_json(rm / "model.safetensors.index.json", metadata=None)


def damage_index_total_size(rm):
    edit_json(rm / "model.safetensors.index.json", metadata={"total_size": 1})


def damage_pad_is_list(rm):
    edit_json(rm / "config.json", pad_token_id=[293])


def damage_truncated_shard(rm):
    shard = rm / "model-00001-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])


@pytest.mark.parametrize(
    "damage, expected",
    [
        (damage_pad_is_eos, ("RM032", "config.json", "/pad_token_id")),
        (damage_no_id2label, ("RM012", "config.json", "/id2label")),
        (damage_vocab_not_multiple_of_8, ("RM002", "config.json", "/vocab_size")),
        (damage_vocab_not_multiple_of_8, ("RM022", "model-00001-of-00004.safetensors", "model.embed_tokens.weight")),
        (damage_pad_out_of_range, ("RM031", "config.json", "/pad_token_id")),
        (damage_pad_disagrees_with_tokenizer, ("RM033", "tokenizer_config.json", "/pad_token")),
        (damage_index_without_metadata, ("RM040", "model.safetensors.index.json", "/metadata")),
        (damage_index_total_size, ("RM041", "model.safetensors.index.json", "/metadata/total_size")),
        (damage_pad_is_list, ("RM002", "config.json", "/pad_token_id")),
        (damage_truncated_shard, ("RM001", "model-00001-of-00004.safetensors", "")),
    ],
    ids=lambda v: getattr(v, "__name__", None) or v[0],
)
def test_each_defect_is_reported_and_makes_the_checkpoint_invalid(good_rm, writable_copy, damage, expected):
    rm = writable_copy(good_rm)
    damage(rm)
    assert expected in codes(rm)
    result = CliRunner().invoke(cli, ["validate", str(rm)])
    assert result.exit_code == 1
    assert expected[0] in result.stderr and "invalid" in result.stderr.splitlines()[-1]


def test_a_causal_lm_is_not_a_reward_model(build):
    found = codes(build("llama3"))
    assert ("RM010", "model.safetensors", "score.weight") in found
    assert ("RM013", "model.safetensors", "lm_head.weight") in found
    assert ("RM002", "config.json", "/architectures/0") in found


def test_shrunk_vocabulary_is_reported(build, tmp_path):
    rm = tmp_path / "rm"
    convert(build("olmo2"), rm)
    edit_json(rm / "config.json", vocab_size=296)  # smaller than the 300-token tokenizer, as OLMo-2-13B-RM shipped
    found = {f.code for f in validate(rm)}
    assert {"RM021", "RM022"} <= found


def test_dropout_is_a_warning_not_an_error(good_rm, writable_copy):
    rm = writable_copy(good_rm)
    edit_json(rm / "config.json", attention_dropout=0.1)
    findings = validate(rm)
    assert [(f.code, f.severity) for f in findings] == [("RM050", "warning")]
