"""Static checks of ``rmconvert validate``: headers and JSON only, fast and in bounded memory at any size.

Each check takes a :class:`rmconvert.doctor.findings.Subject` and yields findings of its codes.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..engine.pad import eos_ids
from ..families.schema import schema_errors
from ..sources.checkpoint import VALUE_HEAD
from ..sources.tokenizer_files import TOKENIZER, TOKENIZER_CONFIG
from .findings import Finding, Subject

CONFIG = "config.json"


def known_architecture(s: Subject) -> Iterator[Finding]:
    if s.architecture is None:
        yield s.finding("RM003", CONFIG, "/model_type", f"{s.ckpt.model_type!r}: no installed plugin converts it")


def config_schema(s: Subject) -> Iterator[Finding]:
    """One finding a field: a value the family's schema and the reward-model schema it extends both reject
    (``LlamaForCausalLM`` in architectures: no ``ForSequenceClassification$``, not the family's class) is one
    problem, its messages joined."""
    if s.architecture is None:
        return
    messages: dict[str, list[str]] = {}
    for problem in schema_errors(s.config, s.architecture.schema):
        pointer, message = problem.split(": ", 1)
        if message not in messages.setdefault(pointer, []):
            messages[pointer].append(message)
    for pointer, said in messages.items():
        yield s.finding("RM002", CONFIG, pointer, f"{'; '.join(said)} (schema {s.architecture.schema.name})")


def _count(n: int, noun: str) -> str:
    """``1 row``, ``2 rows``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def remote_code(s: Subject) -> Iterator[Finding]:
    if s.config.get("auto_map"):
        yield s.finding("RM004", CONFIG, "/auto_map", f"names {sorted(s.config['auto_map'].values())}; never run")


def openrlhf(s: Subject) -> Iterator[Finding]:
    prefix = s.config.get("value_head_prefix")
    if s.config.get("architectures") == ["RewardModel"] or "value_head.weight" in s.ckpt.tensors or prefix:
        yield s.finding(
            "RM014",
            CONFIG,
            "/architectures",
            f"OpenRLHF layout (head {prefix or 'value_head'}.weight, reward normalised by mean/std"
            f" {s.config.get('mean')}/{s.config.get('std')} when normalize_reward); transformers loads a random"
            " 2-label head instead",
        )


def value_head(s: Subject) -> Iterator[Finding]:
    weight, bias = s.ckpt.tensors.get(VALUE_HEAD + "weight"), s.ckpt.tensors.get(VALUE_HEAD + "bias")
    if weight is not None and s.score_name not in s.ckpt.tensors:
        yield s.finding(
            "RM015",
            weight.path.name,
            weight.name,
            f"TRL value head {list(weight.shape)}{' with a bias' if bias is not None else ''} in {weight.path.name};"
            " transformers loads a random score head instead",
        )


def head(s: Subject) -> Iterator[Finding]:
    hidden, name = s.hidden_size, s.score_name
    for lm_head in sorted(n for n in s.ckpt.tensors if n.startswith("lm_head.")):
        yield s.finding("RM013", s.ckpt.tensors[lm_head].path.name, lm_head, f"a reward model has only {name}")
    if s.kept_mlp is not None:  # Qwen2ForProcessRewardModel: its MLP head's last layer has a row per label
        name, score = s.kept_mlp.weight, s.ckpt.tensors[s.kept_mlp.weight]
    else:
        score = s.ckpt.tensors.get(name)
    if score is None and VALUE_HEAD + "weight" in s.ckpt.tensors:
        return  # RM015
    if score is None:
        yield s.finding("RM010", s.weights_file, name, f"no score head: no shard holds {name}")
        return
    if len(score.shape) != 2 or score.shape[0] not in (1, 2) or score.shape[1] != hidden:
        yield s.finding("RM011", score.path.name, name, f"{list(score.shape)}; expected [1 or 2, {hidden}]")
        return
    id2label = s.config.get("id2label")
    labels = len(id2label) if isinstance(id2label, dict) else 2  # what transformers builds without id2label
    if labels != score.shape[0]:
        yield s.finding(
            "RM012",
            CONFIG,
            "/id2label",
            f"the config loads {_count(labels, 'label')} but {name} has {_count(score.shape[0], 'row')}"
            " (transformers would initialise a new head at random)",
        )


def embedding(s: Subject) -> Iterator[Finding]:
    if s.layout is None:
        return
    if s.layout.error is not None:
        yield s.finding("RM023", CONFIG, "", s.layout.error.message)
        return
    name = s.layout.embedding
    emb, vocab, hidden = s.ckpt.tensors[name], s.text_config.get("vocab_size"), s.hidden_size
    if type(vocab) is int and emb.shape[0] != vocab:
        yield s.finding("RM022", emb.path.name, name, f"{emb.shape[0]} rows but config vocab_size is {vocab}")
    if len(emb.shape) == 2 and type(hidden) is int and emb.shape[1] != hidden:
        yield s.finding("RM024", emb.path.name, name, f"{emb.shape[1]} wide but config hidden_size is {hidden}")


def tokenizer_files(s: Subject) -> Iterator[Finding]:
    if s.tokenizer_error is not None:
        exc = s.tokenizer_error
        yield s.finding("RM060", getattr(exc.path, "name", str(exc.path)), "", exc.message)


def vocabulary(s: Subject) -> Iterator[Finding]:
    vocab = s.text_config.get("vocab_size")
    if s.tokenizer is not None and type(vocab) is int and vocab < len(s.tokenizer):
        yield s.finding("RM021", CONFIG, "/vocab_size", f"{vocab} rows for a tokenizer of {len(s.tokenizer)} tokens")


def pad(s: Subject) -> Iterator[Finding]:
    pad_id, vocab = s.text_config.get("pad_token_id"), s.text_config.get("vocab_size")
    if type(pad_id) is not int or s.tokenizer is None:
        return  # a missing or non-int pad is a schema finding
    if type(vocab) is int and pad_id >= vocab:
        yield s.finding("RM031", CONFIG, "/pad_token_id", f"{pad_id} is not below vocab_size {vocab}")
    if pad_id in eos_ids(s.config, s.generation_config, s.tokenizer):
        yield s.finding("RM032", CONFIG, "/pad_token_id", f"pad {pad_id} is an eos id")
    if s.tokenizer.special_id("pad") != pad_id:
        yield s.finding(
            "RM033",
            TOKENIZER_CONFIG,
            "/pad_token",
            f"{s.tokenizer.special('pad')!r} (id {s.tokenizer.special_id('pad')}) but config pad_token_id is {pad_id}",
        )


def padding_side(s: Subject) -> Iterator[Finding]:
    """A family whose recurrence runs over pad tokens must be padded on the right."""
    if s.right_padding_only and s.tokenizer is not None and s.tokenizer.tokenizer_config.get("padding_side") == "left":
        yield s.finding("RM034", TOKENIZER_CONFIG, "/padding_side", f"{s.ckpt.model_type} cannot be left-padded")


def index(s: Subject) -> Iterator[Finding]:
    if s.ckpt.index is None:
        return
    metadata, name = s.ckpt.index.get("metadata"), s.ckpt.index_name
    indexed = set(s.ckpt.index["weight_map"].values())
    # tensors sharing a storage (tied, in a .bin) count once, as transformers counts them
    total = sum(
        nbytes
        for path, _, nbytes in {(t.path, t.offset, t.nbytes) for t in s.ckpt.tensors.values()}
        if path.name in indexed
    )
    if not isinstance(metadata, dict):
        yield s.finding("RM040", name, "/metadata", "missing")
    elif metadata.get("total_size") != total:
        yield s.finding("RM041", name, "/metadata/total_size", f"{metadata.get('total_size')!r}; tensors hold {total}")


def pickled(s: Subject) -> Iterator[Finding]:
    if s.ckpt.pickled:
        yield s.finding("RM042", s.weights_file, "", "PyTorch pickle weights (.bin); safetensors are safe and faster")


def dropout(s: Subject) -> Iterator[Finding]:
    fields = s.architecture.dropout_fields if s.architecture else ()
    for name in fields:
        value = s.text_config.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            yield s.finding("RM050", CONFIG, f"/{name}", f"{value}")


def problem_type(s: Subject) -> Iterator[Finding]:
    """Serving stacks apply sigmoid (1 label) or softmax (2 labels) unless the config says regression; a 2-label
    PRM's labels are classes (softmax: P(correct step), as TRL's PRMTrainer outputs are read)."""
    value = s.config.get("problem_type")
    score = s.ckpt.tensors.get(s.score_name)
    if s.per_token and score is not None and score.shape[0] == 2:
        return
    if value != "regression":
        yield s.finding("RM051", CONFIG, "/problem_type", "missing" if value is None else repr(value))


def _listed(tokens: list[str], ids: dict[str, int], here: dict[str, int] | None = None) -> str:
    """``N ('<a>' = 1, ...)``: how many tokens, the first three with their ids (and the ids ``here``)."""
    shown = ", ".join(f"{t!r} = {ids[t]}" + (f" here {here[t]}" if here else "") for t in tokens[:3])
    return f"{len(tokens)} ({shown}{', ...' if len(tokens) > 3 else ''})"


def policy_vocabulary(s: Subject) -> Iterator[Finding]:
    """With --policy: the same token -> id map as the policy's tokenizer, and embedding rows for each id."""
    if s.policy is None or s.tokenizer is None:
        return
    ours, theirs = s.tokenizer.ids, s.policy.ids
    extra = sorted((t for t in ours if t not in theirs), key=ours.get)
    missing = sorted((t for t in theirs if t not in ours), key=theirs.get)
    moved = sorted((t for t in theirs if t in ours and ours[t] != theirs[t]), key=theirs.get)
    problems = [
        f"{_listed(extra, ours)} not in the policy's" if extra else "",
        f"{_listed(missing, theirs)} of the policy's missing" if missing else "",
        f"{_listed(moved, theirs, ours)} at other ids" if moved else "",
    ]
    if extra or missing or moved:
        yield s.finding("RM070", TOKENIZER, "/added_tokens", "tokens: " + "; ".join(p for p in problems if p))
    if s.layout is None or s.layout.embedding is None:
        return  # RM023
    name = s.layout.embedding
    rows = s.ckpt.tensors[name].shape[0]
    if rows < len(s.policy):
        yield s.finding(
            "RM071", s.ckpt.tensors[name].path.name, name, f"{rows} rows; the policy's ids reach {len(s.policy) - 1}"
        )


def token_head(s: Subject) -> Iterator[Finding]:
    """A token classifier (value model, PRM): its head's bias [labels], no dropout before it."""
    if not s.per_token or s.kept_mlp is not None:
        return
    name = s.score_name
    score = s.ckpt.tensors.get(name)
    if score is None or len(score.shape) != 2:
        return  # RM010 / RM011
    bias_name = name[: -len("weight")] + "bias"
    bias = s.ckpt.tensors.get(bias_name)
    if bias is None:
        yield s.finding("RM170", s.weights_file, bias_name, f"no shard holds {bias_name}")
    elif bias.shape != (score.shape[0],):
        yield s.finding("RM171", bias.path.name, bias_name, f"{list(bias.shape)}; expected [{score.shape[0]}]")
    value = s.config.get("classifier_dropout")
    if value is None:
        value = s.config.get("hidden_dropout")
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value):
        yield s.finding("RM172", CONFIG, "/classifier_dropout", "not set (0.1)" if value is None else f"{value}")


def step_tag(s: Subject) -> Iterator[Finding]:
    """A PRM's step tag: one token of the vocabulary, not the pad or an eos."""
    tag = s.config.get("step_tag_id")
    if tag is None:
        return
    vocab = s.text_config.get("vocab_size")
    size = len(s.tokenizer) if s.tokenizer is not None else vocab
    limit = min((x for x in (size, vocab) if type(x) is int), default=None)
    if type(tag) is not int or tag < 0 or (limit is not None and tag >= limit):
        yield s.finding("RM173", CONFIG, "/step_tag_id", f"{tag!r}; the vocabulary has {size} tokens")
        return
    if s.tokenizer is None:
        return
    if tag == s.text_config.get("pad_token_id") or tag in eos_ids(s.config, s.generation_config, s.tokenizer):
        role = "the pad" if tag == s.text_config.get("pad_token_id") else "an eos"
        yield s.finding("RM174", CONFIG, "/step_tag_id", f"{tag} is {role}")


#: The static checks, in report order.
STATIC = (
    known_architecture,
    config_schema,
    remote_code,
    openrlhf,
    value_head,
    head,
    embedding,
    tokenizer_files,
    vocabulary,
    pad,
    padding_side,
    index,
    pickled,
    dropout,
    problem_type,
    policy_vocabulary,
    token_head,
    step_tag,
)
