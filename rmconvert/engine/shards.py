"""Which output shard holds which tensor: source shards copied whole where nothing in them changes."""

from __future__ import annotations

import math
from dataclasses import replace

from ..dtypes import TORCH_NAMES
from ..io.safetensors import Header, OutTensor
from ..sources.checkpoint import SINGLE, Checkpoint
from .options import Options


def _reshard(tensors: list[OutTensor], limit: int) -> list[list[OutTensor]]:
    """Split tensors, in order, into shards of at most ``limit`` bytes (a bigger tensor gets its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _sources(shard: Header, dropped: set[str]) -> list:
    """The source tensors a shard keeps, in the order :func:`_plan_shards` lists them."""
    return [info for info in sorted(shard.tensors.values(), key=lambda t: t.offset) if info.name not in dropped]


def _shard_names(count: int, sharded: bool) -> list[str]:
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)] if sharded else [SINGLE]


def _plan_shards(
    ckpt: Checkpoint,
    dropped: set[str],
    replaced: dict[str, OutTensor],
    heads: list[OutTensor],
    options: Options,
    renamed: dict[str, str] | None = None,
) -> tuple[dict[str, Header | list[OutTensor]], dict | None]:
    """The output shards (a source shard to copy whole, or the tensors to assemble) and the index; ``heads`` (the
    score, or an MLP head's tensors) join one shard, ``renamed`` tensors are written under their new names."""
    renamed = renamed or {}
    target = TORCH_NAMES[options.dtype] if options.dtype else None
    grouped: list[list[OutTensor]] = []
    changed: list[bool] = []
    for shard in ckpt.shards:
        kept = []
        for info in sorted(shard.tensors.values(), key=lambda t: t.offset):
            if info.name not in dropped:
                tensor = replaced.get(info.name) or OutTensor.copy_of(info)
                if info.name in renamed:
                    tensor = replace(tensor, name=renamed[info.name])
                kept.append(tensor.as_dtype(target) if target else tensor)
        grouped.append(kept)
        changed.append(
            shard.view
            or len(kept) != len(shard.tensors)
            or any(n in renamed for n in shard.tensors)
            or any(t.parts != OutTensor.copy_of(info).parts for t, info in zip(kept, _sources(shard, dropped)))
            or (shard.path.suffix == ".safetensors" and (shard.metadata or {}).get("format") != "pt")
        )
    # The head joins a shard that is rewritten anyway (where the old head or lm_head was), else the last one.
    home = next((i for i, c in enumerate(changed) if c and grouped[i]), len(grouped) - 1)
    while not grouped[home] and home > 0:
        home -= 1
    grouped[home] += [head.as_dtype(target) if target else head for head in heads]
    changed[home] = True

    if options.max_shard_size:
        groups = _reshard([t for group in grouped for t in group], options.max_shard_size)
        sources: list[Header | None] = [None] * len(groups)
    else:
        # a .bin shard is always assembled (into safetensors), but places the head as its safetensors twin would
        copyable = [not c and s.path.suffix == ".safetensors" for s, c in zip(ckpt.shards, changed)]
        kept_groups = [(g, s if ok else None) for g, s, ok in zip(grouped, ckpt.shards, copyable) if g]
        groups, sources = [g for g, _ in kept_groups], [s for _, s in kept_groups]
    names = _shard_names(len(groups), ckpt.index is not None or len(groups) > 1)
    shards = {name: source or group for name, group, source in zip(names, groups, sources)}
    if names == [SINGLE]:
        return shards, None
    every = [t for group in groups for t in group]
    metadata = {"total_size": sum(t.nbytes for t in every)}
    if "total_parameters" in ((ckpt.index or {}).get("metadata") or {}):
        metadata["total_parameters"] = sum(math.prod(t.shape) for t in every)
    weight_map = {t.name: name for name, group in zip(names, groups) for t in group}
    return shards, {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
