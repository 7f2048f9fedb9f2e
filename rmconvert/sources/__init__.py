"""Where a checkpoint comes from: what the user typed (a directory, a Hub repo id, an adapter) resolved in one call."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .adapter import Adapter, is_adapter, read_adapter, resolve_base
from .checkpoint import Checkpoint, open_checkpoint, require_directory
from .hub import is_repo_id_source, resolve_source

__all__ = ["Source", "is_repo_id_source", "resolve"]


@dataclass
class Source:
    """A resolved source: the checkpoint directory and, when one was given, the LoRA adapter to merge into it."""

    path: Path
    adapter: Adapter | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        """The directories read: the adapter's (when given), then the checkpoint's."""
        return ((self.adapter.path,) if self.adapter else ()) + (self.path,)

    @cached_property
    def checkpoint(self) -> Checkpoint:
        """The checkpoint, read from its headers on first use (a value-head side file included)."""
        return open_checkpoint(self.path)


def resolve(spec: str | os.PathLike, revision: str | None = None, adapter: str | os.PathLike | None = None) -> Source:
    """Resolve ``spec`` (a directory or a Hub repo id at ``revision``) and ``adapter``; ``spec`` may itself be an
    adapter directory, whose ``base_model_name_or_path`` names the base (a directory or a repo id)."""
    path = resolve_source(spec, revision)
    require_directory(path)
    if adapter is None and is_adapter(path) and not (path / "config.json").exists():
        adapter = path
    lora = read_adapter(adapter) if adapter is not None else None
    if lora is not None and lora.path == path:
        path = resolve_base(lora)
        require_directory(path)
    return Source(path, lora)
