"""JSON schemas (draft 2020-12) of reward-model configs, shipped as ``rmconvert.schemas``."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """Path of the built-in schema ``<name>.schema.json``."""
    return HERE / f"{name}.schema.json"
