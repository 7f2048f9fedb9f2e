"""``validate --load`` of vision-language reward models scores image+text probes made by the checkpoint's own
processor (issue 16): tiny processors built locally (a word-level tokenizer, the family's image processor), the
probes equal to what the processor itself makes, a sound reward model clean, a processor that does not fit its model
a finding, broken processor files a warning and never a crash."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rmconvert import convert, validate
from rmconvert import tiny_vlm as T
from rmconvert.doctor.images import probe_image
from rmconvert.doctor.probes import PROBE_TEXTS, _image_samples, _load
from rmconvert.doctor.validation import _read
from rmconvert.families.host import load_registry

pytestmark = pytest.mark.filterwarnings("ignore")

V5 = int(transformers.__version__.split(".")[0]) >= 5
FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava", "llava_next", "gemma3")
#: The family's media tokens at the tiny config's ids, and the tokenizer's named special tokens.
QWEN = {"<|image_pad|>": T.IMAGE, "<|video_pad|>": T.VIDEO, "<|vision_start|>": T.START, "<|vision_end|>": T.END}
GEMMA = {"<image_soft_token>": T.IMAGE, "<start_of_image>": T.START, "<end_of_image>": T.END, "<video>": T.VIDEO}
LLAVA = {"<image>": T.IMAGE, "<video>": T.VIDEO}
SPECIALS = {
    "qwen2_5_vl": QWEN,
    "qwen2_vl": QWEN,
    "qwen3_vl": QWEN,
    "llava": LLAVA,
    "llava_next": LLAVA,
    "gemma3": GEMMA,
}
GEMMA_NAMES = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}


def tokenizer(model_type: str) -> PreTrainedTokenizerFast:
    """Word-level: <unk> 0, <s> 1, </s> 2, the probe texts' words from 3, filler words, the family's media tokens."""
    words = [w for text in PROBE_TEXTS for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]
    specials = SPECIALS[model_type]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in dict.fromkeys(words):
        vocab[word] = len(vocab)
    vocab.update({f"w{i}": i for i in range(len(vocab), T.END + 1) if i not in specials.values()})
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials))
    extra = {"extra_special_tokens": GEMMA_NAMES} if model_type == "gemma3" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra)


def image_processor(name: str, **settings):
    """The family's image processor (transformers 5: its PIL backend, no torchvision)."""
    pil = getattr(transformers, f"{name}Pil", None) if V5 else None
    return (pil or getattr(transformers, name))(**settings)


def processor(model_type: str, **changes):
    """The family's processor of the tiny config: Qwen's image processor alone (its processor needs torchvision),
    the LLaVA, LLaVA-NeXT and Gemma 3 processors."""
    tok = tokenizer(model_type)
    if model_type.startswith("qwen"):  # 4 image tokens: 4x4 patches (14 or Qwen3-VL's 16 pixels), merged 2x2
        side = 64 if model_type == "qwen3_vl" else 56
        patch = {"patch_size": 16} if model_type == "qwen3_vl" else {}
        settings = {"min_pixels": side * side, "max_pixels": side * side, **patch, **changes}
        return image_processor("Qwen2VLImageProcessor", **settings)
    options = {"patch_size": 8, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    sizes = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    if model_type == "llava":
        pixels = image_processor("LlavaImageProcessor" if V5 else "CLIPImageProcessor", **sizes)
        return transformers.LlavaProcessor(pixels, tok, **{**options, **changes})
    if model_type == "llava_next":
        pixels = image_processor("LlavaNextImageProcessor", **sizes, image_grid_pinpoints=[[32, 32], [32, 64]])
        return transformers.LlavaNextProcessor(pixels, tok, **{**options, **changes})
    pixels = image_processor("Gemma3ImageProcessor", size={"height": 32, "width": 32})
    return transformers.Gemma3Processor(pixels, tok, **{"image_seq_length": 4, **changes})


def save_processor(model_type: str, path, **changes) -> None:
    processor(model_type, **changes).save_pretrained(path)
    tokenizer(model_type).save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``checkpoints(model_type)`` -> (policy dir, converted RM dir), with the family's processor; cached."""
    cache = {}

    def _get(model_type):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(model_type)
            src = T.build_policy(model_type, root / "src")
            if model_type in ("qwen2_vl", "qwen2_5_vl"):
                T.qwen_layout(src, canonical=False)  # the released names
            save_processor(model_type, src)
            convert(src, root / "rm")
            cache[model_type] = src, root / "rm"
        return cache[model_type]

    return _get


def copy(path, to):
    shutil.copytree(path, to)
    return to


def samples(rm):
    """The image+text probes ``validate --load`` scores, and its findings about them."""
    subject = _read(rm, load_registry())
    model = _load(subject, rm)[0].eval()
    return _image_samples(subject, model, model.config.get_text_config().pad_token_id)


def expected(model_type: str, seed: int, text: str) -> dict:
    """What the family's processor makes of the probe image and ``text`` (Qwen: its image processor and the tokens
    the Qwen processor writes, ``<|vision_start|>``, an image token per merged patch, ``<|vision_end|>``)."""
    made = processor(model_type)
    if not model_type.startswith("qwen"):
        placeholder = "<start_of_image>" if model_type == "gemma3" else "<image>"
        return dict(made(images=[probe_image(seed)], text=[f"{placeholder} {text}"], return_tensors="pt"))
    vision = dict(made(images=[probe_image(seed)], return_tensors="pt"))
    assert vision["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4 tokens after the 2x2 merge
    text = f"<|vision_start|>{'<|image_pad|>' * 4}<|vision_end|> {text}"
    inputs = dict(tokenizer(model_type)([text], return_tensors="pt"))  # 4.57: token_type_ids too
    return {**inputs, "mm_token_type_ids": (inputs["input_ids"] == T.IMAGE).long(), **vision}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_probes_are_what_the_checkpoint_processor_makes(checkpoints, model_type):
    made, findings = samples(checkpoints(model_type)[1])
    assert findings == []
    for sample, (seed, text) in zip(made, [(0, PROBE_TEXTS[0]), (1, PROBE_TEXTS[1]), (2, PROBE_TEXTS[0])]):
        want = expected(model_type, seed, text)
        assert sorted(sample) == sorted(want)
        for key, value in want.items():
            assert torch.equal(sample[key], value), key
    # (32 / 8)^2 LLaVA patches, CLS dropped; LLaVA-NeXT: those of the base image and of one 32x32 tile, 4 newlines
    tokens = {"llava": 16, "llava_next": 36}.get(model_type, 4)
    assert int((made[0]["input_ids"] == T.IMAGE).sum()) == tokens
    if model_type == "gemma3":
        assert torch.equal(made[0]["token_type_ids"], (made[0]["input_ids"] == T.IMAGE).long())
    assert not torch.equal(made[0]["pixel_values"], made[2]["pixel_values"])  # another image, the same text
    assert torch.equal(made[0]["input_ids"], made[2]["input_ids"])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_sound_reward_model_is_clean_with_its_processor(checkpoints, model_type):
    src, rm = checkpoints(model_type)
    assert validate(rm, load=True, against=src) == []


#: A processor that does not fit its model: LLaVA's image token is the video token; Gemma 3 writes 9 image tokens
#: for the model's 4; Qwen's image processor merges no patches (16 image tokens for the model's 4).
MISFITS = {"llava": {"image_token": "<video>"}, "gemma3": {"image_seq_length": 9}, "qwen2_5_vl": {"merge_size": 1}}


@pytest.mark.parametrize("model_type", sorted(MISFITS))
def test_a_processor_that_does_not_fit_its_model_is_a_finding(checkpoints, tmp_path, model_type):
    rm = copy(checkpoints(model_type)[1], tmp_path / "rm")
    save_processor(model_type, tmp_path / "misfit", **MISFITS[model_type])
    for name in ("processor_config.json", "preprocessor_config.json"):  # the RM's tokenizer kept
        if (tmp_path / "misfit" / name).exists():
            shutil.copy(tmp_path / "misfit" / name, rm / name)
    found = validate(rm, load=True)
    file = "preprocessor_config.json" if model_type.startswith("qwen") else "processor_config.json"
    assert [(f.code, f.severity, f.file) for f in found] == [("RM137", "error", file)], found
    assert ("no image token 300" if model_type == "llava" else "tokens do not match") in found[0].message
    made, _ = samples(rm)  # the config's probes instead
    assert int((made[0]["input_ids"] == T.IMAGE).sum()) == (16 if model_type == "llava" else 4)


BROKEN = {
    "not-json": "{not json",
    "empty": "",
    "unknown-class": '{"processor_class": "NoSuchProcessor", "image_processor_type": "NoSuchImageProcessor"}',
}
#: The file that names each family's processor: LLaVA's processor, Qwen's image processor.
PROCESSOR_FILE = {"llava": "processor_config.json", "qwen2_5_vl": "preprocessor_config.json"}


@pytest.mark.parametrize("broken", sorted(BROKEN))
@pytest.mark.parametrize("model_type", sorted(PROCESSOR_FILE))
def test_broken_processor_files_fall_back_to_config_probes(checkpoints, tmp_path, model_type, broken):
    """Never a crash: RM138 (a warning) names the file in one line; the config's probes still check padding and
    images, and ``--against`` still compares with images."""
    src, rm = checkpoints(model_type)
    rm = copy(rm, tmp_path / "rm")
    for name in ("processor_config.json", "preprocessor_config.json"):
        (rm / name).unlink(missing_ok=True)
    (rm / PROCESSOR_FILE[model_type]).write_text(BROKEN[broken])
    found = validate(rm, load=True, against=src)
    assert [(f.code, f.file) for f in found] == [("RM138", PROCESSOR_FILE[model_type])], found
    assert len(found[0].message.splitlines()) == 1


def test_a_padded_batch_that_disagrees_is_reported_with_processor_probes(checkpoints, tmp_path):
    """RM110 from the processor's probes: batches padded with the tokenizer's pad (<unk>, as the processor pads
    them), which the pooling does not skip (it skips config.json's pad)."""
    rm = copy(checkpoints("llava")[1], tmp_path / "rm")
    config = json.loads((rm / "tokenizer_config.json").read_text())
    (rm / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<unk>"}))
    codes = {f.code for f in validate(rm, load=True)}
    assert {"RM033", "RM110"} <= codes and not codes & {"RM137", "RM138"}, codes


def test_an_unused_image_is_reported_with_processor_probes(checkpoints, tmp_path):
    """RM136 from the processor's probes: Gemma 3 with its projector zeroed (as before training) ignores images."""
    from safetensors.torch import load_file, save_file

    rm = copy(checkpoints("gemma3")[1], tmp_path / "rm")
    for shard in rm.glob("*.safetensors"):
        tensors = {k: torch.zeros_like(v) if "mm_input_projection" in k else v for k, v in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    assert [f.code for f in validate(rm, load=True)] == ["RM136"]
