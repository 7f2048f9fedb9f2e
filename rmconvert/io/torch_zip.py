"""PyTorch ``.bin`` weights (torch's zip format) at the header level, without torch and without running pickle code.

``torch.save`` writes a zip whose ``<archive>/data.pkl`` pickles the state dict and whose entries
``<archive>/data/<key>`` hold each storage's bytes, stored uncompressed. The pickle is read by an unpickler
that accepts exactly what a state dict of tensors needs (the globals ``torch.load(weights_only=True)``
allows for one) and refuses every other global before anything is called. Each contiguous tensor is then
a byte range of the ``.bin`` file: the same :class:`TensorInfo` the safetensors reader gives, which the
engine copies with ``copy_file_range``.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .safetensors import DTYPE_BITS, Header, TensorInfo

MAX_PICKLE = 100_000_000  # bytes of data.pkl read at most (a state dict's pickle is a few MB)
LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (fields not needed), name length, extra length
#: torch's legacy storage classes (what ``torch.save`` names in the pickle) -> safetensors dtype.
STORAGE_DTYPES = {
    "BFloat16Storage": "BF16",
    "HalfStorage": "F16",
    "FloatStorage": "F32",
    "DoubleStorage": "F64",
    "ComplexFloatStorage": "C64",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
#: torch dtypes a pickle may name -> safetensors dtype (``_rebuild_tensor_v3`` names the dtype of a tensor whose
#: storage is untyped: float8, uint16, ...).
TORCH_DTYPES = {
    **dict.fromkeys(("bfloat16",), "BF16"),
    **dict.fromkeys(("float16", "half"), "F16"),
    **dict.fromkeys(("float32", "float"), "F32"),
    **dict.fromkeys(("float64", "double"), "F64"),
    **dict.fromkeys(("int64", "long"), "I64"),
    **dict.fromkeys(("int32", "int"), "I32"),
    **dict.fromkeys(("int16", "short"), "I16"),
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",
}


class _Refused(Exception):
    """The pickle asks for something a state dict of tensors does not need."""


class _StandIn:
    """Base of the objects a pickle's globals and storages stand for: the BUILD opcode (set an object's state, which
    would write into its ``__dict__`` past a frozen dataclass) is refused, so a pickle alters none of them."""

    def __setstate__(self, state):
        name = type(self).__name__.strip("_")
        raise _Refused(f"the pickle sets the state of a {name} (BUILD), which a state dict of tensors does not need")


@dataclass(frozen=True)
class _StorageType(_StandIn):
    dtype: str


@dataclass(frozen=True)
class _Dtype(_StandIn):
    dtype: str


@dataclass(frozen=True)
class _Storage(_StandIn):
    """A storage by persistent id: the zip entry ``data/<key>`` holding ``numel`` elements of ``dtype``."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _Tensor(_StandIn):
    """What ``torch._utils._rebuild_tensor_v2`` (or ``_v3``) would build: a view of a storage."""

    storage: _Storage
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str  # the storage's, or the one _rebuild_tensor_v3 names


@dataclass(frozen=True)
class _Function(_StandIn):
    """A function a pickle may call, wrapped: BUILD on the function itself would set its attributes for the process."""

    function: Callable

    def __call__(self, *args):
        return self.function(*args)


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(x) is int and x >= 0 for x in value):
        raise _Refused(f"{what} {value!r} is not a tuple of non-negative integers")
    return value


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest) -> _Tensor:
    """Stands in for ``torch._utils._rebuild_tensor_v2`` (requires_grad, hooks and metadata are ignored)."""
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor is built from something that is not a storage")
    if type(storage_offset) is not int or storage_offset < 0:
        raise _Refused(f"storage offset {storage_offset!r} is not a non-negative integer")
    return _Tensor(storage, storage_offset, _ints(size, "size"), _ints(stride, "stride"), storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_rest) -> _Tensor:
    """Stands in for ``torch._utils._rebuild_tensor_v3``: a view of an untyped storage as ``dtype``."""
    if not isinstance(dtype, _Dtype):
        raise _Refused(f"tensor dtype {dtype!r} is not a torch dtype")
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    return _Tensor(tensor.storage, tensor.offset, tensor.shape, tensor.stride, dtype.dtype)


def _rebuild_parameter(data, *_rest) -> _Tensor:
    """Stands in for ``torch._utils._rebuild_parameter``: a parameter is its data."""
    if not isinstance(data, _Tensor):
        raise _Refused("a parameter is built from something that is not a tensor")
    return data


#: The only callables a pickle may name, and what stands in for them.
GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v3"): _Function(_rebuild_tensor_v3),
    ("torch.storage", "UntypedStorage"): _StorageType("U8"),  # counted in bytes
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
}


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals a state dict of tensors needs; anything else stops the read."""

    def find_class(self, module: str, name: str):
        if (module, name) in GLOBALS:
            return GLOBALS[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return _Dtype(TORCH_DTYPES[name])
        raise _Refused(f"the pickle names {module}.{name}, which a state dict of tensors does not need; not run")

    def persistent_load(self, pid) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"unknown persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or kind.dtype not in DTYPE_BITS:
            raise _Refused(f"storage type {kind!r} is not a tensor storage")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _Refused(f"malformed storage reference {str(pid)[:80]}")
        return _Storage(key, kind.dtype, numel)


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a view is row-major contiguous (strides of size-1 dimensions do not matter, as in torch)."""
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _data_offset(f, info: zipfile.ZipInfo, path: Path) -> int:
    """Absolute offset of an entry's bytes: after its local header, name and extra field."""
    f.seek(info.header_offset)
    raw = f.read(LOCAL_HEADER.size)
    if len(raw) < LOCAL_HEADER.size:
        raise CheckpointError(f"truncated: zip entry {info.filename} has no local header", path)
    signature, name_length, extra_length = LOCAL_HEADER.unpack(raw)
    if signature != b"PK\x03\x04":
        raise CheckpointError(f"corrupt zip: entry {info.filename} has no local header", path)
    return info.header_offset + LOCAL_HEADER.size + name_length + extra_length


def _not_a_zip(path: Path, head: bytes) -> CheckpointError:
    if head[:1] == b"\x80" or head[257:262] == b"ustar":  # a pickle (torch < 1.6), or a tar (older still)
        return CheckpointError(
            "legacy (pre-zip) torch file: re-save it with torch >= 1.6 or as safetensors (rmconvert never unpickles it)",
            path,
        )
    if head[:2] == b"PK":
        return CheckpointError("truncated or corrupt zip (no central directory)", path)
    return CheckpointError("not a torch zip file", path)


def _read_entry(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    """A small entry's bytes (data.pkl, byteorder): torch stores them plain; zipfile also inflates deflate and the like."""
    info = archive.getinfo(name)
    if info.flag_bits & 0x1:
        raise CheckpointError(f"zip entry {name} is encrypted; torch stores it plain", path)
    try:
        return archive.read(info)
    except (NotImplementedError, RuntimeError) as exc:  # a compression method or flag zipfile cannot read
        raise CheckpointError(f"zip entry {name} cannot be read: {exc}; torch stores it plain", path) from None


def _load_pickle(archive: zipfile.ZipFile, name: str, path: Path):
    info = archive.getinfo(name)
    if info.file_size > MAX_PICKLE:
        raise CheckpointError(f"{name} is {info.file_size} bytes, over the {MAX_PICKLE}-byte limit", path)
    data = _read_entry(archive, name, path)
    try:
        return _StateDictUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise CheckpointError(str(exc), path) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{name} is not a valid pickle: {str(exc)[:120] or type(exc).__name__}", path) from None
    except RecursionError:
        raise CheckpointError(f"{name} is nested too deeply", path) from None


def read_torch_zip(path: str | Path) -> Header:
    """Every tensor of a ``torch.save``'d state dict as a byte range of the file; raises CheckpointError.

    Refuses, naming the file: a pickle global outside a state dict's needs, a compressed or encrypted
    entry, a tensor past its storage, a non-contiguous view, a legacy (pre-zip) file, a damaged zip.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(512)
            try:
                archive = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
                raise _not_a_zip(path, head) from None
            with archive:
                return _read_archive(archive, f, path, size)
    except (zipfile.BadZipFile, zlib.error) as exc:
        raise CheckpointError(f"corrupt zip: {exc}", path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read: {exc.strerror or exc}", path) from None


def _read_archive(archive: zipfile.ZipFile, f, path: Path, size: int) -> Header:
    entries = {info.filename: info for info in archive.infolist()}
    pickles = [name for name in entries if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError("not a torch zip file: no <archive>/data.pkl", path)
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "byteorder" in entries and _read_entry(archive, prefix + "byteorder", path) != b"little":
        raise CheckpointError("big-endian storages are not supported", path)
    state = _load_pickle(archive, pickles[0], path)
    if not isinstance(state, dict):
        raise CheckpointError(f"the pickle holds a {type(state).__name__}, not a state dict of tensors", path)
    tensors: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, _Tensor):
            raise CheckpointError(f"entry {str(name)[:80]!r} is not a tensor: not a state dict of tensors", path)
        storage = tensor.storage
        entry = entries.get(f"{prefix}data/{storage.key}")
        if entry is None:
            raise CheckpointError(f"tensor {name!r}: no zip entry data/{storage.key} holds its storage", path)
        if entry.compress_type != zipfile.ZIP_STORED or entry.flag_bits & 0x1:
            raise CheckpointError(f"zip entry {entry.filename} is compressed or encrypted; torch stores it plain", path)
        storage_bits, bits = storage.numel * DTYPE_BITS[storage.dtype], DTYPE_BITS[tensor.dtype]
        if entry.file_size * 8 != storage_bits:
            raise CheckpointError(
                f"tensor {name!r}: storage {storage.key} holds {entry.file_size} bytes,"
                f" not {storage.numel} elements of {storage.dtype}",
                path,
            )
        numel = math.prod(tensor.shape)
        if len(tensor.stride) != len(tensor.shape) or not (numel == 0 or _contiguous(tensor.shape, tensor.stride)):
            raise CheckpointError(
                f"tensor {name!r} is a non-contiguous view (shape {list(tensor.shape)}, stride"
                f" {list(tensor.stride)}); save it with .contiguous() or as safetensors",
                path,
            )
        if (tensor.offset + numel) * bits > storage_bits:
            raise CheckpointError(
                f"tensor {name!r}: elements {tensor.offset}..{tensor.offset + numel} of {tensor.dtype} run past its"
                f" storage of {storage_bits // 8} bytes",
                path,
            )
        if storage.key not in offsets:
            offsets[storage.key] = _data_offset(f, entry, path)
            if offsets[storage.key] + entry.file_size > size:
                raise CheckpointError(f"truncated: zip entry {entry.filename} runs past the end of the file", path)
        start = offsets[storage.key] + tensor.offset * bits // 8
        tensors[name] = TensorInfo(name, tensor.dtype, tensor.shape, path, start, numel * bits // 8)
    return Header(path, tensors, None, size)
