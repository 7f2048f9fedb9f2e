"""Bad input to ``rmconvert convert`` and ``rmconvert validate``, through the real CLI.

Every refusal must be one line ``rmconvert: error: <file>: <problem>`` (exit 1) or a click usage error
(exit 2), never a traceback; the source stays byte-identical and nothing appears at the destination, not
even a temporary sibling. An interrupted conversion (SIGINT, SIGTERM) leaves nothing behind either.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import pytest
from click.testing import CliRunner

from rmconvert.cli import cli
from rmconvert.testing import bin_name, save_as_bin, snapshot

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
EMBEDDING = "model.embed_tokens.weight"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
STAGING = re.compile(r"^\..+\.rmconvert-(tmp|old)$")


# --- running the CLI and checking what it left -------------------------------------------------


def rmconvert(*args):
    """Run the ``rmconvert`` CLI in-process; the result keeps stdout and stderr apart."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def state(path: Path):
    """What is at ``path``: None, a file's hash, or a directory's files (hashed) and subdirectories."""
    try:
        path.lstat()
    except OSError:  # missing, or a name too long to exist
        return None
    if path.is_file():
        return "file", hashlib.sha256(path.read_bytes()).hexdigest()
    return "dir", snapshot(path), sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_dir())


def leftovers(*directories: Path) -> list[str]:
    """Staging directories (``.<dst>.*.rmconvert-tmp`` / ``-old``) left in any of ``directories``."""
    return sorted(str(p) for d in directories if os.path.isdir(d) for p in d.iterdir() if STAGING.match(p.name))


def assert_no_crash(result) -> None:
    """The command exited on purpose: no exception escaped and no traceback was printed."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output + result.stderr


def assert_one_error(result, culprit: Path | str, problem: str) -> None:
    """Exit 1 with exactly one line ``rmconvert: error: <culprit>: ...<problem>...`` on stderr."""
    assert_no_crash(result)
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"rmconvert: error: {culprit}: "
    assert lines[0].startswith(prefix), lines[0]
    assert problem in lines[0][len(prefix) :], lines[0]


# --- damaging checkpoints ----------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """The header (``__metadata__`` included) and the data buffer of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(path: Path, header: dict | list | bytes, data: bytes = b"") -> None:
    """Write ``header`` (JSON-encoded unless bytes, space-padded to 8 bytes) followed by ``data``."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Let ``edit`` change the header of a safetensors file in place; the data is kept."""
    header, data = read_safetensors(path)
    edit(header)
    write_safetensors(path, header, data)


def replace_header_text(path: Path, text: bytes) -> None:
    """Swap a safetensors header for raw ``text``; the data is kept."""
    write_safetensors(path, text, read_safetensors(path)[1])


def set_header_length(path: Path, length: int) -> None:
    """Overwrite the 8-byte little-endian header length of a safetensors file."""
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", length))


def cut(path: Path, nbytes: int) -> None:
    """Drop the last ``nbytes`` bytes of a file."""
    os.truncate(path, path.stat().st_size - nbytes)


def append(path: Path, data: bytes) -> None:
    """Add ``data`` at the end of a file."""
    with open(path, "ab") as f:
        f.write(data)


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    """Let ``edit`` change a JSON object file in place."""
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=2))


def in_data_order(header: dict) -> list[str]:
    """Tensor names of a header in the order of their bytes."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def shift_second_tensor(path: Path, by: int) -> None:
    """Move the data_offsets of the second tensor (in data order) by ``by`` bytes, size unchanged."""

    def edit(header):
        entry = header[in_data_order(header)[1]]
        entry["data_offsets"] = [offset + by for offset in entry["data_offsets"]]

    edit_header(path, edit)


def set_entry(path: Path, tensor: str, **fields) -> None:
    """Change fields (dtype, shape, ...) of one tensor's header entry."""
    edit_header(path, lambda header: header[tensor].update(fields))


def duplicate_key(path: Path) -> None:
    """Repeat the last tensor entry in the header text (JSON allows it; safetensors does not)."""
    header, data = read_safetensors(path)
    last = in_data_order(header)[-1]
    text = json.dumps(header)[:-1] + f", {json.dumps(last)}: {json.dumps(header[last])}}}"
    write_safetensors(path, text.encode(), data)


def shards(src: Path) -> list[Path]:
    """The shard files of a sharded checkpoint, in name order."""
    return sorted(src.glob("model-*-of-*.safetensors"))


def first_tensor(shard: Path) -> str:
    """Name of the first tensor (in data order) of a shard."""
    return in_data_order(read_safetensors(shard)[0])[0]


def copy_tensor(from_shard: Path, to_shard: Path, tensor: str) -> None:
    """Put a copy of ``tensor`` (entry and bytes) of one shard into another shard as well."""
    header, data = read_safetensors(from_shard)
    begin, end = header[tensor]["data_offsets"]
    target, target_data = read_safetensors(to_shard)
    target[tensor] = {**header[tensor], "data_offsets": [len(target_data), len(target_data) + end - begin]}
    write_safetensors(to_shard, target, target_data + data[begin:end])


def remap(src: Path, tensor: str, shard: str) -> None:
    """Make the index's weight_map put ``tensor`` in the file ``shard``."""
    edit_json(src / INDEX, lambda index: index["weight_map"].update({tensor: shard}))


def only_pickle(src: Path) -> None:
    """Replace the safetensors weights by a (fake) pytorch_model.bin."""
    (src / SINGLE).unlink()
    (src / BIN).write_bytes(b"PK\x03\x04 not really a pickle")


# --- .bin (torch zip) sources ------------------------------------------------------------------


def to_bin(src: Path) -> None:
    """Replace the safetensors weights by ``torch.save``'d .bin files (sharded as they were)."""
    twin = save_as_bin(src, src.with_name(src.name + "-bin"))
    shutil.rmtree(src)
    twin.rename(src)


def bin_shards(src: Path) -> list[Path]:
    return sorted(src.glob("pytorch_model*.bin"))


def second_bin_shard(src: Path) -> Path:
    """The second .bin shard the index names."""
    return src / sorted(set(json.loads((src / BIN_INDEX).read_text())["weight_map"].values()))[1]


def rewrite_zip(path: Path, entries: Callable[[list[tuple[str, bytes]]], list], deflate: str = "") -> None:
    """Rewrite a zip entry by entry after ``entries(list of (name, data))``; entries ending in ``deflate`` are
    compressed."""
    with zipfile.ZipFile(path) as z:
        items = entries([(i.filename, z.read(i)) for i in z.infolist()])
    with zipfile.ZipFile(path, "w") as z:
        for name, data in items:
            z.writestr(name, data, zipfile.ZIP_DEFLATED if deflate and name.endswith(deflate) else zipfile.ZIP_STORED)


def read_pickle(path: Path) -> OrderedDict:
    """A .bin's state dict as rmconvert's own (code-free) unpickler reads it: tensor records, not tensors."""
    from rmconvert.io.torch_zip import _StateDictUnpickler

    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        return _StateDictUnpickler(__import__("io").BytesIO(z.read(name))).load()


class TorchPickler(__import__("pickle").Pickler):
    """Pickles tensor records as ``torch.save`` pickles tensors; anything else (a payload) as pickle does."""

    def persistent_id(self, obj):
        import torch

        from rmconvert.io.torch_zip import STORAGE_DTYPES, _Storage

        if isinstance(obj, _Storage):
            kind = next(k for k, v in STORAGE_DTYPES.items() if v == obj.dtype)
            return ("storage", getattr(torch, kind), obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        import torch

        from rmconvert.io.torch_zip import _Tensor

        if isinstance(obj, _Tensor):
            args = (obj.storage, obj.offset, obj.shape, obj.stride, False, OrderedDict())
            return torch._utils._rebuild_tensor_v2, args
        return NotImplemented


def edit_pickle(path: Path, edit: Callable[[OrderedDict], None]) -> None:
    """Re-pickle the state dict of the .bin at ``path`` after ``edit(state)``."""
    import io

    state = read_pickle(path)
    edit(state)
    buffer = io.BytesIO()
    TorchPickler(buffer, protocol=2).dump(state)
    rewrite_zip(path, lambda items: [(n, buffer.getvalue() if n.endswith("/data.pkl") else d) for n, d in items])


def edit_tensor(path: Path, name: str, **fields) -> None:
    """Change a tensor record's offset, shape or stride in a .bin's pickle."""
    edit_pickle(path, lambda state: state.__setitem__(name, replace(state[name], **fields)))


def corrupt_pickle(path: Path) -> None:
    """Change one byte of the stored data.pkl (its CRC no longer matches)."""
    data = path.read_bytes()
    at = data.index(b"_rebuild_tensor_v2")
    path.write_bytes(data[:at] + b"X" + data[at + 1 :])


def legacy_bin(src: Path) -> None:
    """A pytorch_model.bin in torch's legacy (pre-1.6, not zip) format."""
    import torch

    to_bin(src)
    torch.save({"w": torch.zeros(2)}, src / BIN, _use_new_zipfile_serialization=False)


def with_value_head_file(src: Path, name: str, tensors: dict) -> None:
    """Save ``tensors`` (shapes) as a value-head side file ``name`` beside the weights."""
    import torch
    from safetensors.torch import save_file

    values = {k: torch.zeros(shape) for k, shape in tensors.items()}
    save_file(values, src / name) if name.endswith(".safetensors") else torch.save(values, src / name)


class Payload:
    """An object whose unpickling calls ``func(*args)``: what a malicious checkpoint carries."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Custom:
    """A class of the attacker's own, which unpickling would import and build."""


def plant(src: Path, payload) -> None:
    """Make ``src`` a .bin checkpoint whose pickle carries ``payload`` before every tensor."""
    to_bin(src)

    def first(state):
        items = list(state.items())
        state.clear()
        state.update({"model.payload": payload, **dict(items)})

    edit_pickle(src / BIN, first)


def marker(src: Path) -> Path:
    """The file a payload planted in ``src`` would create."""
    return src.parent / "payload-ran"


def add_f32_tensor(path: Path, name: str, shape: list[int], sparse: bool = False) -> None:
    """Add a zero F32 tensor to a safetensors file; ``sparse`` leaves its bytes a hole (no disk time)."""
    header, data = read_safetensors(path)
    nbytes = math.prod(shape) * 4
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + nbytes]}
    write_safetensors(path, header, data if sparse else data + bytes(nbytes))
    if sparse:
        os.truncate(path, path.stat().st_size + nbytes)


def nested(depth: int = 100_000) -> str:
    """JSON nested ``depth`` arrays deep: valid, but deeper than a recursive parser can follow."""
    return "[" * depth + "]" * depth


def add_score_head(src: Path, rows: int, labels: int | None = None) -> None:
    """Make the source a reward model: a ``[rows, hidden]`` score.weight, and ``labels`` labels in config.json."""
    hidden = json.loads((src / CONFIG).read_text())["hidden_size"]
    add_f32_tensor(src / SINGLE, "score.weight", [rows, hidden])
    if labels:
        edit_json(src / CONFIG, lambda c: c.update(id2label={str(i): f"LABEL_{i}" for i in range(labels)}))


def add_token(src: Path, token_id: int) -> None:
    """Add a special token with id ``token_id`` to tokenizer.json."""
    entry = {
        "id": token_id,
        "content": "<far>",
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }
    edit_json(src / TOKENIZER, lambda t: t["added_tokens"].append(entry))


def without_unk(src: Path) -> None:
    """Llama 2's tokenizer with no unknown token declared: only <s> and </s> are left, and neither may pad."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # transformers 4 writes both
        if (src / name).exists():
            edit_json(src / name, lambda c: c.pop("unk_token", None))


# --- the catalogue -----------------------------------------------------------------------------

Culprit = str | Callable[[Path], Path]
FAR_TOKEN_ID = 1 << 62  # a vocabulary this size cannot be allocated (nor should an attempt be made)


def source_case(name, problem, damage, culprit: Culprit = SINGLE, *, sharded=False, options=()):
    """A damaged source: ``damage(src)``; the error must name ``culprit`` (relative to src, or a function of it)."""
    return pytest.param(damage, culprit, problem, sharded, tuple(options), id=name)


def second_shard(src: Path) -> Path:
    """The second shard of a sharded checkpoint."""
    return shards(src)[1]


def last_shard(src: Path) -> Path:
    """The last shard of a sharded checkpoint."""
    return shards(src)[-1]


def misplace(src: Path, tensor: str) -> None:
    """Make the index put ``tensor`` in a shard that does not hold it."""
    remap(src, tensor, next(p.name for p in shards(src) if tensor not in read_safetensors(p)[0]))


# fmt: off
BAD_SOURCES = [
    # safetensors files
    source_case("truncated-shard", "truncated: tensors end at byte", lambda s: cut(s / SINGLE, 100)),
    source_case("truncated-shard-json", "truncated: tensors end at byte", lambda s: cut(s / SINGLE, 100),
                options=["--json"]),
    source_case("shorter-than-length-prefix", "shorter than the 8-byte header length",
                lambda s: (s / SINGLE).write_bytes(b"\x10\0\0\0")),
    source_case("header-length-past-eof", "truncated: header length",
                lambda s: set_header_length(s / SINGLE, (s / SINGLE).stat().st_size)),
    source_case("header-length-over-limit", "exceeds the 100000000-byte limit",
                lambda s: set_header_length(s / SINGLE, 1 << 40)),
    source_case("header-not-json", "header is not valid JSON", lambda s: replace_header_text(s / SINGLE, b"{not json")),
    source_case("header-not-utf8", "header is not valid JSON", lambda s: replace_header_text(s / SINGLE, b"{\xff\xfe}")),
    source_case("header-not-object", "header is not a JSON object", lambda s: replace_header_text(s / SINGLE, b"[]")),
    source_case("header-duplicate-key", "duplicate key", lambda s: duplicate_key(s / SINGLE)),
    source_case("header-deeply-nested", "header is not valid JSON",
                lambda s: replace_header_text(s / SINGLE, nested().encode())),
    source_case("unknown-dtype", f"tensor {EMBEDDING!r}: unknown dtype 'F33'",
                lambda s: set_entry(s / SINGLE, EMBEDDING, dtype="F33")),
    source_case("embedding-not-float", f"{EMBEDDING} has dtype I32; expected one of",
                lambda s: set_entry(s / SINGLE, EMBEDDING, dtype="I32")),
    source_case("negative-shape", "is not a list of non-negative integers",
                lambda s: set_entry(s / SINGLE, EMBEDDING, shape=[-1, 64])),
    source_case("entry-missing-dtype", "entry must have exactly dtype, shape, data_offsets",
                lambda s: edit_header(s / SINGLE, lambda h: h[EMBEDDING].pop("dtype"))),
    source_case("offsets-disagree-with-shape", "data_offsets span",
                lambda s: edit_header(s / SINGLE, lambda h: h[EMBEDDING]["shape"].__setitem__(0, 1))),
    source_case("offsets-overlap", "overlaps the previous tensor", lambda s: shift_second_tensor(s / SINGLE, -4)),
    source_case("offsets-hole", "leaves a hole before it", lambda s: shift_second_tensor(s / SINGLE, 4)),
    source_case("trailing-bytes", "trailing bytes after the data", lambda s: append(s / SINGLE, b"\0" * 8)),
    # sharded checkpoints and their index
    source_case("missing-shard", "cannot read: No such file or directory", lambda s: second_shard(s).unlink(),
                second_shard, sharded=True),
    source_case("truncated-second-shard", "truncated: tensors end at byte", lambda s: cut(second_shard(s), 4),
                second_shard, sharded=True),
    source_case("tensor-in-two-shards", "is also in",
                lambda s: copy_tensor(last_shard(s), shards(s)[0], first_tensor(last_shard(s))),
                last_shard, sharded=True),
    source_case("index-names-absent-tensor", "weight_map names 'model.ghost.weight', which no shard holds",
                lambda s: remap(s, "model.ghost.weight", shards(s)[0].name), INDEX, sharded=True),
    source_case("index-names-wrong-shard", f"weight_map puts {EMBEDDING!r} in",
                lambda s: misplace(s, EMBEDDING), INDEX, sharded=True),
    source_case("index-names-outside-file", "which is not a file in the checkpoint",
                lambda s: remap(s, EMBEDDING, f"../{shards(s)[0].name}"), INDEX, sharded=True),
    source_case("index-not-json", "invalid JSON", lambda s: (s / INDEX).write_text('{"weight_map": '), INDEX,
                sharded=True),
    source_case("index-without-weight-map", "weight_map must map tensor names to file names",
                lambda s: (s / INDEX).write_text('{"metadata": {}}'), INDEX, sharded=True),
    # config.json
    source_case("config-not-json", "invalid JSON", lambda s: (s / CONFIG).write_text("{'model_type': 'llama'}"), CONFIG),
    source_case("config-not-object", "not a JSON object", lambda s: (s / CONFIG).write_text('["llama"]'), CONFIG),
    source_case("config-missing", "missing", lambda s: (s / CONFIG).unlink(), CONFIG),
    source_case("config-deeply-nested", "invalid JSON", lambda s: (s / CONFIG).write_text(nested()), CONFIG),
    source_case("config-without-model-type", "no model_type",
                lambda s: edit_json(s / CONFIG, lambda c: c.pop("model_type")), CONFIG),
    *[
        source_case(f"model-type-{t}", f"no installed plugin converts model_type {t!r}",
                    lambda s, t=t: edit_json(s / CONFIG, lambda c: c.update(model_type=t)), CONFIG)
        for t in ("bert", "bart", "t5", "no-such-model")
    ],
    source_case("hidden-size-not-int", "vocab_size and hidden_size must be positive integers",
                lambda s: edit_json(s / CONFIG, lambda c: c.update(hidden_size="64")), CONFIG),
    source_case("embedding-disagrees-with-vocab-size", "but config.json says vocab_size=",
                lambda s: edit_json(s / CONFIG, lambda c: c.update(vocab_size=c["vocab_size"] + 7))),
    source_case("no-embedding-tensor", f"no tensor {EMBEDDING!r}: the llama layout expects it",
                lambda s: edit_header(s / SINGLE, lambda h: h.update({"model.embedding.weight": h.pop(EMBEDDING)})),
                "."),
    source_case("id2label-disagrees-with-3-row-head", "id2label has 2 labels but score.weight has 3 rows",
                lambda s: add_score_head(s, rows=3, labels=2), CONFIG),
    source_case("id2label-disagrees-with-head", "id2label has 2 labels but score.weight has 1 row",
                lambda s: add_score_head(s, rows=1, labels=2), CONFIG),
    source_case("id2label-disagrees-with-2-row-head", "id2label has 1 label but score.weight has 2 rows",
                lambda s: add_score_head(s, rows=2, labels=1), CONFIG),
    source_case("arch-does-not-match", "which --arch olmo2 does not convert", lambda s: None, CONFIG,
                options=["--arch", "olmo2"]),
    # tokenizer and weight files
    source_case("tokenizer-missing", "missing: rmconvert reads the vocabulary from a fast tokenizer",
                lambda s: (s / TOKENIZER).unlink(), TOKENIZER),
    source_case("tokenizer-not-json", "invalid JSON", lambda s: cut(s / TOKENIZER, 10), TOKENIZER),
    source_case("tokenizer-without-model", "no model vocabulary or added_tokens list",
                lambda s: edit_json(s / TOKENIZER, lambda t: t.pop("model")), TOKENIZER),
    source_case("token-id-far-beyond-vocab", str(FAR_TOKEN_ID), lambda s: add_token(s, FAR_TOKEN_ID), TOKENIZER),
    source_case("only-fake-pytorch-model-bin", "truncated or corrupt zip", only_pickle, BIN),
    source_case("no-weights", f"no {SINGLE}, {INDEX}, {BIN} or {BIN_INDEX}", lambda s: (s / SINGLE).unlink(), "."),
    # .bin weights (torch zip)
    source_case("bin-truncated", "truncated or corrupt zip", lambda s: (to_bin(s), cut(s / BIN, 100)), BIN),
    source_case("bin-corrupt-pickle", "corrupt zip: Bad CRC-32", lambda s: (to_bin(s), corrupt_pickle(s / BIN)), BIN),
    source_case("bin-compressed-entry", "is compressed or encrypted",
                lambda s: (to_bin(s), rewrite_zip(s / BIN, list, deflate="data/0")), BIN),
    source_case("bin-legacy-format", "legacy (pre-zip) torch file", legacy_bin, BIN),
    source_case("bin-not-a-state-dict", "is not a tensor",
                lambda s: (to_bin(s), edit_pickle(s / BIN, lambda st: st.update(step=3))), BIN),
    source_case("bin-offset-past-storage", "run past its storage",
                lambda s: (to_bin(s), edit_tensor(s / BIN, EMBEDDING, offset=64)), BIN),
    source_case("bin-size-past-storage", "run past its storage",
                lambda s: (to_bin(s), edit_tensor(s / BIN, EMBEDDING, shape=(294, 64))), BIN),
    source_case("bin-non-contiguous-view", "is a non-contiguous view",
                lambda s: (to_bin(s), edit_tensor(s / BIN, EMBEDDING, shape=(64, 293), stride=(1, 64))), BIN),
    source_case("bin-index-names-missing-shard", "cannot read: No such file or directory",
                lambda s: (to_bin(s), second_bin_shard(s).unlink()),
                lambda s: s / bin_name(second_shard(s).name), sharded=True),
    source_case("bin-index-mixes-formats", "weight_map mixes .bin and .safetensors files",
                lambda s: (to_bin(s), edit_json(s / BIN_INDEX, lambda i: i["weight_map"].update(
                    {EMBEDDING: "model-00001-of-00004.safetensors"}))), BIN_INDEX, sharded=True),
    source_case("safetensors-index-mixes-formats", "weight_map mixes .bin and .safetensors files",
                lambda s: remap(s, EMBEDDING, BIN), INDEX, sharded=True),
    # value heads
    source_case("value-head-wrong-width", "a value head is [1, hidden_size=64]",
                lambda s: with_value_head_file(s, "value_head.safetensors", {
                    "v_head.summary.weight": [1, 48], "v_head.summary.bias": [1]}), "value_head.safetensors"),
    source_case("value-head-bin-wrong-width", "a value head is [1, hidden_size=64]",
                lambda s: with_value_head_file(s, "value_head.bin", {"v_head.summary.weight": [2, 64]}),
                "value_head.bin"),
    source_case("value-head-file-holds-other-tensors", "a value head file holds only",
                lambda s: with_value_head_file(s, "value_head.safetensors", {"score.weight": [1, 64]}),
                "value_head.safetensors"),
    source_case("pad-existing-none-qualifies", "--pad-token existing: no token qualifies as pad", without_unk,
                TOKENIZER, options=["--pad-token", "existing"]),
]
# fmt: on


@dataclass
class Workspace:
    """Where a case sets its scene: private copies of tiny checkpoints in a fresh directory."""

    build: Callable
    copy: Callable
    tmp: Path

    def source(self, sharded: bool = False, name: str = "src") -> Path:
        """A private copy of a tiny Llama 2 checkpoint (several shards and an index when ``sharded``)."""
        return self.copy(self.build("llama2", max_shard_size="100KB") if sharded else self.build("llama2"), name)

    def dst(self) -> Path:
        """A destination path (not created) in a directory of its own."""
        parent = self.tmp / "out"
        parent.mkdir(exist_ok=True)
        return parent / "rm"


@pytest.fixture
def ws(build, writable_copy, tmp_path) -> Workspace:
    """This test's workspace."""
    return Workspace(build, writable_copy, tmp_path)


def check_refused(src: Path, dst: Path, args, culprit, problem: str) -> None:
    """Run ``convert SRC DST *args``; expect one error line, SRC and DST as they were, no staging left."""
    before = state(src), state(dst)
    result = rmconvert("convert", src, dst, *args)
    assert_one_error(result, culprit, problem)
    assert (state(src), state(dst)) == before
    assert leftovers(dst.parent, src.parent, src) == []


@pytest.mark.parametrize("damage, culprit, problem, sharded, options", BAD_SOURCES)
def test_convert_refuses_bad_source(ws, damage, culprit, problem, sharded, options):
    src = ws.source(sharded)
    where = culprit(src) if callable(culprit) else src / culprit if culprit != "." else src
    damage(src)
    check_refused(src, ws.dst(), options, where, problem)


@pytest.mark.parametrize("rows, labels", [(1, 2), (2, 1)])
def test_label_and_row_counts_are_said_in_the_singular_for_one(ws, rows, labels):
    """``1 row``, ``1 label``: the whole message, to its end (the cases above match a part of it)."""
    src = ws.source(name=f"src-{rows}")
    add_score_head(src, rows=rows, labels=labels)
    expected = {
        1: "id2label has 2 labels but score.weight has 1 row",
        2: "id2label has 1 label but score.weight has 2 rows",
    }
    result = rmconvert("convert", src, ws.dst())
    assert_one_error(result, src / CONFIG, expected[rows])
    assert result.stderr.rstrip("\n").endswith(expected[rows]), result.stderr


PAYLOADS = {
    "os.system": lambda m: Payload(os.system, f"touch {m}"),
    "builtins.eval": lambda m: Payload(eval, f"open({str(m)!r}, 'w').close()"),
    "subprocess.Popen": lambda m: Payload(subprocess.Popen, ["touch", str(m)]),
    "custom class": lambda m: Custom(),
}


@pytest.mark.parametrize("kind", PAYLOADS)
def test_malicious_pickle_never_runs(ws, kind):
    """A pickle naming a forbidden global is refused, naming the file and the global, before anything runs:
    by convert and by validate. (The os.system and eval payloads are live: plain pickle runs them.)"""
    src = ws.source()
    plant(src, PAYLOADS[kind](marker(src)))
    assert not marker(src).exists()
    global_name = {"custom class": "Custom"}.get(kind, kind.split(".")[-1])
    check_refused(src, ws.dst(), (), src / BIN, "the pickle names ")
    assert global_name in rmconvert("convert", src, ws.dst()).stderr
    checked = rmconvert("validate", src)
    assert checked.exit_code == 1 and "RM001" in checked.stdout and global_name in checked.stdout
    assert not marker(src).exists()
    if kind in ("os.system", "builtins.eval"):  # proof that the payload is real: an ordinary unpickler runs it
        import pickle

        with zipfile.ZipFile(src / BIN) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
        with pytest.raises(pickle.UnpicklingError):  # the payload runs first, then torch's storages fail
            pickle.loads(data)
        assert marker(src).exists()


class Scene(NamedTuple):
    """A command line ``convert SRC DST *options`` and the file or directory its error must name."""

    src: Path
    dst: Path
    culprit: Path
    options: tuple[str, ...] = ()


def dst_is_src(ws):
    """DST is SRC itself."""
    src = ws.source()
    return Scene(src, src, src)


def dst_inside_src(ws):
    """DST would be a subdirectory of SRC."""
    src = ws.source()
    return Scene(src, src / "rm", src / "rm")


def dst_contains_src(ws):
    """SRC is inside DST."""
    src = ws.source(name="box/src")
    return Scene(src, src.parent, src.parent)


def dst_symlink_to_src(ws):
    """DST is a symlink to SRC."""
    src, dst = ws.source(), ws.dst()
    dst.symlink_to(src, target_is_directory=True)
    return Scene(src, dst, src)


def dst_is_file(ws):
    """DST is an existing regular file."""
    dst = ws.dst()
    dst.write_text("not a directory\n")
    return Scene(ws.source(), dst, dst)


def dst_not_empty(ws):
    """DST is a directory with a file in it, and --overwrite is not given."""
    dst = ws.dst()
    dst.mkdir()
    (dst / "keep.txt").write_text("precious\n")
    return Scene(ws.source(), dst, dst)


def bad_source_into_empty_dst(ws):
    """A truncated source and an existing empty DST, which must stay as it is."""
    src, dst = ws.source(), ws.dst()
    cut(src / SINGLE, 100)
    dst.mkdir()
    return Scene(src, dst, src / SINGLE)


def bad_source_with_overwrite(ws):
    """A truncated source with --overwrite: the old DST must survive the failed run."""
    src, dst = dst_not_empty(ws)[:2]
    cut(src / SINGLE, 100)
    return Scene(src, dst, src / SINGLE, ("--overwrite",))


def dst_parent_missing(ws):
    """DST's parent directory does not exist."""
    dst = ws.tmp / "nowhere" / "rm"
    return Scene(ws.source(), dst, dst.parent)


def dst_name_too_long(ws):
    """DST's name is longer than any file name can be."""
    dst = ws.dst().with_name("d" * 300)
    return Scene(ws.source(), dst, dst)


def dst_name_too_long_for_staging(ws):
    """DST's name fits, but ``.<name>.<random>.rmconvert-tmp`` does not."""
    dst = ws.dst().with_name("d" * 250)
    return Scene(ws.source(), dst, dst.parent)


def src_missing(ws):
    """SRC does not exist."""
    src = ws.tmp / "no-such-src"
    return Scene(src, ws.dst(), src)


def src_name_too_long(ws):
    """SRC's name is longer than any file name can be."""
    src = ws.tmp / ("s" * 300)
    return Scene(src, ws.dst(), src)


def src_is_file(ws):
    """SRC is a safetensors file, not a checkpoint directory."""
    src = ws.tmp / "weights.safetensors"
    shutil.copy(ws.build("llama2") / SINGLE, src)
    return Scene(src, ws.dst(), src)


# fmt: off
BAD_PATHS = [
    pytest.param(dst_is_src, "destination is the source checkpoint", id="dst-is-src"),
    pytest.param(dst_inside_src, "destination is inside the source checkpoint", id="dst-inside-src"),
    pytest.param(dst_contains_src, "destination contains the source checkpoint", id="dst-contains-src"),
    pytest.param(dst_symlink_to_src, "destination is the source checkpoint", id="dst-symlink-to-src"),
    pytest.param(dst_is_file, "exists and is not a directory", id="dst-is-file"),
    pytest.param(dst_not_empty, "exists and is not empty (use --overwrite to replace it)", id="dst-not-empty"),
    pytest.param(bad_source_into_empty_dst, "truncated", id="bad-source-into-empty-dst"),
    pytest.param(bad_source_with_overwrite, "truncated", id="bad-source-with-overwrite"),
    pytest.param(dst_parent_missing, "parent directory does not exist", id="dst-parent-missing"),
    pytest.param(dst_name_too_long, "File name too long", id="dst-name-too-long"),
    pytest.param(dst_name_too_long_for_staging, "cannot create a working directory: File name too long",
                 id="dst-name-too-long-for-staging"),
    pytest.param(src_missing, "no such directory", id="src-missing"),
    pytest.param(src_name_too_long, "File name too long", id="src-name-too-long"),
    pytest.param(src_is_file, "not a checkpoint directory", id="src-is-file"),
]
# fmt: on


@pytest.mark.parametrize("scene, problem", BAD_PATHS)
def test_convert_refuses_bad_paths(ws, scene, problem):
    src, dst, culprit, options = scene(ws)
    check_refused(src, dst, options, culprit, problem)


# fmt: off
BAD_USAGE = [
    pytest.param(["--arch", "nosuch"], "unknown architecture 'nosuch'", id="arch-unknown"),
    pytest.param(["--head", "bogus"], "'bogus' is not one of 'scalar', 'bt'", id="head-bogus"),
    pytest.param(["--init-std", "-1"], "--init-std must be a positive number", id="init-std-negative"),
    pytest.param(["--init-std", "nan"], "--init-std must be a positive number", id="init-std-nan"),
    pytest.param(["--from-bt", "sum"], "'sum' is not one of 'row1', 'difference'", id="from-bt-bogus"),
    pytest.param(["--pad-token", ""], "--pad-token must not be empty", id="pad-token-empty"),
    pytest.param(["--dtype", "int8"], "'int8' is not one of", id="dtype-bogus"),
    pytest.param(["--max-shard-size", "banana"], "--max-shard-size 'banana' is not a size", id="max-shard-size-bogus"),
    pytest.param(["--max-shard-size", "0"], "--max-shard-size must be positive", id="max-shard-size-zero"),
    pytest.param(["--seed", "one"], "'one' is not a valid integer", id="seed-not-int"),
    pytest.param(["--no-such-option"], "No such option '--no-such-option'", id="unknown-option"),
    pytest.param(["--revision", "../../models--other--repo/refs/main"], "is not a branch, tag or commit: empty parts,"
                 " '.' and '..' are not allowed", id="revision-escapes-the-cache"),
    pytest.param(["--revision", "/etc/passwd"], "is not a branch, tag or commit: absolute paths", id="revision-absolute"),
    pytest.param(["--revision", ""], "--revision '' is not a branch, tag or commit: it is empty", id="revision-empty"),
    pytest.param(["--revision", "v2"], "--revision applies to a Hugging Face repo id, but", id="revision-of-a-directory"),
]
# fmt: on


@pytest.mark.parametrize("options, problem", BAD_USAGE)
def test_convert_usage_errors(ws, options, problem):
    src, dst = ws.source(), ws.dst()
    before = state(src)
    result = rmconvert("convert", src, dst, *options)
    assert_no_crash(result)
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith("Error: "), result.stderr
    assert problem in result.stderr.splitlines()[-1]
    assert state(src) == before
    assert state(dst) is None
    assert leftovers(dst.parent) == []


@pytest.mark.parametrize("pad", ["eos", "</s>", "<newpad>"])
def test_convert_refuses_a_pad_token_that_would_move_xglms_position_table(ws, pad):
    """XGLM's pad id is also the row its position table skips: another pad id changes every reward."""
    src, dst = ws.copy(ws.build("xglm")), ws.dst()
    before = state(src)
    result = rmconvert("convert", src, dst, "--pad-token", pad)
    assert_no_crash(result)
    assert result.exit_code == 2, result.stderr
    assert "pad id indexes its position table" in result.stderr.splitlines()[-1]
    assert "use --pad-token keep" in result.stderr.splitlines()[-1]
    assert (state(src), state(dst), leftovers(dst.parent)) == (before, None, [])


def test_convert_refuses_an_xglm_whose_pad_is_its_eos(ws):
    """pad = eos (as HALOs sets it): the automatic pad would move the position table's pad row: exit 1."""
    src = ws.copy(ws.build("xglm"))
    edit_json(src / CONFIG, lambda c: c.__setitem__("pad_token_id", c["eos_token_id"]))
    check_refused(src, ws.dst(), [], src / CONFIG, "xglm's pad id indexes its position table")


def test_convert_missing_dst_argument(ws):
    result = rmconvert("convert", ws.source())
    assert_no_crash(result)
    assert result.exit_code == 2
    assert "Missing argument 'DST'" in result.stderr


# --- sources that are neither a directory nor a Hub repo id -------------------------------------

NOT_A_REPO_ID = "no such directory, and not a Hugging Face repo id: "

# fmt: off
BAD_SPECS = [
    pytest.param("org/..", NOT_A_REPO_ID + "'.' and '..' are not names", id="repo-id-dotdot"),
    pytest.param("../org/name", NOT_A_REPO_ID + "'.' and '..' are not names", id="repo-id-leading-dotdot"),
    pytest.param("org/../../etc", NOT_A_REPO_ID + "'.' and '..' are not names", id="repo-id-climbing-out"),
    pytest.param("org\\name", NOT_A_REPO_ID + "backslashes are not allowed", id="repo-id-backslash"),
    pytest.param("org//name", NOT_A_REPO_ID + "an empty part", id="repo-id-empty-part"),
    pytest.param("org/name/", NOT_A_REPO_ID + "an empty part", id="repo-id-trailing-slash"),
]
# fmt: on


@pytest.mark.parametrize("spec, problem", BAD_SPECS)
def test_specs_that_would_leave_the_cache_are_refused(ws, monkeypatch, spec, problem):
    """Shaped like a repo id but not one: never looked up in the Hugging Face cache, refused in one line."""
    monkeypatch.chdir(ws.tmp)
    dst = ws.dst()
    for args in (["convert", spec, dst], ["validate", spec], ["validate", ws.source(), "--against", spec]):
        assert_one_error(rmconvert(*args), spec, problem)
    assert state(dst) is None
    assert leftovers(dst.parent) == []


def test_an_absolute_path_is_never_a_repo_id(ws):
    src = ws.tmp / "org" / "name"
    check_refused(src, ws.dst(), [], src, "no such directory")
    assert rmconvert("convert", src, ws.dst()).stderr.count("repo id") == 0


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["convert", "tiny-org/absent", "{dst}"], id="convert"),
        pytest.param(["validate", "tiny-org/absent"], id="validate"),
        pytest.param(["validate", "{src}", "--against", "tiny-org/absent"], id="validate-against"),
    ],
)
def test_repo_id_not_in_the_cache_offline(ws, args):
    """One line naming the repo and what to do; nothing at DST, nothing written into the cache."""
    cache, dst = ws.tmp / "hf-cache", ws.dst()
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HOME=str(ws.tmp / "hf-home"), HF_HUB_OFFLINE="1")
    src = ws.source()
    command = [rmconvert_script(), *(a.format(dst=dst, src=src) for a in args)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ws.tmp, check=False)
    result = ProcessResult(done.returncode, done.stdout, done.stderr)
    assert_one_error(result, "tiny-org/absent", "not in the Hugging Face cache")
    assert "run once online, or `hf download tiny-org/absent`" in result.stderr
    assert list(cache.iterdir()) == []
    assert state(dst) is None


class ProcessResult(NamedTuple):
    """A finished process, shaped like click's Result for the assertions above."""

    exit_code: int
    stdout: str
    stderr: str
    exception: None = None

    @property
    def output(self) -> str:
        return self.stdout


# --- --overwrite ------------------------------------------------------------------------------


def test_overwrite_replaces_non_empty_dst(ws):
    src, dst = ws.source(), ws.dst()
    dst.mkdir()
    (dst / "stale.txt").write_text("old run\n")
    (dst / "old-shard.safetensors").write_bytes(b"\0" * 16)
    before = state(src)

    result = rmconvert("convert", src, dst, "--overwrite")
    assert_no_crash(result)
    assert result.exit_code == 0, result.stderr
    assert "rmconvert: error" not in result.stderr
    assert not (dst / "stale.txt").exists() and not (dst / "old-shard.safetensors").exists()
    assert (dst / SINGLE).is_file() and (dst / "rmconvert.json").is_file()
    assert state(src) == before
    assert leftovers(dst.parent) == []

    checked = rmconvert("validate", dst)
    assert_no_crash(checked)
    assert checked.exit_code == 0, checked.stderr
    assert checked.stdout.splitlines()[-1] == f"{dst}: valid (0 errors, 0 warnings)"


# --- validate ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(build, tmp_path_factory) -> Path:
    """A sound reward model converted from the tiny Llama 2 (read-only; copy it to damage it)."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    result = rmconvert("convert", build("llama2"), out)
    assert result.exit_code == 0, result.stderr
    return out


def reward_model_copy(damage):
    """A scene: a private copy of the reward model, damaged by ``damage(path)``."""

    def scene(ws, reward_model):
        path = ws.copy(reward_model, "rm")
        damage(path)
        return path

    return scene


# fmt: off
BAD_REWARD_MODELS = [
    pytest.param(lambda ws, rm: ws.tmp / "no-such-rm", "RM001", "no-such-rm", "no such directory", id="missing"),
    pytest.param(reward_model_copy(lambda p: cut(p / SINGLE, 100)), "RM001", SINGLE, "truncated", id="truncated-shard"),
    pytest.param(reward_model_copy(lambda p: replace_header_text(p / SINGLE, b"{oops")), "RM001", SINGLE,
                 "header is not valid JSON", id="header-not-json"),
    pytest.param(reward_model_copy(lambda p: (p / CONFIG).write_text("{")), "RM001", CONFIG, "invalid JSON",
                 id="config-not-json"),
    pytest.param(reward_model_copy(lambda p: (p / CONFIG).write_text(nested())), "RM001", CONFIG, "invalid JSON",
                 id="config-deeply-nested"),
    pytest.param(lambda ws, rm: ws.tmp / ("v" * 300), "RM001", "v" * 300, "File name too long", id="name-too-long"),
    pytest.param(reward_model_copy(lambda p: (p / TOKENIZER).unlink()), "RM060", TOKENIZER, "missing",
                 id="tokenizer-missing"),
    pytest.param(reward_model_copy(lambda p: cut(p / TOKENIZER, 10)), "RM060", TOKENIZER, "invalid JSON",
                 id="tokenizer-not-json"),
    pytest.param(lambda ws, rm: ws.source(), "RM010", SINGLE, "no score head", id="causal-lm-not-a-reward-model"),
]
# fmt: on


@pytest.mark.parametrize("scene, code, file, problem", BAD_REWARD_MODELS)
def test_validate_reports_bad_checkpoint(ws, reward_model, scene, code, file, problem):
    path = scene(ws, reward_model)
    before = state(path)
    result = rmconvert("validate", path)
    assert_no_crash(result)
    assert result.exit_code == 1, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()  # a table: CODE SEVERITY FILE WHERE MESSAGE, fix lines, a verdict
    matching = [line for line in lines if re.match(rf"{code}\s+error\s", line) and problem in line]
    assert len(matching) == 1, result.stdout
    assert re.search(rf"\s(\S*/)?{re.escape(file)}\s", matching[0]), matching[0]
    assert re.fullmatch(rf"{re.escape(str(path))}: invalid \(\d+ errors, \d+ warnings\)", lines[-1]), lines[-1]
    assert state(path) == before


def policy_without_tokenizer(ws):
    """A policy directory with weights and config but no tokenizer.json."""
    policy = ws.source(name="policy")
    (policy / TOKENIZER).unlink()
    return policy


def policy_missing(ws):
    return ws.tmp / "no-such-policy"


def policy_of_another_family(ws):
    """An OLMo 2 policy for a Llama reward model: the same words at other ids."""
    return ws.copy(ws.build("olmo2"), "policy")


# fmt: off
BAD_POLICIES = [
    pytest.param(policy_without_tokenizer, TOKENIZER, "missing: rmconvert reads the vocabulary", id="no-tokenizer"),
    pytest.param(policy_missing, "", "no such directory", id="missing-directory"),
    pytest.param(policy_of_another_family, TOKENIZER, "not the reward model's tokenizer family: 0 of its 300 tokens",
                 id="another-family"),
]
# fmt: on


@pytest.mark.parametrize("scene, culprit, problem", BAD_POLICIES)
def test_validate_refuses_bad_policy(ws, reward_model, scene, culprit, problem):
    policy = scene(ws)
    before = state(reward_model), state(policy)
    result = rmconvert("validate", reward_model, "--policy", policy)
    assert_one_error(result, policy / culprit, problem)
    assert (state(reward_model), state(policy)) == before


# --- interrupted conversions -------------------------------------------------------------------

GiB = 1 << 30
GRACE_SECONDS = 10  # what `docker stop` allows between SIGTERM and SIGKILL


def rmconvert_script() -> str:
    """The installed ``rmconvert`` console script of this Python environment."""
    script = Path(sys.executable).with_name("rmconvert")
    found = str(script) if script.exists() else shutil.which("rmconvert")
    assert found, "the rmconvert console script is not installed"
    return found


def slow_source(ws: Workspace, nbytes: int) -> Path:
    """A tiny Llama 2 plus one ``nbytes`` tensor of holes: slow to copy and hash, free to create."""
    src = ws.source()
    add_f32_tensor(src / SINGLE, "model.extra.weight", [nbytes // 4], sparse=True)
    return src


def fingerprint(path: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file under ``path``: any write shows, without hashing gigabytes of holes."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


def _default_sigint() -> None:
    """In the child, before exec: undo an inherited SIG_IGN so that Python installs its SIGINT handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_conversion(src: Path, dst: Path) -> subprocess.Popen:
    """``rmconvert convert SRC DST`` as a separate process, as a user or a job scheduler runs it."""
    # A test run started in the background ignores SIGINT, and its children would inherit that.
    sigint_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    return subprocess.Popen(
        [rmconvert_script(), "convert", str(src), str(dst)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint if sigint_ignored else None,  # noqa: PLW1509 (only a signal call)
    )


def wait_for_copy(proc: subprocess.Popen, dst: Path, timeout: float = 120) -> None:
    """Return once a shard is being written into DST's staging directory; fail if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"rmconvert ended (exit {proc.returncode}) before it could be interrupted: {proc.stderr.read()}"
            )
        if any(p.stat().st_size > 0 for p in dst.parent.glob(f".{dst.name}.*.rmconvert-tmp/*.safetensors")):
            return
        time.sleep(0.002)
    pytest.fail("rmconvert never started writing")


def assert_interrupted(returncode: int, stdout: str, stderr: str) -> None:
    """Exit 130 with one ``rmconvert: error: ... interrupted ...`` line (after progress lines only)."""
    assert returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    assert stdout == ""
    *progress, last = stderr.splitlines()
    assert last.startswith("rmconvert: error: ") and "interrupted" in last, stderr
    assert all(re.fullmatch(r"\[\d+/\d+\] \S+", line) for line in progress), stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_conversion_leaves_nothing(ws, signum):
    src, dst = slow_source(ws, GiB), ws.dst()
    before = fingerprint(src)
    proc = start_conversion(src, dst)
    try:
        wait_for_copy(proc, dst)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_interrupted(proc.returncode, stdout, stderr)
    assert state(dst) is None
    assert leftovers(dst.parent) == []
    assert fingerprint(src) == before


def test_sigterm_cleans_up_within_a_grace_period(ws):
    """A scheduler sends SIGTERM, then SIGKILL: cleanup must not wait for the rest of a big source to be read."""
    src, dst = slow_source(ws, 64 * GiB), ws.dst()  # reading it all takes far longer than the grace period
    proc = start_conversion(src, dst)
    try:
        wait_for_copy(proc, dst)
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        left = leftovers(dst.parent)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for path in dst.parent.glob(f".{dst.name}.*"):  # a partial copy can be gigabytes
            shutil.rmtree(path, ignore_errors=True)
    assert proc.returncode != -signal.SIGKILL, f"still running {GRACE_SECONDS} s after SIGTERM; killed, leaving {left}"
    assert_interrupted(proc.returncode, stdout, stderr)
    assert left == []
    assert state(dst) is None


# --- LoRA adapters (--adapter) -----------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def lora_adapter(build, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter of the tiny Llama 2 (read-only; copy it to damage it); made by peft (test extra)."""
    from rmconvert.testing import build_adapter

    path = tmp_path_factory.mktemp("adapter") / "adapter"
    return build_adapter(build("llama2"), path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def edit_adapter_tensors(adapter: Path, edit: Callable[[dict], None]) -> None:
    """Let ``edit`` change the adapter's tensors (a dict of torch tensors), then save them again."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, adapter / ADAPTER_WEIGHTS)


def resize_lora(part: str, rows: slice | None = None, columns: slice | None = None):
    """An edit: every LoRA ``part`` (lora_A or lora_B) cut to ``rows`` and ``columns``, or grown by one rank."""

    def edit(tensors):
        import torch

        for key in [k for k in tensors if f".{part}." in k]:
            t = tensors[key]
            tensors[key] = t[rows or slice(None), columns or slice(None)].contiguous() if rows or columns else (
                torch.cat([t, t[:, :1]], dim=1))  # fmt: skip

    return edit


def other_family_base(adapter: Path) -> None:
    """base_model_name_or_path names a local GPT-2 checkpoint (only its config matters)."""
    other = adapter.parent / "gpt2-base"
    other.mkdir()
    (other / CONFIG).write_text(json.dumps({"model_type": "gpt2"}))
    edit_json(adapter / ADAPTER_CONFIG, lambda c: c.update(base_model_name_or_path=str(other)))


def rename_modules(tensors: dict) -> None:
    """Module names of another family (GPT-2's transformer.h.N) for every LoRA tensor."""
    for key in list(tensors):
        tensors[key.replace("model.model.layers.", "model.transformer.h.")] = tensors.pop(key)


def adapter_case(name, problem, damage, culprit=ADAPTER_WEIGHTS, *, as_source=False):
    """A damaged adapter: ``damage(adapter)``; ``culprit`` is relative to the adapter ("." for itself).
    ``as_source`` runs ``convert ADAPTER DST`` (the base from base_model_name_or_path), else ``convert SRC DST
    --adapter ADAPTER``."""
    return pytest.param(damage, culprit, problem, as_source, id=name)


def pickled_adapter_with_payload(adapter: Path) -> None:
    """The adapter's weights as ``adapter_model.bin`` whose pickle carries an ``os.system`` payload first."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(adapter / ADAPTER_WEIGHTS), adapter / "adapter_model.bin")
    (adapter / ADAPTER_WEIGHTS).unlink()
    payload = Payload(os.system, f"touch {adapter.parent / 'payload-ran'}")
    edit_pickle(adapter / "adapter_model.bin", lambda state: state.update({"payload": payload}))


# fmt: off
BAD_ADAPTERS = [
    adapter_case("rank-of-a-and-b-differ", "A has rank 4 but B has rank 5",
                 lambda a: edit_adapter_tensors(a, resize_lora("lora_B"))),
    adapter_case("rank-disagrees-with-config", "A and B have rank 4 but adapter_config.json gives r=2",
                 lambda a: edit_json(a / ADAPTER_CONFIG, lambda c: c.update(r=2))),
    adapter_case("wrong-hidden-size", "the adapter does not fit this model",
                 lambda a: edit_adapter_tensors(a, resize_lora("lora_A", columns=slice(0, 32)))),
    adapter_case("target-module-matches-nothing", "target_modules entry 'wq' matches no tensor of BASE",
                 lambda a: edit_json(a / ADAPTER_CONFIG, lambda c: c.update(target_modules=["q_proj", "wq"])),
                 ADAPTER_CONFIG),
    adapter_case("target-regex-matches-nothing", "matches no tensor of BASE",
                 lambda a: edit_json(a / ADAPTER_CONFIG, lambda c: c.update(target_modules=r".*\.attn\.c_attn")),
                 ADAPTER_CONFIG),
    adapter_case("trained-on-another-model-type", "the adapter was trained on a gpt2 model", other_family_base,
                 ADAPTER_CONFIG),
    adapter_case("module-names-of-another-family", "BASE has no tensor transformer.h.0.self_attn.q_proj.weight",
                 lambda a: edit_adapter_tensors(a, rename_modules)),
    adapter_case("weights-missing", f"no {ADAPTER_WEIGHTS}", lambda a: (a / ADAPTER_WEIGHTS).unlink(), "."),
    adapter_case("pickle-weights-forbidden-global", "the pickle names posix.system", pickled_adapter_with_payload,
                 "adapter_model.bin"),
    *[
        adapter_case(f"peft-type-{t.lower()}", f"peft_type {t!r}: only LoRA adapters (LORA) can be merged",
                     lambda a, t=t: edit_json(a / ADAPTER_CONFIG, lambda c: c.update(peft_type=t)), ADAPTER_CONFIG)
        for t in ("IA3", "PROMPT_TUNING", "PREFIX_TUNING", "NO_SUCH_TYPE")
    ],
    adapter_case("task-type-token-cls", "task_type 'TOKEN_CLS': only CAUSAL_LM and SEQ_CLS adapters are merged",
                 lambda a: edit_json(a / ADAPTER_CONFIG, lambda c: c.update(task_type="TOKEN_CLS")), ADAPTER_CONFIG),
    adapter_case("dora-without-magnitude", "use_dora in adapter_config.json and the DoRA magnitude vector disagree",
                 lambda a: edit_json(a / ADAPTER_CONFIG, lambda c: c.update(use_dora=True))),
    adapter_case("target-parameters", "LoRA on parameters (target_parameters) is not merged by rmconvert",
                 lambda a: edit_json(a / ADAPTER_CONFIG, lambda c: c.update(target_parameters=["experts"]))
                 , ADAPTER_CONFIG),
    adapter_case("seq-cls-without-head", "the trained head is not in the adapter and cannot be recovered",
                 lambda a: edit_json(a / ADAPTER_CONFIG, lambda c: c.update(task_type="SEQ_CLS"))),
    adapter_case("r-not-positive", "r must be a positive number, not 0",
                 lambda a: edit_json(a / ADAPTER_CONFIG, lambda c: c.update(r=0)), ADAPTER_CONFIG),
    adapter_case("rank-pattern-not-a-regex", "rank_pattern key '(' is not a regex",
                 lambda a: edit_json(a / ADAPTER_CONFIG, lambda c: c.update(rank_pattern={"(": 2})), ADAPTER_CONFIG),
    adapter_case("config-not-json", "invalid JSON", lambda a: (a / ADAPTER_CONFIG).write_text("{"), ADAPTER_CONFIG),
    adapter_case("config-not-json-as-source", "invalid JSON", lambda a: (a / ADAPTER_CONFIG).write_text("{"),
                 ADAPTER_CONFIG, as_source=True),
    adapter_case("base-neither-directory-nor-repo-id", "is neither a local directory nor a Hugging Face repo id",
                 lambda a: edit_json(a / ADAPTER_CONFIG, lambda c: c.update(base_model_name_or_path="/no/such/base")),
                 ADAPTER_CONFIG, as_source=True),
]
# fmt: on


@pytest.mark.parametrize("damage, culprit, problem, as_source", BAD_ADAPTERS)
def test_convert_refuses_bad_adapter(ws, lora_adapter, damage, culprit, problem, as_source):
    src, adapter = ws.source(), ws.copy(lora_adapter, "adapter")
    damage(adapter)
    where = adapter / culprit if culprit != "." else adapter
    before = state(adapter)
    if as_source:
        check_refused(adapter, ws.dst(), (), where, problem)
    else:
        check_refused(src, ws.dst(), ("--adapter", adapter), where, problem)
    assert state(adapter) == before
    assert not (adapter.parent / "payload-ran").exists()


def test_adapter_base_repo_id_not_in_the_cache_offline(ws, lora_adapter):
    """base_model_name_or_path names a repo id the cache lacks, offline: one line naming it and what to do."""
    adapter, cache, dst = ws.copy(lora_adapter, "adapter"), ws.tmp / "hf-cache", ws.dst()
    edit_json(adapter / ADAPTER_CONFIG, lambda c: c.update(base_model_name_or_path="tiny-org/absent"))
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HOME=str(ws.tmp / "hf-home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([rmconvert_script(), "convert", str(adapter), str(dst)], capture_output=True, text=True,
                          env=env, cwd=ws.tmp, check=False)  # fmt: skip
    assert_one_error(
        ProcessResult(done.returncode, done.stdout, done.stderr), "tiny-org/absent", "not in the Hugging Face cache"
    )
    assert list(cache.iterdir()) == [] and state(dst) is None


def test_adapter_option_names_a_checkpoint_not_an_adapter(ws):
    src, other = ws.source(), ws.source(name="other")
    check_refused(src, ws.dst(), ("--adapter", other), other, "no adapter_config.json: not a PEFT adapter directory")


def test_validate_adapter_needs_against(ws, reward_model, lora_adapter):
    result = rmconvert("validate", reward_model, "--adapter", lora_adapter)
    assert_no_crash(result)
    assert result.exit_code == 2
    assert "--adapter needs --against BASE" in result.stderr
