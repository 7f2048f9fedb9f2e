"""A PEFT LoRA adapter directory as the user gave it: its config checked, its tensors located (headers only).

What merging it means is decided by the engine (:mod:`rmconvert.engine.merge`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..io.safetensors import TensorInfo
from .checkpoint import check_links, read_json, read_weights, require_directory
from .hub import resolve_source

ADAPTER_CONFIG = "adapter_config.json"

ADAPTER_WEIGHTS = "adapter_model.safetensors"

ADAPTER_PICKLE = "adapter_model.bin"

#: Task types merged: a policy/SFT adapter (new head) or a reward-model adapter (its saved head).
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", None)

#: adapter_config.json settings whose merge rmconvert does not reproduce: refused, never approximated.
UNSUPPORTED = {
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "mica": "MiCA (mica)",
    "kasa_config": "KaSA (kasa_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "megatron_config": "Megatron layers (megatron_config)",
}


@dataclass
class Adapter:
    """A PEFT LoRA adapter directory as read from disk: its config and every tensor's location."""

    path: Path
    config: dict
    weights: Path
    tensors: dict[str, TensorInfo]

    @property
    def config_path(self) -> Path:
        return self.path / ADAPTER_CONFIG

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")


def is_adapter(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (has adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_weights(path: Path) -> tuple[Path, dict[str, TensorInfo]]:
    """The adapter's weights file and its tensors, from headers only: ``adapter_model.safetensors``, else
    ``adapter_model.bin`` through the safe ``.bin`` reader (no pickle code run, no tensor loaded)."""
    for name in (ADAPTER_WEIGHTS, ADAPTER_PICKLE):
        if (path / name).exists():
            return path / name, read_weights(path / name).tensors
    raise CheckpointError(f"no {ADAPTER_WEIGHTS} or {ADAPTER_PICKLE}: the adapter's weights are missing", path)


def resolve_base(adapter: Adapter) -> Path:
    """The base checkpoint named by ``base_model_name_or_path``: a local directory (absolute, or relative to the
    working directory as PEFT reads it), else a Hub repo id at the adapter's ``revision``."""
    name = adapter.config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise CheckpointError("no base_model_name_or_path: give the base checkpoint (rmconvert convert BASE DST"
                              " --adapter ADAPTER)", adapter.config_path)  # fmt: skip
    local = Path(name).expanduser()
    revision = adapter.config.get("revision")
    base = local if local.is_dir() else resolve_source(name, revision if isinstance(revision, str) else None)
    if not base.is_dir():
        raise CheckpointError(
            f"base_model_name_or_path {name!r} is neither a local directory nor a Hugging Face repo id:"
            " give the base checkpoint (rmconvert convert BASE DST --adapter ADAPTER)",
            adapter.config_path,
        )
    return base


def read_adapter(path: str | Path) -> Adapter:
    """Read and check a LoRA adapter directory; raises CheckpointError naming the file for anything else."""
    path = Path(path)
    require_directory(path)
    if not is_adapter(path):
        raise CheckpointError(f"no {ADAPTER_CONFIG}: not a PEFT adapter directory", path)
    check_links(path)
    config = read_json(path / ADAPTER_CONFIG)
    where = path / ADAPTER_CONFIG
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(f"peft_type {peft_type!r}: only LoRA adapters (LORA) can be merged", where)
    if config.get("task_type") not in TASK_TYPES:
        raise CheckpointError(
            f"task_type {config['task_type']!r}: only CAUSAL_LM and SEQ_CLS adapters are merged", where
        )
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{what} is not merged by rmconvert (never approximately): merge it with PEFT", where)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda")):
        raise CheckpointError(f"init_lora_weights {init!r} changes the base weights: merge it with PEFT", where)
    for key in ("r", "lora_alpha"):
        if not _positive(config.get(key)):
            raise CheckpointError(f"{key} must be a positive number, not {config.get(key)!r}", where)
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(_positive(v) for v in patterns.values()):
            raise CheckpointError(f"{key} must map module names to positive numbers", where)
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise CheckpointError(f"{key} key {pattern!r} is not a regex: {exc}", where) from None
    weights, tensors = read_adapter_weights(path)
    return Adapter(path, config, weights, tensors)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
