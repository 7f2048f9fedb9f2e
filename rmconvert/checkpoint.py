"""Read a Hugging Face checkpoint directory: config, tensor headers, index, without loading weights."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .safetensors_io import Header, TensorInfo, read_header

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


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
    shards: list[Header]
    index: dict | None
    tensors: dict[str, TensorInfo]

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


def _shard_names(path: Path) -> tuple[list[str], dict | None]:
    index_path = path / INDEX
    index = read_json(index_path, required=False)
    if index is None:
        if (path / SINGLE).exists():
            return [SINGLE], None
        pickled = [name for name in PICKLES if (path / name).exists()]
        problem = (
            f"only safetensors weights are supported, found {pickled[0]} (pickle files can run code when loaded)"
            if pickled
            else f"no {SINGLE} or {INDEX}"
        )
        raise CheckpointError(problem, path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError("weight_map must map tensor names to file names", index_path)
    names = sorted(set(weight_map.values()))
    for name in names:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"weight_map names {name!r}, which is not a file in the checkpoint", index_path)
    return names, index


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
    """Read config.json and every safetensors header of a checkpoint; check the index is exact."""
    path = Path(path)
    require_directory(path)
    check_links(path)
    config = read_config(path)
    names, index = _shard_names(path)
    shards = [read_header(path / name) for name in names]
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
                    f"weight_map puts {name!r} in {mapped.get(name)!r} but it is in {info.path.name}", path / INDEX
                )
        absent = sorted(set(mapped) - set(tensors))
        if absent:
            raise CheckpointError(f"weight_map names {absent[0]!r}, which no shard holds", path / INDEX)
    return Checkpoint(path, config, shards, index, tensors)
