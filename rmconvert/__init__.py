"""rmconvert: turn causal-LM checkpoints into reward-model checkpoints, and check that they are sound."""

__version__ = "0.1.0"

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
