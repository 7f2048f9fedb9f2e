"""Byte-level I/O: kernel copies and their fallbacks, --link, --max-shard-size, --dtype, header writing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rmconvert import convert, load_reward_model, validate
from rmconvert.io import safetensors as io
from rmconvert.sources.checkpoint import open_checkpoint
from rmconvert.testing import snapshot


def all_tensors(path):
    out = {}
    for shard in open_checkpoint(path).shards:
        out.update(load_file(shard.path))
    return out


def test_written_headers_are_sorted_padded_and_read_back_by_the_reference_reader(converted_sharded):
    for shard in open_checkpoint(converted_sharded).shards:
        raw = shard.path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        assert (8 + length) % 8 == 0
        header = json.loads(raw[8 : 8 + length])
        names = [n for n in header if n != "__metadata__"]
        widths = [io.DTYPE_BITS[header[n]["dtype"]] for n in names]
        assert [(-w, n) for w, n in zip(widths, names)] == sorted((-w, n) for w, n in zip(widths, names))
        assert header["__metadata__"]["format"] == "pt"
        with safe_open(shard.path, "pt") as f:  # the reference reader checks offsets, sizes and trailing bytes
            assert set(f.keys()) == set(names)


@pytest.fixture(scope="module")
def converted_sharded(build, tmp_path_factory):
    dst = tmp_path_factory.mktemp("io") / "rm"
    convert(build("llama2", max_shard_size="100KB"), dst)
    return dst


@pytest.mark.parametrize("failing", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP])
def test_copy_range_falls_back_when_the_kernel_cannot_copy(tmp_path, monkeypatch, failing):
    source = tmp_path / "src"
    source.write_bytes(os.urandom(3 << 20))

    def unsupported(*args, **kwargs):
        raise OSError(failing, os.strerror(failing))

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    if failing == errno.EOPNOTSUPP:  # and no sendfile to a file either: plain pread/write
        monkeypatch.setattr(os, "sendfile", unsupported)
    src_fd, dst_fd = os.open(source, os.O_RDONLY), os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(dst_fd, b"head")
        io.copy_range(src_fd, dst_fd, 1000, (2 << 20) + 5)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert (tmp_path / "dst").read_bytes() == b"head" + source.read_bytes()[1000 : 1000 + (2 << 20) + 5]


def test_link_gives_the_same_bytes_and_shares_unchanged_shards(build, tmp_path):
    src = build("llama2", max_shard_size="100KB")
    copied = convert(src, tmp_path / "copied")
    linked = convert(src, tmp_path / "linked", link=True)
    assert snapshot(tmp_path / "copied") == snapshot(tmp_path / "linked")
    unchanged = len(copied["whole_file_copies"])
    assert unchanged >= 1 and copied["written"]["copied"] == unchanged and linked["written"]["copied"] == 0
    assert linked["written"]["hardlink"] + linked["written"]["reflink"] == unchanged
    for name in linked["whole_file_copies"]:
        same_inode = (tmp_path / "linked" / name).stat().st_ino in {p.stat().st_ino for p in src.iterdir()}
        assert same_inode == (linked["written"]["hardlink"] == unchanged)


def test_max_shard_size_reshards_exactly(build, tmp_path):
    src = build("llama2", max_shard_size="100KB")
    report = convert(src, tmp_path / "rm", max_shard_size="150KB")
    shards = open_checkpoint(tmp_path / "rm").shards  # raises unless the index is exact
    assert len(shards) == 3 and report["whole_file_copies"] == []
    for shard in shards:
        assert sum(t.nbytes for t in shard.tensors.values()) <= 150_000 or len(shard.tensors) == 1
    before, after = all_tensors(src), all_tensors(tmp_path / "rm")
    assert all(
        torch.equal(after[k], v) for k, v in before.items() if k not in ("lm_head.weight", "model.embed_tokens.weight")
    )
    assert validate(tmp_path / "rm") == []


def test_max_shard_size_can_merge_into_a_single_file(build, tmp_path):
    convert(build("llama2", max_shard_size="100KB"), tmp_path / "rm", max_shard_size="1GB")
    assert sorted(p.name for p in (tmp_path / "rm").glob("model*")) == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    _, info = load_reward_model(tmp_path / "rm", output_loading_info=True)
    assert not any(info.values())


def test_dtype_cast_matches_torch_rounding(build, tmp_path):
    src = build("llama2")
    report = convert(src, tmp_path / "rm", dtype="bfloat16")
    before, after = all_tensors(src), all_tensors(tmp_path / "rm")
    assert report["dtype"] == "bfloat16" and {t.dtype for t in after.values()} == {torch.bfloat16}
    for key, value in before.items():
        if key != "lm_head.weight":
            rows = len(value)
            assert torch.equal(after[key][:rows], value.to(torch.bfloat16)), key
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["dtype"] == "bfloat16"
    model, info = load_reward_model(tmp_path / "rm", output_loading_info=True, dtype="auto")
    assert not any(info.values()) and model.dtype == torch.bfloat16


def test_size_parser():
    from rmconvert.engine import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        parse_size("five gigs")


@pytest.mark.parametrize("kind", ["llama2", "olmo2", "olmoe"])
def test_converting_a_built_in_family_imports_neither_torch_nor_transformers(
    build, tmp_path, imported_by_convert, kind
):
    """The hot path is headers, byte copies and numpy: torch and transformers cost seconds to import."""
    assert imported_by_convert(build(kind), tmp_path / "rm") == set()
    assert (tmp_path / "rm" / "model.safetensors").exists()


def test_planning_leaves_numpy_and_jsonschema_to_run_alongside_the_copies(build, tmp_path):
    """The plan holds the mean row and the head as computations the writers run, and a worker checks the config
    while the other hashes the sources: planning imports neither numpy nor jsonschema (~0.25 s)."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from rmconvert.engine import Options, plan_conversion\n"
        "from rmconvert.sources.checkpoint import open_checkpoint\n"
        "from rmconvert.families.host import load_registry\n"
        "ckpt = open_checkpoint(Path(sys.argv[1]))\n"
        "entry = load_registry().resolve(ckpt.model_type, 'auto', ckpt.config_path)\n"
        "plan = plan_conversion(ckpt, entry, Options(head='bt', dtype='bfloat16'))\n"
        "assert plan.report['vocab']['added_rows'] > 0, plan.report['vocab']\n"
        "late = sorted(m for m in ('numpy', 'jsonschema') if m in sys.modules)\n"
        "assert not late, late\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(build("llama2"))], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr


def test_every_output_file_reaches_the_disk_before_the_destination_is_named(build, tmp_path, monkeypatch):
    """Crash safety: each file and the staging directory are fsynced before the rename, the parent after it."""
    events = []
    fsync, rename = os.fsync, os.rename
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))
    )
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), rename(a, b)))
    dst = tmp_path / "rm"
    convert(build("llama3", max_shard_size="200KB"), dst)
    (named,) = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(dst.resolve())]
    staging = events[named][1]
    synced = {e[1] for e in events[:named] if e[0] == "fsync"}
    assert len(list(dst.glob("*.safetensors"))) > 1
    assert {f"{staging}/{p.name}" for p in dst.iterdir()} | {staging} <= synced
    assert ("fsync", str(dst.parent.resolve())) in events[named:]


def test_a_config_that_fails_its_schema_stops_the_run_before_any_copy(build, tmp_path, monkeypatch):
    """The config check runs first; no byte of any shard or file is written before it passes."""
    from rmconvert import Architecture
    from rmconvert.engine import write
    from rmconvert.errors import CheckpointError
    from rmconvert.families.host import Registry

    schema = tmp_path / "strict.schema.json"
    schema.write_text(json.dumps({"$schema": "https://json-schema.org/draft/2020-12/schema", "required": ["nothing"]}))
    strict = type("Strict", (Architecture,), {"name": "strict", "model_types": ("llama",), "schema": schema})()
    registry = Registry()
    registry.add(strict, "test", "(in-process)", "")
    writes = []
    write_parts = write.write_parts
    monkeypatch.setattr(
        write, "write_parts", lambda fd, parts, stop: (writes.append(parts), write_parts(fd, parts, stop))
    )
    with pytest.raises(CheckpointError, match="would not satisfy strict.schema.json"):
        convert(build("llama3", max_shard_size="100KB"), tmp_path / "rm", registry=registry)
    assert writes == [] and not (tmp_path / "rm").exists()
