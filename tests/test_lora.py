"""LoRA adapters merged while converting: every merged tensor bit-identical to PEFT's ``merge_and_unload()``.

The adapters are made by PEFT itself on tiny real checkpoints (non-zero A and B, fixed seeds); PEFT is the
oracle, loaded only here (it is in the ``test`` extra, never a run-time dependency).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import peft
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import rmconvert
from rmconvert.cli import cli
from rmconvert.testing import build_adapter, build_checkpoint, load_base, snapshot

EMBEDDING = "model.embed_tokens.weight"
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = ("the answer is good and helpful", "no", "hello world, is the reward model honest?")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return out


def peft_merged(base: Path, adapter: Path, task_type: str, labels: int, dtype: str, vocab_size=None):
    """PEFT's reference: ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` (default arguments)."""
    model = load_base(base, task_type, labels, dtype)
    if vocab_size:
        model.resize_token_embeddings(vocab_size)
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many elements of two same-dtype tensors differ in their bits."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return int((a.contiguous().view(bits) != b.contiguous().view(bits)).sum())


def assert_merged_like_peft(out: Path, base: Path, reference, adapter: Path) -> list[str]:
    """Every tensor of ``out`` but the head and added embedding rows has PEFT's bits; returns those the adapter
    changed (so that a test can check the adapter did something)."""
    ours, source = tensors(out), tensors(base)
    theirs = reference.state_dict()
    changed = []
    for name, tensor in ours.items():
        if name == "score.weight":
            continue
        expected = theirs[name] if name in theirs else theirs[name.split(".", 1)[1]]
        rows = min(tensor.shape[0], expected.shape[0]) if name.endswith("wte.weight") or name == EMBEDDING else None
        assert differing(tensor[:rows], expected[:rows]) == 0, name
        if name not in source or source[name].shape != tensor.shape or differing(tensor, source[name]):
            changed.append(name)
    return changed


def convert(base: Path, out: Path, adapter: Path | None, *args) -> dict:
    result = CliRunner().invoke(
        cli, ["convert", str(base), str(out), *(["--adapter", str(adapter)] if adapter else []), "--json", *args]
    )
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny bases: Llama 3 in bf16 and float32, Llama 2 (its vocabulary grows on conversion), GPT-2."""
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama3-bf16": build_checkpoint("llama3", root / "llama3-bf16", dtype="bfloat16"),
        "llama3": build_checkpoint("llama3", root / "llama3"),
        "llama2": build_checkpoint("llama2", root / "llama2"),
        "gpt2": build_checkpoint("gpt2", root / "gpt2"),
    }


# name: (base, task type, labels, base dtype, build_adapter arguments)
CASES = {
    "causal-bf16-base-fp32-adapter": ("llama3-bf16", "CAUSAL_LM", 1, "bfloat16", {"r": 8, "lora_alpha": 16,
                                      "target_modules": LLAMA_LINEAR}),
    "causal-bf16-base-bf16-adapter-rslora": ("llama3-bf16", "CAUSAL_LM", 1, "bfloat16", {
        "r": 8, "lora_alpha": 12, "use_rslora": True, "adapter_dtype": "bfloat16", "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "causal-patterns-regex": ("llama2", "CAUSAL_LM", 1, "float32", {
        "r": 4, "lora_alpha": 8, "target_modules": r".*\.(q_proj|up_proj|down_proj)",
        "rank_pattern": {"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
        "alpha_pattern": {"up_proj": 3, "layers.0.self_attn.q_proj": 20}}),
    "causal-embedding-lora-vocab-grows": ("llama2", "CAUSAL_LM", 1, "float32", {
        "r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "o_proj"]}),
    "causal-embedding-lora-resized-vocab": ("llama2", "CAUSAL_LM", 1, "float32", {
        "r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "o_proj"], "vocab_size": 301}),
    "seqcls-score": ("llama3", "SEQ_CLS", 1, "float32", {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    "seqcls-2-labels-bf16": ("llama3-bf16", "SEQ_CLS", 2, "bfloat16", {"r": 4, "lora_alpha": 8,
                             "target_modules": ["k_proj", "o_proj"]}),
    "seqcls-embed-tokens-new-tokens": ("llama3", "SEQ_CLS", 1, "float32", {
        "r": 4, "lora_alpha": 8, "target_modules": ["gate_proj"], "modules_to_save": ["embed_tokens"], "vocab_size": 301}),
    "gpt2-fan-in-fan-out-biases": ("gpt2", "CAUSAL_LM", 1, "float32", {
        "r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True, "bias": "all",
        "lora_bias": True}),
    "causal-dora-bf16": ("llama3-bf16", "CAUSAL_LM", 1, "bfloat16", {
        "r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "o_proj", "up_proj"]}),
    "gpt2-dora-fan-in-fan-out": ("gpt2", "CAUSAL_LM", 1, "float32", {
        "r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, bases, tmp_path_factory):
    """(base, adapter, reference model, labels, vocab_size, name) of one case, built once."""
    base_name, task_type, labels, dtype, arguments = CASES[request.param]
    base = bases[base_name]
    adapter = build_adapter(
        base, tmp_path_factory.mktemp("adapter") / "adapter", task_type=task_type, labels=labels, dtype=dtype,
        **arguments,
    )  # fmt: skip
    reference = peft_merged(base, adapter, task_type, labels, dtype, arguments.get("vocab_size"))
    return base, adapter, reference, labels, arguments.get("vocab_size"), request.param


def test_merge_is_bit_identical_to_peft(case, tmp_path):
    base, adapter, reference, labels, vocab_size, name = case
    before = snapshot(base), snapshot(adapter)
    report = convert(base, tmp_path / "rm", adapter)
    changed = assert_merged_like_peft(tmp_path / "rm", base, reference, adapter)
    merged = report["adapter"]["merged"]
    assert merged > 0 and len(changed) >= merged  # the adapter did change the weights (B is not zero)
    assert (snapshot(base), snapshot(adapter)) == before
    ours = tensors(tmp_path / "rm")
    if "seqcls" in name:  # the trained head, exactly, by the head rules (2 -> 1 takes row 1)
        head = reference.score.weight.detach()
        assert differing(ours["score.weight"], head[1:2] if labels == 2 else head) == 0
        assert report["head"]["from"] == labels
    if vocab_size:  # the adapter's bigger embedding, then the vocabulary rules on the new size
        assert ours[EMBEDDING].shape[0] == 304 and report["vocab"]["from"] == vocab_size
        assert json.loads((tmp_path / "rm" / "config.json").read_text())["vocab_size"] == 304
    if "embedding-lora" in name:  # new rows: the mean of the merged rows
        emb = ours[EMBEDDING]
        assert report["vocab"]["added_rows"] > 0
        torch.testing.assert_close(emb[-1], emb[: report["vocab"]["from"]].double().mean(0).float())


def test_manifest_records_the_adapter(case, tmp_path):
    base, adapter, *_ = case
    convert(base, tmp_path / "rm", adapter)
    manifest = json.loads((tmp_path / "rm" / "rmconvert.json").read_text())
    recorded = manifest["adapter"]
    assert recorded["config"] == json.loads((adapter / "adapter_config.json").read_text())
    assert set(recorded["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    import hashlib

    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert recorded["files"]["adapter_model.safetensors"] == "sha256:" + digest
    assert "model.safetensors" in manifest["source_files"] or "model.safetensors.index.json" in manifest["source_files"]


def test_validate_against_a_fresh_merge(case, tmp_path):
    base, adapter, *_ = case
    out = tmp_path / "rm"
    report = convert(base, out, adapter)
    findings = rmconvert.validate(out, against=base, adapter=adapter)
    assert [f for f in findings if f.severity == "error"] == []
    # one flipped bit in a merged tensor is RM125
    source = tensors(base)
    merged_name = next(
        n for n, t in tensors(out).items() if n in source and t.shape == source[n].shape and differing(t, source[n])
    )
    raw = (out / "model.safetensors").read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:start])
    offset = start + header[merged_name]["data_offsets"][0]
    with open(out / "model.safetensors", "r+b") as f:
        byte = os.pread(f.fileno(), 1, offset)
        os.pwrite(f.fileno(), bytes([byte[0] ^ 1]), offset)
    findings = rmconvert.validate(out, against=base, adapter=adapter)
    assert [(f.code, f.where) for f in findings if f.severity == "error"] == [("RM125", merged_name)]
    assert report["adapter"]["merged"] > 0


def test_rewards_equal_the_peft_models(bases, tmp_path):
    """A reward-model adapter: the converted model scores like PEFT's merged model (exactly) and like the
    unmerged PEFT model (to float rounding)."""
    base = bases["llama3"]
    adapter = build_adapter(base, tmp_path / "adapter", task_type="SEQ_CLS", r=4, lora_alpha=16,
                            target_modules=LLAMA_LINEAR, seed=3)  # fmt: skip
    convert(base, tmp_path / "rm", adapter)
    ours = rmconvert.load_reward_model(tmp_path / "rm").eval()
    merged = peft_merged(base, adapter, "SEQ_CLS", 1, "float32")
    unmerged = peft.PeftModel.from_pretrained(load_base(base, "SEQ_CLS"), adapter).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, return_tensors="pt").input_ids
            reward = ours(ids).logits
            assert torch.equal(reward, merged(ids).logits)
            torch.testing.assert_close(reward, unmerged(ids).logits, atol=1e-5, rtol=1e-5)
    assert rmconvert.validate(tmp_path / "rm", load=True) == []


def test_convert_the_adapter_directory_itself(bases, tmp_path):
    """``rmconvert convert ADAPTER DST``: base_model_name_or_path names the local base; same bytes as with --adapter."""
    base = bases["llama3-bf16"]
    adapter = build_adapter(base, tmp_path / "adapter", dtype="bfloat16", target_modules=["q_proj"], r=2, lora_alpha=4)
    convert(base, tmp_path / "a", adapter)
    report = convert(adapter, tmp_path / "b", None, "--head", "bt")
    convert(adapter, tmp_path / "c", None)
    assert report["source"] == str(base)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "c")
    assert not [w for w in report["warnings"] if "tokenizer" in w]
    # a tokenizer saved with the adapter (new tokens) is not BASE's: said, not silently mixed
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][-1], "id": 296, "content": "[PAD]"})
    (adapter / "tokenizer.json").write_text(json.dumps(tokenizer))
    warnings = convert(adapter, tmp_path / "d", None)["warnings"]
    assert any("tokenizer.json differs from BASE's tokenizer.json" in w for w in warnings), warnings
    ours = tensors(tmp_path / "b")["score.weight"]
    assert ours.shape[0] == 2 and not ours[0].any()


def test_seq_cls_adapter_onto_a_reward_model_keeps_its_head(bases, tmp_path):
    """A SEQ_CLS adapter saved without the head, on the reward model it was trained on: the base's head is kept."""
    rm = build_checkpoint("llama3", tmp_path / "rm-base", labels=1)
    adapter = build_adapter(rm, tmp_path / "adapter", task_type="SEQ_CLS", target_modules=["v_proj"], r=2,
                            lora_alpha=2, modules_to_save=[])  # fmt: skip
    import safetensors

    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        held = {k: f.get_tensor(k) for k in f.keys() if "score" not in k}  # noqa: SIM118
    safetensors.torch.save_file(held, adapter / "adapter_model.safetensors")
    report = convert(rm, tmp_path / "out", adapter)
    assert report["head"]["how"] == "unchanged 1-label head"
    assert differing(tensors(tmp_path / "out")["score.weight"], tensors(rm)["score.weight"]) == 0


def test_chunked_add_is_bit_identical(bases, tmp_path, monkeypatch):
    """The float32 add runs a chunk of rows at a time (1 Mi elements): with tiny chunks, ragged last one
    included, a bf16 merge still has PEFT's bits."""
    import rmconvert.engine.lora_merge

    monkeypatch.setattr(rmconvert.engine.lora_merge, "ADD_CHUNK", 200)  # 3 rows of 64, 2 of 96
    base = bases["llama3-bf16"]
    adapter = build_adapter(base, tmp_path / "adapter", dtype="bfloat16", r=8, lora_alpha=8,
                            target_modules=["gate_proj", "down_proj", "k_proj"], seed=5)  # fmt: skip
    convert(base, tmp_path / "rm", adapter)
    reference = peft_merged(base, adapter, "CAUSAL_LM", 1, "bfloat16")
    assert len(assert_merged_like_peft(tmp_path / "rm", base, reference, adapter)) >= 6


def test_head_saved_under_its_in_memory_name(bases, tmp_path):
    """A head saved as ``score.modules_to_save.default.weight`` (a state dict taken from memory) is the same head."""
    from safetensors.torch import load_file, save_file

    base = bases["llama3"]
    adapter = build_adapter(base, tmp_path / "adapter", task_type="SEQ_CLS", target_modules=["q_proj"], r=2,
                            lora_alpha=2)  # fmt: skip
    held = load_file(adapter / "adapter_model.safetensors")
    head = held.pop("base_model.model.score.weight")
    save_file(
        {**held, "base_model.model.score.modules_to_save.default.weight": head}, adapter / "adapter_model.safetensors"
    )
    report = convert(base, tmp_path / "rm", adapter)
    assert report["adapter"]["head"] == "adapter"
    assert differing(tensors(tmp_path / "rm")["score.weight"], head) == 0


def test_pickled_adapter_merges_like_its_safetensors_twin(bases, tmp_path):
    """``adapter_model.bin`` (``save_pretrained(safe_serialization=False)``) is read by the safe ``.bin`` reader:
    the same merged bytes as the safetensors adapter; rmconvert.json hashes the file that was read."""
    base = bases["llama3-bf16"]
    adapter = build_adapter(base, tmp_path / "adapter", dtype="bfloat16", target_modules=["q_proj", "down_proj"], r=4,
                            lora_alpha=8, modules_to_save=["score"], task_type="SEQ_CLS")  # fmt: skip
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        torch.save({k: f.get_tensor(k) for k in f.keys()}, pickled / "adapter_model.bin")  # noqa: SIM118
    convert(base, tmp_path / "a", adapter)
    report = convert(base, tmp_path / "b", pickled)
    assert {k: v for k, v in snapshot(tmp_path / "a").items() if k != "rmconvert.json"} == {
        k: v for k, v in snapshot(tmp_path / "b").items() if k != "rmconvert.json"
    }
    assert set(report["adapter"]["files"]) == {"adapter_config.json", "adapter_model.bin"}


def test_base_named_by_a_hub_repo_id(bases, tmp_path):
    """base_model_name_or_path ``org/name`` resolves through the Hugging Face cache (offline here): the same bytes
    as converting with the local base."""
    import subprocess
    import sys

    from rmconvert.testing import add_to_hub_cache

    base = bases["llama3-bf16"]
    cache = tmp_path / "hf-cache"
    add_to_hub_cache(base, cache, "tiny-org/llama3-base")
    adapter = build_adapter(base, tmp_path / "adapter", dtype="bfloat16", target_modules=["v_proj"], r=2, lora_alpha=4)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "tiny-org/llama3-base"})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    script = Path(sys.executable).with_name("rmconvert")
    done = subprocess.run([str(script), "convert", str(adapter), str(tmp_path / "from-hub")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    convert(base, tmp_path / "local", adapter)
    manifest = json.loads((tmp_path / "from-hub" / "rmconvert.json").read_text())
    assert manifest["source_repo"]["repo_id"] == "tiny-org/llama3-base"
    assert {k: v for k, v in snapshot(tmp_path / "from-hub").items() if k != "rmconvert.json"} == {
        k: v for k, v in snapshot(tmp_path / "local").items() if k != "rmconvert.json"
    }


@pytest.mark.parametrize(
    "bias, problem",
    [
        (lambda b: b[:1], "the LoRA bias is F32[1] but BASE's transformer.h.0.attn.c_attn.bias is F32[192]"),
        (lambda b: b[:-1], "the LoRA bias is F32[191] but BASE's transformer.h.0.attn.c_attn.bias is F32[192]"),
        (
            lambda b: b.to(torch.int64),
            "the LoRA bias is I64[192] but BASE's transformer.h.0.attn.c_attn.bias is F32[192]",
        ),
    ],
    ids=["one-element", "one-short", "int64"],
)
def test_lora_bias_that_does_not_fit_is_refused(bases, tmp_path, bias, problem):
    """A ``lora_B.bias`` of another shape (a [1] one would broadcast) or of an integer dtype: one line, exit 1."""
    from safetensors.torch import load_file, save_file

    adapter = build_adapter(bases["gpt2"], tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["c_attn"],
                            fan_in_fan_out=True, lora_bias=True)  # fmt: skip
    held = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.bias"
    save_file({**held, key: bias(held[key]).contiguous()}, adapter / "adapter_model.safetensors")
    result = CliRunner().invoke(cli, ["convert", str(bases["gpt2"]), str(tmp_path / "rm"), "--adapter", str(adapter)])
    assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr, result.output + result.stderr
    where = f"{adapter / 'adapter_model.safetensors'}: base_model.model.transformer.h.0.attn.c_attn"
    assert result.stderr.splitlines() == [f"rmconvert: error: {where}: {problem}: the adapter does not fit this model"]
    assert not (tmp_path / "rm").exists()


def test_grown_embedding_is_merged_once(bases, tmp_path, monkeypatch):
    """A LoRA-merged embedding whose vocabulary grows: the writer merges it once and takes the mean row from those
    rows (the bytes PEFT's merge gives), not a second merge of the whole embedding."""
    import rmconvert.engine.lora_merge

    merges, merged = [], rmconvert.engine.lora_merge.merged
    monkeypatch.setattr(
        rmconvert.engine.lora_merge, "merged", lambda base, delta: merges.append(base.name) or merged(base, delta)
    )
    base = bases["llama2"]
    adapter = build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"])
    report = convert(base, tmp_path / "rm", adapter)
    assert report["vocab"]["added_rows"] > 0
    assert merges.count(EMBEDDING) == 1 and len(merges) == report["adapter"]["merged"]
    reference = peft_merged(base, adapter, "CAUSAL_LM", 1, "float32")
    assert EMBEDDING in assert_merged_like_peft(tmp_path / "rm", base, reference, adapter)
    emb = tensors(tmp_path / "rm")[EMBEDDING]
    torch.testing.assert_close(emb[-1], emb[: report["vocab"]["from"]].double().mean(0).float())
    # the mean row alone (its rows not computed first) is the same row
    from rmconvert.engine.head import merged_mean_row_parts
    from rmconvert.engine.merge import plan_merge
    from rmconvert.families.host import load_registry
    from rmconvert.sources.adapter import read_adapter
    from rmconvert.sources.checkpoint import open_checkpoint

    ckpt = open_checkpoint(base)
    layout = load_registry().resolve(ckpt.model_type).architecture.layout(ckpt)
    _, mean = merged_mean_row_parts(plan_merge(read_adapter(adapter), ckpt, layout).parts[EMBEDDING])
    assert mean() == emb[-1].numpy().tobytes()


def test_tensor_bytes_reads_past_2_gib(tmp_path):
    """validate reads a tensor the adapter saved whole in full: Linux reads at most 0x7ffff000 bytes at a time."""
    from rmconvert.engine.merge import tensor_bytes
    from rmconvert.io.safetensors import ByteRange, OutTensor

    length = 0x7FFFF000 + 4096
    with open(tmp_path / "big", "wb") as f:  # sparse: zeros, then a tail that must be read too
        f.truncate(16 + length - 8)
        f.seek(16 + length - 8)
        f.write(b"the tail")
    data = tensor_bytes(OutTensor("big", "U8", (length,), (ByteRange(tmp_path / "big", 16, length),)))
    assert len(data) == length and data[-8:] == b"the tail"
