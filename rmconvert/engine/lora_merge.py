"""The arithmetic of a LoRA merge, run by the engine's writer threads: PEFT's operations, PEFT's bits.

PEFT (``LoraLayer.get_delta_weight`` and ``merge``) loads A and B as float32 (it upcasts bf16/fp16 adapters),
computes ``transpose(B @ A, fan_in_fan_out) * scaling`` in float32 and adds it in place to the weight, which
adds in float32 and rounds once to the weight's dtype. torch is imported here, only when an adapter is given.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

from ..errors import CheckpointError
from ..io.safetensors import TensorInfo


@dataclass(frozen=True)
class Delta:
    """One LoRA update: ``weight += transpose(B @ A, transposed) * scale`` (and ``bias += B.bias * scale``);
    with DoRA's ``magnitude``, the weight is rescaled row by row as well."""

    a: TensorInfo
    b: TensorInfo
    scale: float
    transposed: bool
    magnitude: TensorInfo | None = None


TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def read_range(path, offset: int, length: int, buffer: bytearray | None = None) -> bytearray:
    """``length`` bytes at ``offset`` of ``path``, into ``buffer`` (or a new one), however many reads that takes
    (Linux reads at most 0x7ffff000 bytes at a time)."""
    buffer = bytearray(length) if buffer is None else buffer
    view, done = memoryview(buffer)[:length], 0
    with open(path, "rb") as f:
        while done < length:
            n = os.preadv(f.fileno(), [view[done:]], offset + done)
            if n == 0:
                raise CheckpointError("file shrank while being read", path)
            done += n
    return buffer


def read_tensor(info: TensorInfo, buffer: bytearray | None = None):
    """A tensor's bytes from disk as a torch tensor of its dtype and shape, in ``buffer`` (or its own memory)."""
    import torch

    buffer = read_range(info.path, info.offset, info.nbytes, buffer)
    dtype = getattr(torch, TORCH_DTYPES[info.dtype])
    if not info.nbytes:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=math.prod(info.shape)).reshape(info.shape)


def merged(base: TensorInfo, delta: Delta):
    """The merged tensor, by PEFT's operations (``LoraLayer.get_delta_weight`` and ``merge``).

    PEFT loads A and B as float32 (``autocast_adapter_dtype``: a bf16/fp16 adapter is upcast, an fp32 one kept
    even on a bf16 base), or float64 on a float64 base; ``transpose(B @ A, fan_in_fan_out) * scaling`` is float32;
    ``weight.data += delta`` adds in float32 and rounds once to the weight's dtype. The product is computed
    whole, with torch, as PEFT computes it (into a reused buffer); the elementwise steps follow in
    :func:`_scaled_add`: the same float32 products, the same float32 sums (addition commutes exactly) and the
    same rounding as torch's mixed-dtype ``+=``, without float32 copies of the whole weight.
    """
    import torch

    _return_big_blocks()
    weight = read_tensor(base, _weight_buffer(base.nbytes))
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    b = read_tensor(delta.b).to(compute)
    if len(base.shape) == 1:  # lora_bias: bias += lora_B.bias * scaling
        weight += b * delta.scale
        return weight
    a = read_tensor(delta.a).to(compute)
    if delta.magnitude is not None:
        product = b @ a
        return _dora(weight, (product.T if delta.transposed else product) * delta.scale, delta)
    product = torch.matmul(b, a, out=_scratch("product", (b.shape[0], a.shape[1]), compute))
    _scaled_add(weight, product.T if delta.transposed else product, delta.scale)
    return weight


def _scaled_add(weight, update, scale: float) -> None:
    """``weight += update * scale`` as PEFT's ``weight.data += delta`` computes it, in numpy, a chunk of rows
    at a time: ``update * scale`` in the update's float type (the scale rounded to it, as torch does), plus the
    weight exactly widened, rounded once to the weight's dtype (to nearest even; NaN as torch writes it). numpy
    runs this on one core without the GIL, so the two writer threads merge side by side."""
    import numpy as np
    import torch

    if weight.dtype == torch.bfloat16:
        target = weight.view(torch.int16).numpy().view(np.uint16)
    else:
        target = weight.numpy()
    update = update.numpy()
    scale = update.dtype.type(scale)
    step = max(1, ADD_CHUNK // max(1, target.shape[1]))
    buffer = _scratch(
        "sum",
        (min(step, target.shape[0]), target.shape[1]),
        torch.float32 if update.dtype == np.float32 else torch.float64,
    ).numpy()
    for start in range(0, target.shape[0], step):
        rows = slice(start, start + step)
        total = buffer[: target[rows].shape[0]]
        np.multiply(update[rows], scale, out=total)
        if target.dtype == np.uint16:  # bfloat16: the upper half of a float32
            total += (target[rows].astype(np.uint32) << 16).view(np.float32)
            bits = total.view(np.uint32)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            np.copyto(target[rows], np.where(np.isnan(total), 0x7FC0, rounded), casting="unsafe")
        else:
            total += target[rows]
            np.copyto(target[rows], total, casting="unsafe")


def _return_big_blocks() -> None:
    """Have glibc hand every block of 1 MiB or more back to the system when it is freed (a fixed mmap threshold;
    its default rises to 32 MiB and keeps freed tensors in the heap), so that memory stays flat however many
    tensors the two writer threads merge."""
    global _MALLOC_SET
    if not _MALLOC_SET:
        _MALLOC_SET = True
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc: still bounded, only returned later
            pass


_MALLOC_SET = False
_SCRATCH = threading.local()
_WEIGHTS = threading.local()
ADD_CHUNK = 1 << 16  # elements scaled and added at a time: in cache, temporaries below the mmap threshold


def _weight_buffer(nbytes: int) -> bytearray:
    """This thread's buffer for the weight being merged, grown to the largest: the merged bytes a writer
    thread gets stay valid until that thread merges the next tensor, by which time it has written them."""
    buffer = getattr(_WEIGHTS, "buffer", None)
    if buffer is None or len(buffer) < nbytes:
        _WEIGHTS.buffer = None
        buffer = _WEIGHTS.buffer = bytearray(nbytes)
    return buffer


def _scratch(name: str, shape: tuple[int, ...], dtype):
    """A ``shape`` tensor from this thread's buffer ``name``, which grows to the largest asked for and is
    reused: a merge's temporaries cost the same memory for every tensor, however many are merged."""
    import torch

    numel = math.prod(shape)
    buffer = getattr(_SCRATCH, name, None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        setattr(_SCRATCH, name, None)
        buffer = torch.empty(numel, dtype=dtype)
        setattr(_SCRATCH, name, buffer)
    return buffer[:numel].view(shape)


def _dora(weight, update, delta: Delta):
    """DoRA (``DoraLinearVariant.merge_unsafe``, ``DoraLinearLayer.get_weight_norm``): the row norms of the
    updated weight as PEFT computes them (transposed for Conv1D), the magnitude over them times the sum."""
    import torch

    flip = (lambda t: t.T) if delta.transposed else (lambda t: t)
    total = weight + update  # PEFT adds it twice, flipped for the norm: the same bits
    norm = torch.linalg.norm(flip(total), dim=1).to(total.dtype)
    factor = flip((read_tensor(delta.magnitude).to(update.dtype) / norm).view(-1, 1))
    return (factor * total).to(weight.dtype)


def merged_bytes(base: TensorInfo, delta: Delta) -> memoryview:
    """The merged tensor's bytes, as they go into the output file: a view of this thread's weight buffer (no
    copy), valid until the thread's next merge."""
    import torch

    return memoryview(merged(base, delta).contiguous().reshape(-1).view(torch.uint8).numpy())
