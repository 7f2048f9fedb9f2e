"""``rmconvert validate``: static checks of a reward-model checkpoint, each finding with a stable code."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .checkpoint import INDEX, Checkpoint, open_checkpoint, read_json, text_config
from .errors import CheckpointError
from .host import Registry, load_registry
from .pad import eos_ids
from .schema import schema_errors
from .tokenizer_files import TOKENIZER_CONFIG, TokenizerFiles

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    """One problem: stable code, severity, the file and the field or tensor, and what is wrong."""

    code: str
    severity: str
    file: str
    where: str
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


def _head(ckpt: Checkpoint, hidden) -> list[Finding]:
    findings = []
    lm_head = sorted(n for n in ckpt.tensors if n.startswith("lm_head."))
    if lm_head:
        findings.append(
            Finding(
                "RM013",
                ERROR,
                ckpt.tensors[lm_head[0]].path.name,
                lm_head[0],
                "language-model head present: a reward model has only score.weight",
            )
        )
    score = ckpt.tensors.get("score.weight")
    if score is None:
        return findings + [Finding("RM010", ERROR, "model.safetensors", "score.weight", "no score head")]
    if len(score.shape) != 2 or score.shape[0] not in (1, 2) or score.shape[1] != hidden:
        return findings + [
            Finding(
                "RM011",
                ERROR,
                score.path.name,
                "score.weight",
                f"shape {list(score.shape)}; expected [1 or 2, {hidden}]",
            )
        ]
    id2label = ckpt.config.get("id2label")
    labels = len(id2label) if isinstance(id2label, dict) else 2  # transformers' default without id2label
    if labels != score.shape[0]:
        findings.append(
            Finding(
                "RM012",
                ERROR,
                "config.json",
                "/id2label",
                f"config loads {labels} labels but score.weight has {score.shape[0]} rows"
                " (transformers would re-initialise the head randomly)",
            )
        )
    return findings


def _vocab_and_pad(ckpt: Checkpoint, tc: dict, embedding: str | None) -> list[Finding]:
    findings = []
    try:
        tok = TokenizerFiles.read(ckpt.path)
    except CheckpointError as exc:
        return [Finding("RM060", ERROR, Path(str(exc.path)).name, "", exc.message)]
    vocab, pad = tc.get("vocab_size"), tc.get("pad_token_id")
    emb = ckpt.tensors.get(embedding) if embedding else None
    if type(vocab) is int:
        if vocab < len(tok):
            findings.append(
                Finding(
                    "RM021",
                    ERROR,
                    "config.json",
                    "/vocab_size",
                    f"{vocab} is smaller than the tokenizer's {len(tok)} tokens",
                )
            )
        if emb is not None and emb.shape[0] != vocab:
            findings.append(
                Finding(
                    "RM022",
                    ERROR,
                    emb.path.name,
                    emb.name,
                    f"{emb.shape[0]} embedding rows but config vocab_size is {vocab}",
                )
            )
    if type(pad) is int:
        generation_config = read_json(ckpt.path / "generation_config.json", required=False)
        if type(vocab) is int and pad >= vocab:
            findings.append(
                Finding("RM031", ERROR, "config.json", "/pad_token_id", f"{pad} is not below vocab_size {vocab}")
            )
        if pad in eos_ids(ckpt.config, generation_config, tok):
            findings.append(
                Finding(
                    "RM032",
                    ERROR,
                    "config.json",
                    "/pad_token_id",
                    f"pad {pad} is an eos id: the reward is read at the wrong token",
                )
            )
        if tok.special_id("pad") != pad:
            findings.append(
                Finding(
                    "RM033",
                    ERROR,
                    TOKENIZER_CONFIG,
                    "/pad_token",
                    f"tokenizer pad {tok.special('pad')!r} (id {tok.special_id('pad')})"
                    f" differs from config pad_token_id {pad}",
                )
            )
    return findings


def _index(ckpt: Checkpoint) -> list[Finding]:
    if ckpt.index is None:
        return []
    metadata = ckpt.index.get("metadata")
    total = sum(t.nbytes for t in ckpt.tensors.values())
    if not isinstance(metadata, dict):
        return [Finding("RM040", ERROR, INDEX, "/metadata", "missing: transformers 5 raises KeyError")]
    if metadata.get("total_size") != total:
        return [
            Finding(
                "RM041",
                ERROR,
                INDEX,
                "/metadata/total_size",
                f"{metadata.get('total_size')!r}, tensors hold {total} bytes",
            )
        ]
    return []


def _dropout(ckpt: Checkpoint, tc: dict, fields) -> list[Finding]:
    return [
        Finding("RM050", WARNING, "config.json", f"/{name}", f"dropout {tc[name]} (open-instruct trains RMs with 0)")
        for name in fields
        if isinstance(tc.get(name), (int, float)) and not isinstance(tc.get(name), bool) and tc[name]
    ]


def validate(path: str | Path, registry: Registry | None = None) -> list[Finding]:
    """Every finding for the reward-model checkpoint at ``path`` (an empty list means sound)."""
    path = Path(path)
    try:
        ckpt = open_checkpoint(path)
    except CheckpointError as exc:
        where = Path(str(exc.path)) if exc.path is not None else path
        name = where.name if where != path else str(path)
        return [Finding("RM001", ERROR, name, "", exc.message)]
    registry = registry or load_registry()
    registered = registry.for_model_type(ckpt.model_type)
    findings = []
    if registered is None:
        findings.append(
            Finding(
                "RM003",
                ERROR,
                "config.json",
                "/model_type",
                f"{ckpt.model_type!r}: no installed plugin knows this architecture",
            )
        )
    arch = registered.architecture if registered else None
    schema = arch.schema if arch else None
    for problem in schema_errors(ckpt.config, schema) if schema else []:
        pointer, message = problem.split(": ", 1)
        findings.append(Finding("RM002", ERROR, "config.json", pointer, message))
    tc = text_config(ckpt.config)
    findings += _head(ckpt, tc.get("hidden_size"))
    try:
        embedding = arch.embedding_name(ckpt) if arch else None
    except CheckpointError as exc:
        findings.append(Finding("RM023", ERROR, "config.json", "", exc.message))
        embedding = None
    findings += _vocab_and_pad(ckpt, tc, embedding)
    findings += _index(ckpt)
    findings += _dropout(ckpt, tc, arch.dropout_fields if arch else ())
    return findings
