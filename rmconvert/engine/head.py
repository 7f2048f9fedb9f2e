"""The score head and new embedding rows, computed in bounded memory from bytes on disk.

Head rules (docs/cli.md): a fresh scalar head is open-instruct's ``N(0, 1/sqrt(H+1))``; a
Bradley-Terry head is ``[zeros; w]`` so that ``logits[:, 1]`` and ``logits[:, 1] - logits[:, 0]`` both
equal the scalar reward; a HALOs 2-label head becomes scalar by taking row 1, which is the only row
HALOs trains.
"""

from __future__ import annotations

import math
import os
import struct
from functools import partial

from ..dtypes import decode, encode
from ..io.safetensors import DTYPE_BITS, ByteRange, Computed, OutTensor, TensorInfo, materialize

CHUNK_BYTES = 4 << 20  # bytes of embedding rows decoded at a time


def default_init_std(hidden_size: int) -> float:
    """open-instruct's ``layer_init`` std for the score head: ``1 / sqrt(H + 1)``."""
    return 1.0 / math.sqrt(hidden_size + 1)


def initial_row(hidden_size: int, std: float, seed: int, dtype: str) -> bytes:
    """A fresh head row ``N(0, std)``, reproducible from ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return encode(rng.standard_normal(hidden_size) * std, dtype)


def _mean(read, rows: int, row_bytes: int, width: int, source: str, dtype: str) -> bytes:
    """Mean of ``rows`` rows as ``dtype``; ``read(start, count)`` gives rows' bytes, CHUNK_BYTES at a time."""
    import numpy as np

    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    total = np.zeros(width, dtype=np.float64)
    for start in range(0, rows, step):
        count = min(step, rows - start)
        total += decode(read(start, count), source).reshape(count, -1).sum(axis=0, dtype=np.float64)
    return encode(total / rows, dtype)


def mean_row(embedding: TensorInfo, dtype: str) -> bytes:
    """Mean of an embedding's rows as ``dtype``, read in chunks of at most CHUNK_BYTES."""
    rows, row_bytes = embedding.shape[0], embedding.row_bytes
    fd = os.open(embedding.path, os.O_RDONLY)
    try:
        read = lambda start, count: os.pread(fd, count * row_bytes, embedding.offset + start * row_bytes)
        return _mean(read, rows, row_bytes, embedding.shape[1], embedding.dtype, dtype)
    finally:
        os.close(fd)


def _rows_mean(data, tensor: OutTensor) -> bytes:
    """Mean of the rows of ``data``, the bytes of ``tensor``, as mean_row (no copy of them)."""
    data, row_bytes = memoryview(data), tensor.nbytes // tensor.shape[0]
    read = lambda start, count: data[start * row_bytes : (start + count) * row_bytes]
    return _mean(read, tensor.shape[0], row_bytes, tensor.shape[1], tensor.dtype, tensor.dtype)


def merged_mean_row_parts(tensor: OutTensor) -> tuple[tuple, Computed]:
    """The parts of a computed embedding (one a LoRA adapter changed) and the part of its mean row, as mean_row.

    The writer takes the mean of the rows as it computes them, once (the mean row is written after them); the
    mean part computes them again only if it is evaluated alone."""
    means: list[bytes] = []

    def rows() -> bytes:
        data = b"".join(materialize(p) for p in tensor.parts) if len(tensor.parts) > 1 else materialize(tensor.parts[0])
        means[:] = [_rows_mean(data, tensor)]
        return data

    mean = lambda: means[0] if means else _rows_mean(rows(), tensor)
    return (Computed(rows, tensor.nbytes),), Computed(mean, tensor.nbytes // tensor.shape[0])


def mean_row_part(embedding: TensorInfo) -> Computed:
    """The mean embedding row, computed by the writer of the embedding's shard."""
    return Computed(partial(mean_row, embedding, embedding.dtype), embedding.row_bytes)


def read_scalar(info: TensorInfo) -> float:
    """The value of a one-element float tensor, read without numpy (BF16 is the upper half of an F32)."""
    with open(info.path, "rb") as f:
        raw = os.pread(f.fileno(), info.nbytes, info.offset)
    if info.dtype == "BF16":
        return struct.unpack("<f", b"\0\0" + raw)[0]
    return struct.unpack({"F16": "<e", "F32": "<f", "F64": "<d"}[info.dtype], raw)[0]


def row(info: TensorInfo, index: int) -> ByteRange:
    """Row ``index`` of a 2-D tensor as a byte range (copied, never decoded)."""
    return ByteRange(info.path, info.offset + index * info.row_bytes, info.row_bytes)


def row_difference(info: TensorInfo, dtype: str) -> bytes:
    """Row 1 minus row 0 of a 2-row tensor, as ``dtype``."""
    first, second = (row(info, i) for i in (0, 1))
    with open(info.path, "rb") as f:
        values = [decode(os.pread(f.fileno(), p.length, p.offset), info.dtype).astype("f8") for p in (first, second)]
    return encode(values[1] - values[0], dtype)


def score_parts(
    existing: TensorInfo | None, labels: int, hidden_size: int, dtype: str, std: float, seed: int, from_bt: str
) -> tuple[tuple, str]:
    """The bytes of ``score.weight`` ``[labels, H]`` as parts, and how they were made."""
    row_bytes = hidden_size * DTYPE_BITS[dtype] // 8
    zeros = bytes(row_bytes)  # 0.0 is all zero bits in every float dtype
    if existing is None:
        fresh = Computed(partial(initial_row, hidden_size, std, seed, dtype), row_bytes)
        how = f"new, N(0, {std:.6g}) with seed {seed}"
        if labels == 1:
            return (fresh,), how
        return (zeros, fresh), how + ", as [zeros; w]"
    source_labels = existing.shape[0]
    if source_labels == labels:
        return tuple(row(existing, i) for i in range(labels)), f"unchanged {labels}-label head"
    if labels == 2:  # 1 -> 2
        return (zeros, row(existing, 0)), "1-label head w as [zeros; w]"
    if from_bt == "row1":  # HALOs trains only row 1
        return (row(existing, 1),), "row 1 of the 2-label head (the row HALOs trains)"
    difference = Computed(partial(row_difference, existing, dtype), row_bytes)
    return (difference,), "row 1 - row 0 of the 2-label head (softmax-trained classifier)"


def _bias_difference(info: TensorInfo) -> bytes:
    """``b[1] - b[0]`` of a 2-element bias, as its dtype."""
    with open(info.path, "rb") as f:
        values = decode(os.pread(f.fileno(), info.nbytes, info.offset), info.dtype).astype("f8")
    return encode(values[1:] - values[:1], info.dtype)


def bias_parts(head_bias: TensorInfo | None, labels: int, dtype: str, from_bt: str) -> tuple[tuple, str, str]:
    """The bytes of a token classifier's ``score.bias`` ``[labels]`` as parts, their dtype, and how they were
    made, by the rule :func:`score_parts` applies to the weight: the source head's bias copied (a value head's
    ``[b]``; as ``[0, b]`` under a 2-label head, so that ``logit_1 - logit_0`` is the value; a 2-label bias's
    entry 1, or ``b1 - b0``, under 1 label), else zeros."""
    if head_bias is None:
        return (bytes(labels * DTYPE_BITS[dtype] // 8),), dtype, "zeros"
    size = head_bias.nbytes // head_bias.shape[0]
    kept = tuple(ByteRange(head_bias.path, head_bias.offset + i * size, size) for i in range(head_bias.shape[0]))
    name, rows = head_bias.name, head_bias.shape[0]
    if rows == labels:
        return kept, head_bias.dtype, f"{name} as it is"
    if labels == 2:
        return (bytes(size), *kept), head_bias.dtype, f"{name} b as [0, b]"
    if from_bt == "row1":
        return kept[1:], head_bias.dtype, f"entry 1 of {name}"
    return (Computed(partial(_bias_difference, head_bias), size),), head_bias.dtype, f"b1 - b0 of {name}"
