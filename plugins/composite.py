"""Vision-language policies: every image-text family whose generation class is transformers' composite ``*Model``
(vision tower + projector + language model) plus an LM head.

The layout comes from transformers itself, as for the generic plugin: the generation class built on the meta
device names the input embedding, every other table indexed by token id (Gemma 4's per-layer embedding), the LM
head and the key renames applied on load; the reward class (native, or built over the same ``*Model``) says
under which names it loads the backbone. A tensor the reward class would not load under its source name is
written under the name it loads (Qwen2-VL and Qwen2.5-VL releases: ``model.*`` -> ``model.language_model.*``,
``visual.*`` -> ``model.visual.*``); every other name is kept. A tensor the family does not have, or one it
has and the checkpoint lacks (a vision tower cut short), makes the layout incomplete.
"""

import re
from dataclasses import replace

from rmconvert import Architecture, hookimpl
from rmconvert.errors import CheckpointError
from rmconvert.families.layout import Head, Layout, find_head
from rmconvert.sources.checkpoint import text_config

#: ms-swift ``seq_cls`` heads trained under transformers < 4.52 sit inside the LLaVA-family language model.
NESTED_SCORE = "language_model.score.weight"
#: Config fields naming token ids the processor inserts (image, video, audio placeholders and their brackets).
MEDIA_FIELD = re.compile(r"^(image|video|audio|vision|boi|eoi|boa|eoa|bov|eov)_.*(token_id|token_index)$")


def media_ids(config: dict) -> frozenset[int]:
    """Every token id a processor inserts, from the config's top level and its text config."""
    ids = set()
    for part in (config, text_config(config)):
        for key, value in part.items():
            if MEDIA_FIELD.match(key) and type(value) is int:
                ids.add(value)
    return frozenset(ids)


def _text_model_type(config: dict) -> str | None:
    """The model_type of a composite config's language model (its text config's, else the config class's)."""
    declared = text_config(config).get("model_type")
    if isinstance(declared, str) and declared:
        return declared
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    sub = (getattr(CONFIG_MAPPING.get(config.get("model_type"), None), "sub_configs", None) or {}).get("text_config")
    return getattr(sub, "model_type", None) or None


class Composite(Architecture):
    name = "composite"
    fallback = True
    per_token_heads = False
    #: Gemma 4 replaces image, video and audio placeholder ids by the pad id and embeds the pad row into every
    #: layer's input: its pad is part of the computation and is never re-picked.
    pad_in_positions = ("gemma4",)

    @property
    def model_types(self) -> tuple[str, ...]:
        from rmconvert.families.modeling import composite_model_types

        return tuple(sorted(composite_model_types()))

    def claims(self, model_type):
        from rmconvert.families.modeling import is_composite

        return is_composite(model_type)

    def layout(self, ckpt) -> Layout:
        score = self.score_name(ckpt.model_type)
        head = find_head(ckpt, score)
        if head is None and NESTED_SCORE in ckpt.tensors:
            head = Head("score", NESTED_SCORE, tensors=frozenset({NESTED_SCORE}))
        heads = head.tensors if head else frozenset()
        tc = text_config(ckpt.config)
        base = Layout(
            model_type=ckpt.model_type,
            embedding=None,
            score=score,
            head=head,
            lm_head=frozenset(),
            dropped=frozenset(heads),
            hidden_size=tc.get("hidden_size"),
            vocab_size=tc.get("vocab_size"),
            media_ids=media_ids(ckpt.config),
        )
        try:
            return self._layout(ckpt, base)
        except CheckpointError as exc:
            lm_head = {n for n in ckpt.tensors if n.startswith(("lm_head.", "language_model.lm_head."))}
            return Layout(**{**base.__dict__, "lm_head": frozenset(lm_head), "error": exc})

    def _layout(self, ckpt, base: Layout) -> Layout:
        from rmconvert.families.modeling import reward_loading
        from rmconvert.families.structure import structure

        found = structure(ckpt.config, composite=True)
        loads_as, reward_keys = reward_loading(ckpt.config)
        keys = {n: found.rename(n) for n in ckpt.tensors if n not in base.dropped}
        lm_head = {n for n, k in keys.items() if k in found.heads}
        ignored = {n for n, k in keys.items() if k not in found.keys and any(re.search(p, n) for p in found.ignored)}
        extra = sorted(n for n, k in keys.items() if k not in found.keys and n not in ignored and n not in lm_head)
        if extra:
            raise CheckpointError(
                f"{extra[0]!r}{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''} is no tensor of"
                f" {found.causal_lm}: not a {ckpt.model_type} checkpoint as its config describes it",
                ckpt.path,
            )
        kept = {n: k for n, k in keys.items() if n not in lm_head and n not in ignored}
        outside = sorted(n for n, k in kept.items() if not found.in_backbone(k))
        if outside:
            raise CheckpointError(f"{outside[0]!r} is outside {found.causal_lm}'s backbone", ckpt.path)
        missing = sorted(found.keys - {t for n in kept for t in found.targets(n)} - found.heads)
        if missing:
            raise CheckpointError(
                f"no tensor for {missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}:"
                f" {found.causal_lm} built from config.json has it (a vision tower or language model cut short?)",
                ckpt.path,
            )
        # a layout the reward class cannot load as it is (one tensor loads elsewhere) is written whole in the
        # names transformers itself writes for the family, which the reward class, vLLM and sglang all load
        if any(loads_as(n) != k for n, k in kept.items()):
            for name, key in kept.items():
                if loads_as(key) != key or key not in reward_keys:
                    raise CheckpointError(
                        f"{name!r}: {found.causal_lm} loads it as {key}, the reward class as {loads_as(name)}",
                        ckpt.path,
                    )
        renamed = {n: k for n, k in kept.items() if n != k} if any(loads_as(n) != k for n, k in kept.items()) else {}
        if len(set(renamed.values())) < len(renamed):  # e.g. per-expert tensors transformers fuses on load
            key = next(k for k in renamed.values() if list(renamed.values()).count(k) > 1)
            raise CheckpointError(
                f"several tensors load as {key}: the layout the reward class loads cannot be written", ckpt.path
            )
        embedding = [n for n, k in kept.items() if k == found.embedding]
        if len(embedding) != 1:
            raise CheckpointError(
                f"{found.causal_lm} loads its input embedding {found.embedding} from {embedding}", ckpt.path
            )
        tables = tuple(sorted(n for n, k in kept.items() if k in found.vocab_tables))
        tc = text_config(ckpt.config)
        vocab = tc.get("vocab_size")
        fields = ("vocab_size",) + tuple(
            sorted(f for f, v in tc.items() if f != "vocab_size" and "vocab_size" in f and v == vocab and tables)
        )
        rows = found.shapes[found.embedding][0]
        if rows != vocab:  # the class embeds more rows than vocab_size (Llama 3.2 Vision: 8 more): no field holds them
            fields = ()
        return Layout(
            **{
                **base.__dict__,
                "embedding": embedding[0],
                "lm_head": frozenset(lm_head),
                "dropped": base.dropped | lm_head | ignored,
                "renamed": renamed,
                "tables": tables,
                "vocab_size": rows,
                "vocab_fields": fields,
                "load_name": found.rename,
            }
        )

    def text_only(self, ckpt):
        """The language model alone, as a checkpoint of its text family (``--text-only``): the config is the text
        config (with the family's model_type), the tensors the language model's, under the names the text
        family's causal LM loads (its backbone prefix for the composite's language-model module); the vision
        tower and projector are left out. The weight files are seen through a view: written, never copied whole.
        Refused when transformers has no text-only class for the language model (Qwen2-VL's ``qwen2_vl_text``)."""
        from rmconvert.families.modeling import is_decoder_only
        from rmconvert.families.structure import StructureError, structure

        layout = self.layout(ckpt).require()
        text_type = _text_model_type(ckpt.config)
        if not text_type or not is_decoder_only(text_type):
            raise CheckpointError(
                f"--text-only: {ckpt.model_type}'s language model ({text_type}) has no text-only class in"
                " transformers; convert it with its vision tower",
                ckpt.config_path,
            )
        config = {**text_config(ckpt.config), "model_type": text_type}
        for key in ("architectures", "dtype", "torch_dtype", "transformers_version"):
            if key in ckpt.config and key not in config:
                config[key] = ckpt.config[key]
        if type(ckpt.config.get("pad_token_id")) is int and type(config.get("pad_token_id")) is not int:
            config["pad_token_id"] = ckpt.config["pad_token_id"]
        vocab = config.get("vocab_size")
        if type(config.get("pad_token_id")) is int and type(vocab) is int and not 0 <= config["pad_token_id"] < vocab:
            config["pad_token_id"] = None  # a default no embedding row holds (4.57's SmolVLM text config: 128002)
        found = structure(ckpt.config, composite=True)
        try:
            text = structure(config)
        except StructureError as exc:
            raise CheckpointError(f"--text-only: {exc.message}", ckpt.config_path) from None
        language_model = found.embedding.rsplit(".", 2)[0] + "."
        text_prefix = text.embedding.rsplit(".", 2)[0] + "."
        names = {}
        for name in ckpt.tensors:
            if name in layout.head_tensors:
                names[name] = name
            elif name not in layout.dropped:
                key = found.rename(name)
                if key.startswith(language_model):
                    names[name] = text_prefix + key[len(language_model) :]
        odd = sorted(
            new for new in names.values() if text.rename(new) not in text.keys and new not in layout.head_tensors
        )
        if odd:
            raise CheckpointError(f"--text-only: {text.causal_lm} has no tensor {odd[0]!r}", ckpt.config_path)
        for name, new in sorted(names.items()):  # e.g. Qwen3.5-MoE's fused experts, stored otherwise by its text class
            want = (text.shapes or {}).get(text.rename(new))
            if want is not None and new not in layout.head_tensors and tuple(ckpt.tensors[name].shape) != want:
                raise CheckpointError(
                    f"--text-only: {name} is {list(ckpt.tensors[name].shape)}, {text.causal_lm} keeps"
                    f" {text.rename(new)} as {list(want)}; convert it with its vision tower",
                    ckpt.config_path,
                )
        shards = []
        for shard in ckpt.shards:
            tensors = {names[n]: replace(info, name=names[n]) for n, info in shard.tensors.items() if n in names}
            shards.append(replace(shard, tensors=tensors, view=True))
        tensors = {n: info for shard in shards for n, info in shard.tensors.items()}
        return replace(ckpt, config=config, shards=shards, tensors=tensors)

    def dropped(self, ckpt):
        return set(self.layout(ckpt).require().dropped)

    def embedding_name(self, ckpt):
        return self.layout(ckpt).require().embedding


@hookimpl
def rmconvert_register_architectures(register):
    register(Composite())
