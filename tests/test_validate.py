"""``rmconvert validate`` finds each known reward-model defect, with its code, file, field and fix."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import struct
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from rmconvert import Architecture, convert, hookimpl, schemas, validate
from rmconvert.cli import cli
from rmconvert.doctor.findings import CODES, Finding
from rmconvert.families.host import get_plugin_manager, load_registry
from rmconvert.sources.checkpoint import open_checkpoint
from rmconvert.testing import save_as_bin

CODES_PAGE = Path(__file__).resolve().parents[1] / "docs" / "validate.md"


def edit_json(path, **changes):
    """Set (or, with value None, remove) keys of a JSON file."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        data.pop(key, None) if value is None else data.__setitem__(key, value)
    path.write_text(json.dumps(data))


def rename_tensor(rm: Path, old: str, new: str) -> None:
    """Rename a tensor in its shard's header and in the index; the data bytes stay as they are."""
    shard = shard_of(rm, old)
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header[new] = header.pop(old)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    index = rm / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"][new] = data["weight_map"].pop(old)
        index.write_text(json.dumps(data))


def shard_of(rm: Path, tensor: str) -> Path:
    return open_checkpoint(rm).tensors[tensor].path


@pytest.fixture(scope="module")
def source(build):
    return build("llama2", max_shard_size="100KB")


@pytest.fixture(scope="module")
def good_rm(source, tmp_path_factory):
    dst = tmp_path_factory.mktemp("rm") / "rm"
    convert(source, dst)
    return dst


def run(*args):
    return CliRunner().invoke(cli, ["validate", *map(str, args)])


def codes(path, **options):
    return {f.code for f in validate(path, **options)}


def test_a_converted_checkpoint_is_valid_and_the_json_report_follows_its_schema(good_rm):
    result = run(good_rm, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, json.loads(schemas.path("validate-report").read_text()))
    assert report == {"path": str(good_rm), "valid": True, "strict": False, "errors": 0, "warnings": 0, "findings": []}


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
    shard = shard_of(rm, "score.weight")
    shard.write_bytes(shard.read_bytes()[:-10])


def damage_hidden_size(rm):
    edit_json(rm / "config.json", hidden_size=32)


def damage_tokenizer(rm):
    (rm / "tokenizer.json").write_text("{not json")


@pytest.mark.parametrize(
    "damage, code, file, where",
    [
        (damage_pad_is_eos, "RM032", "config.json", "/pad_token_id"),
        (damage_no_id2label, "RM012", "config.json", "/id2label"),
        (damage_vocab_not_multiple_of_8, "RM002", "config.json", "/vocab_size"),
        (damage_vocab_not_multiple_of_8, "RM022", None, "model.embed_tokens.weight"),
        (damage_pad_out_of_range, "RM031", "config.json", "/pad_token_id"),
        (damage_pad_disagrees_with_tokenizer, "RM033", "tokenizer_config.json", "/pad_token"),
        (damage_index_without_metadata, "RM040", "model.safetensors.index.json", "/metadata"),
        (damage_index_total_size, "RM041", "model.safetensors.index.json", "/metadata/total_size"),
        (damage_pad_is_list, "RM002", "config.json", "/pad_token_id"),
        (damage_truncated_shard, "RM001", None, ""),
        (damage_hidden_size, "RM011", None, "score.weight"),
        (damage_hidden_size, "RM024", None, "model.embed_tokens.weight"),
        (damage_tokenizer, "RM060", "tokenizer.json", ""),
    ],
    ids=lambda v: getattr(v, "__name__", None) or str(v),
)
def test_each_defect_is_reported_with_a_fix_and_fails_validation(good_rm, writable_copy, damage, code, file, where):
    rm = writable_copy(good_rm)
    file = file or shard_of(good_rm, where or "score.weight").name
    damage(rm)
    found = [f for f in validate(rm) if f.code == code]
    assert [(f.file, f.where) for f in found] == [(file, where)], validate(rm)
    assert found[0].severity == "error" and found[0].hint and found[0].message
    result = run(rm)
    assert result.exit_code == 1
    assert re.search(rf"^{code} +error +{re.escape(file)}", result.stdout, re.MULTILINE), result.stdout
    assert "invalid" in result.stdout.splitlines()[-1]


def test_a_causal_lm_is_not_a_reward_model(build):
    found = {(f.code, f.where) for f in validate(build("llama3"))}
    assert {("RM010", "score.weight"), ("RM013", "lm_head.weight"), ("RM002", "/architectures/0")} <= found


def test_a_wrong_field_is_one_finding(build):
    """``LlamaForCausalLM`` breaks both the family's schema and the reward-model schema it extends: one
    problem, reported once, with both messages."""
    schema = [f for f in validate(build("llama3")) if f.code == "RM002" and f.where == "/architectures/0"]
    assert [f.message for f in schema] == [
        (
            "'LlamaForCausalLM' does not match 'For(Sequence|Token)Classification$|^Qwen2ForProcessRewardModel$';"
            " 'LlamaForCausalLM' is not one"
            " of ['LlamaForSequenceClassification', 'LlamaForTokenClassification'] (schema llama.schema.json)"
        )
    ]


@pytest.mark.parametrize(
    "head, id2label, expected",
    [
        ("scalar", None, "the config loads 2 labels but score.weight has 1 row"),  # none: transformers loads 2
        ("bt", {"0": "LABEL_0"}, "the config loads 1 label but score.weight has 2 rows"),
    ],
)
def test_label_and_row_counts_are_said_in_the_singular_for_one(source, tmp_path, head, id2label, expected):
    convert(source, tmp_path / "rm", head=head)
    edit_json(tmp_path / "rm" / "config.json", id2label=id2label, label2id=None)
    found = [f.message for f in validate(tmp_path / "rm") if f.code == "RM012"]
    assert found == [expected + " (transformers would initialise a new head at random)"]


@pytest.mark.parametrize(
    "kind, labels, pad, why, action",
    [
        (
            "llama3",
            2,
            "<|finetune_right_pad_id|>",
            "reuses the tokenizer's unused pad token, as --pad-token auto does for a causal LM",
            "given",
        ),
        ("llama2", 1, "<pad>", "a new token: the tokenizer has no unused pad token", "added"),
    ],
)
def test_the_pad_is_eos_hint_names_the_pad_auto_picks_and_keeps_the_head(
    build, tmp_path, kind, labels, pad, why, action
):
    """RM032's fix names the pad ``--pad-token auto`` gives a causal LM (on a reward model auto keeps the trained
    pad, so the token is named): Llama 3's unused ``<|finetune_right_pad_id|>``, reused, not a new ``<pad>``; a
    2-label reward model stays 2-label (``--head bt``). Followed, it gives a sound reward model whose report says
    the pad was given or added as asked, not that the vocabulary holds no pad."""
    rm = Path(shutil.copytree(build(kind, labels=labels), tmp_path / "rm"))
    eos = json.loads((rm / "config.json").read_text())["eos_token_id"]
    eos = eos[-1] if isinstance(eos, list) else eos
    edit_json(rm / "config.json", pad_token_id=eos)
    edit_json(rm / "tokenizer_config.json", pad_token=_token(rm, eos))
    hints = [f.hint for f in validate(rm) if f.code == "RM032"]
    head = " --head bt" if labels == 2 else ""
    command = f"rmconvert convert {rm} {rm}-fixed{head} --pad-token {shlex.quote(pad)}"
    assert hints == [f"{command} ({why}; then retrain: the read position moves)"]
    result = CliRunner().invoke(cli, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rm-fixed" / "rmconvert.json").read_text())["result"]
    assert report["head"]["labels"] == labels and (report["pad"]["token"], report["pad"]["action"]) == (pad, action)
    assert report["pad"]["reason"] == (
        "--pad-token TOKEN" if action == "given" else "--pad-token TOKEN, not in the vocabulary"
    )
    assert [f.code for f in validate(tmp_path / "rm-fixed") if f.severity == "error"] == []


def _token(path: Path, token_id: int) -> str:
    """The text of token ``token_id`` in the tokenizer of ``path``."""
    from rmconvert.sources.tokenizer_files import TokenizerFiles

    return {i: t for t, i in TokenizerFiles.read(path).ids.items()}[token_id]


def test_shrunk_vocabulary_is_reported(build, tmp_path):
    rm = tmp_path / "rm"
    convert(build("olmo2"), rm)
    edit_json(rm / "config.json", vocab_size=296)  # below the 300-token tokenizer, as OLMo-2-13B-RM shipped
    assert {"RM021", "RM022"} <= codes(rm)


def test_warnings_pass_unless_strict(good_rm, writable_copy):
    rm = writable_copy(good_rm)
    edit_json(rm / "config.json", attention_dropout=0.1, auto_map={"AutoModel": "remote.Model"})
    assert sorted((f.code, f.severity) for f in validate(rm)) == [("RM004", "warning"), ("RM050", "warning")]
    assert run(rm).exit_code == 0
    strict = run(rm, "--strict", "--json")
    assert strict.exit_code == 1 and json.loads(strict.stdout)["errors"] == 2


@pytest.mark.parametrize("prefix", ["value_head", "reward_head"])
def test_openrlhf_reward_model_is_recognised_and_convert_fixes_it(good_rm, writable_copy, tmp_path, prefix):
    rm = writable_copy(good_rm)
    rename_tensor(rm, "score.weight", f"{prefix}.weight")
    edit_json(rm / "config.json", architectures=["RewardModel"], value_head_prefix=prefix)
    edit_json(rm / "config.json", id2label=None, label2id=None, mean=0.1, std=2.0, normalize_reward=True)
    found = codes(rm)
    assert {"RM014", "RM010"} <= found
    fixed = tmp_path / "fixed"
    report = convert(rm, fixed)
    assert report["head"]["how"] == "unchanged 1-label head" and report["source_kind"] == "reward model"
    assert validate(fixed, against=rm) == []
    assert validate(fixed) == []


def test_a_value_head_file_beside_the_familys_own_head_is_not_a_value_head_model(build, tmp_path):
    """CTRL's reward head is classifier.weight: a TRL value head left beside it is not what loads (no RM015)."""
    import torch
    from safetensors.torch import save_file

    rm = tmp_path / "rm"
    convert(build("ctrl"), rm)
    hidden = open_checkpoint(rm).tensors["classifier.weight"].shape[1]
    save_file({"v_head.summary.weight": torch.zeros(1, hidden)}, rm / "value_head.safetensors")
    assert validate(rm) == []


def test_load_finds_nothing_on_a_sound_model_and_checks_against_the_source(good_rm, source):
    assert validate(good_rm, load=True, against=source) == []


def test_load_of_a_bin_reward_model_compares_its_tensors_and_probes_padding(good_rm, tmp_path):
    """``.bin`` weights are read as safetensors are: a sound one has only the pickle warning, a bad pad RM110."""
    rm = save_as_bin(good_rm, tmp_path / "bin")
    assert [f.code for f in validate(rm, load=True)] == ["RM042"]
    damage_pad_disagrees_with_tokenizer(rm)
    assert [f.code for f in validate(rm, load=True)] == ["RM033", "RM042", "RM110"]


def test_a_scalar_parameter_loaded_with_other_values_is_reported(good_rm, writable_copy):
    """RM127 for a 0-d parameter (a learned scale) that loads with a value other than the stored one."""
    import torch
    from safetensors.torch import load_file, save_file

    from rmconvert.doctor.probes import _load, _reinitialised
    from rmconvert.doctor.validation import _read

    rm = writable_copy(good_rm)
    shard = shard_of(rm, "model.norm.weight")
    save_file({**load_file(shard), "model.scale": torch.tensor(2.0)}, shard, metadata={"format": "pt"})
    edit_json(
        rm / "model.safetensors.index.json",
        weight_map={
            **json.loads((rm / "model.safetensors.index.json").read_text())["weight_map"],
            "model.scale": shard.name,
        },
    )
    subject = _read(rm, load_registry())
    model, _ = _load(subject, rm)
    model.model.register_parameter("scale", torch.nn.Parameter(torch.tensor(1.0)))
    found = list(_reinitialised(subject, model))
    assert [(f.code, f.file, f.where) for f in found] == [("RM127", shard.name, "model.scale")]
    assert "max |loaded - stored| 1" in found[0].message


def test_load_reports_batches_that_score_differently(good_rm, writable_copy):
    rm = writable_copy(good_rm)
    damage_pad_disagrees_with_tokenizer(rm)  # the tokenizer pads with <unk>, pooling skips only <pad>
    assert {"RM033", "RM110"} <= codes(rm, load=True)


def test_load_reports_missing_and_unexpected_keys(good_rm, writable_copy):
    rm = writable_copy(good_rm)
    rename_tensor(rm, "model.norm.weight", "model.final_norm.weight")
    assert {"RM100", "RM101"} <= codes(rm, load=True)


def test_against_finds_a_changed_backbone_tensor(good_rm, source, writable_copy):
    rm = writable_copy(good_rm)
    info = open_checkpoint(rm).tensors["model.layers.0.mlp.up_proj.weight"]
    with open(info.path, "r+b") as f:
        f.seek(info.offset + 10)
        f.write(b"\x7f")
    found = [f for f in validate(rm, against=source) if f.code == "RM120"]
    assert [f.where for f in found] == ["model.layers.0.mlp.up_proj.weight"]


def test_against_a_two_label_source_checks_the_head_rules(build, tmp_path):
    source = build("llama3", labels=2)
    convert(source, tmp_path / "scalar")
    assert validate(tmp_path / "scalar", load=True, against=source) == []
    bad = tmp_path / "bad"
    convert(source, bad, from_bt="difference", seed=1)
    edit_json(bad / "rmconvert.json", note="score changed below")
    info = open_checkpoint(bad).tensors["score.weight"]
    with open(info.path, "r+b") as f:  # a head that matches neither row 1 nor row 1 - row 0
        f.seek(info.offset)
        f.write(b"\x00\x00\x80\x3f" * 8)
    assert "RM123" in codes(bad, load=True, against=source)


class AcmeChecks:
    """A third-party plugin contributing a check."""

    @hookimpl
    def rmconvert_register_checks(self, register):
        def big_head(subject):
            if subject.ckpt.tensors["score.weight"].shape[0] == 1:
                yield Finding("ACME001", "warning", "config.json", "/id2label", "scalar heads need ACME calibration")

        register(big_head)

    @hookimpl
    def rmconvert_register_architectures(self, register):
        class Nothing(Architecture):
            name = "acme-nothing"

        register(Nothing())


def test_plugins_contribute_checks(good_rm):
    pm = get_plugin_manager(autoload=False)
    pm.register(AcmeChecks(), name="acme")
    findings = validate(good_rm, registry=load_registry(pm))
    assert [(f.code, f.severity) for f in findings] == [("ACME001", "warning")]


def test_every_code_is_documented_in_the_readme():
    table = dict(re.findall(r"^\| (RM\d{3}) \| (.+?) \|$", CODES_PAGE.read_text(), re.MULTILINE))
    assert sorted(table) == sorted(CODES)
