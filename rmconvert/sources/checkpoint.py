"""Read a Hugging Face checkpoint directory: config, where every tensor is (safetensors headers or ``.bin`` pickles read
without running them), the index, a value-head side file; no weights loaded."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..io.safetensors import Header, TensorInfo, read_header
from ..io.torch_zip import read_torch_zip

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
#: Weight layouts in order of preference (safetensors win, as in transformers): (index, single file, suffix).
FORMATS = ((INDEX, SINGLE, ".safetensors"), (BIN_INDEX, BIN_SINGLE, ".bin"))
#: A value head saved beside a causal-LM checkpoint (LlamaFactory, ms-swift), preferred first.
VALUE_HEAD_FILES = ("value_head.safetensors", "value_head.bin")
VALUE_HEAD = "v_head.summary."  # TRL's AutoModelForCausalLMWithValueHead: v_head.summary.weight [1, H], .bias [1]


def read_weights(path: str | Path) -> Header:
    """Every tensor's location in a weights file, safetensors or torch zip (``.bin``), by its suffix."""
    path = Path(path)
    if path.suffix == ".bin":
        return read_torch_zip(path)
    if path.suffix == ".safetensors":
        return read_header(path)
    raise CheckpointError("not a weights file: expected .safetensors or .bin", path)


def read_json(path: Path, required: bool = True) -> dict | None:
    """A JSON object from ``path``; None if absent and not required; CheckpointError if malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise CheckpointError("missing", path) from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", path) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"invalid JSON: {str(exc) or 'nested too deeply'}", path) from None
    if not isinstance(data, dict):
        raise CheckpointError("not a JSON object", path)
    return data


def text_config(config: dict) -> dict:
    """The part of a config that describes the language model (``text_config`` of composite configs)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


@dataclass
class Checkpoint:
    """A checkpoint directory as read from disk: config and every tensor's location."""

    path: Path
    config: dict
    shards: list[Header]  # the weight files, then a value-head side file if there is one
    index: dict | None
    tensors: dict[str, TensorInfo]
    index_name: str | None = None  # the index file read (safetensors' or .bin's)

    @property
    def weights_file(self) -> str:
        """The file that says where tensors are: the index of a sharded checkpoint, else the single file."""
        return self.index_name or self.shards[0].path.name

    @property
    def pickled(self) -> bool:
        """Whether the weights are PyTorch pickles (``.bin``) rather than safetensors, by the index or single file read
        (an index may map no tensor; a value-head side file does not count)."""
        return self.weights_file in (BIN_INDEX, BIN_SINGLE)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


def read_config(path: Path) -> dict:
    """config.json of a transformers model (must name a ``model_type``)."""
    config = read_json(path / "config.json")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise CheckpointError("no model_type: not a transformers model config", path / "config.json")
    return config


def _shard_names(path: Path) -> tuple[list[str], dict | None, str | None]:
    """Weight file names, the index (or None) and its file name, of the preferred format present."""
    for index_name, single, suffix in FORMATS:
        index_path = path / index_name
        index = read_json(index_path, required=False)
        if index is None:
            if (path / single).exists():
                return [single], None, None
            continue
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError("weight_map must map tensor names to file names", index_path)
        names = sorted(set(weight_map.values()))
        for name in names:
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise CheckpointError(f"weight_map names {name!r}, which is not a file in the checkpoint", index_path)
        if {Path(n).suffix for n in names} >= {".bin", ".safetensors"}:
            raise CheckpointError("weight_map mixes .bin and .safetensors files; re-save in one format", index_path)
        odd = next((n for n in names if not n.endswith(suffix)), None)
        if odd is not None:
            raise CheckpointError(f"weight_map names {odd!r}, not a {suffix} file", index_path)
        return names, index, index_name
    raise CheckpointError(f"no {SINGLE}, {INDEX}, {BIN_SINGLE} or {BIN_INDEX}", path)


def _value_head_file(path: Path) -> Header | None:
    """A value head saved beside the weights (``value_head.safetensors`` or ``.bin``), or None."""
    name = next((n for n in VALUE_HEAD_FILES if (path / n).exists()), None)
    if name is None:
        return None
    header = read_weights(path / name)
    odd = sorted(n for n in header.tensors if not n.startswith(VALUE_HEAD))
    if odd or not header.tensors:
        problem = f"holds {odd[0]!r}" if odd else "holds no tensor"
        raise CheckpointError(f"{problem}; a value head file holds only {VALUE_HEAD}weight and bias", path / name)
    return header


def require_directory(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is a directory."""
    try:
        if path.is_dir():
            return
        problem = "not a checkpoint directory" if path.exists() else "no such directory"
    except OSError as exc:  # e.g. a name too long for the filesystem
        problem = exc.strerror or str(exc)
    raise CheckpointError(problem, path)


def check_links(path: Path) -> None:
    """Refuse symlinks that leave the checkpoint, except a Hugging Face cache snapshot's links to its blobs."""
    root = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<revision> -> ../../blobs/<sha>
        allowed.append(root.parent.parent / "blobs")
    for entry in path.iterdir():
        if not entry.is_symlink():
            continue
        try:
            target = entry.resolve()
        except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError for a symlink loop
            raise CheckpointError("symlink loop", entry) from None
        if not target.exists():
            raise CheckpointError(f"broken symlink to {os.readlink(entry)}", entry)
        if not any(target.is_relative_to(a) for a in allowed):
            raise CheckpointError(f"symlink to {target}, outside the checkpoint", entry)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read config.json and where every tensor is (safetensors headers or ``.bin`` pickles, plus a value-head
    side file); check the index is exact."""
    path = Path(path)
    require_directory(path)
    check_links(path)
    config = read_config(path)
    names, index, index_name = _shard_names(path)
    shards = [read_weights(path / name) for name in names]
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in shard.tensors.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is also in {tensors[name].path.name}", shard.path)
            tensors[name] = info
    if index is not None:
        mapped = index["weight_map"]
        for name, info in tensors.items():
            if mapped.get(name) != info.path.name:
                raise CheckpointError(
                    f"weight_map puts {name!r} in {mapped.get(name)!r} but it is in {info.path.name}", path / index_name
                )
        absent = sorted(set(mapped) - set(tensors))
        if absent:
            raise CheckpointError(f"weight_map names {absent[0]!r}, which no shard holds", path / index_name)
    side = _value_head_file(path)
    if side is not None:
        for name, info in side.tensors.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is also in {tensors[name].path.name}", side.path)
            tensors[name] = info
        shards.append(side)
    return Checkpoint(path, config, shards, index, tensors, index_name)
