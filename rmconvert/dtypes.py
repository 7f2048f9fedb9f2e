"""Float dtypes as bytes: decode, encode (round to nearest even, as torch does) and cast, with numpy.

numpy is imported by the functions that compute, which run in writer threads: a conversion starts
copying before numpy has loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

#: safetensors dtype -> numpy storage type; BF16 is stored as its upper 16 bits of a float32.
FLOAT_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
#: torch names accepted by ``--dtype`` -> safetensors dtype.
TORCH_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def decode(raw: bytes, dtype: str) -> np.ndarray:
    """Values of little-endian ``dtype`` bytes, as float64 for F64 and float32 otherwise."""
    import numpy as np

    if dtype == "BF16":
        bits = np.frombuffer(raw, "<u2").astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    values = np.frombuffer(raw, FLOAT_DTYPES[dtype])
    return values if dtype == "F64" else values.astype(np.float32)


def encode(values: np.ndarray, dtype: str) -> bytes:
    """``dtype`` bytes of ``values``; BF16 rounds to nearest even and keeps NaN a NaN."""
    import numpy as np

    if dtype != "BF16":
        return values.astype(FLOAT_DTYPES[dtype]).tobytes()
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = np.where(np.isnan(values), 0x7FC0, rounded)
    return rounded.astype("<u2").tobytes()


def cast(raw: bytes, source: str, target: str) -> bytes:
    """Bytes of ``source`` dtype as ``target`` dtype."""
    return raw if source == target else encode(decode(raw, source), target)
