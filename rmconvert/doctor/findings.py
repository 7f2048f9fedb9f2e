"""What ``rmconvert validate`` reports: the codes (severity, meaning, fix), a finding, and the subject checked.

Checks (:mod:`rmconvert.doctor.checks`, :mod:`rmconvert.doctor.probes`, plugins' ``rmconvert_register_checks``) import this
module; :mod:`rmconvert.doctor.validation` runs them. The dependency runs one way.
"""

from __future__ import annotations

import contextlib
import shlex
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from ..engine.pad import NEW_PAD, PadChoice, choose_pad
from ..errors import CheckpointError, summary
from ..families.architecture import Architecture
from ..families.host import Registry
from ..families.layout import Head, HeadError, Layout, find_head
from ..families.modeling import is_kept
from ..families.target import PROCESS_REWARD_CLASSES, TOKEN, class_of_config, task_of_config
from ..sources.checkpoint import Checkpoint, text_config
from ..sources.tokenizer_files import TokenizerFiles

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Code:
    """A kind of finding: its severity, what it means, and the fix (``{path}`` is the checkpoint as the user named
    it, ``{fixed}`` a new directory for its fixed copy, ``{head}`` the option that keeps the head form found,
    ``{pad}`` the pad ``--pad-token auto`` picks when the pad is an eos and ``{pad_why}`` why)."""

    code: str
    severity: str
    title: str
    hint: str


#: A fix by conversion keeps the head form found: a 2-label reward model stays 2-label (``{head}``: ``--head bt``).
FIX = "rmconvert convert {path} {fixed}{head}"
CODES = {
    c.code: c
    for c in (
        Code(
            "RM001",
            ERROR,
            "the checkpoint cannot be read: a file is missing, truncated or malformed",
            "re-save or re-download the file",
        ),
        Code("RM002", ERROR, "config.json violates the architecture's JSON schema", FIX),
        Code(
            "RM003",
            ERROR,
            "no installed plugin knows the model_type",
            "install a plugin for it (see `rmconvert plugins`)",
        ),
        Code(
            "RM004",
            WARNING,
            "config.json names remote code (auto_map); rmconvert never runs it",
            "load without trust_remote_code, or remove auto_map",
        ),
        Code(
            "RM005",
            ERROR,
            "a check could not run: it raised an unexpected exception (the other checks ran)",
            "fix what the message names, or report it to the check's plugin",
        ),
        Code("RM010", ERROR, "no score head", FIX),
        Code("RM011", ERROR, "score.weight is not [N, hidden_size]", "retrain or re-export the head"),
        Code(
            "RM012",
            ERROR,
            "the config's label count differs from the head's rows (no id2label loads 2)",
            FIX + " (writes id2label)",
        ),
        Code("RM013", ERROR, "a language-model head is present", FIX + " (drops it)"),
        Code(
            "RM014",
            ERROR,
            "an OpenRLHF reward model (RewardModel, value_head): not loadable as a classifier",
            FIX + " (renames the head to score.weight)",
        ),
        Code(
            "RM015",
            ERROR,
            "a TRL value-head model (v_head.summary, inline or in value_head.safetensors/.bin): not loadable as a"
            " classifier",
            FIX + " (makes the value head score.weight)",
        ),
        Code(
            "RM021", ERROR, "vocab_size is smaller than the tokenizer", FIX + " (pads the vocabulary, never shrinks it)"
        ),
        Code("RM022", ERROR, "embedding rows differ from vocab_size", "set vocab_size to the embedding's rows"),
        Code(
            "RM023",
            ERROR,
            "the layout cannot be told (the input embedding, the tensors to drop)",
            "check the architecture (--arch) or the plugin",
        ),
        Code("RM024", ERROR, "a tensor's width differs from hidden_size", "re-export the checkpoint"),
        Code("RM031", ERROR, "pad_token_id is not below vocab_size", FIX),
        Code(
            "RM032",
            ERROR,
            "pad_token_id is an eos id: the reward is read at the wrong token",
            FIX + " --pad-token {pad} ({pad_why}; then retrain: the read position moves)",
        ),
        Code(
            "RM033",
            ERROR,
            "the tokenizer's pad differs from config pad_token_id",
            "make tokenizer_config.json pad_token the config's pad",
        ),
        Code(
            "RM034",
            ERROR,
            "the tokenizer pads on the left, but this family scores only right-padded batches exactly",
            FIX + " (sets padding_side to right)",
        ),
        Code(
            "RM040",
            ERROR,
            "the shard index has no metadata (transformers 5 raises KeyError)",
            FIX + " (writes an exact index)",
        ),
        Code("RM041", ERROR, "the shard index's total_size is wrong", FIX + " (writes an exact index)"),
        Code(
            "RM042",
            WARNING,
            "the weights are PyTorch pickles (.bin): unsafe to load without weights_only, slower than safetensors",
            FIX + " (writes safetensors)",
        ),
        Code("RM050", WARNING, "a dropout field is not 0 (open-instruct trains reward models without dropout)", FIX),
        Code(
            "RM051",
            WARNING,
            "problem_type is not regression: vLLM and transformers' pipeline return sigmoid or softmax"
            " probabilities instead of rewards",
            'set "problem_type": "regression" in config.json, or ' + FIX,
        ),
        Code("RM060", ERROR, "a tokenizer file is missing or malformed", "save the tokenizer with transformers"),
        Code(
            "RM070",
            ERROR,
            "the vocabulary differs from the policy's (token -> id): a model fed the policy's token ids (a critic or"
            " value model in verl, OpenRLHF or open-instruct) reads them as other tokens",
            "rmconvert convert SFT-CHECKPOINT DST --head value (or --pad-token existing: keeps the policy's vocabulary)",
        ),
        Code(
            "RM071",
            ERROR,
            "the embedding has fewer rows than the policy's tokenizer has ids: a critic or value model fed the"
            " policy's ids indexes past it",
            "rmconvert convert SFT-CHECKPOINT DST --head value (or --pad-token existing), from a checkpoint with the"
            " policy's tokenizer",
        ),
        Code(
            "RM100", ERROR, "loading reports missing keys (randomly initialised)", "check the checkpoint's tensor names"
        ),
        Code("RM101", ERROR, "loading reports unexpected keys (ignored)", FIX),
        Code("RM102", ERROR, "loading reports tensors of mismatched shape", FIX),
        Code("RM103", ERROR, "transformers cannot load the model", "see the message"),
        Code(
            "RM110", ERROR, "a padded batch scores differently from the same sequences one by one", "check pad_token_id"
        ),
        Code("RM120", ERROR, "a backbone tensor differs from the source's", "convert again from the source"),
        Code("RM121", ERROR, "a source tensor is missing from the reward model", "convert again from the source"),
        Code("RM122", ERROR, "backbone hidden states differ from the source's", "convert again from the source"),
        Code(
            "RM123",
            ERROR,
            "rewards differ from the source reward model's under the head rules",
            "convert again from the source",
        ),
        Code(
            "RM127",
            ERROR,
            "a tensor loads with values other than its stored bytes (re-initialised on load)",
            "load with a class that keeps loaded weights (for a class rmconvert builds: upgrade rmconvert)",
        ),
        Code(
            "RM124",
            WARNING,
            "a backbone tensor was cast from the source's dtype; bytes not compared",
            "expected after --dtype",
        ),
        Code(
            "RM130",
            ERROR,
            "a vision-language reward model keeps tensor names its class does not load (Qwen2-VL/2.5-VL released"
            " model.*, visual.*): the language model loads as random weights",
            FIX + " (writes model.language_model.*, model.visual.*)",
        ),
        Code(
            "RM131",
            ERROR,
            "a vision-language config has pad_token_id at the top level only: transformers reads the text config's",
            FIX + " (writes the pad into text_config)",
        ),
        Code(
            "RM132",
            ERROR,
            "architectures names a generation class beside a score head (ms-swift seq_cls): transformers and vLLM"
            " load a language model, not the reward model",
            FIX,
        ),
        Code(
            "RM133",
            ERROR,
            "the pad is an image, video or audio token id: the reward is read before the image, or never",
            FIX,
        ),
        Code(
            "RM134",
            ERROR,
            "an image, video or audio token id of the config is outside the text vocabulary or unknown to the"
            " tokenizer",
            "re-save the processor and tokenizer of the policy with the checkpoint",
        ),
        Code(
            "RM135",
            WARNING,
            "a vision-language reward model without processor files (preprocessor_config.json, processor_config.json):"
            " images cannot be prepared from the checkpoint alone",
            "copy the policy's processor files beside the weights",
        ),
        Code(
            "RM136",
            WARNING,
            "(`--load`) two different images give the same reward: the vision tower or projector does not reach the"
            " head",
            "check the projector's weights (Gemma 3's mm_input_projection_weight is zero until trained)",
        ),
        Code(
            "RM137",
            ERROR,
            "(`--load`) the checkpoint's own processor makes image+text inputs the reward model cannot score (no image"
            " token of the config, or the forward fails): probes made from the config instead",
            "re-save the policy's processor with the checkpoint (its image token must be config.json's)",
        ),
        Code(
            "RM138",
            WARNING,
            "(`--load`) the checkpoint's processor files do not load: image+text probes made from the config instead",
            "re-save the policy's processor with the checkpoint",
        ),
        Code(
            "RM125",
            ERROR,
            "a tensor merged from the LoRA adapter differs from a fresh merge (PEFT's merge_and_unload)",
            "convert again from the base and the adapter (rmconvert convert BASE DST --adapter ADAPTER)",
        ),
        Code(
            "RM150",
            ERROR,
            "the reward head is not one transformers' sequence classifier loads (renamed, gated, MLP or read at a"
            " reward token): a plain loader gives a random or wrong head",
            "{convert}",
        ),
        Code(
            "RM151",
            ERROR,
            "the reward head cannot be told: several heads, or a head tensor of an unknown shape",
            "keep one head (remove the other head's tensors) or re-export the checkpoint",
        ),
        Code(
            "RM152",
            WARNING,
            "consumers read different columns of a multi-row head: TRL's GRPO and RLOO read logits[:, 0], HALOs"
            " logits[:, 1], vLLM returns every column",
            "rmconvert convert {path} {fixed} (1 label, the column every consumer reads; from N labels add"
            " --objective NAME|k or --weights c1,...,cN)",
        ),
        Code(
            "RM153",
            ERROR,
            "reward_token_id (the token a token-triggered reward model reads its reward at) is not a single token"
            " of the vocabulary distinct from the pad",
            "set reward_token_id to the reward token's id (InternLM2: 92527), a token of tokenizer.json that is not"
            " the pad",
        ),
        Code(
            "RM170",
            ERROR,
            "a token classifier (value model, PRM) has no head bias: transformers initialises it at random",
            "rmconvert convert SRC DST --head value (or --head prm): writes score.bias",
        ),
        Code("RM171", ERROR, "the token classifier's head bias is not [labels]", "re-export the head"),
        Code(
            "RM172",
            WARNING,
            "classifier_dropout is not 0: a token classifier then drops out before its head in training"
            " (0.1 when neither classifier_dropout nor hidden_dropout is set)",
            "set classifier_dropout to 0.0 in config.json (rmconvert convert writes it)",
        ),
        Code(
            "RM173",
            ERROR,
            "step_tag_id is not a token of the vocabulary (a PRM's score is read at it)",
            "rmconvert convert SRC DST --head prm --step-separator TEXT, TEXT one token",
        ),
        Code(
            "RM174",
            ERROR,
            "step_tag_id is the pad or an eos: a step's score would be read at padding or the end of the text",
            "choose a step separator of its own (rmconvert convert SRC DST --head prm --step-separator TEXT)",
        ),
        Code(
            "RM175",
            ERROR,
            "per-token scores of a padded batch differ from the same sequences one by one at a non-pad position",
            "check pad_token_id and the attention mask",
        ),
        Code(
            "RM176",
            ERROR,
            "per-token scores differ from the source's head applied to its hidden states (under the head rules)",
            "convert again from the source",
        ),
    )
}


@dataclass(frozen=True)
class Finding:
    """One problem: stable code, severity, the file and the JSON pointer or tensor, what is wrong, the fix."""

    code: str
    severity: str
    file: str
    where: str
    message: str
    hint: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Subject:
    """What checks look at: the checkpoint read from disk, and what was made of it."""

    path: Path
    ckpt: Checkpoint
    architecture: Architecture | None
    tokenizer: TokenizerFiles | None
    tokenizer_error: CheckpointError | None
    generation_config: dict | None
    registry: Registry
    repo: tuple[str, str | None] | None = None  # (repo id, revision) when it was named by a Hub repo id
    policy: TokenizerFiles | None = None  # the tokenizer of the policy it will serve (validate --policy)

    @property
    def config(self) -> dict:
        return self.ckpt.config

    @property
    def text_config(self) -> dict:
        return text_config(self.ckpt.config)

    @cached_property
    def layout(self) -> Layout | None:
        """What each tensor is, as the engine sees it (:meth:`Architecture.layout`); None without an architecture.
        An incomplete layout says why in ``layout.error`` (RM023)."""
        return self.architecture.layout(self.ckpt) if self.architecture is not None else None

    @property
    def hidden_size(self) -> int | None:
        return self.layout.hidden_size if self.layout is not None else self.text_config.get("hidden_size")

    @property
    def per_token(self) -> bool:
        """Whether it is a token classifier (a value model, a PRM), by config.json ``architectures``."""
        return task_of_config(self.config) == TOKEN

    @property
    def kept_mlp(self):
        """The MLP head a kept class holds (per token: Qwen2ForProcessRewardModel; a reward model: the
        ``score_inner_size`` of Qwen2ForRewardModel, ...), else None."""
        head = self.layout.head if self.layout is not None else None
        if head is None or head.kind != "mlp":
            return None
        return head if class_of_config(self.config) in PROCESS_REWARD_CLASSES or is_kept(self.config) else None

    @property
    def score_name(self) -> str:
        """The reward head the family's classifier loads (``score.weight`` unless the plugin says so)."""
        if self.per_token and self.architecture is not None:
            with contextlib.suppress(Exception):  # transformers lacks the family: the sequence classifier's name
                return self.architecture.score_name(self.ckpt.model_type, TOKEN)
        return self.layout.score if self.layout is not None else "score.weight"

    @property
    def vision_language(self) -> bool:
        """Whether the checkpoint is a composite image-text model (a text config and a vision config)."""
        return isinstance(self.config.get("text_config"), dict) and isinstance(self.config.get("vision_config"), dict)

    @property
    def right_padding_only(self) -> bool:
        """Whether the family scores only right-padded batches exactly (see Architecture.right_padding_only)."""
        return self.architecture is not None and self.ckpt.model_type in self.architecture.right_padding_only

    @property
    def weights_file(self) -> str:
        """The file that says where tensors are: the index of a sharded checkpoint, else the single file."""
        return self.ckpt.weights_file

    def could_not_run(self, check: str, exc: BaseException) -> Finding:
        """RM005: ``check`` raised ``exc``; names the check, the file the exception names (else the checkpoint)
        and the exception's message."""
        where = getattr(exc, "path", None) or getattr(exc, "filename", None)
        file = Path(str(where)).name if where is not None else str(self.path)
        return self.finding("RM005", file, check, summary(exc))

    def finding(self, code: str, file: str, where: str, message: str) -> Finding:
        """A finding of a built-in code, with its severity and fix hint."""
        kind = CODES[code]
        return Finding(code, kind.severity, file, where, message, kind.hint.format(**self._hint_names(kind.hint)))

    def _hint_names(self, hint: str) -> dict[str, str]:
        """``{path}`` and ``{fixed}`` of fix hints (a repo id is fixed into a local directory, never the cache),
        ``{head}``, and ``{pad}`` and ``{pad_why}`` when ``hint`` names them."""
        names = {}
        if "{head}" in hint:
            names["head"] = self._head_option()
        if "{pad}" in hint:
            names["pad"], names["pad_why"] = self._new_pad()
        if "{convert}" in hint:
            names["convert"] = self._convert_command()
        if self.repo is None:
            return self._filled({**names, "path": str(self.path), "fixed": f"{self.path}-fixed"})
        repo_id, revision = self.repo
        named = f"{repo_id} --revision {revision}" if revision else repo_id
        return self._filled({**names, "path": named, "fixed": f"{repo_id.split('/')[-1]}-fixed"})

    @staticmethod
    def _filled(names: dict[str, str]) -> dict[str, str]:
        """``{convert}`` names the path and the fixed directory too."""
        if "convert" in names:
            names["convert"] = names["convert"].format(path=names["path"], fixed=names["fixed"])
        return names

    @cached_property
    def head(self) -> Head | None:
        """The source's reward head as the engine sees it (found by names and shapes without an architecture);
        None when there is none or it cannot be told (RM151)."""
        if self.layout is not None:
            return self.layout.head
        try:
            return find_head(self.ckpt, self.score_name)
        except HeadError:
            return None

    @property
    def head_error(self) -> HeadError | None:
        if self.layout is not None:
            return self.layout.error if isinstance(self.layout.error, HeadError) else None
        try:
            find_head(self.ckpt, self.score_name)
        except HeadError as exc:
            return exc
        return None

    def _convert_command(self) -> str:
        """The command that makes the head found a standard reward model (or why there is none)."""
        head = self.head
        fix = "rmconvert convert {path} {fixed}"
        if head is None:
            return fix
        if head.refused:
            return f"none exact ({head.refused}): retrain with do_normalize false, or score with safe-rlhf"
        if head.rule == "trigger":
            return (
                "keep it: serve it with vLLM or sglang (InternLM2ForRewardModel) and append reward_token_id to every"
                " input (rmconvert validate checks the token)"
            )
        if head.rule == "gated":
            return fix + " --objective NAME|k (one objective; without it, every objective as a label)"
        if head.rule == "kept":
            return fix + " (keeps the MLP head: rmconvert's class, Qwen2ForRewardModel for Qwen2)"
        extra = " (negates the cost head)" if head.negate else ""
        return fix + (" --label-names NAME,..." if (head.objectives(self.ckpt) or 1) > 2 else "") + extra

    def _head_option(self) -> str:
        """``--head bt`` for a 2-label reward model (convert's default, scalar, would make it 1-label), else none."""
        try:
            score = self.ckpt.tensors.get(self.score_name)
        except Exception:  # noqa: BLE001 (a layout that raises is a finding of its own; a fix hint never fails)
            return ""
        return " --head bt" if score is not None and len(score.shape) == 2 and score.shape[0] == 2 else ""

    def _new_pad(self) -> tuple[str, str]:
        """The pad ``--pad-token auto`` gives a causal LM whose pad is an eos (on a reward model it keeps the
        trained one, so the hint names the token), as a shell word, and why."""
        preferred = (self.architecture or Architecture).pad_tokens
        try:
            choice = choose_pad("auto", self.tokenizer, self.config, self.generation_config, preferred, False)
        except CheckpointError:
            choice = PadChoice(NEW_PAD, None, "added")  # an eos id at the next free id: convert says so
        if choice.action == "reused":
            why = "reuses the tokenizer's unused pad token, as --pad-token auto does for a causal LM"
        else:
            why = "a new token: the tokenizer has no unused pad token"
        return shlex.quote(choice.token), why
