"""rmconvert: turn causal-LM checkpoints into reward-model checkpoints, and check that they are sound."""

__version__ = "0.1.0"

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from . import schemas
from .doctor.validation import validate
from .engine import convert
from .errors import CheckpointError, RMConvertError
from .families.architecture import Architecture
from .families.hookspecs import hookimpl
from .families.loading import load_reward_model

__all__ = [
    "Architecture",
    "CheckpointError",
    "RMConvertError",
    "convert",
    "hookimpl",
    "load_reward_model",
    "schemas",
    "validate",
]

#: The flat package's modules, before it was split into layers: still importable under their old names (with a
#: DeprecationWarning), since third-party plugins and their tests import them.
MOVED = {
    f"rmconvert.{old}": f"rmconvert.{new}"
    for old, new in {
        "architecture": "families.architecture",
        "checkpoint": "sources.checkpoint",
        "checks": "doctor.checks",
        "findings": "doctor.findings",
        "head": "engine.head",
        "hookspecs": "families.hookspecs",
        "host": "families.host",
        "hub": "sources.hub",
        "loading": "families.loading",
        "lora_merge": "engine.lora_merge",
        "modeling": "families.modeling",
        "output": "io.output",
        "pad": "engine.pad",
        "probes": "doctor.probes",
        "reward_head": "families.reward_head",
        "safetensors_io": "io.safetensors",
        "schema": "families.schema",
        "structure": "families.structure",
        "tokenizer_files": "sources.tokenizer_files",
        "torch_zip": "io.torch_zip",
        "validation": "doctor.validation",
    }.items()
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name (:data:`MOVED`) as the module that now holds its code."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} is now {MOVED[spec.name]}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        """The module is the new one, already executed."""


sys.meta_path.append(_MovedModules())
