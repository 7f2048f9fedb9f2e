"""Every reward head in the wild (issue 17): each source layout built tiny and locally, converted, and its reward
checked against the source head's own arithmetic computed here, independently of rmconvert: bit for bit where
the rule is a rename or a row copy, float32 rounded once where it is a collapse, a mean or a difference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rmconvert
from rmconvert.cli import cli
from rmconvert.testing import build_checkpoint, snapshot

PROBES = ([[5, 17, 42, 99, 7]], [[120, 3, 64]], [[11, 250, 33, 2, 90, 18, 77]])


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(result, code: int, *words: str) -> None:
    """One line ``rmconvert: error: ...`` (exit 1) or a usage error (exit 2) that says ``words``."""
    assert result.exit_code == code, (result.exit_code, result.output)
    said = result.output if code == 2 else result.stderr
    lines = [line for line in said.splitlines() if line.startswith(("Error:", "rmconvert: error:"))]
    assert len(lines) == 1, said
    assert "Traceback" not in said
    for word in words:
        assert word in lines[0], (word, lines[0])


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return out


def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama 3 causal LM (float32, untied LM head) and its own hidden states on the probes."""
    return Base(build_checkpoint("llama3", tmp_path_factory.mktemp("llama") / "base"))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return Base(build_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2") / "base", **SERVABLE_QWEN2))


SERVABLE_QWEN2 = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}


class Base:
    """A causal LM, its weights and the last hidden states of its backbone on each probe (after the final norm)."""

    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM

        self.path, self.weights = path, load_file(path / "model.safetensors")
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.hidden_size = self.model.config.hidden_size
        with torch.no_grad():
            outputs = [self.model(torch.tensor(ids), output_hidden_states=True) for ids in PROBES]
        self.hidden = [o.hidden_states[-1] for o in outputs]
        self.logits = [o.logits for o in outputs]

    def source(self, dst: Path, tensors: dict, **changes) -> Path:
        """A checkpoint at ``dst``: this one's tokenizer and config (``changes`` set, None removes), ``tensors``."""
        dst.mkdir(parents=True)
        for f in self.path.iterdir():
            if f.name not in ("model.safetensors", "config.json"):
                shutil.copy(f, dst / f.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
        settings = config(self.path)
        for key, value in changes.items():
            settings.pop(key, None) if value is None else settings.__setitem__(key, value)
        (dst / "config.json").write_text(json.dumps(settings))
        return dst

    def backbone(self, prefix: str = "model.") -> dict:
        return {prefix + k[len("model.") :]: v for k, v in self.weights.items() if k.startswith("model.")}

    def rewards(self, head) -> list[torch.Tensor]:
        """``head(hidden)`` at the last token of each probe, the source head's own arithmetic."""
        with torch.no_grad():
            return [head(h)[:, -1] for h in self.hidden]


def rewards(path: Path) -> list[torch.Tensor]:
    model = rmconvert.load_reward_model(path).eval()
    with torch.no_grad():
        return [model(torch.tensor(ids)).logits for ids in PROBES]


def equal(ours, theirs) -> bool:
    return all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def rounded_once(values: torch.Tensor) -> torch.Tensor:
    """float64 arithmetic rounded once to float32."""
    return values.to(torch.float64).to(torch.float32)


def codes(path, **kwargs) -> dict[str, list]:
    found = {}
    for f in rmconvert.validate(path, **kwargs):
        found.setdefault(f.code, []).append(f)
    return found


# --- renamed linear heads ---------------------------------------------------------------------------


def test_starling_transformer_prefix_and_v_head(llama, tmp_path):
    w = torch.randn(1, llama.hidden_size)
    src = llama.source(
        tmp_path / "starling",
        {**llama.backbone("transformer."), "v_head.weight": w},
        architectures=["LlamaForSequenceClassification"],
        id2label={"0": "LABEL_0"},
    )
    found = codes(src)
    assert "starling" in found["RM150"][0].message and "convert" in found["RM150"][0].hint
    report = rmconvert.convert(src, tmp_path / "rm")
    out = tensors(tmp_path / "rm")
    assert torch.equal(out["score.weight"], w) and not any(k.startswith("transformer.") for k in out)
    assert set(out) - {"score.weight"} == set(llama.backbone()) and report["head"]["kind"] == "starling"
    assert equal(rewards(tmp_path / "rm"), llama.rewards(lambda h: F.linear(h, w)))
    assert [f for f in rmconvert.validate(tmp_path / "rm") if f.severity == "error"] == []
    # every backbone tensor compared with the source's under its transformer.* name
    assert [f for f in rmconvert.validate(tmp_path / "rm", against=src) if f.severity == "error"] == []
    weights = tensors(tmp_path / "rm")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, tmp_path / "rm" / "model.safetensors", metadata={"format": "pt"})
    found = rmconvert.validate(tmp_path / "rm", against=src)
    assert [(f.code, f.where) for f in found if f.severity == "error"] == [("RM120", "transformer.norm.weight")]


def test_validate_against_compares_the_head_by_its_rule(helpsteer, tmp_path):
    src, _ = helpsteer
    rmconvert.convert(src, tmp_path / "rm", weights=",".join(map(str, NEMOTRON_WEIGHTS)))
    assert [f for f in rmconvert.validate(tmp_path / "rm", against=src) if f.severity == "error"] == []
    weights = tensors(tmp_path / "rm")
    weights["score.weight"] = -weights["score.weight"]
    save_file(weights, tmp_path / "rm" / "model.safetensors", metadata={"format": "pt"})
    found = rmconvert.validate(tmp_path / "rm", against=src)
    assert [(f.code, f.where) for f in found if f.severity == "error"] == [("RM123", "score.weight")]


def test_ultrarm_regression_head(llama, tmp_path):
    w = torch.randn(1, llama.hidden_size)
    src = llama.source(
        tmp_path / "ultrarm", {**llama.backbone(), "regression_head.weight": w}, architectures=["LlamaRewardModel"]
    )
    assert "ultrarm" in codes(src)["RM150"][0].message
    rmconvert.convert(src, tmp_path / "rm")
    assert torch.equal(tensors(tmp_path / "rm")["score.weight"], w)
    assert config(tmp_path / "rm")["architectures"] == ["LlamaForSequenceClassification"]
    assert equal(rewards(tmp_path / "rm"), llama.rewards(lambda h: F.linear(h, w)))


@pytest.mark.parametrize("score_type", ["reward", "cost"])
def test_beaver_reward_and_cost(llama, tmp_path, score_type):
    w = torch.randn(1, llama.hidden_size)
    beaver = {"score_type": score_type, "score_dim": 1, "bias": False, "do_normalize": False}
    src = llama.source(
        tmp_path / "beaver", {**llama.backbone(), "score_head.weight": w}, architectures=["LlamaForScore"], **beaver
    )
    report = rmconvert.convert(src, tmp_path / "rm")
    expected = -w if score_type == "cost" else w
    assert torch.equal(tensors(tmp_path / "rm")["score.weight"], expected)
    # BeaverCostPipeline returns -end_scores: higher = better after the negation
    sign = -1.0 if score_type == "cost" else 1.0
    assert equal(rewards(tmp_path / "rm"), llama.rewards(lambda h: sign * F.linear(h, w)))
    assert any("negated" in w for w in report["warnings"]) == (score_type == "cost")


def test_beaver_normaliser_refused(llama, tmp_path):
    src = llama.source(
        tmp_path / "beaver",
        {**llama.backbone(), "score_head.weight": torch.randn(1, llama.hidden_size)},
        score_type="reward",
        do_normalize=True,
        normalizer_type="ExponentialMovingAverage",
    )
    refused(run("convert", src, tmp_path / "rm"), 1, "normaliser", "bias")
    assert not (tmp_path / "rm").exists()


def test_nemo_rm_head_bias_dropped(llama, tmp_path):
    w, b = torch.randn(1, llama.hidden_size), torch.tensor([0.75])
    src = llama.source(tmp_path / "nemo", {**llama.backbone(), "rm_head.weight": w, "rm_head.bias": b})
    report = rmconvert.convert(src, tmp_path / "rm")
    assert torch.equal(tensors(tmp_path / "rm")["score.weight"], w)
    assert any("rm_head.bias [0.75] dropped" in x for x in report["warnings"]) and report["head"]["bias"] == [0.75]
    assert equal(rewards(tmp_path / "rm"), llama.rewards(lambda h: F.linear(h, w)))


def test_score_bias_dropped_and_said(llama, tmp_path):
    """A token classifier's score.bias (a 1-row head of before): the row kept, the bias dropped with a warning."""
    w = torch.randn(1, llama.hidden_size)
    src = llama.source(
        tmp_path / "tokcls", {**llama.backbone(), "score.weight": w, "score.bias": torch.tensor([-0.5])}, pad_token_id=3
    )
    report = rmconvert.convert(src, tmp_path / "rm")
    assert any("score.bias [-0.5] dropped" in x for x in report["warnings"])
    assert set(tensors(tmp_path / "rm")) == {*llama.backbone(), "score.weight"}


def test_linear_grm_value_head(llama, tmp_path):
    w, b = torch.randn(1, llama.hidden_size), torch.tensor([0.5])
    src = llama.source(
        tmp_path / "grm",
        {**llama.weights, "v_head.summary.weight": w, "v_head.summary.bias": b},
        vhead_layer_type="linear",
    )
    report = rmconvert.convert(src, tmp_path / "rm")
    assert report["source_kind"] == "value-head model" and torch.equal(tensors(tmp_path / "rm")["score.weight"], w)
    assert equal(rewards(tmp_path / "rm"), llama.rewards(lambda h: F.linear(h, w)))


# --- multi-objective heads --------------------------------------------------------------------------

HELPSTEER = ["a", "b", "c", "d", "helpfulness", "correctness", "coherence", "complexity", "verbosity"]
NEMOTRON_WEIGHTS = [0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33]


@pytest.fixture
def helpsteer(llama, tmp_path):
    """A 9-output HelpSteer-style reward model (score.weight [9, H]) whose config names its objectives."""
    w = torch.randn(9, llama.hidden_size)
    id2label = dict(enumerate(HELPSTEER))
    src = llama.source(
        tmp_path / "helpsteer",
        {**llama.backbone(), "score.weight": w},
        architectures=["LlamaForSequenceClassification"],
        id2label={str(k): v for k, v in id2label.items()},
        label2id={v: k for k, v in id2label.items()},
        pad_token_id=3,
    )
    return src, w


def test_n_label_head_kept_with_names(llama, helpsteer, tmp_path):
    src, w = helpsteer
    report = rmconvert.convert(src, tmp_path / "rm")
    assert report["head"]["labels"] == 9 and torch.equal(tensors(tmp_path / "rm")["score.weight"], w)
    assert config(tmp_path / "rm")["id2label"] == {str(i): n for i, n in enumerate(HELPSTEER)}
    assert config(tmp_path / "rm")["problem_type"] == "regression"
    assert equal(rewards(tmp_path / "rm"), llama.rewards(lambda h: F.linear(h, w)))
    found = codes(tmp_path / "rm")
    assert [f.severity for f in found.get("RM152", [])] == ["warning"] and "'a' only" in found["RM152"][0].message
    assert not [f for fs in found.values() for f in fs if f.severity == "error"]
    names = ",".join(f"o{i}" for i in range(9))
    rmconvert.convert(src, tmp_path / "named", label_names=names)
    assert list(config(tmp_path / "named")["id2label"].values()) == names.split(",")


def test_objective_by_name_and_number(llama, helpsteer, tmp_path):
    src, w = helpsteer
    for objective, k in (("correctness", 5), ("2", 2)):
        dst = tmp_path / objective
        report = rmconvert.convert(src, dst, objective=objective)
        assert torch.equal(tensors(dst)["score.weight"], w[k : k + 1]) and report["head"]["objective"] == k
        assert equal(rewards(dst), llama.rewards(lambda h, k=k: F.linear(h, w[k : k + 1])))


def test_weights_collapse_in_float32_rounded_once(llama, helpsteer, tmp_path):
    src, w = helpsteer
    report = rmconvert.convert(src, tmp_path / "rm", weights=",".join(map(str, NEMOTRON_WEIGHTS)))
    expected = rounded_once(torch.tensor(NEMOTRON_WEIGHTS, dtype=torch.float64) @ w.double())[None]
    assert torch.equal(tensors(tmp_path / "rm")["score.weight"], expected)
    manifest = json.loads((tmp_path / "rm" / "rmconvert.json").read_text())
    assert manifest["options"]["weights"] == NEMOTRON_WEIGHTS and report["head"]["weights"] == NEMOTRON_WEIGHTS
    assert config(tmp_path / "rm")["id2label"] == {"0": "reward"}
    ours, theirs = rewards(tmp_path / "rm"), llama.rewards(lambda h: F.linear(h, w) @ torch.tensor(NEMOTRON_WEIGHTS))
    torch.testing.assert_close(torch.cat(ours)[:, 0], torch.cat(theirs), rtol=1e-5, atol=1e-5)


def test_multi_objective_bad_input(helpsteer, tmp_path):
    src, _ = helpsteer
    before = snapshot(src)
    refused(run("convert", src, tmp_path / "a", "--objective", "9"), 2, "out of range", "0 to 8")
    refused(run("convert", src, tmp_path / "b", "--objective", "honesty"), 2, "helpfulness")
    refused(run("convert", src, tmp_path / "c", "--weights", "1,2"), 2, "2 weight(s)", "9 row(s)")
    refused(run("convert", src, tmp_path / "d", "--weights", "1,x"), 2, "numbers")
    refused(run("convert", src, tmp_path / "e", "--label-names", "a,b"), 2, "2 name(s)")
    refused(run("convert", src, tmp_path / "f", "--objective", "1", "--weights", "1"), 2, "give one")
    refused(run("convert", src, tmp_path / "g", "--head", "bt"), 2, "--objective")
    assert not any((tmp_path / n).exists() for n in "abcdefg") and snapshot(src) == before


def armorm_tensors(llama, rows: int, qrm: bool) -> dict:
    """ArmoRM's (or QRM's) head: regression_layer [rows, H], the gating network and the transform matrix."""
    h, g, objectives = llama.hidden_size, 16, 4
    tensors = {"regression_layer.weight": torch.randn(rows, h), "reward_transform_matrix": torch.eye(objectives)}
    tensors["gating.logit_scale"] = torch.ones(1)
    if qrm:  # [Linear(no bias), ReLU, BatchNorm1d] x 3 + Linear
        for i, width in zip((0, 3, 6), (h, g, g)):
            tensors[f"gating.layers.{i}.weight"] = torch.randn(g, width)
        for i in (2, 5, 8):
            tensors |= {f"gating.layers.{i}.{n}": torch.randn(g) for n in ("weight", "bias", "running_mean")}
            tensors[f"gating.layers.{i}.running_var"] = torch.rand(g) + 0.5
            tensors[f"gating.layers.{i}.num_batches_tracked"] = torch.tensor(7)
        tensors |= {
            "gating.layers.9.weight": torch.randn(objectives, g),
            "gating.layers.9.bias": torch.randn(objectives),
        }
    else:
        for i, width in enumerate((h, g, g)):
            tensors |= {f"gating.layers.{i}.weight": torch.randn(g, width), f"gating.layers.{i}.bias": torch.randn(g)}
        tensors |= {
            "gating.layers.3.weight": torch.randn(objectives, g),
            "gating.layers.3.bias": torch.randn(objectives),
        }
    return tensors


GATED = {
    "architectures": ["LlamaForRewardModelWithGating"],
    "auto_map": {"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"},
    "id2label": {"0": "LABEL_0"},
    "num_objectives": 4,
    "pad_token_id": 3,
}


def test_armorm_gated(llama, tmp_path):
    head = armorm_tensors(llama, 4, qrm=False)
    src = llama.source(tmp_path / "armorm", {**llama.backbone(), **head}, **GATED)
    found = codes(src)
    assert "gated" in found["RM150"][0].message and "--objective" in found["RM150"][0].hint
    assert "1 label but regression_layer.weight gives 4 rewards" in found["RM012"][0].message
    report = rmconvert.convert(src, tmp_path / "rm")
    w = head["regression_layer.weight"]
    assert torch.equal(tensors(tmp_path / "rm")["score.weight"], w) and report["head"]["labels"] == 4
    assert any("gating" in x for x in report["warnings"])
    assert not any(k.startswith(("gating.", "reward_transform")) for k in tensors(tmp_path / "rm"))
    assert equal(rewards(tmp_path / "rm"), llama.rewards(lambda h: F.linear(h, w)))
    rmconvert.convert(src, tmp_path / "one", objective="3")
    assert torch.equal(tensors(tmp_path / "one")["score.weight"], w[3:4])
    result = run("convert", src, tmp_path / "collapsed", "--weights", "1,1,1,1")
    refused(result, 2, "gated", "gating network", "--objective")
    for head in ("bt", "value"):  # one row is asked of a gated head: only --objective gives it
        result = run("convert", src, tmp_path / head, "--head", head)
        refused(result, 2, "choose one with --objective")
        assert "--weights" not in result.output
    assert not any((tmp_path / n).exists() for n in ("collapsed", "bt", "value"))


def test_qrm_quantile_means(llama, tmp_path):
    head = armorm_tensors(llama, 4 * 3, qrm=True)
    src = llama.source(tmp_path / "qrm", {**llama.backbone(), **head}, **GATED, num_quantiles=3)
    assert "4 objectives x 3 quantiles" in codes(src)["RM150"][0].message
    rmconvert.convert(src, tmp_path / "rm")
    w = head["regression_layer.weight"]
    # reward-bench's QRM: rewards.reshape(-1, objectives, quantiles).mean(dim=2)
    expected = rounded_once(w.double().reshape(4, 3, -1).sum(1) / 3)
    assert torch.equal(tensors(tmp_path / "rm")["score.weight"], expected)
    ours = torch.cat(rewards(tmp_path / "rm"))
    theirs = torch.cat(llama.rewards(lambda h: F.linear(h, w).reshape(*h.shape[:2], 4, 3).mean(-1)))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    rmconvert.convert(src, tmp_path / "one", objective="1")
    assert torch.equal(tensors(tmp_path / "one")["score.weight"], expected[1:2])
    refused(run("convert", src, tmp_path / "w", "--weights", "1,0,0,0"), 2, "gated")


# --- LM-head tokens ---------------------------------------------------------------------------------


def test_nemotron_hf_logit_of_token_0(llama, tmp_path):
    """Llama-3.1-Nemotron-70B-Reward-HF: a causal LM whose reward is the logit of vocab id 0 at the last token."""
    report = rmconvert.convert(llama.path, tmp_path / "rm", head_from_tokens="0")
    row = llama.weights["lm_head.weight"][0:1]
    assert torch.equal(tensors(tmp_path / "rm")["score.weight"], row) and report["head"]["tokens"] == {"0": 0}
    assert equal(rewards(tmp_path / "rm"), llama.rewards(lambda h: F.linear(h, row)))
    theirs = [logits[:, -1, :1] for logits in llama.logits]  # the causal LM's own logit of token 0
    torch.testing.assert_close(torch.cat(rewards(tmp_path / "rm")), torch.cat(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_yes_no_genrm_difference(tmp_path, tied):
    """A yes/no GenRM: reward = l_yes - l_no, sigmoid(reward) = the 2-way softmax's P(yes) (vLLM's
    from_2_way_softmax). The tiny vocabulary has no 'yes': 'an' and ' to' (one token, 'Ġto') stand for no and yes."""
    base = Base(build_checkpoint("llama3", tmp_path / "base", tie_word_embeddings=tied))
    vocab = json.loads((base.path / "tokenizer.json").read_text())["model"]["vocab"]
    no, yes = vocab["an"], vocab["Ġto"]
    report = rmconvert.convert(base.path, tmp_path / "rm", head_from_tokens="an, to")
    table = base.weights["model.embed_tokens.weight" if tied else "lm_head.weight"]
    assert report["head"]["table"] == ("model.embed_tokens.weight" if tied else "lm_head.weight")
    assert report["head"]["tokens"] == {"an": no, " to": yes}
    expected = rounded_once(table[yes].double() - table[no].double())[None]
    got = tensors(tmp_path / "rm")["score.weight"]
    assert torch.equal(got, expected) and torch.equal(got, (table[yes] - table[no])[None])
    assert config(tmp_path / "rm")["id2label"] == {"0": " to"}
    assert equal(rewards(tmp_path / "rm"), base.rewards(lambda h: F.linear(h, expected)))
    theirs = torch.cat([logits[:, -1, [no, yes]].softmax(-1)[:, 1:] for logits in base.logits])
    torch.testing.assert_close(torch.cat(rewards(tmp_path / "rm")).sigmoid(), theirs, rtol=1e-5, atol=1e-6)


def test_head_from_tokens_bad_input(llama, helpsteer, tmp_path):
    before = snapshot(llama.path)
    refused(run("convert", llama.path, tmp_path / "a", "--head-from-tokens", "an,anis"), 2, "'anis' is 2 tokens")
    refused(run("convert", llama.path, tmp_path / "b", "--head-from-tokens", "an,An"), 2, "'An' is 2 tokens")
    refused(run("convert", llama.path, tmp_path / "d", "--head-from-tokens", "99999"), 2, "beyond")
    refused(run("convert", llama.path, tmp_path / "e", "--head-from-tokens", "an,an"), 2, "twice")
    refused(run("convert", helpsteer[0], tmp_path / "f", "--head-from-tokens", "an,is"), 2, "already has a reward")
    refused(run("convert", llama.path, tmp_path / "g", "--objective", "0"), 2, "has none")
    refused(run("convert", llama.path, tmp_path / "h", "--head-from-tokens", "an,,is"), 2, "non-empty")
    assert not any((tmp_path / n).exists() for n in "abdefgh") and snapshot(llama.path) == before


# --- kept MLP heads ---------------------------------------------------------------------------------


def mlp(h, w0, b0, w2, b2):
    """Qwen2ForRewardModel's head: Linear -> ReLU -> Linear, both with a bias."""
    return F.linear(F.relu(F.linear(h, w0, b0)), w2, b2)


def test_qwen2_for_reward_model_kept(qwen2, tmp_path):
    h = qwen2.hidden_size
    head = {"score.0.weight": torch.randn(h, h), "score.0.bias": torch.randn(h)}
    head |= {"score.2.weight": torch.randn(1, h), "score.2.bias": torch.randn(1)}
    src = qwen2.source(
        tmp_path / "qwen2-rm",
        {**qwen2.backbone(), **head},
        architectures=["Qwen2ForRewardModel"],
        auto_map={"AutoModel": "modeling_qwen2_rm.Qwen2ForRewardModel"},
    )
    assert "mlp" in codes(src)["RM150"][0].message
    # as Qwen2.5-Math-RM: pad <|endoftext|>, eos <|im_end|>
    for name, key, value in (("config.json", "eos_token_id", 1), ("generation_config.json", "eos_token_id", 1),
                             ("tokenizer_config.json", "eos_token", "<|im_end|>"), ("config.json", "pad_token_id", 0),
                             ("tokenizer_config.json", "pad_token", "<|endoftext|>")):  # fmt: skip
        settings = json.loads((src / name).read_text())
        (src / name).write_text(json.dumps({**settings, key: value}))
    report = rmconvert.convert(src, tmp_path / "rm")
    out = tensors(tmp_path / "rm")
    assert all(torch.equal(out[k], v) for k, v in head.items()) and report["head"]["rule"] == "kept"
    settings = config(tmp_path / "rm")
    assert settings["architectures"] == ["Qwen2ForRewardModel"] and settings["score_inner_size"] == h
    expected = qwen2.rewards(lambda x: mlp(x, *head.values()))
    assert equal(rewards(tmp_path / "rm"), expected)
    assert [f for f in rmconvert.validate(tmp_path / "rm", load=True) if f.severity == "error"] == []
    # --portable: the class in the checkpoint, loaded by transformers alone
    from transformers import AutoModelForSequenceClassification

    rmconvert.convert(src, tmp_path / "portable", portable=True)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "portable", trust_remote_code=True).eval()
    with torch.no_grad():
        assert equal([model(torch.tensor(ids)).logits for ids in PROBES], expected)
    refused(run("convert", src, tmp_path / "x", "--objective", "0"), 2, "MLP head", "kept")


def test_grm_sftreg_renamed_to_the_mlp_layout(llama, tmp_path):
    h, inner = llama.hidden_size, 24
    head = {"v_head.summary.0.weight": torch.randn(inner, h), "v_head.summary.0.bias": torch.randn(inner)}
    head |= {"v_head.summary.2.weight": torch.randn(1, inner), "v_head.summary.2.bias": torch.randn(1)}
    src = llama.source(
        tmp_path / "grm",
        {**llama.weights, **head},
        architectures=["LlamaForCausalLM"],
        vhead_layer_type="mlp",
        vhead_num_neurons=inner,
    )
    report = rmconvert.convert(src, tmp_path / "rm")
    out = tensors(tmp_path / "rm")
    assert "lm_head.weight" not in out and not any(k.startswith("v_head") for k in out)
    assert all(torch.equal(out["score." + k[len("v_head.summary.") :]], v) for k, v in head.items())
    assert config(tmp_path / "rm")["architectures"] == ["LlamaForRewardModel"] and report["head"]["inner"] == inner
    assert equal(rewards(tmp_path / "rm"), llama.rewards(lambda x: mlp(x, *head.values())))


# --- token-triggered, ambiguous -----------------------------------------------------------------------


def test_internlm2_reward_token(llama, tmp_path):
    w = torch.randn(1, llama.hidden_size)
    vocab = config(llama.path)["vocab_size"]
    good = llama.source(tmp_path / "good", {**llama.backbone(), "v_head.weight": w}, reward_token_id=1, pad_token_id=3)
    found = codes(good)
    assert "internlm2" in found["RM150"][0].message and "reward token 1" in found["RM150"][0].message
    assert "RM153" not in found
    refused(run("convert", good, tmp_path / "rm"), 1, "reward token", "InternLM2ForRewardModel")
    assert not (tmp_path / "rm").exists()
    for token, said in ((vocab + 5, "not below vocab_size"), (3, "is the pad")):
        bad = llama.source(
            tmp_path / f"bad{token}", {**llama.backbone(), "v_head.weight": w}, reward_token_id=token, pad_token_id=3
        )
        assert said in codes(bad)["RM153"][0].message


def test_probes_end_with_the_reward_token(llama, tmp_path):
    from rmconvert.doctor.probes import _probe_ids
    from rmconvert.doctor.validation import _read
    from rmconvert.families.host import load_registry

    src = llama.source(tmp_path / "src", {**llama.backbone(), "v_head.weight": torch.randn(1, 64)}, reward_token_id=2)
    ids, _ = _probe_ids(_read(src, load_registry()), 296)
    assert ids and all(row[-1] == 2 and 2 not in row[:-1] for row in ids)
    ids, _ = _probe_ids(_read(llama.path, load_registry()), 296)
    assert not any(row[-1] == 2 for row in ids)


def test_ambiguous_heads(llama, tmp_path):
    w = torch.randn(1, llama.hidden_size)
    src = llama.source(
        tmp_path / "two", {**llama.backbone(), "regression_head.weight": w, "score_head.weight": w.clone()}
    )
    assert "several reward heads" in codes(src)["RM151"][0].message
    refused(run("convert", src, tmp_path / "rm"), 1, "several reward heads")
    assert not (tmp_path / "rm").exists()
    odd = llama.source(tmp_path / "odd", {**llama.backbone(), "regression_head.weight": torch.randn(llama.hidden_size)})
    assert "not a reward head" in codes(odd)["RM151"][0].message
    refused(run("convert", odd, tmp_path / "rm"), 1, "regression_head.weight is [64]: not a reward head")
    assert not (tmp_path / "rm").exists()


# --- consumers and adapters -------------------------------------------------------------------------


def test_bt_head_read_at_column_0_by_trl(llama, tmp_path):
    rmconvert.convert(llama.path, tmp_path / "bt", head="bt")
    found = codes(tmp_path / "bt")["RM152"]
    assert "all zeros: every reward is 0.0" in found[0].message and "HALOs reads logits[:, 1]" in found[0].message
    rmconvert.convert(llama.path, tmp_path / "scalar")
    assert "RM152" not in codes(tmp_path / "scalar")


def test_adapter_head_is_checked(llama, tmp_path):
    pytest.importorskip("peft")
    from rmconvert.testing import build_adapter

    adapter = build_adapter(llama.path, tmp_path / "adapter", task_type="SEQ_CLS", r=4, target_modules=["q_proj"])
    rmconvert.convert(llama.path, tmp_path / "rm", adapter=adapter)
    assert [
        f for f in rmconvert.validate(tmp_path / "rm", against=llama.path, adapter=adapter) if f.severity == "error"
    ] == []
    weights = tensors(tmp_path / "rm")
    weights["score.weight"] = weights["score.weight"] * 2  # the head changed after the merge
    save_file(weights, tmp_path / "rm" / "model.safetensors", metadata={"format": "pt"})
    for load in (False, True):
        found = rmconvert.validate(tmp_path / "rm", against=llama.path, adapter=adapter, load=load)
        assert [(f.code, f.where) for f in found if f.severity == "error"] == [("RM125", "score.weight")]
