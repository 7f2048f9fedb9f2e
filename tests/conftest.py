"""Shared fixtures: tiny real checkpoints built once per session (random weights, local tokenizers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rmconvert.testing import build_checkpoint, snapshot  # noqa: F401  (snapshot: see rmconvert.testing)


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    """``build(kind, **kwargs)`` -> path of a cached tiny checkpoint; treat it as read-only."""
    cache: dict = {}

    def _build(kind: str, **kwargs) -> Path:
        key = (kind, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build_checkpoint(kind, tmp_path_factory.mktemp(kind) / "src", **kwargs)
        return cache[key]

    return _build


@pytest.fixture
def writable_copy(tmp_path):
    """``writable_copy(path)`` -> a private copy of a checkpoint that a test may damage."""

    def _copy(path: Path, name: str = "src") -> Path:
        return Path(shutil.copytree(path, tmp_path / name))

    return _copy
