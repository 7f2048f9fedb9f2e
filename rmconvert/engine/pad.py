"""Where the pad token is chosen. The pad decides where a reward is read, so the choice is explicit.

transformers pools a sequence-classification model at the rightmost token that is not
``config.pad_token_id``; a pad equal to eos moves that position, so the default pad is never an eos.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ..errors import CheckpointError
from ..sources.checkpoint import text_config
from ..sources.tokenizer_files import TokenizerFiles

NEW_PAD = "<pad>"
#: Names of tokens real sequences hold even though they are special: media placeholders (``<|image_pad|>``)
#: and chat or tool structure (``<|im_start|>``, ``<|start_header_id|>``), in every conversation. A pad must
#: be none of them: open-instruct masks attention by ``ids != pad_token_id``.
IN_USE = re.compile(r"image|video|vision|audio|im_start|im_end|header|eot|eom|turn|inst|tool|think", re.IGNORECASE)
#: Names of tokens a vocabulary keeps spare (Llama 3 ``<|reserved_special_token_0|>``, Gemma ``<unused0>``,
#: Phi-3 ``<|placeholder1|>``, T5 ``<extra_id_0>``).
SPARE = re.compile(r"reserved|unused|placeholder|dummy|extra_id", re.IGNORECASE)
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
    reason: str = ""
    warnings: tuple[str, ...] = field(default=())

    @property
    def is_new(self) -> bool:
        return self.action == "added"


def token_ids(value) -> set[int]:
    """The token ids of a config field: an int, a list of ints, or nothing."""
    if type(value) is int:
        return {value}
    if isinstance(value, list):
        return {v for v in value if type(v) is int}
    return set()


def eos_ids(config: dict, generation_config: dict | None, tok: TokenizerFiles) -> set[int]:
    """Every id that ends a sequence: config, text config, generation config and tokenizer eos."""
    ids = token_ids(config.get("eos_token_id")) | token_ids(text_config(config).get("eos_token_id"))
    ids |= token_ids((generation_config or {}).get("eos_token_id"))
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
    media: frozenset[int] = frozenset(),
) -> PadChoice:
    """Pick the pad for ``mode`` (auto | eos | keep | existing | a token's text); never one of ``media``, the
    ids a processor inserts for images, video or audio, unless asked to keep it."""
    eos = eos_ids(config, generation_config, tok)
    names = {i: t for t, i in tok.ids.items()}
    current = current_pad_id(config, tok)
    if mode == "existing":
        return _existing(tok, eos, current, preferred, reward_model, media)
    if mode == "keep" or (mode == "auto" and reward_model and current is not None):
        warnings = []
        if current is None:
            warnings.append("no pad token: transformers refuses batches of more than one sequence")
        elif current in eos:
            kept = "as asked (--pad-token keep)" if mode == "keep" else "because the reward model was trained with it"
            warnings.append(f"{EOS_WARNING}; kept {kept}")
        reason = "--pad-token keep" if mode == "keep" else "the pad the reward model was trained with"
        return PadChoice(names.get(current), current, "keep" if mode == "keep" else "kept", reason, tuple(warnings))
    if mode == "eos":
        token = tok.special("eos")
        eos_id = tok.ids.get(token) if token else None
        eos_id = eos_id if eos_id is not None else min(eos, default=None)
        return PadChoice(names.get(eos_id), eos_id, "eos", "--pad-token eos", (EOS_WARNING,))
    if mode == "auto":
        if current is not None and current not in eos and current not in media and current in names:
            return PadChoice(names[current], current, "kept", "the configured pad, not an eos")
        taken = eos | media | {tok.special_id("bos"), tok.special_id("unk")}
        for token in preferred:
            if token in tok.ids and tok.ids[token] not in taken:
                return PadChoice(token, tok.ids[token], "reused", "an unused pad token already in the vocabulary")
        return _added(NEW_PAD if NEW_PAD not in tok.ids else "<|rmconvert_pad|>", tok, eos)
    if mode in tok.ids:
        warnings = (EOS_WARNING,) if tok.ids[mode] in eos else ()
        choice = PadChoice(mode, tok.ids[mode], "given", "--pad-token TOKEN", warnings)
    else:
        choice = _added(mode, tok, eos, "--pad-token TOKEN, not in the vocabulary")
    if reward_model and choice.id != current:
        moved = f"changed the reward model's pad to {mode!r}: this moves where rewards are read (retrain)"
        choice = replace(choice, warnings=(*choice.warnings, moved))
    return choice


def _added(
    token: str, tok: TokenizerFiles, eos: set[int], reason: str = "no pad distinct from every eos in the vocabulary"
) -> PadChoice:
    """A new token at the next free id, which no eos id may claim (a config naming an id the tokenizer lacks);
    ``reason``: why (auto found no pad to reuse, or the token was asked for)."""
    if len(tok) in eos:
        raise CheckpointError(
            f"an eos_token_id is {len(tok)}, past the tokenizer's last id {len(tok) - 1}: the new pad would be an eos",
            tok.path / "config.json",
        )
    return PadChoice(token, len(tok), "added", reason)


def _existing(
    tok: TokenizerFiles, eos: set[int], current: int | None, preferred, reward_model: bool, media=frozenset()
) -> PadChoice:
    """A pad among the tokens the tokenizer already has, never an eos, bos or a token real sequences hold, so
    the vocabulary stays the policy's (TRL and open-instruct feed the policy's ids to a value model made from
    the reward model)."""
    names = {i: t for t, i in tok.ids.items()}
    taken = eos | set(media) | {tok.special_id("bos")}
    added = [(e["content"], e["id"]) for e in sorted(tok.tokenizer["added_tokens"], key=lambda e: e["id"])]
    usable = [(t, i) for t, i in added if i not in taken and not IN_USE.search(t)]
    candidates = (
        [(names.get(current), current, "kept", "the configured pad, not an eos")] if current not in taken else []
    )
    candidates += [
        (t, tok.ids[t], "reused", "a pad token already in the vocabulary") for t in preferred if t in tok.ids
    ]
    candidates += [
        (t, i, "reused", "a pad-like special token already in the vocabulary") for t, i in usable if "pad" in t.lower()
    ]
    candidates += [
        (t, i, "reused", "a reserved special token, unused by real sequences") for t, i in usable if SPARE.search(t)
    ]
    unk = tok.special_id("unk")
    candidates += [(tok.special("unk"), unk, "reused", "the unknown token (no pad, pad-like or reserved token)")]
    for token, token_id, action, reason in candidates:
        if token is not None and token_id is not None and token_id not in taken and token_id in names:
            warnings = ()
            if reward_model and token_id != current:
                warnings = (f"changed the reward model's pad to {token!r}: this moves where rewards are read",)
            return PadChoice(token, token_id, action, f"--pad-token existing: {reason}", warnings)
    raise CheckpointError(
        "--pad-token existing: no token qualifies as pad (no configured pad other than an eos, no pad-like,"
        " reserved or unknown token); use --pad-token auto to add <pad>",
        tok.path / "tokenizer.json",
    )
