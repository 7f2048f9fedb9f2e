"""rmconvert: turn causal-LM checkpoints into reward-model checkpoints, and check that they are sound."""

__version__ = "0.1.0"

from . import schemas  # noqa: E402  (for plugins: schemas.path(name))
from .architecture import Architecture  # noqa: E402
from .engine import convert  # noqa: E402
from .errors import CheckpointError, RMConvertError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .loading import load_reward_model  # noqa: E402
from .validation import validate  # noqa: E402

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
