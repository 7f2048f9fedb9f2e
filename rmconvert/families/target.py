"""What kind of model a conversion makes: the *target* the engine, modeling and doctor read.

A reward model is a sequence classifier (one score read at the last token that is not the pad); a value model or
a process reward model (PRM) is a token classifier (a score at every token, ``score [labels, H]`` plus
``score.bias``). Each ``--head`` names one target; nothing else in the engine branches on the head.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQUENCE = "sequence"
TOKEN = "token"
#: Class-name suffix and transformers auto class of each task.
SUFFIX = {SEQUENCE: "ForSequenceClassification", TOKEN: "ForTokenClassification"}
AUTO_CLASS = {SEQUENCE: "AutoModelForSequenceClassification", TOKEN: "AutoModelForTokenClassification"}


@dataclass(frozen=True)
class Target:
    """The output of ``--head <name>``.

    ``labels``: rows of ``score``. ``task``: sequence or token classification. ``problem_type``: written to
    config.json (``regression``: servers and pipelines return the raw logits; None: the classifier's softmax,
    as TRL's PRMTrainer outputs have). ``pad_rule``: what ``--pad-token auto`` means (``existing`` keeps the
    policy's vocabulary, for models fed the policy's token ids).
    """

    name: str
    labels: int
    task: str = SEQUENCE
    problem_type: str | None = "regression"
    pad_rule: str = "auto"
    what: str = "reward model"

    @property
    def suffix(self) -> str:
        return SUFFIX[self.task]

    @property
    def auto_class(self) -> str:
        return AUTO_CLASS[self.task]

    @property
    def bias(self) -> bool:
        """Whether the head has a bias tensor: a token classifier's ``score`` does, a sequence classifier's not."""
        return self.task == TOKEN

    @property
    def per_token(self) -> bool:
        return self.task == TOKEN


TARGETS = {
    "scalar": Target("scalar", 1),
    "bt": Target("bt", 2),
    # TRL's PRMTrainer convention: 2 labels, LABEL_1 = the step is correct (softmax over the labels)
    "prm": Target("prm", 2, TOKEN, problem_type=None, what="process reward model"),
    # a critic / value model: 1 label, a raw value at every token, fed the policy's ids
    "value": Target("value", 1, TOKEN, pad_rule="existing", what="value model"),
}


def task_of_class(class_name: str | None) -> str:
    """The task of a class name written to config.json ``architectures`` (sequence unless it says token)."""
    if not isinstance(class_name, str):
        return SEQUENCE
    return TOKEN if class_name.endswith(SUFFIX[TOKEN]) or class_name in PROCESS_REWARD_CLASSES else SEQUENCE


def task_of_config(config: dict) -> str:
    """The task of a checkpoint from its config.json ``architectures``."""
    return task_of_class(class_of_config(config))


def class_of_config(config: dict) -> str | None:
    """config.json's first ``architectures`` entry, when it is a string."""
    names = config.get("architectures")
    name = names[0] if isinstance(names, list) and names else None
    return name if isinstance(name, str) else None


#: Token-level classes whose head is not ``score [labels, H]``: kept as they are (Qwen2.5-Math-PRM's MLP head).
PROCESS_REWARD_CLASSES = ("Qwen2ForProcessRewardModel",)
