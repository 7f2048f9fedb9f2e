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

#: Options that choose how the source's head (or LM head) becomes ``score``; absent from rmconvert.json when not
#: given, so that the conversions of before these options existed keep their bytes.
HEAD_RULE_OPTIONS = ("label_names", "objective", "weights", "head_from_tokens")


def split_list(text: str) -> tuple[str, ...]:
    """``a,b,c`` as a tuple, each item exactly as written (a token may start with a space; an empty item stays,
    to be refused by :meth:`Options.check`)."""
    return tuple(text.split(","))


def parse_weights(text: str) -> tuple[float, ...]:
    """``0.3,-0.33,...`` as floats."""
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise UsageError(f"--weights {text!r} is not a comma-separated list of numbers") from None


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
    text_only: bool = False  # recorded in rmconvert.json only when set
    step_separator: str | None = None  # a PRM's step tag, recorded as config.json step_tag_id

    # head rules (docs/heads.md); None: the head as found. Recorded in rmconvert.json only when given.
    label_names: tuple[str, ...] | None = None
    objective: str | None = None
    weights: tuple[float, ...] | None = None
    head_from_tokens: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("label_names", "head_from_tokens"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, split_list(value))
        if isinstance(self.weights, str):
            object.__setattr__(self, "weights", parse_weights(self.weights))
        elif self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if isinstance(self.objective, int):
            object.__setattr__(self, "objective", str(self.objective))

    def recorded(self) -> dict:
        """The options as rmconvert.json records them (head rules and the step separator only when given,
        ``text_only`` only when set)."""
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self).items()
            if (k not in (*OPTIONAL, *HEAD_RULE_OPTIONS) or v is not None) and (k != "text_only" or v)
        }

    @property
    def target(self) -> Target:
        """What the output is (a reward model, a value model, a PRM: rmconvert.families.target)."""
        return TARGETS[self.head]

    @property
    def head_rule(self) -> bool:
        """Whether a head rule option was given."""
        return any(getattr(self, name) is not None for name in HEAD_RULE_OPTIONS)

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
        chosen = [f"--{n.replace('_', '-')}" for n in ("objective", "weights", "head_from_tokens") if getattr(self, n)]
        if len(chosen) > 1:
            raise UsageError(f"{' and '.join(chosen)} both say which rows make the head: give one")
        for name in ("label_names", "head_from_tokens"):
            value = getattr(self, name)
            if value is not None and (not value or not all(value)):
                raise UsageError(f"--{name.replace('_', '-')} must list non-empty names, separated by commas")
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise UsageError(f"--label-names {','.join(self.label_names)}: a name is given twice")
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            raise UsageError("--weights must be finite numbers")
        if self.objective is not None and not self.objective:
            raise UsageError("--objective must be a label name or a row number")
        tokens = self.head_from_tokens
        if tokens is not None and self.head == "prm" and len(tokens) != 2:
            raise UsageError(
                f"--head prm --head-from-tokens takes 2 tokens NEG,POS (score = the LM head's rows of both),"
                f" not {len(tokens)}"
            )
        if tokens is not None and self.head == "value" and len(tokens) > 2:
            raise UsageError(
                f"--head value makes 1 row: --head-from-tokens takes 1 token (its row) or 2 (POS - NEG), not {len(tokens)}"
            )
        if self.head == "prm" and (self.objective is not None or self.weights is not None):
            given = "--objective" if self.objective is not None else "--weights"
            raise UsageError(f"{given} makes a 1-row head; --head prm has 2 labels (use --head value or scalar)")
