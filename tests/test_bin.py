"""PyTorch ``.bin`` sources and TRL value heads: converted to the same bytes as their safetensors twins."""

from __future__ import annotations

import itertools
import json
import os
import pickletools
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from rmconvert.doctor.validation import validate
from rmconvert.engine import convert
from rmconvert.errors import CheckpointError
from rmconvert.io import torch_zip
from rmconvert.io.torch_zip import read_torch_zip
from rmconvert.sources.checkpoint import open_checkpoint
from rmconvert.testing import save_as_bin, snapshot

TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


def tensor_bytes(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a checkpoint directory: dtype, shape and bytes (read from the file, not loaded)."""
    out = {}
    for name, info in open_checkpoint(path).tensors.items():
        with open(info.path, "rb") as f:
            out[name] = (info.dtype, info.shape, os.pread(f.fileno(), info.nbytes, info.offset))
    return out


def weight_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or "index" in p.name)


def assert_same_conversion(safetensors_src: Path, bin_src: Path, tmp: Path, *options: str, tied=()) -> dict:
    """Converting the .bin source gives the safetensors twin's output: same files, same tensor bytes (``tied``:
    tensors only the .bin holds, sharing the embedding's storage, dropped)."""
    kwargs = dict(zip(options[::2], options[1::2]))
    ours = convert(bin_src, tmp / "from-bin", **kwargs)
    theirs = convert(safetensors_src, tmp / "from-safetensors", **kwargs)
    assert weight_files(tmp / "from-bin") == weight_files(tmp / "from-safetensors")
    assert all(name.endswith((".safetensors", ".json")) for name in weight_files(tmp / "from-bin"))
    assert tensor_bytes(tmp / "from-bin") == tensor_bytes(tmp / "from-safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"):
        if (tmp / "from-safetensors" / name).exists():
            assert (tmp / "from-bin" / name).read_bytes() == (tmp / "from-safetensors" / name).read_bytes(), name
    assert ours["head"] == theirs["head"] and ours["pad"] == theirs["pad"]
    assert ours["dropped"] == sorted({*theirs["dropped"], *tied})
    return ours


# --- the torch zip reader -----------------------------------------------------------------------


def test_reader_maps_tensors_onto_the_file(tmp_path):
    """Tied tensors, a view at a storage offset and every dtype are byte ranges of the .bin, as torch reads them."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "embed": base,
        "tied": base,  # the same storage, pickled once
        "row2": base[2],  # a view at storage offset 12
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "f8": torch.randn(4, 2).to(torch.float8_e4m3fn),  # an untyped storage, pickled by _rebuild_tensor_v3
        "u16": torch.arange(6).to(torch.uint16)[2:],
    }
    torch.save(state, tmp_path / "w.bin")
    header = read_torch_zip(tmp_path / "w.bin")
    assert set(header.tensors) == set(state)
    dtypes = {"embed": "F32", "row2": "F32", "bf16": "BF16", "f16": "F16", "i64": "I64", "bool": "BOOL"}
    dtypes |= {"f8": "F8_E4M3", "u16": "U16"}
    with open(tmp_path / "w.bin", "rb") as f:
        for name, tensor in state.items():
            info = header.tensors[name]
            assert info.dtype == dtypes.get(name, info.dtype) and info.shape == tuple(tensor.shape)
            assert (
                os.pread(f.fileno(), info.nbytes, info.offset)
                == tensor.contiguous().view(torch.uint8).numpy().tobytes()
            )
    assert header.tensors["tied"].offset == header.tensors["embed"].offset
    assert header.tensors["row2"].offset == header.tensors["embed"].offset + 12 * 4


def rewrite_bin(path: Path, edit_pickle=None, entry: str = "", **info) -> None:
    """Rewrite the torch zip at ``path`` entry by entry: data.pkl through ``edit_pickle``; the central directory
    record of the entry ending in ``/<entry>`` with the ZipInfo fields ``info`` (flag_bits, compress_type)."""
    with zipfile.ZipFile(path) as z:
        items = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in items:
            z.writestr(name, edit_pickle(data) if edit_pickle and name.endswith("/data.pkl") else data)
            if entry and name.endswith("/" + entry):
                for field, value in info.items():
                    setattr(z.getinfo(name), field, value)


def with_build(data: bytes, opcode: str, arg: str | None, state: bytes, nth: int = 0) -> bytes:
    """A pickle with a BUILD opcode setting ``state`` on what its ``nth`` ``opcode`` (with ``arg``) pushed."""
    ops = list(pickletools.genops(data))
    ends = [end for (op, a, _), (_, _, end) in itertools.pairwise(ops) if op.name == opcode and arg in (None, a)]
    return data[: ends[nth]] + state + b"b" + data[ends[nth] :]


def module_state() -> str:
    """What a pickle must not alter in the reader's module: the globals it resolves, the functions' attributes."""
    functions = [torch_zip._rebuild_tensor, torch_zip._rebuild_tensor_v3, torch_zip._rebuild_parameter]
    return repr([torch_zip.GLOBALS, *({**vars(f), "defaults": f.__defaults__} for f in functions)])


@pytest.mark.parametrize(
    "opcode, arg, nth, state, kind",
    [
        ("GLOBAL", "torch float8_e4m3fn", 0, b"}Vdtype\nVBOGUS\ns", "Dtype"),  # was a KeyError traceback
        ("GLOBAL", "torch.storage UntypedStorage", 0, b"}Vdtype\nVF64\ns", "StorageType"),  # one for the process
        ("GLOBAL", "torch._utils _rebuild_tensor_v2", 0, b"}Vx\nI1\ns", "Function"),  # the function's __dict__
        ("GLOBAL", "torch._utils _rebuild_tensor_v2", 0, b"N}V__defaults__\n(I0\nts\x86", "Function"),  # setattr
        ("BINPERSID", None, 0, b"}Vnumel\nI1\ns", "Storage"),
        ("REDUCE", None, 1, b"}Vshape\n(I1\nts", "Tensor"),  # REDUCE 0 is the f8 tensor's hooks, OrderedDict()
    ],
)
def test_pickle_cannot_set_the_state_of_a_stand_in(tmp_path, opcode, arg, nth, state, kind):
    """A BUILD on a dtype, storage type, function, storage or tensor is refused in one line, and alters nothing in
    the module: a clean file read next in the same process reads as before."""
    torch.save({"f8": torch.zeros(4, dtype=torch.float8_e4m3fn), "f32": torch.zeros(2)}, tmp_path / "clean.bin")
    shutil.copy(tmp_path / "clean.bin", tmp_path / "evil.bin")
    rewrite_bin(tmp_path / "evil.bin", lambda data: with_build(data, opcode, arg, state, nth))
    before = module_state()
    with pytest.raises(CheckpointError) as error:
        read_torch_zip(tmp_path / "evil.bin")
    assert str(error.value) == (
        f"{tmp_path / 'evil.bin'}: the pickle sets the state of a {kind} (BUILD), which a state dict of tensors"
        " does not need"
    )
    assert module_state() == before
    tensors = read_torch_zip(tmp_path / "clean.bin").tensors
    assert {name: (t.dtype, t.shape, t.nbytes) for name, t in tensors.items()} == {
        "f8": ("F8_E4M3", (4,), 4),
        "f32": ("F32", (2,), 8),
    }


@pytest.mark.parametrize("entry", ["data.pkl", "byteorder"])
@pytest.mark.parametrize(
    "info, problem",
    [
        ({"flag_bits": 0x1}, "is encrypted; torch stores it plain"),
        ({"compress_type": 99}, "cannot be read: That compression method is not supported; torch stores it plain"),
    ],
)
def test_unreadable_zip_entry_is_one_line(build, tmp_path, entry, info, problem):
    """An encrypted entry, or one in a compression method zipfile lacks (was a RuntimeError or NotImplementedError
    traceback): one line naming the file and the entry; the source unchanged, nothing at the destination."""
    from click.testing import CliRunner

    from rmconvert.cli import cli

    src = save_as_bin(build("llama2"), tmp_path / "src")
    rewrite_bin(src / "pytorch_model.bin", entry=entry, **info)
    before = snapshot(src)
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert (
        result.stderr == f"rmconvert: error: {src / 'pytorch_model.bin'}: zip entry pytorch_model/{entry} {problem}\n"
    )
    assert snapshot(src) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt, side_file", [("bin", False), ("safetensors", True)])
def test_index_mapping_no_tensor_is_pickled_by_its_format(build, tmp_path, fmt, side_file):
    """An index whose weight_map is {} reads no shard: whether the weights are pickles follows the index's format
    (was shards[0]: an IndexError, or the value_head.bin side file), so validate reports RM042 only for .bin."""
    src = Path(shutil.copytree(build("llama2", max_shard_size="100KB"), tmp_path / "src"))
    if fmt == "bin":
        src = save_as_bin(src, tmp_path / "bin")
    index = src / ("pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json")
    index.write_text(json.dumps({**json.loads(index.read_text()), "weight_map": {}}))
    if side_file:
        torch.save(
            value_head(json.loads((src / "config.json").read_text())["hidden_size"], 0.0), src / "value_head.bin"
        )
    assert open_checkpoint(src).pickled == (fmt == "bin")
    codes = {f.code for f in validate(src)}
    assert "RM005" not in codes and ("RM042" in codes) == (fmt == "bin")


# --- conversions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["scalar", "bt"])
@pytest.mark.parametrize("kind, shards", [("llama2", None), ("llama2", "100KB"), ("qwen2", None), ("olmoe", "200KB")])
def test_torch_save_bin_converts_like_safetensors(build, tmp_path, kind, shards, head):
    """torch.save'd .bin weights (single or sharded, Qwen's LM head tied to the embedding) -> the same output."""
    src = build(kind, max_shard_size=shards) if shards else build(kind)
    tied = TIED if json.loads((src / "config.json").read_text()).get("tie_word_embeddings") else None
    bin_src = save_as_bin(src, tmp_path / "bin", tied=tied)
    report = assert_same_conversion(src, bin_src, tmp_path, "head", head, tied=tied or ())
    assert report["whole_file_copies"] == []  # .bin shards are assembled into safetensors, never copied
    if shards:
        index = json.loads((tmp_path / "from-bin" / "model.safetensors.index.json").read_text())
        on_disk = sum(t[2].__len__() for t in tensor_bytes(tmp_path / "from-bin").values())
        assert index["metadata"]["total_size"] == on_disk
    # a [zeros; w] head is sound, with a warning that TRL's GRPO and RLOO read its zero column (RM152)
    assert [f.code for f in validate(tmp_path / "from-bin", against=bin_src)] == (["RM152"] if head == "bt" else [])


def test_safetensors_win_over_bin(build, tmp_path):
    """Both formats present: the safetensors are read (as transformers does); the .bin is neither read nor copied."""
    src = Path(shutil.copytree(build("llama2"), tmp_path / "src"))
    (src / "pytorch_model.bin").write_bytes(b"not even a zip")
    report = convert(src, tmp_path / "out")
    assert "pytorch_model.bin" not in report["files"]
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()


@pytest.mark.skipif(not TRANSFORMERS_4, reason="transformers 5 saves only safetensors")
@pytest.mark.parametrize("kind, shards", [("llama2", None), ("llama2", "100KB"), ("qwen2", None)])
def test_save_pretrained_bin_converts_like_safetensors(build, tmp_path, kind, shards):
    """transformers 4's save_pretrained(safe_serialization=False), single and sharded, tied embeddings."""
    model = transformers.AutoModelForCausalLM.from_pretrained(build(kind))
    sizes = {"max_shard_size": shards} if shards else {}
    for name, safe in (("st", True), ("bin", False)):
        model.save_pretrained(tmp_path / name, safe_serialization=safe, **sizes)
        for tokenizer_file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(build(kind) / tokenizer_file, tmp_path / name)
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    tied = (
        model.config.tie_word_embeddings
        and "lm_head.weight" in read_torch_zip(tmp_path / "bin" / "pytorch_model.bin").tensors
    )
    assert_same_conversion(tmp_path / "st", tmp_path / "bin", tmp_path, tied=TIED if tied else ())
    codes = {f.code for f in validate(tmp_path / "bin")}
    assert "RM042" in codes and not codes & {"RM001", "RM040", "RM041"}


@pytest.mark.skipif(not TRANSFORMERS_4, reason="transformers 5 saves only safetensors")
@pytest.mark.parametrize("head", ["scalar", "bt"])
def test_open_instruct_reward_model_bin_converts_like_safetensors(build, tmp_path, head):
    """open-instruct's reward_modeling.py saves AutoModelForSequenceClassification with safe_serialization=False."""
    src = build("llama3", labels=1, max_shard_size="100KB")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(src)
    for name, safe in (("st", True), ("bin", False)):
        model.save_pretrained(tmp_path / name, safe_serialization=safe, max_shard_size="100KB")
        for tokenizer_file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / tokenizer_file, tmp_path / name)
    assert (tmp_path / "bin" / "pytorch_model.bin.index.json").exists()
    report = assert_same_conversion(tmp_path / "st", tmp_path / "bin", tmp_path, "head", head)
    assert report["source_kind"] == "reward model"
    found = [f.code for f in validate(tmp_path / "from-bin", load=True, against=tmp_path / "bin")]
    assert found == (["RM152"] if head == "bt" else [])  # [zeros; w]: TRL's GRPO and RLOO read the zero column


def test_halos_two_label_bin_to_scalar_takes_row_1_and_keeps_pad(build, tmp_path):
    """A HALOs reward model (2 labels, pad = eos) saved as .bin: --head scalar is row 1 exactly, pad kept."""
    src = build("llama2", labels=2, pad_token_id=2)  # </s>
    bin_src = save_as_bin(src, tmp_path / "halos")
    report = assert_same_conversion(src, bin_src, tmp_path, "head", "scalar")
    source_head = load_file(src / "model.safetensors")["score.weight"]
    assert torch.equal(load_file(tmp_path / "from-bin" / "model.safetensors")["score.weight"], source_head[1:2])
    assert report["pad"]["action"] == "kept" and report["pad"]["id"] == 2
    assert json.loads((tmp_path / "from-bin" / "config.json").read_text())["pad_token_id"] == 2


# --- validate ---------------------------------------------------------------------------------------


def test_validate_bin_reward_model_warns_rm042(build, tmp_path):
    """A sound reward model stored as .bin: only the RM042 warning; its converted twin compares to it (--against)."""
    rm = tmp_path / "rm"
    convert(build("llama2", max_shard_size="100KB"), rm)
    bin_rm = save_as_bin(rm, tmp_path / "rm-bin")
    findings = validate(bin_rm)
    assert [(f.code, f.severity, f.file) for f in findings] == [("RM042", "warning", "pytorch_model.bin.index.json")]
    assert "rmconvert convert" in findings[0].hint
    assert validate(rm, against=bin_rm) == []


# --- value heads ---------------------------------------------------------------------------------------


def value_head(hidden: int, bias: float, seed: int = 1) -> dict[str, torch.Tensor]:
    """TRL's ValueHead.summary: a float32 Linear(H, 1) (TRL keeps it float32 on a bf16 model)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "v_head.summary.weight": torch.randn(1, hidden, generator=gen) / hidden**0.5,
        "v_head.summary.bias": torch.tensor([bias]),
    }


def with_value_head(src: Path, dst: Path, where: str, bias: float) -> tuple[Path, dict]:
    """A copy of ``src`` with a value head: inline in model.safetensors (TRL), in value_head.safetensors or
    value_head.bin (LlamaFactory, ms-swift), or inline in a torch.save'd pytorch_model.bin."""
    dst = Path(shutil.copytree(src, dst))
    head = value_head(json.loads((src / "config.json").read_text())["hidden_size"], bias)
    if where in ("inline", "inline-bin"):
        weights = load_file(dst / "model.safetensors")
        save_file({**weights, **head}, dst / "model.safetensors", metadata={"format": "pt"})
        if where == "inline-bin":
            dst = save_as_bin(dst, dst.with_name(dst.name + "-bin"))
    elif where == "value_head.safetensors":
        save_file(head, dst / where, metadata={"format": "pt"})
    else:
        torch.save(head, dst / where)
    return dst, head


@pytest.mark.parametrize("where", ["inline", "value_head.safetensors", "value_head.bin", "inline-bin"])
@pytest.mark.parametrize("bias", [0.0, 0.75])
def test_value_head_becomes_score(build, tmp_path, where, bias):
    """score.weight is the value head's weight byte for byte, in its own dtype; v_head and lm_head are gone; the
    reward equals the value head's output (TRL: last hidden state @ w + b) minus its bias."""
    src, head = with_value_head(build("llama2"), tmp_path / "src", where, bias)
    findings = {f.code: f for f in validate(src)}
    assert "RM010" not in findings and findings["RM015"].severity == "error"
    assert findings["RM015"].hint.startswith(f"rmconvert convert {src} {src}-fixed")
    assert findings["RM015"].file == (
        "pytorch_model.bin" if where == "inline-bin" else where.replace("inline", "model.safetensors")
    )
    result = convert(src, tmp_path / "rm")
    rm = tmp_path / "rm"
    weights = load_file(rm / "model.safetensors")
    assert torch.equal(weights["score.weight"], head["v_head.summary.weight"])
    assert not [n for n in weights if n.startswith(("v_head.", "lm_head."))]
    assert result["source_kind"] == "value-head model" and result["pad"]["action"] != "kept"
    manifest = json.loads((rm / "rmconvert.json").read_text())
    assert manifest["result"]["value_head"]["bias"] == bias
    bias_warnings = [w for w in result["warnings"] if "bias" in w]
    assert bool(bias_warnings) == bool(bias) and (not bias or "0.75" in bias_warnings[0])
    assert [f.code for f in validate(rm) if f.severity == "error"] == []
    assert validate(rm, against=src) == []  # the backbone is the source's, v_head.* and lm_head dropped
    if where == "value_head.safetensors":  # loaded: rewards are the value head's output minus its bias
        assert validate(rm, load=True, against=src) == []

    reward_model = transformers.AutoModelForSequenceClassification.from_pretrained(rm).eval()
    causal = transformers.AutoModelForCausalLM.from_pretrained(build("llama2")).eval()
    ids = transformers.AutoTokenizer.from_pretrained(rm)("the answer is good", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = causal(ids, output_hidden_states=True).hidden_states[-1][:, -1]
        value = hidden @ head["v_head.summary.weight"].T + head["v_head.summary.bias"]
        reward = reward_model(ids).logits
    assert torch.allclose(reward, value - bias, atol=1e-5), (reward, value)


def test_validate_against_a_value_head_source_compares_rewards(build, tmp_path):
    """--load --against a value-head source: a converted head that is not the value head's is RM123."""
    src, _ = with_value_head(build("llama2"), tmp_path / "src", "value_head.bin", 0.5)
    convert(src, tmp_path / "rm", head="bt")
    assert [f.code for f in validate(tmp_path / "rm", load=True, against=src)] == ["RM152"]  # [zeros; w]: TRL
    weights = load_file(tmp_path / "rm" / "model.safetensors")
    weights["score.weight"] = weights["score.weight"] * 2
    save_file(weights, tmp_path / "rm" / "model.safetensors", metadata={"format": "pt"})
    assert sorted(f.code for f in validate(tmp_path / "rm", load=True, against=src)) == ["RM123", "RM152"]


def test_value_head_keeps_its_float32_dtype_on_a_bf16_model(build, tmp_path):
    """TRL keeps the value head float32 on a bf16 model: score.weight stays float32, the same bytes (bt: [0; w])."""
    src, head = with_value_head(build("llama2", dtype="bfloat16"), tmp_path / "src", "value_head.bin", 0.0)
    convert(src, tmp_path / "rm", head="bt")
    score = load_file(tmp_path / "rm" / "model.safetensors")["score.weight"]
    assert score.dtype == torch.float32
    assert torch.equal(score, torch.cat([torch.zeros(1, score.shape[1]), head["v_head.summary.weight"]]))


def test_value_head_bias_warning_on_stderr(build, tmp_path):
    """The CLI names a non-zero bias on stderr and still exits 0; a zero bias converts silently."""
    from click.testing import CliRunner

    from rmconvert.cli import cli

    for bias, expected in ((0.75, ["rmconvert: warning: value head bias 0.75 dropped"]), (0.0, [])):
        src, _ = with_value_head(build("llama2"), tmp_path / f"src-{bias}", "value_head.safetensors", bias)
        result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / f"rm-{bias}")])
        assert result.exit_code == 0, result.stderr
        warned = [line for line in result.stderr.splitlines() if line.startswith("rmconvert: warning: value head")]
        assert [line[: len(e)] for line, e in zip(warned, expected)] == expected and len(warned) == len(expected)


@pytest.mark.parametrize(
    "bias, says",
    [
        (0.37, "value head bias 0.37 dropped (transformers' score has no bias): every reward is 0.37 lower"),
        (-0.25, "value head bias -0.25 dropped (transformers' score has no bias): every reward is 0.25 higher"),
    ],
)
def test_value_head_bias_warning_says_which_way_rewards_move(build, tmp_path, bias, says):
    """The reward is the value head's output minus its bias: a negative bias makes every reward higher. The
    bias, read from float32 (0.37 is 0.3700000047683716 as a double), is printed rounded; the manifest keeps it
    as read."""
    src, head = with_value_head(build("llama2"), tmp_path / "src", "value_head.safetensors", bias)
    result = convert(src, tmp_path / "rm")
    assert [w for w in result["warnings"] if "bias" in w] == [
        says + " than the value head's output; preferences and rankings are unchanged (see the README to add it back)"
    ]
    assert result["value_head"]["bias"] == head["v_head.summary.bias"].item()
