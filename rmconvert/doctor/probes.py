"""Checks of ``rmconvert validate --load`` and ``--against SRC``: compare bytes, load, score probe batches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ..engine.lora_merge import TORCH_DTYPES, read_range, read_tensor
from ..engine.merge import HEAD
from ..engine.pad import token_ids
from ..errors import CheckpointError, summary
from ..families.architecture import Architecture
from ..families.host import Registry
from ..families.layout import find_head
from ..families.loading import fresh_weights
from ..families.reward_head import accepted
from ..families.structure import quiet_transformers
from ..io.safetensors import TensorInfo
from ..sources.checkpoint import open_checkpoint
from ..sources.tokenizer_files import TOKENIZER_CONFIG
from .findings import CODES, Finding, Subject

PROBE_TEXTS = ("the answer is good and helpful", "no", "hello world, is the reward model honest?")
CHUNK = 16 << 20


def _tolerance(dtype) -> float:
    import torch

    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _load(subject: Subject, path: Path, causal: bool = False, composite: bool = False):
    """(model, loading info) in eval mode; never runs checkpoint code (no trust_remote_code). ``causal`` with
    ``composite``: the image-text generation class."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from ..families.loading import load_reward_model

    with quiet_transformers():
        if causal and composite:
            return AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True, trust_remote_code=False)
        if causal:
            return AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, trust_remote_code=False)
        return load_reward_model(path, output_loading_info=True, trust_remote_code=False, registry=subject.registry)


def _probe_ids(s: Subject, vocab_size: int) -> tuple[list[list[int]], int | None]:
    """The probes of :func:`_text_probe_ids`, each ending with ``reward_token_id`` for a token-triggered reward
    model (InternLM2 reads its reward there, and asserts the token ends the input)."""
    ids, pad = _text_probe_ids(s, vocab_size)
    trigger = s.config.get("reward_token_id")
    if type(trigger) is int and 0 <= trigger < vocab_size:
        ids = [row if row[-1] == trigger else [*row, trigger] for row in ids]
    return ids, pad


def _text_probe_ids(s: Subject, vocab_size: int) -> tuple[list[list[int]], int | None]:
    """Token ids of the probe texts and the pad id, from the reward model's tokenizer (as a user's batches are
    padded); ids drawn from the vocabulary and no pad when the tokenizer cannot load or encode them (a
    word-level tokenizer without an unknown token, ...)."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(s.path)
        ids = [list(tok(text).input_ids) for text in PROBE_TEXTS]
        pad = tok.pad_token_id
    except Exception:  # noqa: BLE001 (the tokenizer's own problems are findings of the static checks)
        return _vocabulary_ids(s, vocab_size), None
    if all(ids) and all(type(i) is int and 0 <= i < vocab_size for row in ids for i in row):
        return ids, pad if type(pad) is int else None
    return _vocabulary_ids(s, vocab_size), None


def _vocabulary_ids(s: Subject, vocab_size: int) -> list[list[int]]:
    """Probe sequences as long as the probe texts' words, of ids spread over the vocabulary, no special token."""
    specials = {i for k in ("pad_token_id", "bos_token_id", "eos_token_id") for i in token_ids(s.text_config.get(k))}
    if s.tokenizer is not None:
        specials |= {s.tokenizer.special_id(role) for role in ("pad", "bos", "eos", "unk")}
    plain = [i for i in range(vocab_size) if i not in specials] or list(range(vocab_size))
    lengths = [len(text.split()) for text in PROBE_TEXTS]
    return [[plain[(7 * (n + i) + 3) % len(plain)] for i in range(n)] for n in lengths]


def _padded(singles: list[list[int]], pad: int, side: str):
    """(input_ids, attention_mask) of the sequences padded to one length on ``side``."""
    import torch

    width = max(map(len, singles))
    rows, masks = [], []
    for ids in singles:
        fill = [pad] * (width - len(ids))
        rows.append(ids + fill if side == "right" else fill + ids)
        masks.append([1] * len(ids) + [0] * len(fill) if side == "right" else [0] * len(fill) + [1] * len(ids))
    return torch.tensor(rows), torch.tensor(masks)


def positions(attention_mask):
    """Position ids that skip padding, as generation computes them (absolute-position families need them)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _load_failed(s: Subject, exc: Exception) -> Finding:
    return s.finding("RM103", "config.json", "", summary(exc))


def loaded(s: Subject) -> Iterator[Finding]:
    """Load with transformers: missing/unexpected/mismatched keys, values other than the stored ones, then
    padded batches vs one by one."""
    import torch

    try:
        model, info = _load(s, s.path)
    except Exception as exc:  # noqa: BLE001 (whatever transformers raises is the finding)
        yield _load_failed(s, exc)
        return
    keys = False
    for code, key in (("RM100", "missing_keys"), ("RM101", "unexpected_keys"), ("RM102", "mismatched_keys")):
        names = [k if isinstance(k, str) else k[0] for k in info.get(key) or []]
        if names:
            keys = True
            yield s.finding(code, s.weights_file, names[0], f"{len(names)} keys: {', '.join(names[:5])}")
    yield from _reinitialised(s, model)
    pad = model.config.get_text_config().pad_token_id
    if keys or type(pad) is not int:
        return
    model.eval()
    if s.vision_language:
        yield from _image_probes(s, model, pad)
        return
    rows = model.get_input_embeddings().num_embeddings
    singles, tokenizer_pad = _probe_ids(s, rows)
    if tokenizer_pad is not None and not 0 <= tokenizer_pad < rows:
        yield s.finding(
            "RM031", TOKENIZER_CONFIG, "/pad_token", f"pad id {tokenizer_pad}; the embedding has {rows} rows"
        )
        return
    pad = pad if tokenizer_pad is None else tokenizer_pad  # what the tokenizer pads with is what users get
    if not 0 <= pad < rows:
        return  # RM031 or RM022 of the static checks
    with torch.no_grad():
        alone_tokens = [model(torch.tensor([ids]), **accepted(model, use_cache=False)).logits for ids in singles]
        alone = torch.cat(alone_tokens) if alone_tokens[0].dim() == 2 else None
        for side in ("right",) if s.right_padding_only else ("right", "left"):
            input_ids, attention_mask = _padded(singles, pad, side)
            options = accepted(model, position_ids=positions(attention_mask), use_cache=False)
            batched = model(input_ids=input_ids, attention_mask=attention_mask, **options).logits
            if batched.dim() == 3:  # a token classifier: every non-pad position
                yield from _per_token_padded(s, batched, attention_mask, alone_tokens, side, _tolerance(model.dtype))
                continue
            if not torch.allclose(batched, alone, atol=_tolerance(model.dtype), rtol=_tolerance(model.dtype)):
                worst = (batched - alone).abs().max().item()
                yield s.finding("RM110", "config.json", "/pad_token_id", f"{side}-padded: off by {worst:.3g}")


def _image_samples(s: Subject, model, pad: int | None) -> tuple[list[dict], list[Finding]]:
    """Two image+text samples of different text lengths, and the first's text with another image: made by the
    checkpoint's own processor (:func:`rmconvert.doctor.images.processor_probe`); from the config
    (:func:`rmconvert.doctor.images.image_sample`) when it has no processor files, when its processor cannot be
    built (RM138), or when it makes inputs the model cannot score (RM137)."""
    import torch

    from .checks import PROCESSOR_FILES
    from .images import image_sample, image_token, probe_image, processor_probe, with_image_of

    files = [f for f in reversed(PROCESSOR_FILES) if (s.path / f).exists()]  # processor_config.json first
    findings = []
    if files:
        try:
            with quiet_transformers():
                make = processor_probe(s.path, model.config)
                samples = [make(probe_image(i), PROBE_TEXTS[t]) for i, t in ((0, 0), (1, 1), (2, 0))]
        except Exception as exc:  # noqa: BLE001 (whatever the processor files make transformers raise is the finding)
            findings.append(s.finding("RM138", files[0], "", summary(exc)))
        else:
            image, problem = image_token(model.config), None
            if not all((x["input_ids"] == image).any() for x in samples):
                problem = f"the processor's inputs hold no image token {image} (config.json's image token id)"
            else:
                try:
                    with torch.no_grad():
                        model(**samples[0], **accepted(model, use_cache=False))
                except Exception as exc:  # noqa: BLE001 (the processor's inputs that fail the model are the finding)
                    problem = summary(exc)
            if problem is None:
                return samples, findings
            findings.append(s.finding("RM137", files[0], "", problem))
    text = [t for t in range(3, 3 + 8) if t != pad]
    singles = [image_sample(model, s.ckpt.model_type, seed=i, text=text[: 5 - 3 * i]) for i in range(2)]
    other = with_image_of(singles[0], image_sample(model, s.ckpt.model_type, seed=7, text=text[:5]))
    return [*singles, other], findings


def _image_probes(s: Subject, model, pad: int) -> Iterator[Finding]:
    """A vision-language reward model on image+text probes (:func:`_image_samples`): a batch right-padded with the
    tokenizer's pad (else the config's) scores as one by one (RM110), and another image changes the reward (RM136)."""
    import torch

    from .images import batch

    rows = model.get_input_embeddings().num_embeddings
    tokenizer_pad = _text_probe_ids(s, rows)[1]
    pad = tokenizer_pad if tokenizer_pad is not None and 0 <= tokenizer_pad < rows else pad  # what users pad with
    if not 0 <= pad < rows:
        return  # RM031 or RM022 of the static checks
    (*singles, other), findings = _image_samples(s, model, pad)
    yield from findings
    tol = _tolerance(model.dtype)
    with torch.no_grad():
        alone = torch.cat([model(**x, **accepted(model, use_cache=False)).logits for x in singles])
        batched = model(**batch(singles, pad), **accepted(model, use_cache=False)).logits
        if not torch.allclose(batched, alone, atol=tol, rtol=tol):
            worst = (batched - alone).abs().max().item()
            yield s.finding(
                "RM110", "config.json", "/text_config/pad_token_id", f"right-padded, with images: off by {worst:.3g}"
            )
        if torch.equal(model(**other, **accepted(model, use_cache=False)).logits, alone[:1]):
            yield s.finding("RM136", s.weights_file, "", "two different images give the same reward")


def _per_token_padded(s: Subject, batched, attention_mask, alone: list, side: str, tol: float) -> Iterator[Finding]:
    """RM175 when a token classifier's scores in a padded batch differ from one by one at a non-pad position."""
    import torch

    worst = 0.0
    for row, single in enumerate(alone):
        kept = batched[row][attention_mask[row].bool()]
        if kept.shape != single[0].shape or not torch.allclose(kept, single[0], atol=tol, rtol=tol):
            worst = max(worst, (kept - single[0]).abs().max().item() if kept.shape == single[0].shape else float("inf"))
    if worst:
        yield s.finding("RM175", "config.json", "/pad_token_id", f"{side}-padded: off by {worst:.3g}")


def _reinitialised(s: Subject, model) -> Iterator[Finding]:
    """RM127 for each parameter that loaded with values other than the stored tensor of its name (a class
    whose weight initialisation writes over loaded weights). Tensors renamed or fused on load, or not of a float
    dtype, are not compared. Reads safetensors and ``.bin`` alike, one tensor at a time."""
    import torch

    parameters = dict(model.named_parameters())
    for name, info in sorted(s.ckpt.tensors.items(), key=lambda item: (item[1].path, item[0])):
        ours = parameters.get(name)
        if ours is None or tuple(ours.shape) != tuple(info.shape) or info.dtype not in TORCH_DTYPES:
            continue
        stored, ours = read_tensor(info), ours.detach()
        if not torch.equal(stored.to(ours.dtype), ours):
            diff = (stored.double() - ours.double()).abs().max().item()
            where = ""
            if ours.dim():
                rows = (stored.to(ours.dtype) != ours).reshape(ours.shape[0], -1).any(-1).nonzero().flatten().tolist()
                where = f"; rows {rows[:5]}{'...' if len(rows) > 5 else ''} of {ours.shape[0]}"
            yield s.finding("RM127", info.path.name, name, f"max |loaded - stored| {diff:.3g}{where}")


def _same_bytes(a: TensorInfo, b: TensorInfo, length: int) -> bool:
    """Whether the first ``length`` bytes of two tensors are equal, read in chunks."""
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        for start in range(0, length, CHUNK):
            n = min(CHUNK, length - start)
            if os.pread(fa.fileno(), n, a.offset + start) != os.pread(fb.fileno(), n, b.offset + start):
                return False
    return True


def _merged(src, src_layout, adapter: Path | None) -> dict:
    """Tensors a fresh merge of ``adapter`` into ``src`` writes, by name (none without an adapter)."""
    if adapter is None:
        return {}
    from ..engine.merge import plan_merge
    from ..sources.adapter import read_adapter

    merge = plan_merge(read_adapter(adapter), src, src_layout)
    parts = dict(merge.parts)
    if merge.head == "adapter":  # the head the adapter saved whole (modules_to_save), compared by the head rules
        parts[HEAD] = merge.checkpoint.tensors[HEAD]
    return parts


def _head_rule_findings(s: Subject, src, src_layout) -> list[Finding]:
    """RM123 when the reward model's head is not what the head rule of the source's head kind (docs/heads.md) makes
    of it, with the options recorded in the reward model's rmconvert.json: compared byte for byte, for the heads
    engine/rules.py writes (the 1- and 2-row heads of before are compared by rewards under ``--load``)."""
    from ..engine.merge import tensor_bytes
    from ..engine.options import HEAD_RULE_OPTIONS, Options
    from ..engine.rules import plan_head
    from ..sources.checkpoint import read_json
    from ..sources.tokenizer_files import TokenizerFiles

    manifest = read_json(s.path / "rmconvert.json", required=False) or {}
    recorded = manifest.get("options") or {}
    given = {k: recorded[k] for k in (*HEAD_RULE_OPTIONS, "head") if recorded.get(k) is not None}
    hidden = src_layout.hidden_size
    try:
        options = Options(**given)
        rule = plan_head(src, src_layout.require(), options, hidden, TokenizerFiles.read(src.path))
    except Exception:  # noqa: BLE001 (a source convert refuses has no head rule to compare with)
        return []
    findings = []
    for expected in rule.tensors if rule is not None else ():
        ours = s.ckpt.tensors.get(expected.name)
        if ours is None:
            findings.append(s.finding("RM121", s.weights_file, expected.name, "the head, not in the reward model"))
        elif ours.dtype != expected.dtype:
            findings.append(s.finding("RM124", ours.path.name, ours.name, f"{expected.dtype} -> {ours.dtype}"))
        elif ours.shape != expected.shape or read_range(ours.path, ours.offset, ours.nbytes) != tensor_bytes(expected):
            findings.append(
                s.finding(
                    "RM123", ours.path.name, ours.name, f"differs from the source's head by its rule ({rule.how})"
                )
            )
    return findings


def _head_findings(s: Subject, ours: TensorInfo, theirs: TensorInfo) -> list[Finding]:
    """RM125 unless the reward model's head is the adapter's (modules_to_save) under the head rules: the same rows,
    ``[zeros; w]`` from one row, row 1 or row 1 - row 0 from two."""
    from ..dtypes import decode, encode

    if ours.dtype != theirs.dtype:
        return [s.finding("RM124", ours.path.name, ours.name, f"{theirs.dtype} -> {ours.dtype}")]
    row = lambda t, i: bytes(read_range(t.path, t.offset + i * t.row_bytes, t.row_bytes))
    if len(ours.shape) == 2 and ours.shape[1:] == theirs.shape[1:] and len(theirs.shape) == 2:
        mine = [row(ours, i) for i in range(ours.shape[0])]
        given = [row(theirs, i) for i in range(theirs.shape[0])]
        if mine == given:
            return []
        if len(given) == 1 and len(mine) == 2 and mine[1] == given[0] and not any(mine[0]):
            return []
        if len(given) == 2 and len(mine) == 1:
            difference = encode(
                decode(given[1], theirs.dtype).astype("f8") - decode(given[0], theirs.dtype), ours.dtype
            )
            if mine[0] in (given[1], difference):
                return []
    what = f"{list(theirs.shape)} in the adapter, {list(ours.shape)} here"
    return [s.finding("RM125", ours.path.name, ours.name, f"differs from the adapter's head (modules_to_save): {what}")]


def _merged_findings(s: Subject, ours: TensorInfo, expected) -> list[Finding]:
    """RM125 when a merged (or adapter-replaced) tensor differs from the fresh merge's bytes."""
    from ..engine.merge import tensor_bytes

    if ours.dtype != expected.dtype:
        return [s.finding("RM124", ours.path.name, ours.name, f"{expected.dtype} -> {ours.dtype}")]
    data = tensor_bytes(expected)
    if ours.shape[1:] != expected.shape[1:] or ours.nbytes < len(data):
        return [s.finding("RM125", ours.path.name, ours.name, f"{list(expected.shape)} -> {list(ours.shape)}")]
    if read_range(ours.path, ours.offset, len(data)) != data:
        return [s.finding("RM125", ours.path.name, ours.name, "bytes differ from a fresh merge of the adapter")]
    return []


def against_source(
    s: Subject, source: Path, registry: Registry, load: bool, adapter: Path | None = None
) -> list[Finding]:
    """The backbone is the source's byte for byte, or with ``adapter`` the fresh merge's; with ``load``,
    hidden states and rewards agree too (not compared after a merge)."""
    try:
        src = open_checkpoint(source)
        # what the conversion left out of the backbone (the LM head, the head it replaced), as the engine decides
        # it, and the names it wrote the rest under (a transformer.* backbone, a Qwen2-VL language model)
        src_layout = (s.architecture or Architecture()).layout(src)
        merged = _merged(src, src_layout, adapter)
    except CheckpointError as exc:
        return [Finding("RM001", "error", str(exc.path), "", f"source: {exc.message}", CODES["RM001"].hint)]
    tables = set(s.layout.vocab_tables) if s.layout and s.layout.error is None else set()
    findings = []
    dropped, renamed = src_layout.dropped, src_layout.renamed
    for name, theirs in sorted(src.tensors.items()):
        if name in dropped:
            continue
        ours = s.ckpt.tensors.get(renamed.get(name, name))
        if ours is not None and name in merged:
            findings += _merged_findings(s, ours, merged[name])
        elif ours is None:
            findings.append(s.finding("RM121", str(source), name, "in the source, not in the reward model"))
        elif ours.dtype != theirs.dtype:
            findings.append(s.finding("RM124", ours.path.name, name, f"{theirs.dtype} -> {ours.dtype}"))
        elif ours.shape[1:] != theirs.shape[1:] or (ours.name not in tables and ours.shape != theirs.shape):
            findings.append(s.finding("RM120", ours.path.name, name, f"{list(theirs.shape)} -> {list(ours.shape)}"))
        elif not _same_bytes(
            ours, theirs, theirs.nbytes if ours.name not in tables else min(ours.nbytes, theirs.nbytes)
        ):
            findings.append(s.finding("RM120", ours.path.name, name, "bytes differ"))
    if not merged:
        findings += _head_rule_findings(s, src, src_layout)
    for name in sorted(set(merged) - set(src.tensors)):  # what only the adapter holds: its head
        ours = s.ckpt.tensors.get(name)
        if ours is None:
            findings.append(s.finding("RM121", str(adapter), name, "in the adapter, not in the reward model"))
        else:
            findings += _head_findings(s, ours, merged[name])
    # a backbone under an alias prefix loads only as the reward model; a VLM's renames are the generation class's own
    aliased = renamed and not isinstance(src.config.get("vision_config"), dict)
    if load and not findings and not merged and not aliased:
        findings += _compare_per_token(s, src, src_layout) if s.per_token else _compare_outputs(s, src)
    return findings


def _float_tensor(info: TensorInfo):
    """A tensor's values as float32."""
    import torch

    from ..dtypes import decode

    raw = bytes(read_range(info.path, info.offset, info.nbytes))
    return torch.from_numpy(decode(raw, info.dtype).astype("float32")).reshape(info.shape)


def _value_head_weight(src, score: str, with_bias: bool = False):
    """A TRL value head's weight [1, H] as a float32 tensor (its bias is what the conversion drops), or None
    when the conversion took another head (``score``, the architecture's, or OpenRLHF's); with ``with_bias``,
    (weight, bias or None), the bias a token classifier keeps."""
    head = find_head(src, score)
    if head is None or head.kind != "value":
        return None
    weight = _float_tensor(src.tensors[head.weight])
    if not with_bias:
        return weight
    return weight, _float_tensor(src.tensors[head.bias]) if head.bias else None


def _per_token_source(s: Subject, src, src_layout, hidden):
    """The source's head applied to its hidden states ``hidden`` [T, H] at every token, or None for a causal LM
    (the head is new): a value head's ``v_head.summary`` with its bias, a reward model's (or PRM's) own head."""
    import torch

    value = _value_head_weight(src, s.score_name, with_bias=True)
    if value is not None:
        weight, bias = value
        out = hidden.float() @ weight.T
        return out + bias if bias is not None else out
    head = find_head(src, src_layout.score)
    if head is not None and head.kind == "mlp" and s.kept_mlp is not None:  # Linear, ReLU, Linear
        layers = sorted({n.rsplit(".", 1)[0] for n in head.tensors})
        out = hidden.float()
        for i, layer in enumerate(layers):
            weight, bias = (_float_tensor(src.tensors[f"{layer}.{p}"]) for p in ("weight", "bias"))
            out = out @ weight.T + bias
            out = out.relu() if i < len(layers) - 1 else out
        return out
    if head is None or head.kind not in ("score", "openrlhf"):
        return None
    weight = _float_tensor(src.tensors[head.weight])
    out = hidden.float() @ weight.T
    return out + _float_tensor(src.tensors[head.bias]) if head.bias else torch.as_tensor(out)


def _compare_per_token(s: Subject, src, src_layout) -> list[Finding]:
    """A token classifier against its source: hidden states equal, and per-token logits equal to the source's
    head applied to them, under the head rules (in float32, up to the dtype's tolerance)."""
    import torch

    source_is_rm = find_head(src, src_layout.score) is not None
    try:
        ours, _ = _load(s, s.path)
        theirs, _ = _load(s, src.path, causal=not source_is_rm or s.score_name not in src.tensors)
    except Exception as exc:  # noqa: BLE001 (whatever transformers raises is the finding)
        return [_load_failed(s, exc)]
    ours, theirs = fresh_weights(ours), fresh_weights(theirs)
    singles = [torch.tensor([ids]) for ids in _probe_ids(s, ours.get_input_embeddings().num_embeddings)[0]]
    with torch.no_grad():
        for ids in singles:
            out = ours(ids, output_hidden_states=True, **accepted(ours, use_cache=False))
            b = theirs(ids, output_hidden_states=True, **accepted(theirs, use_cache=False)).hidden_states[-1]
            if not torch.equal(out.hidden_states[-1], b):
                diff = (out.hidden_states[-1].float() - b.float()).abs().max().item()
                return [s.finding("RM122", s.weights_file, "", f"max difference {diff:.3g}")]
            expected = _per_token_source(s, src, src_layout, b[0])
            if expected is not None and not _rewards_agree(out.logits[0].float(), expected, _tolerance(ours.dtype)):
                worst = "shapes differ"
                if out.logits[0].shape == expected.shape:
                    worst = f"off by {(out.logits[0].float() - expected).abs().max().item():.3g}"
                return [s.finding("RM176", s.weights_file, s.score_name, worst)]
    return []


def _compare_outputs(s: Subject, src) -> list[Finding]:
    """Hidden states of both backbones on the probes; for a reward-model source, rewards per the head rules; for a
    value-head source, rewards equal to the value head's output at the last token minus its bias."""
    import torch

    source_is_rm = s.score_name in src.tensors
    value_head = _value_head_weight(src, s.score_name)
    try:
        ours, _ = _load(s, s.path)
        theirs, _ = _load(s, src.path, causal=not source_is_rm, composite=s.vision_language)
    except Exception as exc:  # noqa: BLE001 (whatever transformers raises is the finding)
        return [_load_failed(s, exc)]
    ours, theirs = fresh_weights(ours), fresh_weights(theirs)
    if s.vision_language:
        return _compare_with_images(s, ours, theirs, value_head, source_is_rm)
    singles = [torch.tensor([ids]) for ids in _probe_ids(s, ours.get_input_embeddings().num_embeddings)[0]]
    findings, values = [], []
    with torch.no_grad():
        for ids in singles:
            a = ours(ids, output_hidden_states=True, **accepted(ours, use_cache=False)).hidden_states[-1]
            b = theirs(ids, output_hidden_states=True, **accepted(theirs, use_cache=False)).hidden_states[-1]
            if not torch.equal(a, b):
                diff = (a.float() - b.float()).abs().max().item()
                return [s.finding("RM122", s.weights_file, "", f"max difference {diff:.3g}")]
            if value_head is not None:  # TRL: v_head(hidden) in the head's dtype, here without its bias
                values.append(b[:, -1].float() @ value_head.T)
        if value_head is not None:
            r_ours = torch.cat([ours(ids, **accepted(ours, use_cache=False)).logits for ids in singles]).float()
            if not _rewards_agree(r_ours, torch.cat(values), _tolerance(ours.dtype)):
                findings.append(
                    s.finding("RM123", s.weights_file, "score.weight", "rewards disagree with the value head")
                )
        if source_is_rm:
            r_ours = torch.cat([ours(ids, **accepted(ours, use_cache=False)).logits for ids in singles])
            r_theirs = [theirs(ids, **accepted(theirs, use_cache=False)).logits for ids in singles]
            r_theirs = torch.cat([r[:, -1] if r.dim() == 3 else r for r in r_theirs])  # a PRM: its last token
            source_head = find_head(src, s.score_name)
            if source_head is not None and source_head.bias:  # a token classifier's bias, which ours cannot hold
                r_theirs = r_theirs - _float_tensor(src.tensors[source_head.bias]).to(r_theirs.dtype)
            if not _rewards_agree(r_ours, r_theirs, _tolerance(ours.dtype)):
                findings.append(s.finding("RM123", s.weights_file, s.score_name, "rewards disagree"))
    return findings


def _compare_with_images(s: Subject, ours, theirs, value_head, source_is_rm: bool) -> list[Finding]:
    """``--against`` for a vision-language model: on image+text probes, the backbones' last hidden states are
    equal (RM122); rewards follow the source's value head or reward head (RM123)."""
    import torch

    backbone = lambda model: model.model  # the composite *Model (4.57's classes have base_model_prefix "")
    samples = _image_samples(s, ours, ours.config.get_text_config().pad_token_id)[0][:2]  # findings: of --load
    findings = []
    with torch.no_grad():
        for x in samples:
            a = backbone(ours)(**x).last_hidden_state
            b = backbone(theirs)(**x).last_hidden_state
            if not torch.equal(a, b):
                diff = (a.float() - b.float()).abs().max().item()
                return [s.finding("RM122", s.weights_file, "", f"with an image: max difference {diff:.3g}")]
            r_ours = ours(**x).logits.float()
            if value_head is not None:
                expected = b[:, -1].float() @ value_head.T
            elif source_is_rm:
                expected = theirs(**x).logits.float()
            else:
                continue
            if not _rewards_agree(r_ours, expected, _tolerance(ours.dtype)):
                findings.append(s.finding("RM123", s.weights_file, s.score_name, "rewards disagree, with an image"))
                break
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
