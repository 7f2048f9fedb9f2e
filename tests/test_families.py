"""Families whose layout the generic plugin learns from transformers (the causal LM on the meta device) rather than
from tensor shapes or names, and every decoder-only type of the installed transformers: the coverage run of ``python -m rmconvert.coverage``, whose result is in docs/coverage.md."""

from __future__ import annotations

import json
import logging

import pytest
import transformers
from safetensors import safe_open

from rmconvert import convert, validate
from rmconvert.coverage import check_all
from rmconvert.families.modeling import decoder_only_model_types
from rmconvert.families.structure import structure

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
#: model_type -> (input embedding, LM head dropped), as the families' real checkpoints name them; with a head,
#: the tiny checkpoint stores it untied, as the real ones do (BioGPT's is [42384, 1024] like its embedding).
LAYOUTS = {
    "biogpt": ("biogpt.embed_tokens.weight", "output_projection.weight"),  # same shape as the embedding
    "modernbert-decoder": ("model.embeddings.tok_embeddings.weight", "decoder.weight"),
    "mpt": ("transformer.wte.weight", None),  # tied: no head stored
    "ctrl": ("transformer.w.weight", "lm_head.weight"),
    "youtu": ("model.embed_tokens.weight", None),
}
AVAILABLE = [t for t in LAYOUTS if t in decoder_only_model_types()]


def tensors(path) -> set[str]:
    names = set()
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            names |= set(f.keys())
    return names


@pytest.mark.parametrize("model_type", AVAILABLE)
def test_the_layout_comes_from_transformers(model_type, build, tmp_path):
    embedding, head = LAYOUTS[model_type]
    src = build(model_type, tie_word_embeddings=False) if head else build(model_type)
    found = structure(json.loads((src / "config.json").read_text()))
    assert found.embedding == embedding
    if head:
        assert head in found.heads and head in tensors(src)
    report = convert(src, tmp_path / "rm")
    kept = tensors(tmp_path / "rm")
    assert embedding in kept and (head is None or head not in kept)
    assert (head in report["dropped"]) if head else report["dropped"] == []
    assert not [n for n in report["dropped"] if n.startswith(found.prefix + ".")]  # the backbone is kept whole
    score = "classifier.weight" if model_type == "ctrl" else "score.weight"  # CTRL's native classifier
    assert score in kept and not {n for n in kept if n.startswith(("lm_head", "output_projection", "decoder."))}
    errors = [(f.code, f.where) for f in validate(tmp_path / "rm", load=True, against=src) if f.severity == "error"]
    assert errors == []


def test_a_native_classifier_with_more_than_a_linear_head_is_not_used(build, tmp_path):
    """ModernBERT-decoder's classifier (transformers 5.24) puts a dense layer and a norm before ``classifier``:
    layers a causal LM does not hold, which would load random. rmconvert's own class takes its place, under a
    name of its own, and loads completely."""
    if "modernbert-decoder" not in AVAILABLE:
        pytest.skip("transformers has no modernbert-decoder")
    from rmconvert import load_reward_model
    from rmconvert.families.modeling import native_class_name

    native = native_class_name("modernbert-decoder")
    report = convert(build("modernbert-decoder"), tmp_path / "rm", portable=True)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert report["class"] == config["architectures"][0] == "ModernBertDecoderScoreForSequenceClassification"
    assert config["auto_map"]["AutoModelForSequenceClassification"].endswith(report["class"])
    model = load_reward_model(tmp_path / "rm")
    assert type(model).__name__ == report["class"] != native
    assert [n for n, _ in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")] == [
        "score.weight"
    ]


@pytest.mark.skipif("youtu" not in AVAILABLE, reason="transformers has no youtu")
def test_a_weight_reinitialised_on_load_is_reported(build, tmp_path, monkeypatch):
    """Youtu's weight initialisation zeroes the embedding's pad row through ``.data``, past transformers' flag
    of loaded tensors. rmconvert's built classifier keeps loaded weights; without that (as a class that
    re-initialises), ``validate --load`` reports the tensor that loads with other values than it stores."""
    from rmconvert.families.reward_head import ScoreForSequenceClassification

    convert(build("youtu"), tmp_path / "rm")
    assert not [f for f in validate(tmp_path / "rm", load=True) if f.severity == "error"]
    monkeypatch.delattr(ScoreForSequenceClassification, "initialize_weights")
    found = [(f.code, f.where) for f in validate(tmp_path / "rm", load=True) if f.code == "RM127"]
    assert found == [("RM127", "model.embed_tokens.weight")]


def test_a_family_transformers_cannot_build_falls_back_to_shapes_with_both_reasons(build, tmp_path):
    from rmconvert.errors import CheckpointError
    from rmconvert.families.host import load_registry

    src = build("gpt2")
    config = json.loads((src / "config.json").read_text())
    generic = load_registry().get("generic").architecture
    from rmconvert.sources.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)
    assert generic.embedding_name(ckpt) == "transformer.wte.weight"
    ckpt.config["n_head"] = 5  # 64 is not a multiple of 5: transformers refuses to build it
    assert generic.embedding_name(ckpt) == "transformer.wte.weight"  # by shape
    ckpt.config["vocab_size"] = config["n_embd"]  # now the position table has the same shape too
    with pytest.raises(CheckpointError, match="transformers cannot build gpt2's causal LM: .*; and by shape"):
        generic.embedding_name(ckpt)


#: Types that convert but do not load as a sound reward model on the latest transformers (docs/coverage.md).
KNOWN_EXCEPTIONS = {"cpmant"}


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the coverage run is tox's latest env's")
def test_every_decoder_only_family_converts_and_loads(tmp_path):
    """``python -m rmconvert.coverage`` as a test: every decoder-only text type of the installed transformers is
    built tiny, converted, loaded and scored on padded batches, each in a forked, memory-bounded process."""
    results = check_all(sorted(decoder_only_model_types()), tmp_path, 8 << 30, 300)
    unbuildable = {t: detail for t, (outcome, detail) in results.items() if outcome == "unbuildable"}
    failed = {t: detail for t, (outcome, detail) in results.items() if outcome == "failed"}
    assert unbuildable == {}, "give these a tiny override in rmconvert.testing"
    assert set(failed) == KNOWN_EXCEPTIONS, failed


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the coverage run is tox's latest env's")
def test_every_decoder_only_family_converts_to_a_token_classifier(tmp_path):
    """``python -m rmconvert.coverage --head value``: every family that converts to a sequence classifier converts
    to a token classifier (a value model; ``--head prm`` differs only in its rows), transformers' own or one
    rmconvert builds, loads and scores padded batches per token."""
    results = check_all(sorted(decoder_only_model_types()), tmp_path, 8 << 30, 300, head="value")
    failed = {t: detail for t, (outcome, detail) in results.items() if outcome == "failed"}
    assert {t for t, (outcome, _) in results.items() if outcome == "unbuildable"} == set()
    assert set(failed) == KNOWN_EXCEPTIONS, failed


class _Records(logging.Handler):
    """The messages logged to transformers' loggers."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("model_type", ["olmoe", "rwkv"])  # a backbone with a key-value cache, one without
def test_the_built_classifier_logs_no_cache_deprecation(model_type, build, tmp_path):
    """transformers 5 renamed ``past_key_values`` to ``cache``: the old name, as an output's keyword or
    attribute, logs "`past_key_values`/`cache_params` are deprecated" (in every TRL run, in ``validate --load``).
    rmconvert's built classifier uses the name its transformers declares and passes the backbone's cache on."""
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    from rmconvert import load_reward_model
    from rmconvert.families.reward_head import ScoreForSequenceClassification

    src = build(model_type)
    convert(src, tmp_path / "rm")
    getattr(logging.Logger.warning_once, "cache_clear", lambda: None)()  # transformers logs it once a process
    records = _Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        assert not [f for f in validate(tmp_path / "rm", load=True, against=src) if f.severity == "error"]
        model = load_reward_model(tmp_path / "rm")
        assert isinstance(model, ScoreForSequenceClassification)
        ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
        cached = model(ids, use_cache=True)
        uncached = model(ids, use_cache=False)
    finally:
        logging.getLogger("transformers").removeHandler(records)
    assert not [m for m in records.messages if "deprecated" in m], records.messages
    cache = "cache" if "cache" in SequenceClassifierOutputWithPast.__dataclass_fields__ else "past_key_values"
    assert list(cached.keys()) == (["logits", cache] if model_type == "olmoe" else ["logits"])  # passed on
    assert list(uncached.keys()) == ["logits"]
    torch.testing.assert_close(cached.logits, uncached.logits)


def test_resolving_a_generic_family_asks_transformers_about_it_alone(tmp_path):
    """``rmconvert convert`` of a gpt2 checkpoint once imported every configuration class of transformers (12 s) to
    answer whether the generic plugin claims gpt2: only gpt2's configuration (and the auto mappings) are imported."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from rmconvert.families.host import load_registry\n"
        "assert load_registry().resolve('gpt2').architecture.name == 'generic'\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformers.models.') and '.configuration_' in m"
        " and not m.startswith('transformers.models.auto')))\n"
    )
    # run outside the repository: from its root, ``-c`` would import the source tree, not the installed package
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.strip() == "['transformers.models.gpt2.configuration_gpt2']"
