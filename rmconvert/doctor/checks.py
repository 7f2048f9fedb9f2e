"""Static checks of ``rmconvert validate``: headers and JSON only, fast and in bounded memory at any size.

Each check takes a :class:`rmconvert.doctor.findings.Subject` and yields findings of its codes.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..engine.lora_merge import read_range
from ..engine.pad import eos_ids
from ..engine.rules import SOURCES
from ..families.layout import HeadError
from ..families.schema import config_schema as schema_for
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
    schema = schema_for(s.architecture, s.config)
    for problem in schema_errors(s.config, schema):
        pointer, message = problem.split(": ", 1)
        if message not in messages.setdefault(pointer, []):
            messages[pointer].append(message)
    for pointer, said in messages.items():
        yield s.finding("RM002", CONFIG, pointer, f"{'; '.join(said)} (schema {schema.name})")


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


#: Who loads each head kind as it is (transformers, vLLM, sglang), for RM150.
LOADERS = {
    "starling": "transformers: a random score (the head is v_head, the backbone may be transformer.*); vLLM, sglang: no",
    "ultrarm": "transformers: remote code only (LlamaRewardModel); vLLM, sglang: no",
    "beaver": "transformers: remote code only (safe-rlhf LlamaForScore); vLLM, sglang: no",
    "nemo": "transformers: a random score (the head is rm_head); vLLM, sglang: no",
    "regression": "transformers: a random score (the head is regression_layer); vLLM, sglang: no",
    "gated": "transformers: remote code only (its reward mixes the rows by a gating network read at the end of the"
    " prompt); vLLM, sglang: no",
    "mlp": "transformers: remote code only (Qwen2ForRewardModel auto_map, reward-bench's INF-ORM and GRM classes);"
    " vLLM, sglang: Qwen2ForRewardModel for Qwen2 with an [H, H] first layer",
    "internlm2": "transformers: remote code only (no internlm2 class); vLLM, sglang: InternLM2ForRewardModel",
}


def _labels(config: dict) -> int:
    """The labels transformers builds from a config: id2label's, else num_labels, else 2."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict):
        return len(id2label)
    return config["num_labels"] if type(config.get("num_labels")) is int else 2


def head_kind(s: Subject) -> Iterator[Finding]:
    """RM150: a head transformers' sequence classifier does not load, named with its kind, its loaders and the
    command that converts it; RM151: a head that cannot be told."""
    if s.head_error is not None:
        yield s.finding("RM151", s.weights_file, "", s.head_error.message)
        return
    head = s.head
    if head is None or head.kind in ("score", "openrlhf", "value") or (head.rule == "kept" and s.kept_mlp is not None):
        return  # RM014, RM015: OpenRLHF and TRL value heads have codes of their own
    rows = head.rows(s.ckpt)
    shape = list(s.ckpt.tensors[head.weight].shape)
    what = f"kind {head.kind} ({SOURCES.get(head.kind, head.kind)}): {head.weight} {shape}"
    if head.quantiles > 1:
        what += f" ({rows // head.quantiles} objectives x {head.quantiles} quantiles)"
    if head.negate:
        what += ", a cost model (lower is better)"
    yield s.finding(
        "RM150",
        s.ckpt.tensors[head.weight].path.name,
        head.weight,
        f"{what}, read at {head.read_at}; {LOADERS[head.kind]}",
    )


def head(s: Subject) -> Iterator[Finding]:
    hidden, name = s.hidden_size, s.score_name
    for lm_head in sorted(n for n in s.ckpt.tensors if n.startswith("lm_head.")):
        yield s.finding("RM013", s.ckpt.tensors[lm_head].path.name, lm_head, f"a reward model has only {name}")
    found = s.head
    if found is not None and found.kind not in ("score", "openrlhf", "value"):
        if s.kept_mlp is not None:  # Qwen2ForRewardModel / Qwen2ForProcessRewardModel: a row per label at the end
            last = s.ckpt.tensors[found.weight]
            if len(last.shape) != 2:
                yield s.finding("RM011", last.path.name, found.weight, f"{list(last.shape)}; expected [N, inner]")
                return
        rows = found.objectives(s.ckpt)
        labels = _labels(s.config)
        if rows is not None and labels != rows and found.rule != "trigger":
            yield s.finding(
                "RM012",
                CONFIG,
                "/id2label",
                f"the config loads {_count(labels, 'label')} but {found.weight} gives {_count(rows, 'reward')}"
                f" ({found.kind} head)",
            )
        return  # RM150 names the head and its fix (none for a kept MLP head)
    score = s.ckpt.tensors.get(name)
    if score is None and (VALUE_HEAD + "weight" in s.ckpt.tensors or s.head_error is not None):
        return  # RM015, RM151
    if score is None:
        yield s.finding("RM010", s.weights_file, name, f"no score head: no shard holds {name}")
        return
    if len(score.shape) != 2 or score.shape[1] != hidden:
        yield s.finding("RM011", score.path.name, name, f"{list(score.shape)}; expected [N, {hidden}]")
        return
    labels = _labels(s.config)  # what transformers builds
    if labels != score.shape[0]:
        yield s.finding(
            "RM012",
            CONFIG,
            "/id2label",
            f"the config loads {_count(labels, 'label')} but {name} has {_count(score.shape[0], 'row')}"
            " (transformers would initialise a new head at random)",
        )


def consumer_fit(s: Subject) -> Iterator[Finding]:
    """RM152: a head of several rows, read at column 0 by TRL's GRPO and RLOO (a [zeros; w] head then gives 0.0 at
    every step, with no warning), at column 1 by HALOs."""
    found = s.head
    if found is None or found.kind != "score" or found.weight not in s.ckpt.tensors:
        return
    info = s.ckpt.tensors[found.weight]
    if len(info.shape) != 2 or info.shape[0] < 2:
        return
    names = _names(s.config, info.shape[0])
    zeros = read_range(info.path, info.offset, info.row_bytes).count(0) == info.row_bytes
    first = "all zeros: every reward is 0.0, with no warning" if zeros else f"{names[0]!r} only"
    loaders = (
        f"TRL's GRPO and RLOO given the model read logits[:, 0] ({first}), given the path they force num_labels=1"
        f" and fail on the {info.shape[0]}-row head"
    )
    if info.shape[0] == 2:
        loaders += "; HALOs reads logits[:, 1]"
    yield s.finding("RM152", info.path.name, found.weight, loaders + f"; vLLM returns all {info.shape[0]} columns")


def _names(config: dict, rows: int) -> list[str]:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and len(id2label) == rows:
        return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(rows)]
    return [f"LABEL_{i}" for i in range(rows)]


def reward_token(s: Subject) -> Iterator[Finding]:
    """RM153: a token-triggered reward model's ``reward_token_id`` is a token of the vocabulary, not the pad."""
    if "reward_token_id" not in s.config:
        return
    token = s.config["reward_token_id"]
    vocab, pad = s.text_config.get("vocab_size"), s.text_config.get("pad_token_id")
    problem = None
    if type(token) is not int or token < 0:
        problem = f"{token!r} is not a token id"
    elif type(vocab) is int and token >= vocab:
        problem = f"{token} is not below vocab_size {vocab}"
    elif token == pad:
        problem = f"{token} is the pad: the reward would be read at padding"
    elif s.tokenizer is not None and token not in set(s.tokenizer.ids.values()):
        problem = f"{token} is no token of tokenizer.json ({len(s.tokenizer)} ids)"
    if problem:
        yield s.finding("RM153", CONFIG, "/reward_token_id", problem)


def embedding(s: Subject) -> Iterator[Finding]:
    if s.layout is None:
        return
    if s.layout.error is not None and not isinstance(s.layout.error, HeadError):
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


#: Files a vision-language reward model carries for its processor (either is enough).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
NESTED_SCORE = "language_model.score.weight"


def vision_language(s: Subject) -> Iterator[Finding]:
    """A composite (vision-language) reward model: names its class loads, pad where transformers reads it, no
    generation class beside a head, media token ids inside the vocabulary and apart from the pad, processor files."""
    if s.text_config is s.config or not isinstance(s.config.get("vision_config"), dict):
        return
    layout = s.layout
    architectures = s.config.get("architectures") or []
    classifier = any(str(a).endswith("ForSequenceClassification") for a in architectures)
    if layout is not None and layout.error is None and layout.renamed and classifier:
        first = min(layout.renamed)
        shard = s.ckpt.tensors[first].path.name
        yield s.finding(
            "RM130",
            shard,
            first,
            f"{len(layout.renamed)} tensors ({first!r}, ...) load under no key of {architectures[0]};"
            f" it loads {layout.renamed[first]!r}",
        )
    top, text = s.config.get("pad_token_id"), s.text_config.get("pad_token_id")
    if type(top) is int and type(text) is not int:
        yield s.finding("RM131", CONFIG, "/text_config/pad_token_id", f"{text!r}; the top level says {top}")
    heads = [n for n in (s.score_name, NESTED_SCORE) if n in s.ckpt.tensors]
    if heads and architectures and not classifier:
        yield s.finding(
            "RM132",
            CONFIG,
            "/architectures",
            f"{architectures} beside {heads[0]} {list(s.ckpt.tensors[heads[0]].shape)}",
        )
    media = layout.media_ids if layout is not None else frozenset()
    pad_id = text if type(text) is int else top
    if type(pad_id) is int and pad_id in media:
        yield s.finding("RM133", CONFIG, "/text_config/pad_token_id", f"{pad_id} is an image, video or audio token id")
    vocab = s.text_config.get("vocab_size")
    names = {i: t for t, i in s.tokenizer.ids.items()} if s.tokenizer is not None else None
    for token_id in sorted(media):
        if type(vocab) is int and token_id >= vocab:
            yield s.finding("RM134", CONFIG, "", f"token id {token_id} is not below vocab_size {vocab}")
        elif names is not None and token_id not in names:
            yield s.finding("RM134", TOKENIZER, "", f"token id {token_id} of config.json is no token of the tokenizer")
    if classifier and not any((s.path / f).exists() for f in PROCESSOR_FILES):
        yield s.finding("RM135", str(s.path), "", f"none of {', '.join(PROCESSOR_FILES)}")


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
    head_kind,
    head,
    consumer_fit,
    reward_token,
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
    vision_language,
    token_head,
    step_tag,
)
