"""Property tests (hypothesis): whatever bytes or config a checkpoint holds, rmconvert answers or refuses cleanly.

- ``read_header`` on any file returns a header whose tensors exactly tile the data buffer, or raises
  CheckpointError; never another exception, and absurd sizes are refused without allocating them.
- ``layout`` writes files that both ``read_header`` and the reference reader (``safetensors.safe_open``) read
  back with the same names, dtypes, shapes and bytes.
- ``convert`` of a tiny checkpoint with any config.json either succeeds with an output that validates, or
  raises an RMConvertError and leaves nothing at the destination.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

import rmconvert
from rmconvert.errors import CheckpointError, RMConvertError
from rmconvert.io.safetensors import DTYPE_BITS, MAX_HEADER, Header, OutTensor, layout, read_header, tensor_nbytes
from rmconvert.sources.tokenizer_files import TokenizerFiles

STAGING = re.compile(r"^\..+\.rmconvert-(tmp|old)$")
WHOLE_BYTE_DTYPES = sorted(d for d, bits in DTYPE_BITS.items() if bits % 8 == 0)
HEADER_SETTINGS = settings(max_examples=400, deadline=None)
CONVERT_SETTINGS = settings(max_examples=40, deadline=None)
U64 = 2**64 - 1

# --- strategies --------------------------------------------------------------------------------

#: Strings as JSON can carry them: any code point, lone surrogates included (``"\ud800"`` is valid JSON text).
json_strings = st.text(st.characters(codec=None) | st.sampled_from(["\ud800", "\udfff", "\x00"]), max_size=12)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-2, 400)  # small ints hit ids, sizes and counts of the tiny checkpoints
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_strings
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(json_strings, children, max_size=4),
    max_leaves=16,
)
tensor_names = st.text(min_size=1, max_size=12).filter(lambda name: name != "__metadata__")
#: Dimensions a mutation may put in a shape: negative, huge, not integers, nested.
odd_dims = st.sampled_from(
    [-1, -(2**63), 2**31, 2**32, 2**50, 2**63, 2**64, 10**30, 1.0, 2.5, "2", True, None, [2], {}]
)


@st.composite
def tensor_sets(draw, dtypes=WHOLE_BYTE_DTYPES, min_tensors=0, max_tensors=5):
    """``{name: (dtype, shape)}`` of a few small tensors (zero-sized and 0-d included)."""
    return draw(
        st.dictionaries(
            tensor_names,
            st.tuples(st.sampled_from(dtypes), st.lists(st.integers(0, 4), max_size=3).map(tuple)),
            min_size=min_tensors,
            max_size=max_tensors,
        )
    )


def _entries(specs: dict) -> tuple[dict, int]:
    """A valid header (without ``__metadata__``) laying ``specs`` out back to back, and the data size."""
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return header, offset


def _some_tensor(draw, header: dict) -> str | None:
    names = sorted(k for k in header if k != "__metadata__" and isinstance(header[k], dict))
    return draw(st.sampled_from(names)) if names else None


def _set_dtype(draw, header, name):
    header[name]["dtype"] = draw(
        st.sampled_from([*DTYPE_BITS, "f32", "F32 ", "", "float32", "F8", "F4\x00", "bf16", "I128"]) | json_values
    )


def _set_shape(draw, header, name):
    header[name]["shape"] = draw(
        st.lists(st.integers(-(2**70), 2**70), max_size=4)
        | st.lists(st.integers(0, 8) | odd_dims, min_size=1, max_size=4)
        | st.lists(st.lists(st.integers(0, 4), max_size=2), min_size=1, max_size=2)  # nested
        | json_values
    )


def _set_dim(draw, header, name):
    shape = header[name].get("shape")
    if isinstance(shape, list) and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers() | odd_dims)


def _set_offsets(draw, header, name):
    entry = header[name]
    offsets = entry.get("data_offsets")
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)
    begin, end = offsets if ok else (0, 0)
    shift = draw(st.integers(-16, 16))
    entry["data_offsets"] = draw(
        st.sampled_from(
            [
                [end, begin],  # reversed
                [begin + shift, end + shift],  # overlapping or leaving a hole
                [begin, end + shift],
                [begin + 10**6, end + 10**6],  # beyond the file
                [2**63, 2**63 + end - begin],
                [0, 2**63],
                [U64, U64],
                [2**64, 2**64],
                [-8, end],
                [begin],
                [begin, end, end],
                [float(begin), float(end)],
            ]
        )
        | json_values
    )


def _overlap(draw, header, name):
    other = _some_tensor(draw, header)
    if other is not None and isinstance(header[other].get("data_offsets"), list):
        header[name]["data_offsets"] = list(header[other]["data_offsets"])


def _add_empty_tensor(draw, header, name):
    """A zero-sized tensor somewhere in (or past) the data: inside another, in a gap, at the end."""
    ends = [
        e["data_offsets"][1]
        for k, e in header.items()
        if k != "__metadata__"
        and isinstance(e, dict)
        and isinstance(e.get("data_offsets"), list)
        and len(e["data_offsets"]) == 2
        and type(e["data_offsets"][1]) is int
        and 0 <= e["data_offsets"][1] < 2**16
    ]
    at = draw(st.integers(0, max(ends, default=0) + 8))
    header[draw(tensor_names.filter(lambda n: n not in header))] = {
        "dtype": draw(st.sampled_from(sorted(DTYPE_BITS))),
        "shape": draw(st.sampled_from([[0], [0, 3], [3, 0]])),
        "data_offsets": [at, at],
    }


def _entry_extra_key(draw, header, name):
    header[name][draw(st.sampled_from(["offsets", "dtype ", "Shape", "extra"]) | json_strings)] = draw(json_values)


def _entry_drop_key(draw, header, name):
    header[name].pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)


def _entry_replaced(draw, header, name):
    header[name] = draw(json_values)


def _extra_top_key(draw, header, name):
    header[draw(json_strings)] = draw(json_values)


def _bad_metadata(draw, header, name):
    header["__metadata__"] = draw(json_values | st.dictionaries(json_strings, json_values, min_size=1, max_size=3))


HEADER_MUTATIONS = [
    _set_dtype,
    _set_shape,
    _set_dim,
    _set_offsets,
    _overlap,
    _add_empty_tensor,
    _entry_extra_key,
    _entry_drop_key,
    _entry_replaced,
    _extra_top_key,
    _bad_metadata,
]


def _set_length(draw, blob: bytes, header_length: int) -> bytes:
    length = draw(
        st.integers(0, U64)
        | st.sampled_from(
            [
                0,
                header_length - 1,
                header_length + 1,
                header_length + 8,
                len(blob),
                len(blob) - 8,
                len(blob) - 7,
                MAX_HEADER,
                MAX_HEADER + 1,
                2**32,
                2**60,
                2**63,
                U64,
            ]
        ).filter(lambda n: 0 <= n <= U64)
    )
    return struct.pack("<Q", length) + blob[8:]


def _truncate(draw, blob: bytes, header_length: int) -> bytes:
    return blob[: draw(st.integers(0, max(len(blob) - 1, 0)))]


def _trailing_garbage(draw, blob: bytes, header_length: int) -> bytes:
    return blob + draw(st.binary(min_size=1, max_size=32))


def _overwrite_byte(draw, blob: bytes, header_length: int) -> bytes:
    if not blob:
        return blob
    at = draw(st.integers(0, len(blob) - 1))
    return blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1 :]


def _not_utf8(draw, blob: bytes, header_length: int) -> bytes:
    """Replace a byte of the header text by one that is never valid UTF-8."""
    if header_length < 2 or len(blob) < 10:
        return blob
    at = draw(st.integers(9, min(8 + header_length, len(blob)) - 1))
    return blob[:at] + draw(st.sampled_from([b"\xff", b"\xc0", b"\xed"])) + blob[at + 1 :]


BYTE_MUTATIONS = [_set_length, _truncate, _trailing_garbage, _overwrite_byte, _not_utf8]


def _header_text(draw, header: dict) -> bytes:
    """JSON text of ``header``, compact or spaced, maybe with a repeated key, maybe space-padded to 8 bytes."""
    compact = draw(st.booleans())
    text = json.dumps(header, separators=(",", ":") if compact else None)
    name = _some_tensor(draw, header)
    # Now and then the same key twice (JSON allows it, safetensors does not).
    if name is not None and draw(st.sampled_from([False] * 9 + [True])):
        text = text[:-1] + f",{json.dumps(name)}:{json.dumps(header[name])}}}"
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        raw += b" " * (-(8 + len(raw)) % 8)
    return raw


@st.composite
def almost_valid_files(draw):
    """A valid safetensors file, then a few mutations of its header (as JSON) and of its bytes."""
    header, size = _entries(draw(tensor_sets(min_tensors=1)))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    for _ in range(draw(st.integers(0, 3))):
        mutation = draw(st.sampled_from(HEADER_MUTATIONS))
        name = _some_tensor(draw, header)
        if name is not None or mutation in (_add_empty_tensor, _extra_top_key, _bad_metadata):
            mutation(draw, header, name)
    text = _header_text(draw, header)
    blob = struct.pack("<Q", len(text)) + text + draw(st.binary(min_size=size, max_size=size))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        blob = draw(st.sampled_from(BYTE_MUTATIONS))(draw, blob, len(text))
    return blob


@st.composite
def length_prefixed(draw):
    """A right length prefix, then arbitrary bytes or arbitrary JSON as the header, then arbitrary data."""
    text = draw(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
    return struct.pack("<Q", len(text)) + text + draw(st.binary(max_size=32))


def safetensors_bytes(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file of ``header`` (space-padded) and ``data``; ``length`` overrides the length prefix."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


# --- read_header -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A file path reused by every example (hypothesis runs them one at a time)."""
    return tmp_path_factory.mktemp("headers") / "model.safetensors"


def check_read_header(path: Path, blob: bytes) -> Header | None:
    """``read_header`` of ``blob`` written at ``path``: a header that tiles the data exactly, or CheckpointError."""
    path.write_bytes(blob)
    try:
        header = read_header(path)
    except CheckpointError as exc:
        assert str(exc).startswith(f"{path}: "), str(exc)
        return None
    # Only a file the format allows may be accepted: tensors back to back from the end of the header to the
    # end of the file (the rule of the reference reader, zero-sized tensors included).
    (length,) = struct.unpack("<Q", blob[:8])
    assert header.size == len(blob)
    assert header.path == path
    assert header.metadata is None or all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())
    expected = 8 + length
    for info in sorted(header.tensors.values(), key=lambda t: (t.offset, t.offset + t.nbytes)):
        assert info.dtype in DTYPE_BITS, info
        assert all(type(d) is int and d >= 0 for d in info.shape), info
        assert info.nbytes == tensor_nbytes(info.dtype, info.shape), info
        assert info.path == path
        assert info.offset == expected, f"{info.name!r} starts at {info.offset}, the previous tensor ends at {expected}"
        expected = info.offset + info.nbytes
    assert expected == len(blob), f"tensors end at {expected}, the file at {len(blob)}"
    return header


# Files the reference reader refuses ("invalid offset"): a zero-sized tensor in a gap, or inside another tensor.
EMPTY_TENSOR_IN_A_GAP = safetensors_bytes(
    {
        "a": {"dtype": "U8", "shape": [20], "data_offsets": [0, 20]},
        "z": {"dtype": "U8", "shape": [0], "data_offsets": [30, 30]},
    },
    bytes(30),
)
EMPTY_TENSOR_INSIDE_ANOTHER = safetensors_bytes(
    {
        "a": {"dtype": "U8", "shape": [20], "data_offsets": [0, 20]},
        "z": {"dtype": "U8", "shape": [0], "data_offsets": [10, 10]},
    },
    bytes(20),
)
# A dtype that is not a string (a list cannot even be looked up in a dict).
DTYPE_IS_A_LIST = safetensors_bytes({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
# An element count too long to print (more than 4300 digits): refused, not a ValueError from int -> str.
HUGE_ELEMENT_COUNT = safetensors_bytes(
    {"a": {"dtype": "F32", "shape": [10**4299, 10**4299], "data_offsets": [0, 4]}}, bytes(4)
)


@HEADER_SETTINGS
@given(blob=st.binary(max_size=256))
@example(blob=b"")
@example(blob=struct.pack("<Q", 2) + b"{}")
@example(blob=struct.pack("<Q", U64) + b"{}")
def test_read_header_arbitrary_bytes(scratch, blob):
    check_read_header(scratch, blob)


@HEADER_SETTINGS
@given(blob=length_prefixed())
@example(blob=struct.pack("<Q", 40_000) + b"[" * 20_000 + b"]" * 20_000)
@example(blob=struct.pack("<Q", 8) + b'{"a":1} ')
def test_read_header_arbitrary_header_text(scratch, blob):
    check_read_header(scratch, blob)


@HEADER_SETTINGS
@given(blob=almost_valid_files())
@example(blob=EMPTY_TENSOR_IN_A_GAP)
@example(blob=EMPTY_TENSOR_INSIDE_ANOTHER)
@example(blob=DTYPE_IS_A_LIST)
def test_read_header_almost_valid_files(scratch, blob):
    check_read_header(scratch, blob)


@HEADER_SETTINGS
@given(specs=tensor_sets(min_tensors=1), data=st.data())
def test_read_header_zero_sized_tensor_anywhere(scratch, specs, data):
    """A valid file plus a zero-sized tensor at any offset: accepted only where it does not break the tiling."""
    header, size = _entries(specs)
    at = data.draw(st.integers(0, size + 8), label="offset")
    header[data.draw(tensor_names.filter(lambda n: n not in header), label="name")] = {
        "dtype": data.draw(st.sampled_from(sorted(DTYPE_BITS)), label="dtype"),
        "shape": data.draw(st.sampled_from([[0], [0, 3], [5, 0, 2]]), label="shape"),
        "data_offsets": [at, at],
    }
    check_read_header(scratch, safetensors_bytes(header, bytes(size)))


@HEADER_SETTINGS
@given(specs=tensor_sets())
def test_read_header_accepts_valid_files(scratch, specs):
    """The unmutated files of the strategy above are valid: the property is not vacuous."""
    header, size = _entries(specs)
    parsed = check_read_header(scratch, safetensors_bytes(header, bytes(size)))
    assert parsed is not None
    assert {n: (t.dtype, list(t.shape)) for n, t in parsed.tensors.items()} == {
        n: (e["dtype"], e["shape"]) for n, e in header.items()
    }


F32 = {"dtype": "F32"}
# fmt: off
ABSURD_SIZES = [
    pytest.param(safetensors_bytes({}, length=2**60), id="header-length-2**60"),
    pytest.param(safetensors_bytes({}, length=U64), id="header-length-u64-max"),
    pytest.param(safetensors_bytes({}, length=MAX_HEADER), id="header-length-at-limit-beyond-file"),
    pytest.param(safetensors_bytes({"a": {**F32, "shape": [2**50], "data_offsets": [0, 4 * 2**50]}}, bytes(8)),
                 id="tensor-2**50-elements"),
    pytest.param(safetensors_bytes({"a": {**F32, "shape": [2**50], "data_offsets": [0, 4]}}, bytes(4)),
                 id="tensor-2**50-elements-4-bytes"),
    pytest.param(safetensors_bytes({"a": {**F32, "shape": [2**25, 2**25], "data_offsets": [0, 2**52]}}),
                 id="tensor-2**50-elements-2d"),
    pytest.param(safetensors_bytes({"a": {**F32, "shape": [1], "data_offsets": [2**63, 2**63 + 4]}}, bytes(4)),
                 id="offsets-2**63"),
    pytest.param(safetensors_bytes({"a": {**F32, "shape": [2**40] * 64, "data_offsets": [0, 4]}}, bytes(4)),
                 id="element-count-2**2560"),
    pytest.param(HUGE_ELEMENT_COUNT, id="element-count-8599-digits"),
    pytest.param(safetensors_bytes({"a": {**F32, "shape": [1] * 200_000, "data_offsets": [0, 8]}}, bytes(4)),
                 id="shape-200000-dims"),
    pytest.param(struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, id="header-nested-100000-deep"),
]
# fmt: on


def assert_refused_cheaply(path: Path, match: str | None = None) -> None:
    """``read_header(path)`` raises CheckpointError within a second, with < 10 MiB peak traced memory.

    Timed and traced in separate runs: tracing every allocation slows Python down many times over.
    """
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=match):
        read_header(path)
    elapsed = time.perf_counter() - started
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match):
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert peak < 10 << 20, f"peak traced memory {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("blob", ABSURD_SIZES)
def test_read_header_refuses_absurd_sizes_without_allocating(scratch, blob):
    scratch.write_bytes(blob)
    assert_refused_cheaply(scratch)


def test_read_header_refuses_a_huge_sparse_file_without_reading_it(tmp_path):
    """A header length of 2**40 in a file that really is that long (a sparse one): refused, not read."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    try:
        with open(path, "r+b") as f:
            f.truncate(2**40 + 8)
    except OSError as exc:
        pytest.skip(f"cannot make a sparse 1 TiB file here: {exc}")
    try:
        assert_refused_cheaply(path, match="exceeds the")
    finally:
        path.unlink()


# --- layout round trip -------------------------------------------------------------------------


@st.composite
def tensors_with_data(draw):
    """OutTensors of random names, whole-byte dtypes and small shapes, their bytes split into random parts."""
    tensors = []
    for name, (dtype, shape) in draw(tensor_sets(max_tensors=8)).items():
        nbytes = tensor_nbytes(dtype, shape)
        if dtype == "BOOL":
            data = bytes(draw(st.lists(st.integers(0, 1), min_size=nbytes, max_size=nbytes)))
        else:
            data = draw(st.binary(min_size=nbytes, max_size=nbytes))
        cuts = sorted(draw(st.lists(st.integers(0, nbytes), max_size=3)))
        parts = tuple(data[a:b] for a, b in zip([0, *cuts], [*cuts, nbytes]))
        tensors.append(OutTensor(name, dtype, shape, parts))
    return tensors


@settings(max_examples=150, deadline=None)
@given(tensors=tensors_with_data(), metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_layout_round_trip(scratch, tensors, metadata):
    import torch
    from safetensors import safe_open

    header_bytes, ordered = layout(tensors, metadata)
    assert sorted(t.name for t in ordered) == sorted(t.name for t in tensors)
    scratch.write_bytes(header_bytes + b"".join(p for t in ordered for p in t.parts))
    expected = {t.name: (t.dtype, t.shape, b"".join(t.parts)) for t in tensors}

    header = check_read_header(scratch, scratch.read_bytes())
    assert header is not None
    assert header.metadata == metadata
    raw = scratch.read_bytes()
    assert {n: (i.dtype, i.shape, raw[i.offset : i.offset + i.nbytes]) for n, i in header.tensors.items()} == expected

    with safe_open(str(scratch), framework="pt") as f:
        assert (f.metadata() or {}) == metadata
        assert sorted(f.keys()) == sorted(expected)
        for name, (dtype, shape, data) in expected.items():
            piece = f.get_slice(name)
            assert (piece.get_dtype(), tuple(piece.get_shape())) == (dtype, shape), name
            tensor = f.get_tensor(name)
            assert tuple(tensor.shape) == shape
            assert tensor.reshape(-1).view(torch.uint8).numpy().tobytes() == data, name


# --- convert with any config.json --------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    """Staging directories (``.<dst>.*.rmconvert-tmp`` / ``-old``) left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if STAGING.match(p.name))


def check_convert(source: Path, config_text: str) -> str:
    """Convert a copy of ``source`` whose config.json is ``config_text``; 'converted' or 'refused: <error>'.

    Success must give an output that validates without errors; failure must be an RMConvertError that
    leaves nothing at the destination. Any other exception fails the test.
    """
    with tempfile.TemporaryDirectory(prefix="rmconvert-prop-") as tmp:
        src, dst = Path(shutil.copytree(source, Path(tmp) / "src")), Path(tmp) / "out" / "rm"
        dst.parent.mkdir()
        (src / "config.json").write_text(config_text, encoding="utf-8")
        try:
            rmconvert.convert(src, dst)
        except RMConvertError as exc:
            assert str(exc), repr(exc)
            assert not dst.exists() and not dst.is_symlink(), f"{dst} left behind after: {exc}"
            assert leftovers(dst.parent) == []
            return f"refused: {type(exc).__name__}"
        errors = [f for f in rmconvert.validate(dst) if f.severity == "error"]
        assert errors == [], f"converted, but the output does not validate: {errors}"
        assert leftovers(dst.parent) == []
        return "converted"


@pytest.fixture(scope="module")
def llama2(build) -> Path:
    return build("llama2")


@pytest.fixture(scope="module")
def llama2_config(llama2) -> dict:
    return json.loads((llama2 / "config.json").read_text())


def with_extras(base: dict):
    """The valid config with a few keys added or replaced by arbitrary JSON values."""
    return st.dictionaries(json_strings | st.sampled_from(sorted(base)), json_values, min_size=1, max_size=4).map(
        lambda extra: {**base, **extra}
    )


@CONVERT_SETTINGS
@given(data=st.data())
def test_convert_with_any_config(llama2, llama2_config, data):
    config = data.draw(
        json_values | st.dictionaries(json_strings, json_values, max_size=6) | with_extras(llama2_config)
    )
    event(check_convert(llama2, json.dumps(config)))


@CONVERT_SETTINGS
@given(data=st.data())
def test_convert_with_one_config_value_replaced(llama2, llama2_config, data):
    key = data.draw(st.sampled_from(sorted(llama2_config)), label="key")
    value = data.draw(json_values, label="value")
    event(check_convert(llama2, json.dumps({**llama2_config, key: value})))


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_convert_with_config_keys_deleted(llama2, llama2_config, data):
    gone = data.draw(st.sets(st.sampled_from(sorted(llama2_config)), min_size=1, max_size=3), label="deleted")
    event(check_convert(llama2, json.dumps({k: v for k, v in llama2_config.items() if k not in gone})))


def test_convert_with_the_unmutated_config(llama2, llama2_config):
    """The base of the mutations converts: the properties above are not vacuous."""
    assert check_convert(llama2, json.dumps(llama2_config)) == "converted"


def test_convert_with_a_lone_surrogate_in_config(llama2, llama2_config):
    r"""``"\ud800"`` is valid JSON text: converted (written back as an escape), or refused with one line."""
    check_convert(llama2, json.dumps({**llama2_config, "comment": "\ud800"}))


def test_convert_when_config_eos_is_the_next_token_id(llama2, llama2_config):
    """An eos id equal to the id a new pad would get: the pad chosen must still not be an eos."""
    tokens = len(TokenizerFiles.read(llama2))  # the id an added pad gets
    for eos in (tokens, [llama2_config["eos_token_id"], tokens]):
        check_convert(llama2, json.dumps({**llama2_config, "eos_token_id": eos}))
