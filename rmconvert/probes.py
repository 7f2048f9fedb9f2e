"""Checks of ``rmconvert validate --load`` and ``--against SRC``: compare bytes, load, score probe batches."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import open_checkpoint
from .errors import CheckpointError
from .findings import CODES, Finding, Subject
from .host import Registry
from .reward_head import accepted
from .safetensors_io import TensorInfo

PROBE_TEXTS = ("the answer is good and helpful", "no", "hello world, is the reward model honest?")
CHUNK = 16 << 20


def _tolerance(dtype) -> float:
    import torch

    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _load(subject: Subject, path: Path, causal: bool = False):
    """(model, loading info) in eval mode; never runs checkpoint code (no trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    from .loading import load_reward_model

    if causal:
        return AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, trust_remote_code=False)
    return load_reward_model(path, output_loading_info=True, trust_remote_code=False, registry=subject.registry)


def _probe_ids(path: Path):
    """Token ids of the probe texts (unpadded), from the reward model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok, [tok(text, return_tensors="pt").input_ids for text in PROBE_TEXTS]


def positions(attention_mask):
    """Position ids that skip padding, as generation computes them (absolute-position families need them)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _load_failed(s: Subject, exc: Exception) -> Finding:
    first_line = (str(exc).splitlines() or [""])[0][:300]
    return s.finding("RM103", "config.json", "", f"{type(exc).__name__}: {first_line}")


def loaded(s: Subject) -> list[Finding]:
    """Load with transformers: missing/unexpected/mismatched keys, then padded batches vs one by one."""
    import torch

    try:
        model, info = _load(s, s.path)
    except Exception as exc:  # noqa: BLE001 (whatever transformers raises is the finding)
        return [_load_failed(s, exc)]
    findings = []
    for code, key in (("RM100", "missing_keys"), ("RM101", "unexpected_keys"), ("RM102", "mismatched_keys")):
        names = [k if isinstance(k, str) else k[0] for k in info.get(key) or []]
        if names:
            findings.append(s.finding(code, s.weights_file, names[0], f"{len(names)} keys: {', '.join(names[:5])}"))
    if findings or model.config.pad_token_id is None:
        return findings
    model.eval()
    tok, singles = _probe_ids(s.path)
    with torch.no_grad():
        alone = torch.cat([model(ids, **accepted(model, use_cache=False)).logits for ids in singles])
        for side in ("right",) if s.right_padding_only else ("right", "left"):
            tok.padding_side = side
            batch = tok(list(PROBE_TEXTS), return_tensors="pt", padding=True)
            options = accepted(model, position_ids=positions(batch["attention_mask"]), use_cache=False)
            batched = model(**batch, **options).logits
            if not torch.allclose(batched, alone, atol=_tolerance(model.dtype), rtol=_tolerance(model.dtype)):
                worst = (batched - alone).abs().max().item()
                findings.append(
                    s.finding("RM110", "config.json", "/pad_token_id", f"{side}-padded: off by {worst:.3g}")
                )
    return findings


def _same_bytes(a: TensorInfo, b: TensorInfo, length: int) -> bool:
    """Whether the first ``length`` bytes of two tensors are equal, read in chunks."""
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        for start in range(0, length, CHUNK):
            n = min(CHUNK, length - start)
            if os.pread(fa.fileno(), n, a.offset + start) != os.pread(fb.fileno(), n, b.offset + start):
                return False
    return True


def against_source(s: Subject, source: Path, registry: Registry, load: bool) -> list[Finding]:
    """The backbone is the source's byte for byte; with ``load``, hidden states and rewards agree too."""
    try:
        src = open_checkpoint(source)
    except CheckpointError as exc:
        return [Finding("RM001", "error", str(exc.path), "", f"source: {exc.message}", CODES["RM001"].hint)]
    arch = s.architecture
    embedding = arch.embedding_name(s.ckpt) if arch else None
    findings = []
    dropped = (arch.dropped(src) if arch else set()) | {s.score_name, "value_head.weight"}
    for name, theirs in sorted(src.tensors.items()):
        if name in dropped:
            continue
        ours = s.ckpt.tensors.get(name)
        if ours is None:
            findings.append(s.finding("RM121", str(source), name, "in the source, not in the reward model"))
        elif ours.dtype != theirs.dtype:
            findings.append(s.finding("RM124", ours.path.name, name, f"{theirs.dtype} -> {ours.dtype}"))
        elif ours.shape[1:] != theirs.shape[1:] or (name != embedding and ours.shape != theirs.shape):
            findings.append(s.finding("RM120", ours.path.name, name, f"{list(theirs.shape)} -> {list(ours.shape)}"))
        elif not _same_bytes(ours, theirs, theirs.nbytes if name != embedding else min(ours.nbytes, theirs.nbytes)):
            findings.append(s.finding("RM120", ours.path.name, name, "bytes differ"))
    if load and not findings:
        findings += _compare_outputs(s, src)
    return findings


def _compare_outputs(s: Subject, src) -> list[Finding]:
    """Hidden states of both backbones on the probes; for a reward-model source, rewards per the head rules."""
    import torch

    source_is_rm = s.score_name in src.tensors
    try:
        ours, _ = _load(s, s.path)
        theirs, _ = _load(s, src.path, causal=not source_is_rm)
    except Exception as exc:  # noqa: BLE001 (whatever transformers raises is the finding)
        return [_load_failed(s, exc)]
    for model in (ours, theirs):  # fresh allocations: CPU kernels may pick code paths by address alignment
        model.eval()
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
    _, singles = _probe_ids(s.path)
    findings = []
    with torch.no_grad():
        for ids in singles:
            a = ours(ids, output_hidden_states=True, **accepted(ours, use_cache=False)).hidden_states[-1]
            b = theirs(ids, output_hidden_states=True, **accepted(theirs, use_cache=False)).hidden_states[-1]
            if not torch.equal(a, b):
                diff = (a.float() - b.float()).abs().max().item()
                return [s.finding("RM122", s.weights_file, "", f"max difference {diff:.3g}")]
        if source_is_rm:
            r_ours = torch.cat([ours(ids, **accepted(ours, use_cache=False)).logits for ids in singles])
            r_theirs = torch.cat([theirs(ids, **accepted(theirs, use_cache=False)).logits for ids in singles])
            if not _rewards_agree(r_ours, r_theirs, _tolerance(ours.dtype)):
                findings.append(s.finding("RM123", s.weights_file, s.score_name, "rewards disagree"))
    return findings


def _rewards_agree(ours, theirs, tol: float) -> bool:
    """Head rules: same form equal; 2 -> 1 is row 1 (or row 1 - row 0); 1 -> 2 is [0, r]."""
    import torch

    close = lambda a, b: torch.allclose(a, b, atol=tol, rtol=tol)
    if ours.shape == theirs.shape:
        return close(ours, theirs)
    if ours.shape[1] == 1:
        return close(ours[:, 0], theirs[:, 1]) or close(ours[:, 0], theirs[:, 1] - theirs[:, 0])
    return close(ours[:, 1], theirs[:, 0]) and bool((ours[:, 0] == 0).all())
