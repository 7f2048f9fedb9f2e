"""Value models and process reward models (``--head value`` / ``--head prm``): token classifiers made from every
source layout, built tiny here. The per-token logits of the output must be the expected ``score`` (and bias)
applied to the *source* backbone's hidden states, computed independently in the test: bit for bit where the rule
copies, one float32 rounding where it takes a difference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from rmconvert import convert, load_reward_model, validate
from rmconvert.cli import cli
from rmconvert.testing import snapshot

IDS = [[5, 9, 17, 33, 2, 60], [7, 8, 100]]


def weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def hidden_states(src: Path, ids: list[int]) -> torch.Tensor:
    """The source backbone's last hidden states [T, H], through transformers' AutoModel (no rmconvert code)."""
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(src).eval()
    with torch.no_grad():
        return backbone(torch.tensor([ids]), use_cache=False).last_hidden_state[0]


def per_token(dst: Path, ids: list[int]) -> torch.Tensor:
    model = load_reward_model(dst).eval()
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0]


def assert_applies(dst: Path, src: Path, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Per-token logits of ``dst`` == ``weight``, ``bias`` applied to ``src``'s hidden states, bit for bit."""
    stored = weights(dst)
    assert torch.equal(stored["score.weight"], weight)
    assert torch.equal(stored["score.bias"], bias)
    for ids in IDS:
        expected = torch.nn.functional.linear(hidden_states(src, ids), weight, bias)
        assert torch.equal(per_token(dst, ids), expected)


def edited(src: Path, dst: Path, add: dict | None = None, drop=(), **fields) -> Path:
    """A copy of the single-file checkpoint ``src`` with tensors added or dropped and config fields set."""
    dst = Path(shutil.copytree(src, dst))
    tensors = {k: v for k, v in load_file(dst / "model.safetensors").items() if k not in drop}
    save_file({**tensors, **(add or {})}, dst / "model.safetensors", metadata={"format": "pt"})
    if fields:
        (dst / "config.json").write_text(json.dumps({**config(dst), **fields}, indent=2))
    return dst


def no_errors(dst: Path, src: Path | None = None) -> list:
    return [(f.code, f.where, f.message) for f in validate(dst, load=True, against=src) if f.severity == "error"]


# --- from a causal LM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama3", "olmo2"])  # a native token classifier, one rmconvert builds
@pytest.mark.parametrize("head", ["prm", "value"])
def test_a_policy_becomes_a_token_classifier(build, tmp_path, kind, head):
    src = build(kind)
    report = convert(src, tmp_path / head, head=head, seed=7)
    convert(src, tmp_path / "rm", seed=7)
    dst, cfg = tmp_path / head, config(tmp_path / head)
    fresh = weights(tmp_path / "rm")["score.weight"]  # the reward head of the same seed
    family = {"llama3": "Llama", "olmo2": "Olmo2"}[kind]
    assert cfg["architectures"] == [report["class"]] == [f"{family}ForTokenClassification"]
    assert cfg["classifier_dropout"] == 0.0 and report["target"] in ("process reward model", "value model")
    if head == "prm":
        assert cfg["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"} and "problem_type" not in cfg
        assert_applies(dst, src, torch.cat([torch.zeros_like(fresh), fresh]), torch.zeros(2))
    else:
        assert cfg["id2label"] == {"0": "LABEL_0"} and cfg["problem_type"] == "regression"
        assert_applies(dst, src, fresh, torch.zeros(1))
    assert no_errors(dst, src) == []


def test_a_value_model_keeps_the_policys_vocabulary(build, tmp_path):
    """--head value pads with a token the tokenizer has (the --pad-token existing rule): policy ids index the
    same rows, and validate --policy finds nothing."""
    src = build("llama3")  # has <|finetune_right_pad_id|>
    report = convert(src, tmp_path / "value", head="value")
    assert report["pad"]["action"] in ("kept", "reused") and report["vocab"]["added_rows"] == 0
    assert report["pad"]["reason"].startswith("--pad-token existing")
    assert [f.code for f in validate(tmp_path / "value", policy=src) if f.code in ("RM070", "RM071")] == []


def test_reruns_are_byte_identical(build, tmp_path):
    for name in ("a", "b"):
        convert(build("olmo2"), tmp_path / name, head="prm", step_separator="\n", portable=True)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")  # rmconvert.json included


# --- from reward models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["value", "prm"])
def test_a_reward_models_head_becomes_the_token_head(build, tmp_path, head):
    """A 1-label sequence classifier: value = its score (bias 0), so the value at the last token is the
    reward, bit for bit; prm = [0; w]."""
    src = build("llama3", labels=1)
    convert(src, tmp_path / head, head=head)
    w = weights(src)["score.weight"]
    if head == "value":
        assert_applies(tmp_path / head, src, w, torch.zeros(1))
        rm = load_reward_model(src).eval()
        with torch.no_grad():
            reward = rm(torch.tensor([IDS[0]]), use_cache=False).logits[0]
        assert torch.equal(per_token(tmp_path / head, IDS[0])[-1], reward)
    else:
        assert_applies(tmp_path / head, src, torch.cat([torch.zeros_like(w), w]), torch.zeros(2))
    assert no_errors(tmp_path / head, src) == []


@pytest.mark.parametrize("from_bt", ["row1", "difference"])
def test_a_two_label_reward_model_becomes_a_value_model_by_the_2_to_1_rules(build, tmp_path, from_bt):
    src = build("llama3", labels=2)
    convert(src, tmp_path / "value", head="value", from_bt=from_bt)
    w = weights(src)["score.weight"]
    row = w[1:] if from_bt == "row1" else (w[1:].double() - w[:1].double()).float()  # one float32 rounding
    assert_applies(tmp_path / "value", src, row, torch.zeros(1))
    assert no_errors(tmp_path / "value", src) == []


@pytest.mark.parametrize("bias", [0.0, 0.75])
def test_a_value_head_keeps_its_bias_exactly(build, tmp_path, bias):
    """TRL's v_head.summary (and Skywork-o1-Open-PRM's): weight and bias copied, so the output is TRL's
    ``v_head(hidden)`` at every token, bit for bit."""
    base = build("llama3")
    hidden = config(base)["hidden_size"]
    w = torch.randn(1, hidden, generator=torch.Generator().manual_seed(3)) / hidden**0.5
    b = torch.tensor([bias])
    src = edited(base, tmp_path / "src", {"v_head.summary.weight": w, "v_head.summary.bias": b})
    report = convert(src, tmp_path / "value", head="value")
    assert not [m for m in report["warnings"] if "bias" in m]  # nothing dropped
    assert report["head"]["bias"] == "v_head.summary.bias as it is"
    assert_applies(tmp_path / "value", src, w, b)
    assert no_errors(tmp_path / "value", src) == []
    convert(src, tmp_path / "prm", head="prm")
    assert_applies(tmp_path / "prm", src, torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros(1), b]))


def test_an_openrlhf_head_becomes_the_value_head(build, tmp_path):
    base = build("llama3", labels=1)
    w = load_file(base / "model.safetensors")["score.weight"]
    src = edited(
        base, tmp_path / "src", {"value_head.weight": w}, drop=("score.weight",), value_head_prefix="value_head"
    )
    convert(src, tmp_path / "value", head="value")
    assert_applies(tmp_path / "value", src, w, torch.zeros(1))


def trl_prm(build, tmp_path) -> Path:
    """What TRL's PRMTrainer saves: LlamaForTokenClassification, 2 labels, score.weight and score.bias."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForTokenClassification

    base = build("llama3")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = "<|finetune_right_pad_id|>"  # as a PRMTrainer script sets one
    cfg = AutoConfig.from_pretrained(base, num_labels=2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForTokenClassification(cfg)
    model.model.load_state_dict(
        {k[len("model.") :]: v for k, v in load_file(base / "model.safetensors").items() if k.startswith("model.")}
    )
    with torch.no_grad():
        model.score.bias.copy_(torch.tensor([0.25, -0.5]))
    model.save_pretrained(tmp_path / "trl-prm")
    tokenizer.save_pretrained(tmp_path / "trl-prm")
    return tmp_path / "trl-prm"


def test_a_trl_prm_validates_as_it_is_and_becomes_a_value_model(build, tmp_path):
    src = trl_prm(build, tmp_path)
    assert no_errors(src) == []
    convert(src, tmp_path / "value", head="value")
    w, b = weights(src)["score.weight"], weights(src)["score.bias"]
    assert_applies(tmp_path / "value", src, w[1:], b[1:])  # row 1 (LABEL_1: correct), with its bias
    assert no_errors(tmp_path / "value", src) == []
    convert(src, tmp_path / "prm", head="prm")
    assert_applies(tmp_path / "prm", src, w, b)


# --- step tags -------------------------------------------------------------------------------------------


def test_the_step_separator_is_recorded_as_step_tag_id(build, tmp_path):
    from tokenizers import Tokenizer

    src = build("llama3")
    report = convert(src, tmp_path / "prm", head="prm", step_separator="\n")
    tag = Tokenizer.from_file(str(src / "tokenizer.json")).encode("\n", add_special_tokens=False).ids
    assert config(tmp_path / "prm")["step_tag_id"] == report["head"]["step_tag_id"] == tag[0]
    assert json.loads((tmp_path / "prm" / "rmconvert.json").read_text())["options"]["step_separator"] == "\n"
    assert no_errors(tmp_path / "prm") == []


def test_a_step_tag_that_is_not_a_token_or_is_the_pad_is_reported(build, tmp_path):
    convert(build("llama3"), tmp_path / "prm", head="prm")
    cfg = config(tmp_path / "prm")
    for tag, code in ((cfg["vocab_size"] + 3, "RM173"), (cfg["pad_token_id"], "RM174")):
        (tmp_path / "prm" / "config.json").write_text(json.dumps({**cfg, "step_tag_id": tag}))
        assert [f.code for f in validate(tmp_path / "prm") if f.code.startswith("RM17")] == [code]


def test_a_token_classifier_without_bias_or_with_dropout_is_reported(build, tmp_path):
    convert(build("llama3"), tmp_path / "value", head="value")
    dst = edited(tmp_path / "value", tmp_path / "broken", drop=("score.bias",), classifier_dropout=None)
    found = {(f.code, f.severity) for f in validate(dst, load=True)}
    assert {("RM170", "error"), ("RM172", "warning"), ("RM100", "error")} <= found


def test_a_bias_of_another_shape_is_reported(build, tmp_path):
    convert(build("llama3"), tmp_path / "value", head="value")
    dst = edited(tmp_path / "value", tmp_path / "two", {"score.bias": torch.zeros(2)})
    found = [(f.code, f.where, f.message) for f in validate(dst) if f.code == "RM171"]
    assert found == [("RM171", "score.bias", "[2]; expected [1]")]


def test_per_token_scores_of_a_padded_batch_are_held_to_one_by_one(build, tmp_path):
    """RM175 at a non-pad position that moved, none for moves at pad positions (what the mask hides)."""
    from rmconvert.doctor.probes import _per_token_padded
    from rmconvert.doctor.validation import _read
    from rmconvert.families.host import load_registry

    convert(build("llama3"), tmp_path / "value", head="value")
    subject = _read(tmp_path / "value", load_registry())
    alone = [torch.tensor([[[1.0], [2.0], [3.0]]]), torch.tensor([[[4.0], [5.0]]])]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batched = torch.tensor([[[1.0], [2.0], [3.0]], [[4.0], [5.0], [9.0]]])  # 9.0 at the pad: hidden by the mask
    assert list(_per_token_padded(subject, batched, mask, alone, "right", 1e-5)) == []
    batched[1, 1, 0] = 5.5
    found = [(f.code, f.where, f.message) for f in _per_token_padded(subject, batched, mask, alone, "right", 1e-5)]
    assert found == [("RM175", "/pad_token_id", "right-padded: off by 0.5")]


def test_a_changed_bias_is_found_against_the_source(build, tmp_path):
    src = build("llama3", labels=1)
    convert(src, tmp_path / "value", head="value")
    dst = edited(tmp_path / "value", tmp_path / "changed", {"score.bias": torch.tensor([0.5])})
    assert [f.code for f in validate(dst, load=True, against=src) if f.severity == "error"] == ["RM176"]


# --- bad input: one line, exit 1 or 2, nothing at DST ------------------------------------------------------


def mlp_head(build, tmp_path) -> Path:
    """Qwen2.5-Math-PRM's head on a tiny backbone: score.0 [H, H] + b, ReLU, score.2 [2, H] + b."""
    base = build("llama3")
    hidden = config(base)["hidden_size"]
    head = {"score.0.weight": torch.zeros(hidden, hidden), "score.0.bias": torch.zeros(hidden)}
    head |= {"score.2.weight": torch.zeros(2, hidden), "score.2.bias": torch.zeros(2)}
    return edited(base, tmp_path / "mlp", head)


@pytest.mark.parametrize(
    "case, args, code, message",
    [
        ("prm-from-bt", ["--head", "prm", "--from-bt", "row1"], 2, "--head prm keeps 2 labels"),
        ("several-tokens", ["--head", "prm", "--step-separator", "the answer is"], 2, "must be one token"),
        ("step-tag-eos", ["--head", "prm", "--step-separator", "<|end_of_text|>"], 2, "an eos"),
        ("separator-scalar", ["--step-separator", "\n"], 2, "with --head prm or value"),
        ("value-from-mlp", ["--head", "value"], 1, "is an MLP head"),
        ("prm-from-mlp", ["--head", "prm"], 1, "is an MLP head"),
    ],
)
def test_bad_input_is_refused_with_one_line(build, tmp_path, case, args, code, message):
    src = mlp_head(build, tmp_path) if "mlp" in case else build("llama3")
    before = snapshot(src)
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "dst"), *args])
    assert result.exit_code == code, result.output
    assert message in result.stderr
    if code == 1:
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("rmconvert: error: ")
    assert not (tmp_path / "dst").exists() and not [p for p in tmp_path.iterdir() if "rmconvert-" in p.name]
    assert snapshot(src) == before


# --- real clients ----------------------------------------------------------------------------------------


def test_verl_loads_every_value_model_with_no_missing_key(build, tmp_path):
    """verl's load_valuehead_model: AutoModelForTokenClassification.from_pretrained(path, num_labels=1), with
    trust_remote_code=True for a --portable output of a family transformers has no token classifier for."""
    from transformers import AutoModelForTokenClassification

    for kind, portable in (("llama3", False), ("olmo2", True), ("olmoe", True)):
        dst = tmp_path / kind
        convert(build(kind, labels=1), dst, head="value", portable=portable)
        remote = {"trust_remote_code": True} if portable else {}
        model, info = AutoModelForTokenClassification.from_pretrained(
            dst, num_labels=1, output_loading_info=True, **remote
        )
        assert {k: v for k, v in info.items() if v} == {}, (kind, info)
        assert type(model).__name__ == config(dst)["architectures"][0]
        with torch.no_grad():
            assert torch.equal(model.eval()(torch.tensor([IDS[0]])).logits[0], per_token(dst, IDS[0]))


def test_the_token_classification_pipeline_reads_a_prm(build, tmp_path):
    from transformers import pipeline

    convert(build("llama3"), tmp_path / "prm", head="prm")
    found = pipeline("token-classification", model=str(tmp_path / "prm"))("the answer is good")
    assert found and {e["entity"] for e in found} <= {"LABEL_0", "LABEL_1"}
    assert all(0.0 <= e["score"] <= 1.0 for e in found)


# --- Qwen2.5-Math-PRM's MLP head, kept ---------------------------------------------------------------------


def qwen_prm(build, tmp_path) -> tuple[Path, dict]:
    """Qwen2ForProcessRewardModel's layout on a tiny Qwen 2: score.0 [H, H] + b, ReLU, score.2 [2, H] + b, no LM
    head, ``architectures`` naming the class vLLM serves."""
    base = build("qwen2")
    hidden = config(base)["hidden_size"]
    gen = torch.Generator().manual_seed(5)
    head = {"score.0.weight": torch.randn(hidden, hidden, generator=gen) / hidden**0.5}
    head |= {"score.0.bias": torch.randn(hidden, generator=gen) / 10}
    head |= {"score.2.weight": torch.randn(2, hidden, generator=gen) / hidden**0.5}
    head |= {"score.2.bias": torch.randn(2, generator=gen) / 10}
    src = edited(base, tmp_path / "qwen-prm", head, drop=("lm_head.weight",))
    cfg = config(src)
    cfg.update(architectures=["Qwen2ForProcessRewardModel"], tie_word_embeddings=False)
    (src / "config.json").write_text(json.dumps(cfg))
    return src, head


def test_qwen2_process_reward_model_is_kept_byte_for_byte(build, tmp_path):
    from transformers import AutoModelForTokenClassification

    src, head = qwen_prm(build, tmp_path)
    report = convert(src, tmp_path / "prm", head="prm", step_separator="\n", portable=True)
    dst, cfg = tmp_path / "prm", config(tmp_path / "prm")
    assert cfg["architectures"] == [report["class"]] == ["Qwen2ForProcessRewardModel"]
    assert cfg["auto_map"]["AutoModelForTokenClassification"] == "modeling_rmconvert.Qwen2ForProcessRewardModel"
    assert report["head"]["how"] == "MLP head score.0/score.2 kept" and "step_tag_id" in cfg
    stored = weights(dst)
    assert all(torch.equal(stored[name], value) for name, value in head.items())
    assert not [n for n in stored if n.startswith(("score.weight", "score.bias", "lm_head"))]
    for ids in IDS:
        h = hidden_states(src, ids)
        first = torch.nn.functional.linear(h, head["score.0.weight"], head["score.0.bias"]).relu()
        expected = torch.nn.functional.linear(first, head["score.2.weight"], head["score.2.bias"])
        assert torch.equal(per_token(dst, ids), expected)
    # the tiny Qwen 2's pad is its eos, kept as the PRM was trained with it (RM032, as for any such reward model)
    assert [e for e in no_errors(dst, src) if e[0] != "RM032"] == []
    model, info = AutoModelForTokenClassification.from_pretrained(dst, trust_remote_code=True, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {} and type(model).__name__ == "Qwen2ForProcessRewardModel"


def test_a_token_classifier_of_a_built_in_family_converts_without_torch_or_transformers(build, tmp_path):
    """As for reward models: the llama, olmo2 and olmoe plugins name their token classifier, so ``convert --head
    value`` reads headers and JSON only (no torch, no transformers: memory stays flat)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from rmconvert.cli import main\n"
        "sys.argv = ['rmconvert', 'convert', sys.argv[1], sys.argv[2], '--head', 'value']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    for kind in ("llama3", "olmo2", "olmoe"):
        command = [sys.executable, "-c", code, str(build(kind)), str(tmp_path / kind)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=True)
        assert result.stdout.strip().splitlines()[-1] == "[]", (kind, result.stdout, result.stderr)


def test_a_trl_prm_becomes_a_reward_model_read_at_the_last_token(build, tmp_path):
    """A sequence classifier of a PRM: row 1 of its head, its bias dropped with a warning; validate --against
    compares the reward with the PRM's per-token logit at the last token, minus the bias (as for a value head)."""
    src = trl_prm(build, tmp_path)
    report = convert(src, tmp_path / "rm")
    # one warning for the dropped bias (heads' and prm's joined), with its values
    assert (
        [w for w in report["warnings"] if "bias" in w and "dropped" in w]
        == [w for w in report["warnings"] if w.startswith("score.bias [0.25, -0.5] dropped")]
        != []
    )
    assert torch.equal(weights(tmp_path / "rm")["score.weight"], weights(src)["score.weight"][1:])
    assert no_errors(tmp_path / "rm", src) == []


# --- heads (issue 17) joined with token targets (issue 18) -------------------------------------------------


def lm_table(src: Path) -> torch.Tensor:
    """The causal LM's LM head [vocab, H] (its input embedding when tied)."""
    stored = weights(src)
    return stored["lm_head.weight"] if "lm_head.weight" in stored else stored["model.embed_tokens.weight"]


def two_tokens(src: Path) -> tuple[str, str, int, int]:
    """Two single tokens of the tiny tokenizer, as math-shepherd's ``-`` (NEG) and ``+`` (POS): names and ids."""
    vocab = json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
    neg, pos = ("-", "+") if "-" in vocab and "+" in vocab else sorted(vocab, key=vocab.get)[40:42]
    return neg, pos, vocab[neg], vocab[pos]


def test_a_math_shepherd_style_lm_becomes_a_prm_of_its_lm_head_rows(build, tmp_path):
    """``--head-from-tokens NEG,POS --head prm``: score = lm_head[[NEG, POS]] (the rows, not their difference),
    bias 0; per-token logits equal h @ lm_head[[NEG, POS]].T bit for bit at every position."""
    src = build("llama3")
    neg, pos, neg_id, pos_id = two_tokens(src)
    report = convert(src, tmp_path / "prm", head="prm", head_from_tokens=f"{neg},{pos}", step_separator="\n")
    dst, cfg = tmp_path / "prm", config(tmp_path / "prm")
    weight = lm_table(src)[[neg_id, pos_id]]
    assert cfg["architectures"] == [report["class"]] == ["LlamaForTokenClassification"]
    assert cfg["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"} and "problem_type" not in cfg
    assert report["head"]["rule"] == "rows" and report["head"]["tokens"] == {neg: neg_id, pos: pos_id}
    assert_applies(dst, src, weight, torch.zeros(2))
    for ids in IDS:  # every position, against the LM head itself: h @ lm_head[[NEG, POS]].T
        assert torch.equal(per_token(dst, ids), hidden_states(src, ids) @ weight.T)
    assert no_errors(dst, src) == []


def test_value_from_lm_head_tokens(build, tmp_path):
    """``--head value`` takes a 1-row rule of the LM head: one token's row, or POS - NEG (rounded once), bias 0."""
    src = build("llama3")
    neg, pos, neg_id, pos_id = two_tokens(src)
    table = lm_table(src)
    convert(src, tmp_path / "one", head="value", head_from_tokens=pos)
    assert_applies(tmp_path / "one", src, table[[pos_id]], torch.zeros(1))
    convert(src, tmp_path / "two", head="value", head_from_tokens=f"{neg},{pos}")
    difference = (table[pos_id].double() - table[neg_id].double()).float()[None]
    assert_applies(tmp_path / "two", src, difference, torch.zeros(1))
    assert config(tmp_path / "two")["problem_type"] == "regression"


def n_label_rm(build, tmp_path, bias: bool = False) -> tuple[Path, torch.Tensor, torch.Tensor | None]:
    """A 3-objective reward model: a LlamaForSequenceClassification ``score [3, H]``, or NeMo's ``rm_head`` with a
    bias ``[3]`` (a renamed linear head)."""
    src = build("llama3")
    hidden = config(src)["hidden_size"]
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(3, hidden, generator=gen) / hidden**0.5
    b = torch.tensor([0.5, -0.25, 0.125]) if bias else None
    head = {"rm_head.weight": w, "rm_head.bias": b} if bias else {"score.weight": w}
    names = {"0": "helpful", "1": "correct", "2": "coherent"}
    fields = {"id2label": names, "label2id": {v: int(k) for k, v in names.items()}}
    if not bias:
        fields["architectures"] = ["LlamaForSequenceClassification"]
    dst = edited(src, tmp_path / ("nemo" if bias else "n-label"), head, drop=("lm_head.weight",), **fields)
    return dst, w, b


@pytest.mark.parametrize("objective", ["1", "coherent"])
def test_value_from_an_n_label_reward_model_objective(build, tmp_path, objective):
    """``--head value --objective k`` from an N-label reward model: row k's per-token output, bias 0 (a sequence
    classifier's score has none)."""
    src, w, _ = n_label_rm(build, tmp_path)
    k = {"1": 1, "coherent": 2}[objective]
    report = convert(src, tmp_path / "value", head="value", objective=objective)
    assert report["head"]["objective"] == k and config(tmp_path / "value")["id2label"] == {"0": "LABEL_0"}
    assert_applies(tmp_path / "value", src, w[[k]], torch.zeros(1))
    assert not [m for m in report["warnings"] if "bias" in m]


def test_value_keeps_the_source_bias_by_the_rows_rule(build, tmp_path):
    """A renamed linear head with a bias (NeMo's rm_head [3, H] + [3]): ``--objective 1`` gives row 1 and bias
    entry 1; ``--weights`` gives the same combination of the rows and of the bias, each rounded once."""
    src, w, b = n_label_rm(build, tmp_path, bias=True)
    report = convert(src, tmp_path / "row", head="value", objective="1")
    assert_applies(tmp_path / "row", src, w[[1]], b[[1]])
    assert not [m for m in report["warnings"] if "dropped" in m]
    c = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    convert(src, tmp_path / "mix", head="value", weights="0.5,-1,2")
    expected_w = (c @ w.double()).float()[None]
    expected_b = (c @ b.double()).float()[None]
    assert_applies(tmp_path / "mix", src, expected_w, expected_b)


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("prm-one-token", ["--head", "prm", "--head-from-tokens", "{pos}"], "takes 2 tokens"),
        ("prm-three-tokens", ["--head", "prm", "--head-from-tokens", "{neg},{pos},{pos2}"], "takes 2 tokens"),
        ("value-three-tokens", ["--head", "value", "--head-from-tokens", "{neg},{pos},{pos2}"], "makes 1 row"),
        ("prm-objective", ["--head", "prm", "--objective", "1"], "--head prm has 2 labels"),
        ("prm-weights", ["--head", "prm", "--weights", "1,0,0"], "--head prm has 2 labels"),
        ("value-n-rows", ["--head", "value"], "of 1 row(s); this head rule gives 3"),
        ("prm-n-rows", ["--head", "prm"], "of 2 row(s); this head rule gives 3"),
    ],
)
def test_bad_head_and_target_combinations_are_refused_in_one_line(build, tmp_path, case, args, message):
    src = n_label_rm(build, tmp_path)[0] if "rows" in case or "objective" in case or "weights" in case else None
    lm = build("llama3")
    neg, pos, _, _ = two_tokens(lm)
    vocab = json.loads((lm / "tokenizer.json").read_text())["model"]["vocab"]
    pos2 = next(t for t in sorted(vocab, key=vocab.get)[50:] if t not in (neg, pos) and t.isalpha())
    args = [a.format(neg=neg, pos=pos, pos2=pos2) for a in args]
    src = src or lm
    before = snapshot(src)
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "dst"), *args])
    assert result.exit_code == 2, (case, result.output)
    lines = [line for line in result.output.splitlines() if line.startswith(("Error:", "rmconvert: error:"))]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, (case, result.output)
    assert not (tmp_path / "dst").exists() and not [p for p in tmp_path.iterdir() if "rmconvert-" in p.name]
    assert snapshot(src) == before
