"""Image+text probes for vision-language reward models: one sample per call, made by the checkpoint's own processor
(:func:`processor_probe`) or, without one, from the model's own config (:func:`image_sample`).

A processor probe is a small synthetic image (a numpy array: no pillow needed) and a text after the processor's image
placeholder, with everything the processor returns (``mm_token_type_ids`` included). A config probe's vision inputs
are synthetic tensors of the shapes the family's vision tower takes (a small image: 2x2 merged patches for the Qwen
families, the tower's own image size for the others); the number of image tokens is asked of the model
(``get_image_features``), so the sample is what the family's processor would make of such an image:
``<bos> <vision_start> <image>*N <vision_end> text``, with ``mm_token_type_ids`` (Qwen, Gemma 4) or
``token_type_ids`` (Gemma 3) marking the image tokens, as the processors give them. Qwen2.5-VL without
``mm_token_type_ids`` silently falls back to 1-D positions: every probe passes them."""

from __future__ import annotations

from functools import partial

#: Config fields naming the image placeholder id, in the order families use them.
IMAGE_FIELDS = ("image_token_id", "image_token_index")
#: Families whose processor marks image tokens in ``mm_token_type_ids`` / ``token_type_ids``.
MM_TOKEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "gemma4")
TOKEN_TYPES = ("gemma3",)


def image_token(config) -> int | None:
    """The image placeholder id of a composite config (transformers object)."""
    for name in IMAGE_FIELDS:
        value = getattr(config, name, None)
        if type(value) is int:
            return value
    return None


def _vision_inputs(backbone, model_type: str, generator) -> tuple[dict, int | None]:
    """Synthetic vision inputs of one small image, and the image-token count when the family fixes it."""
    import torch

    vision = backbone.config.vision_config
    if hasattr(vision, "spatial_merge_size") and hasattr(vision, "temporal_patch_size"):  # the Qwen families
        patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        side = 2 * merge
        channels = getattr(vision, "in_channels", getattr(vision, "in_chans", 3))
        pixels = torch.randn(side * side, channels * temporal * patch * patch, generator=generator)
        return {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, side, side]])}, 4
    if model_type.startswith("gemma4"):
        patch, side = vision.patch_size, 4 * getattr(vision, "pooling_kernel_size", 2)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        return {
            "pixel_values": torch.rand(1, side * side, 3 * patch * patch, generator=generator),
            "image_position_ids": torch.stack([xs.flatten(), ys.flatten()], -1)[None],
        }, None
    size = getattr(vision, "image_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if model_type == "llava_next":
        image = torch.randn(1, 3, 3, size, size, generator=generator)
        return {"pixel_values": image, "image_sizes": torch.tensor([[size, size]])}, None
    if getattr(vision, "model_type", "") == "pixtral":  # Mistral 3, Pixtral-based LLaVA: images of any size
        image = torch.randn(1, 3, size, size, generator=generator)
        return {"pixel_values": image, "image_sizes": torch.tensor([[size, size]])}, None
    if model_type in ("smolvlm", "idefics3", "idefics2"):
        return {"pixel_values": torch.randn(1, 1, 3, size, size, generator=generator)}, None
    return {"pixel_values": torch.randn(1, 3, size, size, generator=generator)}, None


def image_sample(model, model_type: str, seed: int = 0, words: int = 5, text: list[int] | None = None) -> dict:
    """One image+text sample (batch 1) for ``model`` (a reward model, a generation model or the composite
    ``*Model``); ``text``: the text ids after the image (else ``words`` ids drawn with ``seed``)."""
    import torch

    backbone = model
    while not hasattr(backbone, "get_image_features") and hasattr(backbone, "model"):
        backbone = backbone.model
    config = backbone.config
    generator = torch.Generator().manual_seed(seed)
    vision, count = _vision_inputs(backbone, model_type, generator)
    if count is None:
        with torch.no_grad():
            features = backbone.get_image_features(**vision)
        pooled = getattr(features, "pooler_output", features)
        if isinstance(pooled, (list, tuple)):
            pooled = torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])
        count = pooled.reshape(-1, pooled.shape[-1]).shape[0]
    image = image_token(config)
    vocab = backbone.get_input_embeddings().num_embeddings
    if text is None:
        text = torch.randint(3, min(vocab, 280), (words,), generator=generator).tolist()
    start = getattr(config, "vision_start_token_id", None) or getattr(config, "boi_token_id", None)
    start = start if type(start) is int else getattr(config, "boi_token_index", None)
    end = getattr(config, "vision_end_token_id", None) or getattr(config, "eoi_token_id", None)
    end = end if type(end) is int else getattr(config, "eoi_token_index", None)
    ids = [1, *([start] if type(start) is int else []), *[image] * count, *([end] if type(end) is int else []), *text]
    input_ids = torch.tensor([ids])
    sample = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **vision}
    if model_type in MM_TOKEN_TYPES:
        sample["mm_token_type_ids"] = (input_ids == image).long()
    if model_type in TOKEN_TYPES:
        sample["token_type_ids"] = (input_ids == image).long()
    return sample


#: Side of the probe image in pixels: 2x2 merged 28-pixel patches for the Qwen families; other processors resize it.
PROBE_SIDE = 56


def probe_image(seed: int):
    """A small random RGB image, ``PROBE_SIDE`` x ``PROBE_SIDE`` x 3 uint8 (numpy): processors take arrays."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (PROBE_SIDE, PROBE_SIDE, 3), dtype=np.uint8)


def _framed(tokenizer, config, image: str) -> str:
    """``image`` between the tokens of the config's ``vision_start_token_id`` and ``vision_end_token_id`` (the
    Qwen families' chat templates write them; the processor does not), then a space."""
    ends = [getattr(config, f"vision_{e}_token_id", None) for e in ("start", "end")]
    if all(type(i) is int for i in ends):
        start, end = tokenizer.convert_ids_to_tokens(ends)
        image = f"{start}{image}{end}"
    return f"{image} "


def processor_probe(path, config):
    """``make(image, text)``: one sample (batch 1) of ``image`` and ``text`` after its placeholder, made by the
    processor at ``path`` (``AutoProcessor``), or where that cannot be built (Qwen2-VL's needs torchvision for its
    video processor) by its image processor and tokenizer as the Qwen processors do it. Raises what loading raises."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(path)
        placeholder = getattr(processor, "boi_token", None) or processor.image_token  # Gemma 3: the processor's
        return partial(_processed, processor, _framed(processor.tokenizer, config, placeholder))
    except Exception as exc:  # noqa: BLE001 (raised below unless the image processor and tokenizer do)
        error = exc
    image_processor = AutoImageProcessor.from_pretrained(path)
    if type(getattr(image_processor, "merge_size", None)) is not int:
        raise error
    return partial(_by_hand, image_processor, AutoTokenizer.from_pretrained(path), config)


def _processed(processor, placeholder: str, image, text: str) -> dict:
    return dict(processor(images=[image], text=[placeholder + text], return_tensors="pt"))


def _by_hand(image_processor, tokenizer, config, image, text: str) -> dict:
    """What a Qwen-family processor makes: the image token once per merged patch, ``mm_token_type_ids`` 1 there."""
    vision = dict(image_processor(images=[image], return_tensors="pt"))
    count = int(vision["image_grid_thw"].prod()) // image_processor.merge_size**2
    image_id = image_token(config)
    framed = _framed(tokenizer, config, tokenizer.convert_ids_to_tokens(image_id) * count)
    inputs = dict(tokenizer([framed + text], return_tensors="pt"))
    return {**inputs, **vision, "mm_token_type_ids": (inputs["input_ids"] == image_id).long()}


def with_image_of(sample: dict, other: dict) -> dict:
    """``sample`` with the vision inputs of ``other`` (same shapes): the same text, another image."""
    text = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
    return {k: sample[k] if k in text else other[k] for k in sample}


def batch(samples: list[dict], pad: int) -> dict:
    """Samples as one right-padded batch: ids padded with ``pad``, masks with 0, vision tensors concatenated."""
    import torch

    length = max(s["input_ids"].shape[1] for s in samples)
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
            fill = pad if key == "input_ids" else 0
            values = [torch.nn.functional.pad(v, (0, length - v.shape[1]), value=fill) for v in values]
        out[key] = torch.cat(values)
    return out
