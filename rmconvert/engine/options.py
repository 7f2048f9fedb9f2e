"""What the output depends on: the conversion options, checked before anything is read."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..dtypes import TORCH_NAMES
from ..errors import UsageError
from ..families.target import TARGETS, Target

#: --head name -> labels of the head it makes (the target of each: rmconvert.families.target.TARGETS).
HEADS = {name: target.labels for name, target in TARGETS.items()}

#: Options absent from rmconvert.json when not given, so that conversions made before they existed keep their bytes.
OPTIONAL = ("step_separator",)

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
    step_separator: str | None = None  # a PRM's step tag, recorded as config.json step_tag_id

    @property
    def target(self) -> Target:
        """What the output is (a reward model, a value model, a PRM: rmconvert.families.target)."""
        return TARGETS[self.head]

    def recorded(self) -> dict:
        """The options as rmconvert.json records them (an optional one only when given)."""
        return {k: v for k, v in asdict(self).items() if k not in OPTIONAL or v is not None}

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
        if self.step_separator is not None and not self.target.per_token:
            raise UsageError(
                f"--step-separator marks the steps a PRM scores: give it with --head prm or value, not {self.head}"
            )
        if self.head == "prm" and self.from_bt != "row1":
            raise UsageError("--from-bt chooses how a 2-label head becomes 1 label; --head prm keeps 2 labels")
        if self.step_separator == "":
            raise UsageError("--step-separator must not be empty")
