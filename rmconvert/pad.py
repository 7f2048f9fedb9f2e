"""Where the pad token is chosen. The pad decides where a reward is read, so the choice is explicit.

transformers pools a sequence-classification model at the rightmost token that is not
``config.pad_token_id``; a pad equal to eos moves that position, so the default pad is never an eos.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checkpoint import text_config
from .errors import CheckpointError
from .tokenizer_files import TokenizerFiles

NEW_PAD = "<pad>"
EOS_WARNING = (
    "pad = eos: transformers >= 4.49 then reads the reward at the token before the final eos, and older"
    " versions at the token before the first eos (often the end of the prompt)"
)


@dataclass(frozen=True)
class PadChoice:
    """The pad token of the output, its id, and how it was chosen."""

    token: str | None
    id: int | None
    action: str  # kept | reused | added | eos | keep | given
    warnings: tuple[str, ...] = field(default=())

    @property
    def is_new(self) -> bool:
        return self.action == "added"


def _ids(value) -> set[int]:
    if type(value) is int:
        return {value}
    if isinstance(value, list):
        return {v for v in value if type(v) is int}
    return set()


def eos_ids(config: dict, generation_config: dict | None, tok: TokenizerFiles) -> set[int]:
    """Every id that ends a sequence: config, text config, generation config and tokenizer eos."""
    ids = _ids(config.get("eos_token_id")) | _ids(text_config(config).get("eos_token_id"))
    ids |= _ids((generation_config or {}).get("eos_token_id"))
    if tok.special_id("eos") is not None:
        ids.add(tok.special_id("eos"))
    return ids


def current_pad_id(config: dict, tok: TokenizerFiles) -> int | None:
    """The pad id the checkpoint uses now: config.json's, else the tokenizer's."""
    configured = text_config(config).get("pad_token_id", config.get("pad_token_id"))
    return configured if type(configured) is int else tok.special_id("pad")


def choose_pad(
    mode: str,
    tok: TokenizerFiles,
    config: dict,
    generation_config: dict | None,
    preferred: tuple[str, ...],
    reward_model: bool,
) -> PadChoice:
    """Pick the pad for ``mode`` (auto | eos | keep | a token's text)."""
    eos = eos_ids(config, generation_config, tok)
    names = {i: t for t, i in tok.ids.items()}
    current = current_pad_id(config, tok)
    if mode == "keep" or (mode == "auto" and reward_model and current is not None):
        warnings = []
        if current is None:
            warnings.append("no pad token: transformers refuses batches of more than one sequence")
        elif current in eos:
            warnings.append(EOS_WARNING + "; kept because the reward model was trained with it")
        return PadChoice(names.get(current), current, "keep" if mode == "keep" else "kept", tuple(warnings))
    if mode == "eos":
        token = tok.special("eos")
        eos_id = tok.ids.get(token) if token else None
        eos_id = eos_id if eos_id is not None else min(eos, default=None)
        return PadChoice(names.get(eos_id), eos_id, "eos", (EOS_WARNING,))
    if mode == "auto":
        if current is not None and current not in eos and current in names:
            return PadChoice(names[current], current, "kept")
        taken = eos | {tok.special_id("bos"), tok.special_id("unk")}
        for token in preferred:
            if token in tok.ids and tok.ids[token] not in taken:
                return PadChoice(token, tok.ids[token], "reused")
        return _added(NEW_PAD if NEW_PAD not in tok.ids else "<|rmconvert_pad|>", tok, eos)
    if mode in tok.ids:
        warnings = (EOS_WARNING,) if tok.ids[mode] in eos else ()
        return PadChoice(mode, tok.ids[mode], "given", warnings)
    return _added(mode, tok, eos)


def _added(token: str, tok: TokenizerFiles, eos: set[int]) -> PadChoice:
    """A new token at the next free id, which no eos id may claim (a config naming an id the tokenizer lacks)."""
    if len(tok) in eos:
        raise CheckpointError(
            f"an eos_token_id is {len(tok)}, past the tokenizer's last id {len(tok) - 1}: the new pad would be an eos",
            tok.path / "config.json",
        )
    return PadChoice(token, len(tok), "added")
