"""Read and patch tokenizer files as JSON: tokenizer.json, tokenizer_config.json, special_tokens_map.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .checkpoint import read_json

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


def token_content(value) -> str | None:
    """A special-token entry as its text (entries are strings or AddedToken dicts)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class TokenizerFiles:
    """The JSON tokenizer files of a checkpoint and the vocabulary they define."""

    path: Path
    tokenizer: dict
    tokenizer_config: dict
    special_tokens_map: dict | None
    ids: dict[str, int]

    @classmethod
    def read(cls, path: Path) -> TokenizerFiles:
        """Read the tokenizer files of checkpoint directory ``path``; tokenizer.json is required."""
        tok_path = path / TOKENIZER
        if not tok_path.exists():
            raise CheckpointError(
                "missing: rmconvert reads the vocabulary from a fast tokenizer (save it with a transformers"
                " PreTrainedTokenizerFast)",
                tok_path,
            )
        tokenizer = read_json(tok_path)
        model = tokenizer.get("model")
        added = tokenizer.get("added_tokens", [])
        if not isinstance(model, dict) or not isinstance(added, list):
            raise CheckpointError("no model vocabulary or added_tokens list", tok_path)
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            ids = {k: v for k, v in vocab.items() if type(v) is int}
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            ids = {entry[0]: i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
        else:
            raise CheckpointError("model.vocab is neither a mapping nor a list", tok_path)
        for entry in added:
            if (
                not isinstance(entry, dict)
                or type(entry.get("id")) is not int
                or not isinstance(entry.get("content"), str)
            ):
                raise CheckpointError(f"malformed added_tokens entry {entry!r}", tok_path)
            ids[entry["content"]] = entry["id"]
        if not ids:
            raise CheckpointError("empty vocabulary", tok_path)
        return cls(
            path,
            tokenizer,
            read_json(path / TOKENIZER_CONFIG, required=False) or {},
            read_json(path / SPECIAL_TOKENS_MAP, required=False),
            ids,
        )

    def __len__(self) -> int:
        """Ids the tokenizer can produce: highest id + 1 (``len(tokenizer)`` for a well-formed one)."""
        return max(self.ids.values()) + 1

    def special(self, role: str) -> str | None:
        """Text of the ``<role>_token`` (pad, eos, bos, unk) as the tokenizer config declares it."""
        key = f"{role}_token"
        for source in (self.tokenizer_config, self.special_tokens_map or {}):
            if key in source:
                return token_content(source[key])
        return None

    def special_id(self, role: str) -> int | None:
        text = self.special(role)
        return self.ids.get(text) if text is not None else None

    def with_pad(self, token: str) -> dict[str, dict]:
        """Patched copies of the files, keyed by file name, that make ``token`` the pad (added if new)."""
        tokenizer = dict(self.tokenizer)  # shallow copies: only the parts that change are replaced
        tokenizer_config = dict(self.tokenizer_config)
        token_id = self.ids.get(token)
        if token_id is None:
            token_id = len(self)
            entry = {
                "id": token_id,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            tokenizer["added_tokens"] = [*tokenizer["added_tokens"], entry]
            if isinstance(tokenizer_config.get("added_tokens_decoder"), dict):
                decoder_entry = {k: v for k, v in entry.items() if k != "id"}
                tokenizer_config["added_tokens_decoder"] = {
                    **tokenizer_config["added_tokens_decoder"],
                    str(token_id): decoder_entry,
                }
        if isinstance(tokenizer.get("padding"), dict):
            tokenizer["padding"] = {**tokenizer["padding"], "pad_id": token_id, "pad_token": token}
        tokenizer_config["pad_token"] = _replace_content(tokenizer_config.get("pad_token"), token)
        files = {TOKENIZER: tokenizer, TOKENIZER_CONFIG: tokenizer_config}
        if self.special_tokens_map is not None:
            special = dict(self.special_tokens_map)
            special["pad_token"] = _replace_content(special.get("pad_token"), token)
            files[SPECIAL_TOKENS_MAP] = special
        return files


def _replace_content(old, token: str):
    if isinstance(old, dict):
        return {**old, "content": token}
    return token
