"""The conversion engine: plan a reward-model checkpoint from headers, then write it by copying bytes."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .checkpoint import INDEX, SINGLE, Checkpoint, open_checkpoint, read_json, text_config
from .errors import CheckpointError, OutputError, UsageError
from .head import FLOAT_DTYPES, default_init_std, mean_row, score_parts
from .host import Registered, Registry, load_registry
from .output import FILE_MODE, check_destination, staged, write_file
from .pad import choose_pad
from .safetensors_io import ByteRange, Copier, OutTensor, layout
from .schema import schema_errors
from .tokenizer_files import TokenizerFiles

MANIFEST = "rmconvert.json"
GENERATION_CONFIG = "generation_config.json"
HEADS = {"scalar": 1, "bt": 2}
#: Files never carried over: other weight formats, which would disagree with the converted weights.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".safetensors")


@dataclass(frozen=True)
class Options:
    """What the user asked for; the same options on the same source give byte-identical output."""

    arch: str = "auto"
    head: str = "scalar"
    pad_token: str = "auto"
    seed: int = 0
    init_std: float | None = None
    from_bt: str = "row1"

    def check(self) -> None:
        if self.head not in HEADS:
            raise UsageError(f"--head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if self.from_bt not in ("row1", "difference"):
            raise UsageError(f"--from-bt must be row1 or difference, not {self.from_bt!r}")
        if self.init_std is not None and not (self.init_std > 0 and math.isfinite(self.init_std)):
            raise UsageError(f"--init-std must be a positive number, not {self.init_std!r}")
        if not self.pad_token:
            raise UsageError("--pad-token must not be empty")


@dataclass
class Plan:
    """Everything the output will contain, decided before a byte is written."""

    checkpoint: Checkpoint
    registered: Registered
    json_files: dict[str, dict]
    shards: dict[str, tuple[Header, list[OutTensor] | None]]  # name -> (source shard, tensors; None = copy file)
    index: dict | None
    copies: list[str]
    report: dict = field(default_factory=dict)


def _head_tensor(ckpt: Checkpoint) -> str:
    """Name of an existing reward head: ``score.weight``, or OpenRLHF's ``<value_head_prefix>.weight``."""
    prefix = ckpt.config.get("value_head_prefix")
    return f"{prefix}.weight" if isinstance(prefix, str) and f"{prefix}.weight" in ckpt.tensors else "score.weight"


def _check_shapes(ckpt: Checkpoint, embedding: str, head: str) -> tuple[int, int]:
    tc = text_config(ckpt.config)
    vocab, hidden = tc.get("vocab_size"), tc.get("hidden_size")
    if type(vocab) is not int or type(hidden) is not int or vocab <= 0 or hidden <= 0:
        raise CheckpointError("vocab_size and hidden_size must be positive integers", ckpt.config_path)
    emb = ckpt.tensors[embedding]
    if emb.shape != (vocab, hidden):
        raise CheckpointError(
            f"{embedding} is {list(emb.shape)} but config.json says vocab_size={vocab}, hidden_size={hidden}",
            emb.path,
        )
    if emb.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{embedding} has dtype {emb.dtype}; expected one of {', '.join(FLOAT_DTYPES)}", emb.path)
    score = ckpt.tensors.get(head)
    if score is not None:
        if len(score.shape) != 2 or score.shape[0] not in (1, 2) or score.shape[1] != hidden:
            raise CheckpointError(f"{head} is {list(score.shape)}; a reward head is [1 or 2, {hidden}]", score.path)
        if score.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{head} has dtype {score.dtype}", score.path)
        id2label = ckpt.config.get("id2label")
        if isinstance(id2label, dict) and len(id2label) != score.shape[0]:
            raise CheckpointError(
                f"id2label has {len(id2label)} labels but {head} has {score.shape[0]} rows", ckpt.config_path
            )
    return vocab, hidden


def _output_config(ckpt, registered, labels, vocab, pad) -> dict:
    config = copy.deepcopy(ckpt.config)
    arch = registered.architecture
    config["architectures"] = [arch.class_name(ckpt.model_type)]
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    config.pop("num_labels", None)
    config.pop("value_head_prefix", None)
    text_config(config)["vocab_size"] = vocab
    for target in {id(config): config, id(text_config(config)): text_config(config)}.values():
        if pad.id is not None:
            target["pad_token_id"] = pad.id
        for name in arch.dropout_fields:
            if isinstance(target.get(name), (int, float)) and not isinstance(target[name], bool) and target[name]:
                target[name] = 0.0
    return config


def plan_conversion(ckpt: Checkpoint, registered: Registered, options: Options) -> Plan:
    """Decide the output of converting ``ckpt`` with ``options``; reads only headers and small files."""
    arch = registered.architecture
    embedding = arch.embedding_name(ckpt)
    head = _head_tensor(ckpt)
    vocab, hidden = _check_shapes(ckpt, embedding, head)
    existing = ckpt.tensors.get(head)
    tok = TokenizerFiles.read(ckpt.path)
    generation_config = read_json(ckpt.path / GENERATION_CONFIG, required=False)
    pad = choose_pad(options.pad_token, tok, ckpt.config, generation_config, arch.pad_tokens, existing is not None)
    tokens = len(tok) + pad.is_new
    new_vocab = math.ceil(max(vocab, tokens) / 8) * 8
    labels = HEADS[options.head]
    emb = ckpt.tensors[embedding]
    std = options.init_std if options.init_std is not None else default_init_std(hidden)
    score_dtype = existing.dtype if existing else emb.dtype
    parts, head_how = score_parts(existing, labels, hidden, score_dtype, std, options.seed, options.from_bt)
    score = OutTensor("score.weight", score_dtype, (labels, hidden), tuple(parts))

    dropped = sorted(n for n in ckpt.tensors if arch.dropped(n) or n == head)
    out: list[list[OutTensor]] = []
    touched: list[bool] = []
    for shard in ckpt.shards:
        tensors, changed = [], False
        for name, info in sorted(shard.tensors.items()):
            if name in dropped:
                changed = True
            elif name == embedding and new_vocab > vocab:
                extra = mean_row(emb) * (new_vocab - vocab)
                tensors.append(OutTensor(name, emb.dtype, (new_vocab, hidden), (*OutTensor.copy_of(emb).parts, extra)))
                changed = True
            else:
                tensors.append(OutTensor.copy_of(info))
        out.append(tensors)
        touched.append(changed or (shard.metadata or {}).get("format") != "pt")
    home = next((i for i, (t, c) in enumerate(zip(out, touched)) if c and t), len(out) - 1)
    while not out[home] and home > 0:
        home -= 1
    out[home].append(score)
    touched[home] = True

    kept = [(s, t, c) for s, t, c in zip(ckpt.shards, out, touched) if t]
    names = [SINGLE] if ckpt.index is None else [f"model-{i:05d}-of-{len(kept):05d}.safetensors" for i in range(1, len(kept) + 1)]
    shards = {name: (shard, tensors if changed else None) for name, (shard, tensors, changed) in zip(names, kept)}
    index = None
    if ckpt.index is not None:
        all_tensors = [tensor for _, tensors, _ in kept for tensor in tensors]
        metadata = {"total_size": sum(t.nbytes for t in all_tensors)}
        if "total_parameters" in (ckpt.index.get("metadata") or {}):
            metadata["total_parameters"] = sum(math.prod(t.shape) for t in all_tensors)
        weight_map = {t.name: name for name, (_, tensors, _) in zip(names, kept) for t in tensors}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}

    config = _output_config(ckpt, registered, labels, new_vocab, pad)
    problems = schema_errors(config, arch.schema)
    if problems:
        raise CheckpointError(f"the converted config would not satisfy {arch.schema.name}: {problems[0]}", ckpt.config_path)
    json_files = {"config.json": config}
    if pad.token is not None and options.pad_token != "keep":
        for name, patched in tok.with_pad(pad.token).items():
            if patched != getattr(tok, name.removesuffix(".json")) :
                json_files[name] = patched
    if generation_config is not None and "pad_token_id" in generation_config and pad.id is not None:
        json_files[GENERATION_CONFIG] = {**generation_config, "pad_token_id": pad.id}
    skip = set(json_files) | {INDEX, MANIFEST}
    copies = sorted(
        p.name for p in ckpt.path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in skip and not p.name.endswith(SKIPPED_SUFFIXES)
    )  # fmt: skip

    report = {
        "source": str(ckpt.path),
        "architecture": arch.name,
        "class": config["architectures"][0],
        "model_type": ckpt.model_type,
        "source_kind": "reward model" if existing is not None else "causal LM",
        "head": {"from": existing.shape[0] if existing else None, "labels": labels, "how": head_how},
        "pad": {"token": pad.token, "id": pad.id, "action": pad.action},
        "vocab": {"from": vocab, "to": new_vocab, "tokenizer": tokens, "added_rows": new_vocab - vocab},
        "dropped": dropped,
        "files": sorted([*shards, *json_files, *copies, *([INDEX] if index else []), MANIFEST]),
        "whole_file_copies": sorted(name for name, (_, tensors) in shards.items() if tensors is None),
        "warnings": list(pad.warnings),
    }
    if existing is not None and pad.action == "kept":
        report["warnings"].append(
            f"kept pad {pad.token!r} (id {pad.id}) of the reward model: changing it would move where rewards are read"
        )
    return Plan(ckpt, registered, json_files, shards, index, copies, report)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _dump(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def write_plan(plan: Plan, out: Path, options: Options, progress=None) -> None:
    """Write every file of ``plan`` into the (empty) directory ``out``."""
    ckpt = plan.checkpoint
    sources = sorted({*[s.path.name for s in ckpt.shards], *plan.copies, "config.json", "tokenizer.json"}
                     | ({INDEX} if ckpt.index else set()))  # fmt: skip
    copier = Copier()
    with ThreadPoolExecutor(max_workers=1) as pool:  # hash the sources on the second core while copying
        hashes = {name: pool.submit(_sha256, ckpt.path / name) for name in sources}
        try:
            for i, (name, (shard, tensors)) in enumerate(plan.shards.items(), 1):
                if progress:
                    progress(f"[{i}/{len(plan.shards)}] {name}")
                fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
                try:
                    if tensors is None:
                        copier.write_parts(fd, [ByteRange(shard.path, 0, shard.size)])
                    else:
                        header, ordered = layout(tensors, {**(shard.metadata or {}), "format": "pt"})
                        copier.write_parts(fd, [header] + [p for t in ordered for p in t.parts])
                finally:
                    os.close(fd)
            for name in plan.copies:
                fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
                try:
                    copier.write_parts(fd, [ByteRange(ckpt.path / name, 0, (ckpt.path / name).stat().st_size)])
                finally:
                    os.close(fd)
        finally:
            copier.close()
        for name, obj in plan.json_files.items():
            write_file(out / name, _dump(obj if name != "config.json" else dict(sorted(obj.items()))))
        if plan.index is not None:
            write_file(out / INDEX, _dump(plan.index))
        manifest = {
            "rmconvert": __version__,
            "architecture": {
                "name": plan.registered.architecture.name,
                "plugin": plan.registered.plugin,
                "distribution": plan.registered.distribution,
                "version": plan.registered.version,
            },
            "options": options.__dict__,
            "source_files": {name: future.result() for name, future in sorted(hashes.items())},
            "result": {k: plan.report[k] for k in ("class", "source_kind", "head", "pad", "vocab", "dropped")},
        }
        write_file(out / MANIFEST, _dump(manifest))


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    registry: Registry | None = None,
    progress=None,
    **options,
) -> dict:
    """Convert the checkpoint at ``src`` into a reward model at ``dst``; returns the report.

    ``options`` are the fields of :class:`Options` (arch, head, pad_token, seed, init_std, from_bt).
    """
    opts = Options(**options)
    opts.check()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError("not a checkpoint directory" if src.exists() else "no such directory", src)
    check_destination(src, dst, overwrite)
    registry = registry or load_registry()
    ckpt = open_checkpoint(src)
    registered = registry.resolve(ckpt.model_type, opts.arch, ckpt.config_path)
    plan = plan_conversion(ckpt, registered, opts)
    try:
        with staged(dst, overwrite) as out:
            write_plan(plan, out, opts, progress)
    except OSError as exc:
        where = exc.filename or dst
        raise OutputError(f"write failed: {exc.strerror or exc}", where) from None
    plan.report["destination"] = str(dst)
    return plan.report
