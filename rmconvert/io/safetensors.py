"""safetensors at the header level: parse and check headers, write files from byte ranges.

A tensor is bytes ``[begin, end)`` of the data buffer, so an unchanged tensor is copied into a new
file by the kernel (``copy_file_range``) with rewritten offsets; nothing is loaded.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

MAX_HEADER = 100_000_000  # the reference reader's limit
CAST_CHUNK = 16 << 20  # bytes read at a time when casting
# Bytes per kernel copy between checks for a stop. Under dirty-page throttling a copy runs at disk speed: 256 MiB
# chunks took over 5 s on a busy disk, half the ~10 s a scheduler allows between SIGTERM and SIGKILL.
COPY_CHUNK = 16 << 20
#: Bits per element of every safetensors dtype.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: ``nbytes`` bytes at absolute ``offset`` of ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one slice along the first dimension)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


@dataclass(frozen=True)
class Header:
    """A parsed, checked safetensors header."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    size: int
    #: the file seen through a view (some of its tensors, under other names): never copied whole
    view: bool = False


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor; raises ValueError for sizes that are not whole bytes."""
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    if bits % 8:
        raise ValueError(f"{_count(math.prod(shape))} elements of {dtype} are not a whole number of bytes")
    return bits // 8


def _short(value) -> str:
    """A JSON value for a message, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _count(n: int) -> str:
    """A number for a message (a hostile header can claim sizes too long to print)."""
    return str(n) if n < 10**30 else "more than 10^30"


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _entry(name: str, raw, path: Path, data_start: int) -> TensorInfo:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets", path)
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(f"tensor {name!r}: unknown dtype {dtype!r}", path)
    ints = lambda v: isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)
    if not ints(shape):
        raise CheckpointError(f"tensor {name!r}: shape {_short(shape)} is not a list of non-negative integers", path)
    if not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(f"tensor {name!r}: data_offsets {_short(offsets)} is not [begin, end]", path)
    try:
        nbytes = tensor_nbytes(dtype, tuple(shape))
    except ValueError as exc:
        raise CheckpointError(f"tensor {name!r}: {exc}", path) from None
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(
            f"tensor {name!r}: data_offsets span {_count(offsets[1] - offsets[0])} bytes"
            f" but {dtype}{_short(shape)} needs {_count(nbytes)}",
            path,
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], nbytes)


def read_header(path: str | Path) -> Header:
    """Parse and check a safetensors file's header against the file; raises CheckpointError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"truncated: {size} bytes, shorter than the 8-byte header length", path)
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER:
                raise CheckpointError(f"header length {length} exceeds the {MAX_HEADER}-byte limit", path)
            if length > size - 8:
                raise CheckpointError(f"truncated: header length {length} exceeds the {size}-byte file", path)
            text = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read: {exc.strerror or exc}", path) from None
    try:
        raw = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"header is not valid JSON: {str(exc) or 'nested too deeply'}", path) from None
    if not isinstance(raw, dict):
        raise CheckpointError("header is not a JSON object", path)
    metadata = raw.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError("__metadata__ must map strings to strings", path)
    data_start = 8 + length
    tensors = {name: _entry(name, entry, path, data_start) for name, entry in raw.items()}
    expected = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        if info.offset != expected:  # as the reference reader: even an empty tensor sits where the data is
            kind = "overlaps the previous tensor" if info.offset < expected else "leaves a hole before it"
            raise CheckpointError(f"tensor {info.name!r} {kind} (data_offsets start {info.offset - data_start})", path)
        expected = info.offset + info.nbytes
    if expected != size:
        problem = "truncated" if expected > size else "trailing bytes after the data"
        raise CheckpointError(f"{problem}: tensors end at byte {expected} but the file has {size}", path)
    return Header(path, tensors, metadata, size)


# --- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ByteRange:
    """``length`` bytes at ``offset`` of the file at ``path``."""

    path: Path
    offset: int
    length: int


@dataclass(frozen=True)
class Cast:
    """The bytes of ``source`` as another float dtype, converted in bounded chunks while writing."""

    source: ByteRange
    from_dtype: str
    to_dtype: str

    @property
    def length(self) -> int:
        return self.source.length // DTYPE_BITS[self.from_dtype] * DTYPE_BITS[self.to_dtype]


@dataclass(frozen=True)
class Computed:
    """``length`` bytes computed by the writer (a mean embedding row, a new head row), so that copying
    the unchanged bytes need not wait for the arithmetic, nor for numpy's import."""

    compute: Callable[[], bytes]
    length: int

    def __call__(self) -> bytes:
        data = self.compute()
        if len(data) != self.length:
            raise AssertionError(f"computed {len(data)} bytes, planned {self.length}")
        return data


@dataclass(frozen=True)
class Repeat:
    """``row`` written ``count`` times, in bounded chunks (new embedding rows)."""

    row: bytes | Computed
    count: int

    @property
    def length(self) -> int:
        return part_length(self.row) * self.count


Part = ByteRange | Cast | Repeat | Computed | bytes


def part_length(part: Part) -> int:
    return len(part) if isinstance(part, bytes) else part.length


def materialize(part: bytes | Computed) -> bytes:
    return part if isinstance(part, bytes) else part()


@dataclass(frozen=True)
class OutTensor:
    """A tensor of an output file, assembled from byte ranges of source files and new bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        return sum(map(part_length, self.parts))

    def as_dtype(self, dtype: str) -> OutTensor:
        """This tensor cast to float ``dtype`` (unchanged if it already is one, or is not a float)."""
        from ..dtypes import FLOAT_DTYPES, cast

        if self.dtype == dtype or self.dtype not in FLOAT_DTYPES:
            return self

        def cast_part(part: Part) -> Part:
            if isinstance(part, Repeat):
                return Repeat(cast_part(part.row), part.count)
            if isinstance(part, ByteRange):
                return Cast(part, self.dtype, dtype)
            length = part_length(part) // DTYPE_BITS[self.dtype] * DTYPE_BITS[dtype]
            return Computed(lambda: cast(materialize(part), self.dtype, dtype), length)

        return OutTensor(self.name, dtype, self.shape, tuple(cast_part(p) for p in self.parts))

    @classmethod
    def copy_of(cls, info: TensorInfo) -> OutTensor:
        """An unchanged tensor."""
        return cls(info.name, info.dtype, info.shape, (ByteRange(info.path, info.offset, info.nbytes),))


def layout(tensors: list[OutTensor], metadata: dict[str, str]) -> tuple[bytes, list[OutTensor]]:
    """Header bytes and tensor order the way the reference writer does it.

    Tensors sorted by descending dtype width then name; header padded with spaces to a multiple of 8.
    """
    ordered = sorted(tensors, key=lambda t: (-DTYPE_BITS[t.dtype], t.name))
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in ordered:
        if t.nbytes != tensor_nbytes(t.dtype, t.shape):
            raise AssertionError(f"{t.name}: {t.nbytes} bytes for {t.dtype}{list(t.shape)}")
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append ``length`` bytes at ``offset`` of ``src_fd`` to ``dst_fd``, in the kernel where possible."""
    end = offset + length
    while offset < end:
        try:
            n = os.copy_file_range(src_fd, dst_fd, end - offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            n = _copy_fallback(src_fd, dst_fd, offset, end - offset)
        if n == 0:
            raise CheckpointError(f"file shrank while being copied (at byte {offset})", _fd_path(src_fd))
        offset += n


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` at the file position (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_fallback(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    try:
        return os.sendfile(dst_fd, src_fd, offset, length)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(src_fd, min(length, 16 << 20), offset)
    write_all(dst_fd, data)
    return len(data)


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class Stopped(Exception):
    """Raised inside a writer thread when the run was stopped (error elsewhere, Ctrl-C, SIGTERM)."""


def _merged(parts) -> list:
    """Parts with adjacent byte ranges of the same file merged into one."""
    merged: list = []
    for part in parts:
        last = merged[-1] if merged else None
        adjacent = isinstance(last, ByteRange) and last.path == getattr(part, "path", None)
        if isinstance(part, ByteRange) and adjacent and last.offset + last.length == part.offset:
            merged[-1] = ByteRange(part.path, last.offset, last.length + part.length)
            continue
        merged.append(part)
    return merged


def write_parts(dst_fd: int, parts, stop: threading.Event | None = None, advance=None) -> None:
    """Append parts to ``dst_fd`` in order: byte ranges copied by the kernel, casts and repeats in bounded
    chunks; checks ``stop`` between chunks so that an interrupted run ends promptly, and calls
    ``advance(nbytes)`` after each chunk (progress)."""
    from ..dtypes import cast

    fds: dict[Path, int] = {}

    def fd_of(path: Path) -> int:
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        return fds[path]

    def check() -> None:
        if stop is not None and stop.is_set():
            raise Stopped

    def written(nbytes: int) -> None:
        if advance is not None:
            advance(nbytes)

    try:
        for part in _merged(parts):
            if isinstance(part, ByteRange):
                for start in range(0, part.length, COPY_CHUNK):
                    check()
                    n = min(COPY_CHUNK, part.length - start)
                    copy_range(fd_of(part.path), dst_fd, part.offset + start, n)
                    written(n)
            elif isinstance(part, Cast):
                src = part.source
                step = CAST_CHUNK - CAST_CHUNK % (DTYPE_BITS[part.from_dtype] // 8)
                for start in range(0, src.length, step):
                    check()
                    raw = os.pread(fd_of(src.path), min(step, src.length - start), src.offset + start)
                    data = cast(raw, part.from_dtype, part.to_dtype)
                    write_all(dst_fd, data)
                    written(len(data))
            elif isinstance(part, Repeat):
                row = materialize(part.row)
                per_chunk = max(1, CAST_CHUNK // max(len(row), 1))
                for start in range(0, part.count, per_chunk):
                    check()
                    data = row * min(per_chunk, part.count - start)
                    write_all(dst_fd, data)
                    written(len(data))
            else:
                data = materialize(part)
                write_all(dst_fd, data)
                written(len(data))
    finally:
        for fd in fds.values():
            os.close(fd)
