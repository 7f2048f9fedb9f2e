"""``rmconvert validate --load`` never crashes: whatever the tokenizer or config, it exits 0 or 1 with findings.

- A sound reward model whose word-level tokenizer has no unknown token (it cannot encode the probe texts) is
  probed with token ids drawn from the vocabulary and validates clean.
- A check that raises is a finding (RM005) naming the check, and the other checks still run.
- Property tests (hypothesis) run ``validate --load`` through the CLI over broken and unusual tokenizers and
  configs: exit 0 or 1, never a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rmconvert import Architecture, convert, hookimpl, validate
from rmconvert.cli import cli
from rmconvert.errors import CheckpointError
from rmconvert.families.host import get_plugin_manager, load_registry

LOAD_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good_rm(build, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("rm") / "rm"
    convert(build("llama2"), dst)
    return dst


def word_level_without_unk(rm: Path) -> None:
    """Replace the tokenizer by a word-level one over the same vocabulary and specials, with no unknown token:
    it cannot encode a word outside its vocabulary (``WordLevel error: Missing [UNK] token``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    old = Tokenizer.from_file(str(rm / "tokenizer.json"))
    specials = json.loads((rm / "tokenizer.json").read_text())["added_tokens"]
    tok = Tokenizer(models.WordLevel(vocab=old.get_vocab(with_added_tokens=False), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([t["content"] for t in sorted(specials, key=lambda t: t["id"])])
    tok.save(str(rm / "tokenizer.json"))


def run_cli(*args: str):
    result = CliRunner().invoke(cli, list(args))
    crash = result.exception if not isinstance(result.exception, SystemExit) else None
    assert crash is None, f"crashed: {type(crash).__name__}: {crash}\n{result.output}"
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    return result


def test_a_tokenizer_that_cannot_encode_the_probes_is_probed_with_vocabulary_ids(good_rm, tmp_path):
    from transformers import AutoTokenizer

    rm = Path(shutil.copytree(good_rm, tmp_path / "rm"))
    word_level_without_unk(rm)
    with pytest.raises(Exception, match="Missing \\[UNK\\] token"):  # the reported crash
        AutoTokenizer.from_pretrained(rm)("the answer is good and helpful")
    assert [f for f in validate(rm, load=True, against=None) if f.severity == "error"] == []
    result = run_cli("validate", str(rm), "--load")
    assert result.exit_code == 0 and ": valid (0 errors" in result.output


def test_a_check_that_raises_is_a_finding_and_the_others_still_run(good_rm):
    def broken(subject):
        yield from ()
        raise ValueError("the plugin's check tripped over something")

    class Plugin:
        @hookimpl
        def rmconvert_register_architectures(self, register):
            register(type("Odd", (Architecture,), {"name": "odd", "model_types": ("odd",)})())

        @hookimpl
        def rmconvert_register_checks(self, register):
            register(broken)

    pm = get_plugin_manager(autoload=False)
    pm.register(Plugin(), "odd-plugin")
    findings = validate(good_rm, registry=load_registry(pm))
    assert [(f.code, f.severity, f.where) for f in findings] == [("RM005", "error", "odd-plugin:broken")]
    assert "ValueError: the plugin's check tripped over something" in findings[0].message
    assert findings[0].hint


def test_a_llama3_model_with_eos_ids_in_a_list_is_probed_with_vocabulary_ids(build, tmp_path):
    """Llama 3 configs hold a list of eos ids; the vocabulary probe ids skip each of them."""
    src = build("llama3")
    rm = tmp_path / "rm"
    convert(src, rm)
    assert isinstance(json.loads((rm / "config.json").read_text())["eos_token_id"], list)
    word_level_without_unk(rm)
    assert [f for f in validate(rm, load=True, against=src) if f.severity == "error"] == []


def test_a_tokenizer_pad_without_an_embedding_row_is_a_finding(good_rm, tmp_path):
    """The tokenizer pads with a token it added past the embedding: padded batches would index out of range."""
    rm = Path(shutil.copytree(good_rm, tmp_path / "rm"))
    tok = json.loads((rm / "tokenizer.json").read_text())
    rows = json.loads((rm / "config.json").read_text())["vocab_size"]
    last = max(t["id"] for t in tok["added_tokens"])
    for i in range(last + 1, rows + 1):  # ids are given in order: fill up to the pad at the embedding's end
        content = "<late-pad>" if i == rows else f"<extra{i}>"
        entry = {"id": i, "content": content, "special": True, "normalized": False}
        tok["added_tokens"].append(entry | {"single_word": False, "lstrip": False, "rstrip": False})
    (rm / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((rm / "tokenizer_config.json").read_text())
    (rm / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<late-pad>"}))
    found = {(f.code, f.file, f.where) for f in validate(rm, load=True)}
    assert ("RM031", "tokenizer_config.json", "/pad_token") in found
    assert not [f for f in found if f[0] == "RM005"], found


def test_a_policy_path_too_long_is_one_line(good_rm):
    with pytest.raises(CheckpointError, match="too long"):
        validate(good_rm, policy="a" * 300)
    result = run_cli("validate", str(good_rm), "--policy", "a" * 300)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "too long" in result.output


ODD_CHECKS = """
import functools

from rmconvert import hookimpl
from rmconvert.doctor.findings import Finding


def scalar_head(subject, code):
    yield Finding(code, "warning", subject.path / "config.json", "/id2label", "a scalar head")


def junk(subject):
    yield Finding("ODD002", "warning", "config.json", "", "fine")
    yield Finding("ODD003", "fatal", "config.json", "", "no such severity")
    yield "not a finding"


@hookimpl
def rmconvert_register_checks(register):
    register(functools.partial(scalar_head, code="ODD001"))
    register(junk)
"""


@pytest.fixture
def odd_checks(tmp_path, monkeypatch):
    """An installed plugin (entry point ``odd``) registering a partial, a check whose finding names its file by a
    Path, and one yielding a finding of no known severity and a string."""
    (tmp_path / "odd_checks.py").write_text(ODD_CHECKS)
    dist = tmp_path / "odd_checks-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: odd-checks\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rmconvert]\nodd = odd_checks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("RMCONVERT_DISABLE_PLUGIN_AUTOLOAD", raising=False)


def test_plugin_checks_that_are_partials_or_yield_malformed_findings(good_rm, odd_checks):
    findings = validate(good_rm)
    assert [(f.code, f.file, f.where) for f in findings[:2]] == [
        ("ODD001", str(good_rm / "config.json"), "/id2label"),
        ("ODD002", "config.json", ""),
    ]
    assert [(f.code, f.where) for f in findings[2:]] == [("RM005", "odd:junk")] * 2
    assert "'fatal'" in findings[2].message and "'not a finding'" in findings[3].message
    table = run_cli("validate", str(good_rm))
    assert table.exit_code == 1 and "ODD001" in table.output and "odd:junk" in table.output
    report = json.loads(run_cli("validate", str(good_rm), "--json").stdout)
    assert [f["code"] for f in report["findings"]] == ["ODD001", "ODD002", "RM005", "RM005"]


# --- properties ----------------------------------------------------------------------------------

#: JSON values small enough that a model built from them stays tiny (no allocation of absurd sizes).
small_values = (
    st.none()
    | st.booleans()
    | st.integers(-2, 400)
    | st.floats(-1, 1000, allow_nan=False)
    | st.text(max_size=8)
    | st.lists(st.integers(-2, 400), max_size=3)
    | st.dictionaries(st.text(max_size=4), st.integers(-2, 400), max_size=2)
)


def _tokenizer_json(rm: Path, data) -> str:
    choice = data.draw(
        st.sampled_from(["word-level", "not json", "empty object", "no model", "added tokens odd", "deleted"])
    )
    path = rm / "tokenizer.json"
    if choice == "word-level":
        word_level_without_unk(rm)
    elif choice == "not json":
        path.write_bytes(data.draw(st.binary(max_size=40)))
    elif choice == "empty object":
        path.write_text("{}")
    elif choice == "no model":
        tok = json.loads(path.read_text())
        tok.pop("model")
        path.write_text(json.dumps(tok))
    elif choice == "added tokens odd":
        tok = json.loads(path.read_text())
        tok["added_tokens"] = data.draw(st.lists(st.dictionaries(st.sampled_from(["id", "content"]), small_values)))
        path.write_text(json.dumps(tok))
    else:
        path.unlink()
    return f"tokenizer.json {choice}"


def _tokenizer_config(rm: Path, data) -> str:
    path = rm / "tokenizer_config.json"
    config = json.loads(path.read_text())
    key = data.draw(
        st.sampled_from(["pad_token", "eos_token", "padding_side", "model_max_length", "tokenizer_class", "unk_token"])
    )
    config[key] = data.draw(small_values)
    path.write_text(json.dumps(config))
    return f"tokenizer_config {key}"


def _config(rm: Path, data) -> str:
    path = rm / "config.json"
    config = json.loads(path.read_text())
    key = data.draw(
        st.sampled_from(
            [
                "pad_token_id",
                "eos_token_id",
                "bos_token_id",
                "vocab_size",
                "id2label",
                "architectures",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "rope_scaling",
                "torch_dtype",
                "hidden_act",
                "model_type",
            ]
        )
    )
    config[key] = data.draw(small_values | st.sampled_from(["gpt2", "olmoe", "bert"]))
    path.write_text(json.dumps(config))
    return f"config {key}"


@LOAD_SETTINGS
@given(data=st.data())
def test_validate_load_over_broken_tokenizers_and_configs(good_rm, tmp_path_factory, data):
    rm = Path(shutil.copytree(good_rm, tmp_path_factory.mktemp("case") / "rm"))
    mutations = data.draw(
        st.lists(st.sampled_from([_tokenizer_json, _tokenizer_config, _config]), min_size=1, unique=True)
    )
    for mutate in mutations:  # each from the sound file it damages
        event(mutate(rm, data))
    event(f"exit {run_cli('validate', str(rm), '--load').exit_code}")
