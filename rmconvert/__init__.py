"""rmconvert: turn causal-LM checkpoints into reward-model checkpoints, and check that they are sound."""

__version__ = "0.1.0"

from . import schemas
from .architecture import Architecture
from .engine import convert
from .errors import CheckpointError, RMConvertError
from .hookspecs import hookimpl
from .loading import load_reward_model
from .validation import validate

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
