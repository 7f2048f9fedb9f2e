"""The sequence and token classifiers rmconvert builds for families transformers has none for.

Self-contained (torch and transformers only): ``--portable`` copies this source into the checkpoint.
"""

import inspect

import torch
from transformers import AutoModel
from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification
from transformers.modeling_outputs import SequenceClassifierOutputWithPast, TokenClassifierOutput


def accepted(module, **kwargs) -> dict:
    """The keyword arguments ``module.forward`` takes (all of them when it takes ``**kwargs``)."""
    parameters = inspect.signature(module.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in parameters}


#: The field holding the key-value cache in transformers' outputs: ``cache`` once transformers 5 renamed it,
#: ``past_key_values`` before (4.x). On 5, the old name still works but logs "`past_key_values`/`cache_params`
#: are deprecated", as an output's constructor keyword and as its attribute alike.
CACHE_FIELDS = ("cache", "past_key_values")
CACHE = "cache" if "cache" in SequenceClassifierOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_of(outputs):
    """The backbone's cache, read from the field its output class declares, never through transformers 5's
    deprecated ``past_key_values`` alias; None for a backbone whose output holds none (RWKV, xLSTM, Mamba on
    transformers 4, whose ``cache_params`` was never passed on), or a tuple output."""
    fields = getattr(outputs, "__dataclass_fields__", {})
    return next((getattr(outputs, n) for n in CACHE_FIELDS if n in fields), None)


def mark_loaded(model) -> None:
    """Mark initialised every module whose tensors all loaded (so the family's initialisation skips it)."""
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if tensors and all(getattr(t, "_is_hf_initialized", False) for t in tensors):
            module._is_hf_initialized = True


class ScoreForSequenceClassification(GenericForSequenceClassification):
    """A backbone under ``base_model_prefix`` plus ``score`` (no bias), read at the rightmost token that is
    not the pad: transformers' GenericForSequenceClassification, with a forward that also takes backbones
    that keep no key-value cache (Mamba, RWKV, xLSTM, ...)."""

    def __init__(self, config):
        """transformers' own, with the head as wide as the text model (4.57's reads ``config.hidden_size``,
        which a composite config such as LLaVA's lacks)."""
        super(GenericForSequenceClassification, self).__init__(config)
        self.num_labels = config.num_labels
        setattr(self, self.base_model_prefix, AutoModel.from_config(config))
        self.score = torch.nn.Linear(config.get_text_config().hidden_size, self.num_labels, bias=False)
        self.post_init()

    def initialize_weights(self):
        """Never over loaded weights: a module whose tensors all loaded is marked initialised before the
        family's initialisation runs, as transformers does for remote code (Youtu's zeroes the embedding's pad
        row through ``.data``, past the flag transformers marks loaded tensors with)."""
        mark_loaded(self)
        super().initialize_weights()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        backbone = getattr(self, self.base_model_prefix)
        kwargs = accepted(backbone, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        outputs = backbone(input_ids=input_ids, **kwargs)
        logits = self.score(outputs[0])
        batch_size = logits.shape[0]
        pad = self.config.get_text_config().pad_token_id
        if pad is None and batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if pad is None or input_ids is None:
            last = torch.full((batch_size,), logits.shape[1] - 1, device=logits.device)
        else:
            non_pad = (input_ids != pad).to(logits.device, torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last = (positions * non_pad).argmax(-1)
        pooled = logits[torch.arange(batch_size, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled,
            **{CACHE: cache_of(outputs)},
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


def mlp_head(config, inner: int | None = None) -> torch.nn.Sequential:
    """``Linear(H, inner) -> ReLU -> Linear(inner, num_labels)``, both with a bias (``inner``: H when None)."""
    hidden = config.get_text_config().hidden_size
    inner = inner or hidden
    return torch.nn.Sequential(
        torch.nn.Linear(hidden, inner), torch.nn.ReLU(), torch.nn.Linear(inner, config.num_labels)
    )


class MLPScoreForSequenceClassification(ScoreForSequenceClassification):
    """The same, with Qwen2ForRewardModel's MLP head: ``score = Linear(H, I) -> ReLU -> Linear(I, num_labels)``,
    both with a bias (``I`` is config ``score_inner_size``, ``hidden_size`` when absent), read at the rightmost
    token that is not the pad."""

    def __init__(self, config):
        super().__init__(config)
        self.score = mlp_head(config, getattr(config, "score_inner_size", None))
        self.post_init()


class ScoreForTokenClassification(GenericForTokenClassification):
    """A backbone under ``base_model_prefix`` plus ``score`` (with a bias) at every token, after a dropout of
    ``classifier_dropout``: transformers' GenericForTokenClassification (a value model, a process reward model),
    with the forward and initialisation of :class:`ScoreForSequenceClassification`."""

    def initialize_weights(self):
        """Never over loaded weights (see ScoreForSequenceClassification.initialize_weights)."""
        mark_loaded(self)
        super().initialize_weights()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        backbone = getattr(self, self.base_model_prefix)
        kwargs = accepted(backbone, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        outputs = backbone(input_ids=input_ids, **kwargs)
        logits = self.score(self.dropout(outputs[0]))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config)
        return TokenClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


class ProcessRewardForTokenClassification(ScoreForTokenClassification):
    """Qwen2.5-Math-PRM's layout (``Qwen2ForProcessRewardModel``): a backbone plus an MLP head at every token,
    ``score.0 [H, H]`` + bias, ReLU, ``score.2 [labels, H]`` + bias (vLLM's ``qwen2_rm.py``); P(correct step) is
    the softmax's entry 1 at each step tag."""

    def __init__(self, config):
        super().__init__(config)
        self.dropout = torch.nn.Identity()
        self.score = mlp_head(config)
        self.post_init()
