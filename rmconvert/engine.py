"""The conversion engine: plan a reward-model checkpoint from headers, then write it by copying bytes."""

from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from . import __version__
from .architecture import Architecture
from .checkpoint import (
    BIN_INDEX,
    INDEX,
    SINGLE,
    VALUE_HEAD,
    Checkpoint,
    open_checkpoint,
    read_json,
    require_directory,
    text_config,
)
from .dtypes import FLOAT_DTYPES, TORCH_NAMES
from .errors import CheckpointError, OutputError, PluginError, UsageError
from .head import default_init_std, mean_row_part, merged_mean_row_parts, read_scalar, score_parts
from .host import Registered, Registry, load_registry
from .hub import is_repo_id_source, resolve_source, snapshot_origin
from .lora import is_adapter, plan_merge, read_adapter, resolve_base
from .output import FILE_MODE, check_destination, staged, sync_file, write_file
from .pad import PadChoice, choose_pad
from .safetensors_io import ByteRange, Header, OutTensor, Repeat, layout, write_parts
from .schema import schema_errors
from .tokenizer_files import TOKENIZER_CONFIG, TokenizerFiles

MANIFEST = "rmconvert.json"
GENERATION_CONFIG = "generation_config.json"
HEADS = {"scalar": 1, "bt": 2}
#: Files never carried over: other weight formats, which would disagree with the converted weights.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".safetensors")
FICLONE = 0x40049409  # ioctl: share the source's extents (reflink) on XFS, btrfs, ...
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int | None) -> int | None:
    """Bytes of a size such as ``5GB``, ``500MiB`` or ``1000000``."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise UsageError(f"--max-shard-size {text!r} is not a size like 5GB or 500MiB")
    return int(float(match[1]) * SIZE_UNITS[(match[2] or "").upper()])


@dataclass(frozen=True)
class Options:
    """What the output depends on: the same source and options give byte-identical output."""

    arch: str = "auto"
    head: str = "scalar"
    pad_token: str = "auto"
    seed: int = 0
    init_std: float | None = None
    from_bt: str = "row1"
    dtype: str | None = None
    max_shard_size: int | None = None
    portable: bool = False
    hash_sources: bool = True

    def check(self) -> None:
        if self.head not in HEADS:
            raise UsageError(f"--head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if self.from_bt not in ("row1", "difference"):
            raise UsageError(f"--from-bt must be row1 or difference, not {self.from_bt!r}")
        if self.init_std is not None and not (self.init_std > 0 and math.isfinite(self.init_std)):
            raise UsageError(f"--init-std must be a positive number, not {self.init_std!r}")
        if not self.pad_token:
            raise UsageError("--pad-token must not be empty")
        if self.dtype is not None and self.dtype not in TORCH_NAMES:
            raise UsageError(f"--dtype must be one of {', '.join(TORCH_NAMES)}, not {self.dtype!r}")
        if self.max_shard_size is not None and self.max_shard_size <= 0:
            raise UsageError("--max-shard-size must be positive")


@dataclass
class Plan:
    """Everything the output will contain, decided before a byte is written."""

    checkpoint: Checkpoint
    registered: Registered
    json_files: dict[str, dict]
    generated: dict[str, bytes]  # other files written by rmconvert (the --portable modeling file)
    shards: dict[str, Header | list[OutTensor]]  # file name -> source shard copied whole, or tensors to assemble
    index: dict | None
    copies: list[str]
    report: dict = field(default_factory=dict)


def head_tensor(ckpt: Checkpoint, score: str) -> str:
    """Name of an existing reward head: ``score`` (the architecture's), OpenRLHF's ``<value_head_prefix>.weight``, or TRL's
    value head ``v_head.summary.weight`` (inline, or in a value_head file beside the weights)."""
    prefix = ckpt.config.get("value_head_prefix")
    if isinstance(prefix, str) and f"{prefix}.weight" in ckpt.tensors:
        return f"{prefix}.weight"
    if score not in ckpt.tensors and VALUE_HEAD + "weight" in ckpt.tensors:
        return VALUE_HEAD + "weight"
    return score


def _value_head_bias(ckpt: Checkpoint, hidden: int) -> float:
    """The value head's bias (0.0 without one), after checking its weight is [1, H] and its bias [1]."""
    weight, bias = ckpt.tensors[VALUE_HEAD + "weight"], ckpt.tensors.get(VALUE_HEAD + "bias")
    if weight.shape != (1, hidden) or weight.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{weight.name} is {weight.dtype}{list(weight.shape)}; a value head is [1, hidden_size={hidden}]",
            weight.path,
        )
    if bias is None:
        return 0.0
    if bias.shape != (1,) or bias.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{bias.name} is {bias.dtype}{list(bias.shape)}; a value head's bias is [1]", bias.path)
    return read_scalar(bias)


def _check_shapes(ckpt: Checkpoint, arch: Architecture, embedding: str, head: str) -> tuple[int, int]:
    """(vocab_size, hidden_size), after checking the embedding and any head agree with config.json."""
    vocab, hidden = text_config(ckpt.config).get("vocab_size"), arch.hidden_size(ckpt.config)
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
    score = ckpt.tensors.get(head) if not head.startswith(VALUE_HEAD) else None  # see _value_head_bias
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


def _keep_position_pad(ckpt: Checkpoint, pad: PadChoice, options: Options) -> None:
    """A family whose pad id indexes its position table (XGLM) scores every sequence differently under another
    pad id: the source's pad must stay."""
    source = text_config(ckpt.config).get("pad_token_id")
    if pad.id == source or options.pad_token == "keep":
        return
    problem = (
        f"{ckpt.model_type}'s pad id indexes its position table: pad {pad.token!r} (id {pad.id}) would move it from"
        f" {source} and change every reward"
    )
    if options.pad_token != "auto":
        raise UsageError(f"--pad-token {options.pad_token!r}: {problem}; use --pad-token keep")
    raise CheckpointError(
        f"{problem}; set pad_token_id to the model's pad (the real checkpoints' is 1)", ckpt.config_path
    )


def _output_config(ckpt: Checkpoint, registered: Registered, labels: int, vocab: int, pad: PadChoice, dtype) -> dict:
    """config.json of the reward model: class, labels, regression, vocab, pad, no dropout; the rest preserved."""
    config = copy.deepcopy(ckpt.config)
    arch = registered.architecture
    config["architectures"] = [arch.class_name(ckpt.model_type)]
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    config["problem_type"] = "regression"  # servers and pipelines then return raw rewards, not sigmoid/softmax
    config.pop("num_labels", None)
    config.pop("value_head_prefix", None)
    text_config(config)["vocab_size"] = vocab
    for target in {id(config): config, id(text_config(config)): text_config(config)}.values():
        if pad.id is not None:
            target["pad_token_id"] = pad.id
        for name in arch.dropout_fields:
            if isinstance(target.get(name), (int, float)) and not isinstance(target[name], bool) and target[name]:
                target[name] = 0.0
        for key in ("dtype", "torch_dtype"):
            if dtype and key in target:
                target[key] = dtype
    arch.output_config(config)
    return config


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


def _shard_names(count: int, sharded: bool) -> list[str]:
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)] if sharded else [SINGLE]


def _plan_shards(
    ckpt: Checkpoint, dropped: set[str], replaced: dict[str, OutTensor], score: OutTensor, options: Options
) -> tuple[dict[str, Header | list[OutTensor]], dict | None]:
    """The output shards (a source shard to copy whole, or the tensors to assemble) and the index."""
    target = TORCH_NAMES[options.dtype] if options.dtype else None
    grouped: list[list[OutTensor]] = []
    changed: list[bool] = []
    for shard in ckpt.shards:
        kept = []
        for info in sorted(shard.tensors.values(), key=lambda t: t.offset):
            if info.name not in dropped:
                tensor = replaced.get(info.name) or OutTensor.copy_of(info)
                kept.append(tensor.as_dtype(target) if target else tensor)
        grouped.append(kept)
        changed.append(
            len(kept) != len(shard.tensors)
            or any(t.parts != OutTensor.copy_of(shard.tensors[t.name]).parts for t in kept)
            or (shard.path.suffix == ".safetensors" and (shard.metadata or {}).get("format") != "pt")
        )
    # The head joins a shard that is rewritten anyway (where the old head or lm_head was), else the last one.
    home = next((i for i, c in enumerate(changed) if c and grouped[i]), len(grouped) - 1)
    while not grouped[home] and home > 0:
        home -= 1
    grouped[home].append(score.as_dtype(target) if target else score)
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


def _plan_json(
    ckpt: Checkpoint,
    right_padding_only: bool,
    config: dict,
    tok: TokenizerFiles,
    generation_config,
    pad: PadChoice,
    options: Options,
) -> tuple[dict[str, dict], dict[str, bytes]]:
    """JSON files to write (config, tokenizer files the pad or padding side change) and generated code
    (--portable)."""
    json_files = {"config.json": config}
    generated = {}
    if options.portable:
        from .modeling import PORTABLE_MODULE, portable_module

        source = portable_module(ckpt.model_type, config["architectures"][0])
        if source is not None:
            generated[f"{PORTABLE_MODULE}.py"] = source.encode()
            config["auto_map"] = {
                **config.get("auto_map", {}),
                "AutoModelForSequenceClassification": f"{PORTABLE_MODULE}.{config['architectures'][0]}",
            }
    if pad.token is not None and options.pad_token != "keep":
        originals = {
            "tokenizer.json": tok.tokenizer,
            "tokenizer_config.json": tok.tokenizer_config,
            "special_tokens_map.json": tok.special_tokens_map,
        }
        json_files.update({n: f for n, f in tok.with_pad(pad.token).items() if f != originals[n]})
    if right_padding_only:
        tokenizer_config = json_files.get(TOKENIZER_CONFIG, tok.tokenizer_config)
        if tokenizer_config.get("padding_side") != "right":
            json_files[TOKENIZER_CONFIG] = {**tokenizer_config, "padding_side": "right"}
    if generation_config is not None and "pad_token_id" in generation_config and pad.id is not None:
        json_files[GENERATION_CONFIG] = {**generation_config, "pad_token_id": pad.id}
    return json_files, generated


def plan_conversion(ckpt: Checkpoint, registered: Registered, options: Options, adapter=None) -> Plan:
    """Decide the output of converting ``ckpt`` with ``options``; reads only headers and small files.

    ``adapter`` (a :class:`rmconvert.lora.Adapter`) is merged into ``ckpt`` first: the plan is that of the
    merged checkpoint, its merged tensors computed by the writers.
    """
    arch = registered.architecture
    embedding = arch.embedding_name(ckpt)
    merge = None
    if adapter is not None:
        merge = plan_merge(adapter, ckpt, embedding)
        ckpt = merge.checkpoint
    score_name = arch.score_name(ckpt.model_type)
    head = head_tensor(ckpt, score_name)
    value_head = head.startswith(VALUE_HEAD)
    vocab, hidden = _check_shapes(ckpt, arch, embedding, head)
    bias = _value_head_bias(ckpt, hidden) if value_head else None
    existing = ckpt.tensors.get(head)
    tok = TokenizerFiles.read(ckpt.path)
    generation_config = read_json(ckpt.path / GENERATION_CONFIG, required=False)
    # a value head was read at the last attended token: like a causal LM, it gets a pad distinct from eos
    trained_pad = existing is not None and not value_head
    pad = choose_pad(options.pad_token, tok, ckpt.config, generation_config, arch.pad_tokens, trained_pad)
    if ckpt.model_type in arch.pad_in_positions:
        _keep_position_pad(ckpt, pad, options)
    tokens = len(tok) + pad.is_new
    if tokens > 2 * vocab:
        raise CheckpointError(
            f"token ids reach {len(tok) - 1} but the embedding has {vocab} rows: is this the model's tokenizer?",
            ckpt.path / "tokenizer.json",
        )
    new_vocab = math.ceil(max(vocab, tokens) / 8) * 8
    labels = HEADS[options.head]
    dropped = arch.dropped(ckpt) | {head} & set(ckpt.tensors)
    if value_head:
        dropped |= {n for n in ckpt.tensors if n.startswith("v_head.")}
    if embedding in dropped:
        raise PluginError(f"architecture {arch.name!r} drops the input embedding {embedding}")

    emb = ckpt.tensors[embedding]
    replaced = dict(merge.parts) if merge else {}
    if new_vocab > vocab:  # the old rows as they are, then the mean row for each new one
        old = replaced.get(embedding) or OutTensor.copy_of(emb)
        rows, mean = old.parts, mean_row_part(emb)
        if old.parts != OutTensor.copy_of(emb).parts:  # merged by the writer: the mean taken as it merges
            rows, mean = merged_mean_row_parts(old)
        replaced[embedding] = OutTensor(
            embedding, emb.dtype, (new_vocab, hidden), (*rows, Repeat(mean, new_vocab - vocab))
        )
    std = options.init_std if options.init_std is not None else default_init_std(hidden)
    score_dtype = existing.dtype if existing else emb.dtype
    parts, head_how = score_parts(existing, labels, hidden, score_dtype, std, options.seed, options.from_bt)
    if value_head:
        head_how = f"value head {head}" + (" as [zeros; w]" if labels == 2 else "") + f" ({existing.dtype})"
    score = OutTensor(score_name, score_dtype, (labels, hidden), tuple(parts))
    shards, index = _plan_shards(ckpt, dropped, replaced, score, options)

    config = _output_config(ckpt, registered, labels, new_vocab, pad, options.dtype)
    right_padding_only = ckpt.model_type in arch.right_padding_only
    json_files, generated = _plan_json(ckpt, right_padding_only, config, tok, generation_config, pad, options)
    skip = set(json_files) | set(generated) | {INDEX, BIN_INDEX, MANIFEST}
    copies = sorted(
        p.name
        for p in ckpt.path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in skip and not p.name.endswith(SKIPPED_SUFFIXES)
    )

    report = {
        "source": str(ckpt.path),
        "architecture": arch.name,
        "class": config["architectures"][0],
        "model_type": ckpt.model_type,
        "source_kind": "value-head model" if value_head else "reward model" if existing is not None else "causal LM",
        "head": {"from": existing.shape[0] if existing else None, "labels": labels, "how": head_how},
        "pad": {"token": pad.token, "id": pad.id, "action": pad.action, "reason": pad.reason},
        "vocab": {"from": vocab, "to": new_vocab, "tokenizer": tokens, "added_rows": new_vocab - vocab},
        "dtype": options.dtype or "unchanged",
        "dropped": sorted(dropped),
        "files": sorted([*shards, *json_files, *generated, *copies, *([INDEX] if index else []), MANIFEST]),
        "whole_file_copies": sorted(name for name, shard in shards.items() if isinstance(shard, Header)),
        "warnings": list(pad.warnings),
    }
    if right_padding_only:
        report["warnings"].append(
            f"{ckpt.model_type}'s recurrence runs over pad tokens: score right-padded batches only"
            " (tokenizer padding_side is right)"
        )
    if value_head:
        report["value_head"] = {"file": existing.path.name, "bias": bias}
        if bias:
            report["warnings"].append(
                f"value head bias {bias!r} dropped (transformers' score has no bias): every reward is {bias!r} lower"
                " than the value head's output; preferences and rankings are unchanged (see the README to add it back)"
            )
    if merge is not None:
        files = (adapter.config_path, adapter.weights) if options.hash_sources else ()
        hashes = {p.name: _sha256(p, threading.Event()) for p in files}
        report["adapter"] = merge.report(hashes if options.hash_sources else None)
        report["source_kind"] += f" + {adapter.task_type or 'LoRA'} adapter"
        report["warnings"] += merge.warnings(ckpt.path)
    if trained_pad and pad.action == "kept":
        report["warnings"].append(
            f"kept pad {pad.token!r} (id {pad.id}) of the reward model: changing it would move where rewards are read"
        )
    return Plan(ckpt, registered, json_files, generated, shards, index, copies, report)


def _sha256(path: Path, stop: threading.Event, advance=None) -> str | None:
    """``sha256:<hex>`` of a file (its Hugging Face LFS oid), or None once ``stop`` is set.

    A file of a Hugging Face cache snapshot links to ``blobs/<sha256>`` when it is an LFS file: the name
    is the hash, verified by the download, and nothing is read.
    """
    if path.is_symlink():
        blob = path.resolve()
        if blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
            return "sha256:" + blob.name
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            if stop.is_set():
                return None
            digest.update(view[:n])
            if advance is not None:
                advance(n)
    return "sha256:" + digest.hexdigest()


def _dump(obj: dict) -> bytes:
    """Pretty JSON in UTF-8; escaped ASCII when the data holds lone surrogates (valid JSON, not UTF-8)."""
    try:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(obj, indent=2) + "\n").encode()


def _link(source: Path, target: Path) -> str | None:
    """Reflink, else hard-link ``source`` to the new ``target``; the method used, or None if neither works."""
    with open(source, "rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            fcntl.ioctl(fd, FICLONE, src.fileno())
            return "reflink"
        except OSError:
            os.unlink(target)
        finally:
            os.close(fd)
    try:
        os.link(source, target)
        return "hardlink"
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return None
        raise


def _manifest(plan: Plan, options: Options, hashes: dict[str, str]) -> dict:
    entry = plan.registered
    return {
        "rmconvert": __version__,
        "architecture": {
            "name": entry.architecture.name,
            "plugin": entry.plugin,
            "distribution": entry.distribution,
            "version": entry.version,
        },
        "options": asdict(options),
        **({"source_repo": origin} if (origin := snapshot_origin(plan.checkpoint.path)) else {}),
        "source_files": hashes,
        "result": {
            k: plan.report[k]
            for k in ("class", "source_kind", "head", "pad", "vocab", "dtype", "dropped", "value_head")
            if k in plan.report
        },
        **({"adapter": plan.report["adapter"]} if "adapter" in plan.report else {}),
    }


def _check_config(plan: Plan, stop=None) -> None:
    """The output config must satisfy the architecture's JSON schema."""
    schema = plan.registered.architecture.schema
    problems = schema_errors(plan.json_files["config.json"], schema)
    if problems:
        raise CheckpointError(
            f"the converted config would not satisfy {schema.name}: {problems[0]}", plan.checkpoint.config_path
        )


@dataclass(frozen=True)
class _Job:
    """One unit of the workers' work: check the config, write a shard or file, or hash a source file."""

    kind: str  # "check", "assemble", "copy" or "hash"
    size: int
    name: str  # the output file written, or the source file hashed
    run: partial
    reads: frozenset[Path] = frozenset()  # source files it reads whole


class _Queue:
    """Which job a free worker takes next: a priority queue, not first in first out.

    The config check comes first and nothing is written before it passes (a schema error stops the run before
    any copy); meanwhile the other worker may hash sources, which writes nothing. Then the hash of a file that
    was just copied (it is in the page cache: hashed while the other worker reads the next file from the
    disk), then assembled shards (they also compute: the mean row, the head), then copies, biggest first so
    that the workers finish together, then hashes of files not yet read.
    """

    def __init__(self, jobs: list[_Job]):
        self.jobs = jobs
        self.checked = not any(j.kind == "check" for j in jobs)
        self.read: set[Path] = set()

    def _rank(self, job: _Job) -> tuple:
        kind = {"check": 0, "hash": 1 if job.reads <= self.read else 4, "assemble": 2, "copy": 3}[job.kind]
        return (kind, -job.size, job.name)

    def take(self) -> _Job | None:
        """The most urgent job that may run now, or None (every other job waits for the config check)."""
        ready = [j for j in self.jobs if self.checked or j.kind in ("check", "hash")]
        if not ready:
            return None
        job = min(ready, key=self._rank)
        self.jobs.remove(job)
        return job

    def done(self, job: _Job) -> None:
        self.checked |= job.kind == "check"
        self.read |= job.reads


WORKERS = 2  # this machine class has two cores


@contextmanager
def _signals_set(stop: threading.Event):
    """While the workers run, SIGINT and SIGTERM set ``stop`` instead of raising in this thread; yields the
    signals received.

    A KeyboardInterrupt raised at an arbitrary point of this thread can land inside the executor's own locked
    sections (``submit``, ``wait``) and leave a lock held that the cleanup then waits on forever. Only signals
    whose handler would raise are taken over (not an ignored SIGINT, not SIGTERM outside the CLI), and only
    from the main thread, the one Python delivers signals to.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum, frame):
        received.append(signum)
        stop.set()

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if callable(h)}
    for s in previous:
        signal.signal(s, record)
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def write_plan(
    plan: Plan, out: Path, options: Options, link: bool = False, progress=None, on_bytes=None
) -> dict[str, int]:
    """Write every file of ``plan`` into the empty directory ``out``; returns how many shards were written how.

    ``progress(message)`` is called when a shard is written; ``on_bytes(done, total)``, from the workers,
    as bytes are copied, written and hashed.

    Two workers check the config, copy shards and hash the sources in the order of :class:`_Queue`; a third
    thread flushes each finished file to the disk while the rest run. Only this thread receives signals, and
    it imports nothing meanwhile: a Ctrl-C or SIGTERM that broke off an import here would leave a module lock
    held, and a worker's own import (numpy, jsonschema) would wait on it forever. On an error, Ctrl-C or
    SIGTERM the workers stop at their next chunk, so nothing runs on after the staging dir is removed; a
    signal only sets ``stop`` (:func:`_signals_set`), and the loop raises KeyboardInterrupt once the workers
    have returned.
    """
    ckpt = plan.checkpoint
    read = [s.path.name for s in ckpt.shards] + plan.copies + [n for n in plan.json_files if (ckpt.path / n).exists()]
    read += [ckpt.index_name] if ckpt.index_name is not None else []
    size = lambda name: (ckpt.path / name).stat().st_size
    jobs = [_Job("check", 0, "config.json", partial(_check_config, plan))]
    for name, shard in plan.shards.items():
        if isinstance(shard, Header):
            reads = frozenset({shard.path})
        else:
            reads = frozenset(p.path for t in shard for p in t.parts if isinstance(p, ByteRange))
        kind = "assemble" if isinstance(shard, list) else "copy"
        jobs.append(_Job(kind, _shard_bytes(shard), name, partial(_write_shard, out / name, shard, ckpt, link), reads))
    jobs += [
        _Job("copy", size(n), n, partial(_write_copy, out / n, ckpt.path / n), frozenset({ckpt.path / n}))
        for n in plan.copies
    ]
    if options.hash_sources:
        jobs += [
            _Job("hash", size(n), n, partial(_sha256, ckpt.path / n), frozenset({ckpt.path / n})) for n in set(read)
        ]
    meter = _Meter(sum(j.size for j in jobs), on_bytes)
    jobs = [j if j.kind == "check" else replace(j, run=partial(j.run, advance=meter.add)) for j in jobs]
    queue = _Queue(jobs)
    stop = threading.Event()
    with (
        _signals_set(stop) as received,
        ThreadPoolExecutor(max_workers=WORKERS) as pool,
        ThreadPoolExecutor(max_workers=1) as background,
    ):
        try:
            running: dict = {}
            methods = {"copied": 0, "assembled": 0, "reflink": 0, "hardlink": 0}
            digests, flushes = {}, []
            while True:
                while not received and len(running) < WORKERS and (job := queue.take()) is not None:
                    running[pool.submit(job.run, stop)] = job
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                if received:
                    raise KeyboardInterrupt
                for future in finished:
                    job = running.pop(future)
                    result = future.result()
                    queue.done(job)
                    if job.kind == "hash":
                        digests[job.name] = result
                    if result in ("copied", "assembled", "file"):  # linked files share the source's blocks
                        flushes.append(background.submit(sync_file, out / job.name))
                    if result in methods:
                        methods[result] += 1
                        if progress:
                            progress(f"[{sum(methods.values())}/{len(plan.shards)}] {job.name}")
            for future in flushes:
                future.result()
            if received:
                raise KeyboardInterrupt
        except BaseException:  # an error, Ctrl-C or SIGTERM: stop every worker now
            stop.set()
            pool.shutdown(cancel_futures=True)
            background.shutdown(cancel_futures=True)
            raise
    for name, obj in plan.json_files.items():
        write_file(out / name, _dump(dict(sorted(obj.items())) if name == "config.json" else obj))
    for name, data in plan.generated.items():
        write_file(out / name, data)
    if plan.index is not None:
        write_file(out / INDEX, _dump(plan.index))
    write_file(out / MANIFEST, _dump(_manifest(plan, options, dict(sorted(digests.items())))))
    return methods


def _shard_bytes(shard: Header | list[OutTensor]) -> int:
    return shard.size if isinstance(shard, Header) else sum(t.nbytes for t in shard)


class _Meter:
    """Bytes done out of a total, summed across the workers, reported to ``callback(done, total)``."""

    def __init__(self, total: int, callback):
        self.total, self.done, self.callback = total, 0, callback
        self.lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        if self.callback is not None:
            with self.lock:
                self.done += nbytes
                self.callback(self.done, self.total)


def _write_shard(
    target: Path, shard: Header | list[OutTensor], ckpt: Checkpoint, link: bool, stop, advance=None
) -> str:
    """Write one shard: linked or copied whole when unchanged, else assembled; returns which."""
    if isinstance(shard, Header) and link:
        method = _link(shard.path, target)
        if method:
            if advance is not None:
                advance(shard.size)
            return method
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        if isinstance(shard, Header):
            write_parts(fd, [ByteRange(shard.path, 0, shard.size)], stop, advance)
            return "copied"
        header, ordered = layout(shard, _metadata(ckpt, shard))
        write_parts(fd, [header] + [p for t in ordered for p in t.parts], stop, advance)
        return "assembled"
    finally:
        os.close(fd)


def _write_copy(target: Path, source: Path, stop, advance=None) -> str:
    """Copy a file that needs no change (tokenizer model, chat template, README, ...)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        write_parts(fd, [ByteRange(source, 0, source.stat().st_size)], stop, advance)
    finally:
        os.close(fd)
    return "file"


def _metadata(ckpt: Checkpoint, tensors: list[OutTensor]) -> dict[str, str]:
    """``__metadata__`` of an assembled shard: the first source shard's, with ``format: pt``."""
    first = next((s for s in ckpt.shards if any(t.name in s.tensors for t in tensors)), ckpt.shards[0])
    return {**(first.metadata or {}), "format": "pt"}


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    link: bool = False,
    adapter: str | Path | None = None,
    registry: Registry | None = None,
    progress=None,
    revision: str | None = None,
    on_bytes=None,
    **options,
) -> dict:
    """Convert the checkpoint at ``src`` into a reward model at ``dst``; returns the report.

    ``src`` is a directory, or a Hub repo id ``org/name`` at ``revision`` (see :func:`rmconvert.hub.resolve_source`).
    ``options`` are the fields of :class:`Options`. ``link`` reflinks or hard-links shards that are
    unchanged instead of copying them (a hard-linked file shares its inode with the source).
    ``progress(message)`` is called as each shard is written, ``on_bytes(done, total)`` from the workers
    as bytes are copied, written and hashed.
    ``adapter`` is a PEFT LoRA adapter directory merged into ``src`` first; ``src`` may itself be an adapter
    whose ``base_model_name_or_path`` names the base.
    """
    options["max_shard_size"] = parse_size(options.get("max_shard_size"))
    opts = Options(**options)
    opts.check()
    dst = Path(dst)
    if is_repo_id_source(src):
        check_destination(None, dst, overwrite)  # what DST alone decides, before the download
    src = resolve_source(src, revision)
    require_directory(src)
    if adapter is None and is_adapter(src) and not (src / "config.json").exists():
        adapter = src
    lora = read_adapter(adapter) if adapter is not None else None
    if lora is not None:
        src = resolve_base(lora) if lora.path == src else src
        require_directory(src)
        check_destination(lora.path, dst, overwrite)
    check_destination(src, dst, overwrite)
    registry = registry or load_registry()
    ckpt = open_checkpoint(src)
    registered = registry.resolve(ckpt.model_type, opts.arch, ckpt.config_path)
    plan = plan_conversion(ckpt, registered, opts, lora)
    try:
        with staged(dst, overwrite) as out:
            plan.report["written"] = write_plan(plan, out, opts, link, progress, on_bytes)
    except OSError as exc:
        raise OutputError(f"write failed: {exc.strerror or exc}", exc.filename or dst) from None
    plan.report["destination"] = str(dst)
    return plan.report
