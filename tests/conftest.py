"""Shared fixtures: tiny real checkpoints built once per session (random weights, local tokenizers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Before torch loads MKL: MKL's default code path on some CPUs (AMD EPYC with AVX2, measured) rounds a matrix product
# differently when an operand lies 8 bytes off a 16-byte boundary, and transformers maps the weights where they lie in
# the file. The bit-for-bit checks compare conversions, not addresses: BLAS runs in its strict reproducible mode.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

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


@pytest.fixture(scope="session")
def vlm_policy(tmp_path_factory):
    """``vlm_policy(model_type, released=False)`` -> a cached tiny image-text policy of ``rmconvert.tiny_vlm``
    (Qwen2-VL and Qwen2.5-VL in their released ``model.*`` + ``visual.*`` names, or the canonical ones); read-only."""
    from rmconvert import tiny_vlm

    cache: dict = {}

    def _policy(model_type: str, released: bool = False) -> Path:
        if (model_type, released) not in cache:
            src = tiny_vlm.build_policy(model_type, tmp_path_factory.mktemp(model_type) / "policy")
            if model_type in ("qwen2_vl", "qwen2_5_vl"):
                tiny_vlm.qwen_layout(src, canonical=not released)
            cache[model_type, released] = src
        return cache[model_type, released]

    return _policy


@pytest.fixture
def writable_copy(tmp_path):
    """``writable_copy(path)`` -> a private copy of a checkpoint that a test may damage."""

    def _copy(path: Path, name: str = "src") -> Path:
        return Path(shutil.copytree(path, tmp_path / name))

    return _copy


HEAVY_MODULES = ("torch", "transformers", "huggingface_hub")
_CONVERT_AND_LIST_MODULES = f"""
import sys
from rmconvert.cli import main
sys.argv = ["rmconvert", "convert", sys.argv[1], sys.argv[2]]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
print("imported:", *(m for m in {HEAVY_MODULES!r} if m in sys.modules))
"""


@pytest.fixture
def imported_by_convert(tmp_path):
    """``imported_by_convert(src, dst, env=None, cwd=tmp_path)`` -> which of :data:`HEAVY_MODULES` a fresh
    interpreter imported to run ``rmconvert convert SRC DST`` (which must succeed)."""

    def _run(src, dst: Path, env: dict | None = None, cwd: Path = tmp_path) -> set[str]:
        command = [sys.executable, "-c", _CONVERT_AND_LIST_MODULES, str(src), str(dst)]
        # run outside the repository: from its root, ``-c`` would import the source tree, not the installed package
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, check=False)
        assert result.returncode == 0, result.stderr
        return set(result.stdout.splitlines()[-1].split()[1:])

    return _run
