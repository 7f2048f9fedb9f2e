"""Faults and hostile input through the real CLI: symlinks, a full disk, read-only places, two runs at once,
code that must never run, odd destinations.

A refusal is exit 1 (2 for usage) with exactly one line ``rmconvert: error: <path>: <problem>`` on stderr and
no traceback; the source stays byte-identical, and nothing is left at the destination, not even a staging
sibling (``.<name>.*.rmconvert-tmp`` / ``-old``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

import rmconvert
from rmconvert.cli import cli
from rmconvert.testing import snapshot

SINGLE = "model.safetensors"
CONFIG = "config.json"
STAGING = re.compile(r"^\..+\.rmconvert-(tmp|old)$")
PROGRESS = re.compile(r"\[\d+/\d+\] \S+")
ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"

# --- running the CLI and checking what it left -------------------------------------------------


def run_cli(*args):
    """``rmconvert ARGS`` in-process; the result keeps stdout and stderr apart."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def rmconvert_script() -> str:
    """The ``rmconvert`` console script of this Python environment."""
    script = Path(sys.executable).with_name("rmconvert")
    found = str(script) if script.exists() else shutil.which("rmconvert")
    assert found, "the rmconvert console script is not installed"
    return found


def state(path: Path):
    """What is at ``path`` (without following a final symlink): None, a link, a file's bytes or a directory's."""
    try:
        path.lstat()
    except OSError:
        return None
    if path.is_symlink():
        return "symlink", os.readlink(path)
    if path.is_file():
        return "file", path.read_bytes()
    return "dir", snapshot(path)


def leftovers(*directories: Path) -> list[str]:
    """Staging directories (``.<dst>.*.rmconvert-tmp`` / ``-old``) left in any of ``directories``."""
    return sorted(str(p) for d in directories if d.is_dir() for p in d.iterdir() if STAGING.match(p.name))


def assert_no_crash(result) -> None:
    """The command exited on purpose: no exception escaped and no traceback was printed."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output + result.stderr, result.stderr


def error_line(stderr: str) -> tuple[str, str]:
    """(path, problem) of the single ``rmconvert: error: <path>: <problem>`` line that ends stderr.

    Progress lines (``[1/3] model-...``) may come before it; nothing else may.
    """
    *before, last = stderr.splitlines() or [""]
    assert all(PROGRESS.fullmatch(line) for line in before), stderr
    assert last.startswith("rmconvert: error: "), stderr
    path, sep, problem = last[len("rmconvert: error: ") :].partition(": ")
    assert sep and problem, last
    return path, problem


def assert_one_error(result, culprits, problem: str | tuple[str, ...]) -> str:
    """Exit 1, nothing on stdout, one error line naming one of ``culprits`` and containing ``problem``."""
    assert_no_crash(result)
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    path, text = error_line(result.stderr)
    culprits = [str(c) for c in (culprits if isinstance(culprits, (list, tuple)) else [culprits])]
    assert path in culprits, f"error names {path!r}, expected one of {culprits}: {result.stderr}"
    problems = (problem,) if isinstance(problem, str) else problem
    assert any(p in text for p in problems), result.stderr
    return path


def assert_refused(src: Path, dst: Path, args, culprits, problem, extra_dirs=()) -> None:
    """``convert SRC DST *args`` fails with one line; SRC and DST are as they were; no staging anywhere."""
    before = snapshot(src), state(dst)
    result = run_cli("convert", src, dst, *args)
    assert_one_error(result, culprits, problem)
    assert (snapshot(src), state(dst)) == before
    assert leftovers(dst.parent, src.parent, src, *extra_dirs) == []


def assert_converted(result, dst: Path) -> None:
    """Exit 0, no error line, and DST validates (``rmconvert validate`` exits 0)."""
    assert_no_crash(result)
    assert result.exit_code == 0, result.stderr
    assert "rmconvert: error" not in result.stderr
    checked = run_cli("validate", dst)
    assert_no_crash(checked)
    assert checked.exit_code == 0, checked.output + checked.stderr


# --- building scenes ---------------------------------------------------------------------------


@pytest.fixture
def source(build, writable_copy):
    """``source(sharded=False, name="src")`` -> a private copy of the tiny Llama 2 checkpoint."""

    def _source(sharded: bool = False, name: str = "src") -> Path:
        return writable_copy(build("llama2", max_shard_size="100KB") if sharded else build("llama2"), name)

    return _source


@pytest.fixture
def out(tmp_path) -> Path:
    """A fresh directory to put destinations in."""
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def reference(build, tmp_path_factory):
    """``reference(sharded)`` -> the tiny Llama 2 converted alone with default options (read-only)."""
    cache: dict[bool, dict] = {}

    def _reference(sharded: bool = False) -> dict:
        if sharded not in cache:
            dst = tmp_path_factory.mktemp("reference") / "rm"
            src = build("llama2", max_shard_size="100KB") if sharded else build("llama2")
            result = run_cli("convert", src, dst)
            assert result.exit_code == 0, result.stderr
            cache[sharded] = snapshot(dst)
        return cache[sharded]

    return _reference


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def add_sparse_tensor(path: Path, name: str, nbytes: int) -> None:
    """Add an F32 tensor of ``nbytes`` zero bytes to a safetensors file, as a hole (no disk, no time)."""
    header, data = read_safetensors(path)
    header[name] = {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [len(data), len(data) + nbytes]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    os.truncate(path, path.stat().st_size + nbytes)


# --- symlinks in SRC ---------------------------------------------------------------------------


def link_outside(src: Path, tmp: Path) -> Path:
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("not part of the checkpoint\n")
    (src / "README.md").symlink_to(elsewhere / "secret.txt")
    return src / "README.md"


def link_outside_relative(src: Path, tmp: Path) -> Path:
    (tmp / "secret.txt").write_text("not part of the checkpoint\n")
    (src / "notes.txt").symlink_to(Path("..") / "secret.txt")
    return src / "notes.txt"


def link_to_system_file(src: Path, tmp: Path) -> Path:
    (src / "tokenizer.model").symlink_to("/etc/passwd")
    return src / "tokenizer.model"


def link_broken(src: Path, tmp: Path) -> Path:
    (src / "README.md").symlink_to(tmp / "no-such-file")
    return src / "README.md"


def link_loop(src: Path, tmp: Path) -> Path:
    (src / "README.md").symlink_to("README.md")
    return src / "README.md"


@pytest.mark.parametrize(
    "make_link, problem",
    [
        pytest.param(link_outside, "outside the checkpoint", id="outside"),
        pytest.param(link_outside_relative, "outside the checkpoint", id="outside-relative"),
        pytest.param(link_to_system_file, "outside the checkpoint", id="to-etc-passwd"),
        pytest.param(link_broken, "broken symlink", id="broken"),
        pytest.param(link_loop, ("broken symlink", "symbolic links", "symlink loop"), id="loop"),
    ],
)
def test_symlink_in_source_is_refused(source, out, tmp_path, make_link, problem):
    src = source()
    culprit = make_link(src, tmp_path)
    assert_refused(src, out / "rm", [], [culprit], problem)


def test_hugging_face_cache_snapshot_converts(source, out, tmp_path, reference):
    """``hub/models--org--name/snapshots/<rev>/`` of relative links to ``../../blobs/<sha>``: converted, and
    the output holds regular files with the bytes a plain copy of the checkpoint gives."""
    plain = source()
    repo = tmp_path / "hub" / "models--org--tiny-llama2"
    snap = repo / "snapshots" / ("0123456789abcdef" * 2 + "01234567")
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for file in sorted(plain.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()  # what the hub names a blob (its LFS oid or git sha)
        (repo / "blobs" / blob).write_bytes(data)
        (snap / file.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    before = snapshot(repo)
    dst = out / "rm"

    result = run_cli("convert", snap, dst)
    assert_converted(result, dst)
    assert snapshot(repo) == before
    links = [p.name for p in dst.rglob("*") if p.is_symlink()]
    assert links == [], f"symlinks in the output: {links}"
    assert all(p.is_file() for p in dst.iterdir())
    manifest = json.loads((dst / "rmconvert.json").read_text())
    assert manifest.pop("source_repo") == {"repo_id": "org/tiny-llama2", "commit": snap.name}
    (dst / "rmconvert.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    assert snapshot(dst) == reference()  # the same bytes, once the recorded origin is left out
    assert leftovers(out, snap.parent) == []


# --- a full disk -------------------------------------------------------------------------------


class Budget:
    """A stand-in for ``os.copy_file_range`` / ``os.write``: writes into files under ``root`` succeed until a
    byte or call budget is spent, then fail with ENOSPC (a write that crosses the byte budget is short)."""

    def __init__(self, real, root: Path, kind: str, limit: float = math.inf):
        self.real, self.root, self.kind, self.limit = real, f"{root}/", kind, limit
        self.bytes = self.calls = 0
        self.lock = threading.Lock()  # rmconvert writes shards from two threads: keep the budget exact

    def _counted(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.root)
        except OSError:
            return False

    def _allowance(self, wanted: int) -> int:
        self.calls += 1
        if self.kind == "calls":
            if self.calls >= self.limit:
                raise OSError(errno.ENOSPC, ENOSPC)
            return wanted
        left = self.limit - self.bytes
        if left <= 0:
            raise OSError(errno.ENOSPC, ENOSPC)
        return int(min(wanted, left))

    def copy_file_range(self, src, dst, count, *args, **kwargs):
        if not self._counted(dst):
            return self.real(src, dst, count, *args, **kwargs)
        with self.lock:
            n = self.real(src, dst, self._allowance(count), *args, **kwargs)
            self.bytes += n
        return n

    def write(self, fd, data):
        if not self._counted(fd):
            return self.real(fd, data)
        with self.lock:
            n = self.real(fd, memoryview(data)[: self._allowance(len(data))])
            self.bytes += n
        return n


def unavailable(*args, **kwargs):
    raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


def install(monkeypatch, syscall: str, budget: Budget, fallback: bool) -> None:
    """Route ``os.<syscall>`` through ``budget``; with ``fallback``, copy_file_range and sendfile are missing
    (ENOSYS), so every byte goes through pread/write."""
    if fallback:
        monkeypatch.setattr(os, "copy_file_range", unavailable)
        monkeypatch.setattr(os, "sendfile", unavailable)
    monkeypatch.setattr(os, syscall, getattr(budget, syscall))


# syscall, budget kind, fraction of what a full conversion uses (0: the very first), copy_file_range missing
DISK_FULL = [
    pytest.param("copy_file_range", "bytes", 0.0, False, id="copy_file_range-first-byte"),
    pytest.param("copy_file_range", "bytes", 0.5, False, id="copy_file_range-half-way"),
    pytest.param("copy_file_range", "bytes", 1.0, False, id="copy_file_range-last-byte"),
    pytest.param("copy_file_range", "calls", 0.0, False, id="copy_file_range-first-call"),
    pytest.param("copy_file_range", "calls", 0.6, False, id="copy_file_range-later-call"),
    pytest.param("write", "bytes", 0.0, False, id="write-first-byte"),
    pytest.param("write", "bytes", 0.5, False, id="write-half-way"),
    pytest.param("write", "bytes", 1.0, False, id="write-last-byte"),
    pytest.param("write", "calls", 0.0, False, id="write-first-call"),
    pytest.param("write", "calls", 1.0, False, id="write-last-call"),
    pytest.param("write", "bytes", 0.5, True, id="write-half-way-no-copy_file_range"),
]


@pytest.mark.parametrize("syscall, kind, fraction, fallback", DISK_FULL)
def test_disk_full_while_writing(source, out, tmp_path, monkeypatch, syscall, kind, fraction, fallback):
    src = source(sharded=True)
    before = snapshot(src)

    # What a complete conversion spends through this syscall, to aim the failure inside it.
    probe_root = tmp_path / "probe"
    probe_root.mkdir()
    with monkeypatch.context() as patch:
        meter = Budget(getattr(os, syscall), probe_root, kind)
        install(patch, syscall, meter, fallback)
        result = run_cli("convert", src, probe_root / "rm")
        assert result.exit_code == 0, result.stderr
    used = meter.bytes if kind == "bytes" else meter.calls
    assert used > 0, f"a conversion makes no {syscall} calls into the output"
    limit = min(int(used * fraction), used - 1) if kind == "bytes" else max(1, math.ceil(used * fraction))

    dst = out / "rm"
    budget = Budget(getattr(os, syscall), out, kind, limit)
    install(monkeypatch, syscall, budget, fallback)
    result = run_cli("convert", src, dst)
    monkeypatch.undo()

    assert_no_crash(result)
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    path, problem = error_line(result.stderr)
    assert ENOSPC in problem, result.stderr
    assert path == str(dst) or path.startswith(str(out / f".{dst.name}.")), f"names {path}, not DST or its staging"
    assert state(dst) is None
    assert leftovers(out) == []
    assert list(out.iterdir()) == []
    assert snapshot(src) == before


# --- a read-only place -------------------------------------------------------------------------


@pytest.mark.parametrize("dst", [Path("/proc/rmconvert-test-out"), Path("/sys/rmconvert-test-out")], ids=str)
def test_dst_on_a_read_only_filesystem(source, dst):
    """Tests run as root, whom permissions do not stop; /proc and /sys refuse new directories to anyone."""
    if not dst.parent.is_dir():
        pytest.skip(f"{dst.parent} is not mounted here")
    if dst.exists():
        pytest.skip(f"{dst} exists")
    try:
        os.mkdir(dst)
    except OSError:
        pass
    else:
        os.rmdir(dst)
        pytest.skip(f"{dst.parent} accepts new directories here")
    src = source()
    before = snapshot(src)
    result = run_cli("convert", src, dst)
    assert_one_error(result, [dst, dst.parent], ("cannot", "not writable", "denied", "not permitted", "Read-only"))
    assert snapshot(src) == before
    assert not dst.exists()


# --- two runs into the same DST ----------------------------------------------------------------

CONCURRENT_EXTRA = 256 << 20  # a sparse tensor this big keeps each run copying for about a second


def test_two_conversions_into_the_same_dst(source, out, tmp_path):
    """Started together: exactly one wins; the loser names DST and leaves nothing; DST is a sound output,
    the same bytes as a conversion done alone."""
    src = source()
    add_sparse_tensor(src / SINGLE, "model.extra.weight", CONCURRENT_EXTRA)
    before = snapshot(src)
    dst = out / "rm"
    runs = [
        subprocess.Popen(
            [rmconvert_script(), "convert", str(src), str(dst)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [run.communicate(timeout=300) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    codes = [run.returncode for run in runs]
    for stdout, stderr in outputs:
        assert "Traceback" not in stdout + stderr, stderr
    assert sorted(codes) == [0, 1], outputs
    loser = codes.index(1)
    path, problem = error_line(outputs[loser][1])
    assert path == str(dst), outputs[loser][1]
    assert "appeared and is not empty" in problem or "exists and is not empty" in problem, problem
    assert outputs[loser][0] == ""
    assert leftovers(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["rm"]

    checked = subprocess.run(
        [rmconvert_script(), "validate", str(dst)], check=False, capture_output=True, text=True, timeout=300
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    alone = tmp_path / "alone" / "rm"
    alone.parent.mkdir()
    result = run_cli("convert", src, alone)
    assert result.exit_code == 0, result.stderr
    assert snapshot(dst) == snapshot(alone)
    assert snapshot(src) == before


# --- code that must never run ------------------------------------------------------------------

EVIL_MODULE = """\
from pathlib import Path

Path({marker!r}).write_text("evil.py was imported\\n")


class EvilModel:
    pass


class EvilConfig:
    pass
"""


class Evil:
    """Unpickling this calls ``exec``, which writes the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pytorch_model.bin was unpickled')",)


@pytest.mark.parametrize(
    "auto_map",
    [
        pytest.param(
            {"AutoModelForSequenceClassification": "evil.EvilModel", "AutoModelForCausalLM": "evil.EvilModel"},
            id="models",
        ),
        pytest.param(
            {
                "AutoConfig": "evil.EvilConfig",
                "AutoModelForSequenceClassification": "evil.EvilModel",
                "AutoModelForCausalLM": "evil.EvilModel",
            },
            id="config-and-models",
        ),
    ],
)
def test_remote_code_in_auto_map_never_runs(source, out, tmp_path, auto_map):
    marker = tmp_path / "remote-code-ran"
    src = source()
    (src / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    config = json.loads((src / CONFIG).read_text())
    config["auto_map"] = auto_map
    (src / CONFIG).write_text(json.dumps(config, indent=2))
    before = snapshot(src)
    dst = out / "rm"

    result = run_cli("convert", src, dst)
    assert_no_crash(result)
    assert result.exit_code == 0, result.stderr
    assert not marker.exists(), "convert ran evil.py"
    checked = run_cli("validate", dst)
    assert_no_crash(checked)
    assert not marker.exists(), "validate ran evil.py"
    assert checked.exit_code == 0, checked.output + checked.stderr
    try:
        model = rmconvert.load_reward_model(dst)  # no trust_remote_code: transformers' own class
    finally:
        assert not marker.exists(), "load_reward_model ran evil.py"
    assert type(model).__module__.startswith(("transformers.", "rmconvert.")), type(model)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert snapshot(src) == before


def test_pickle_beside_safetensors_is_never_unpickled(source, out, tmp_path):
    marker = tmp_path / "pickle-ran"
    src = source()
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(marker)))
    before = snapshot(src)
    dst = out / "rm"

    result = run_cli("convert", src, dst)
    assert_no_crash(result)
    assert result.exit_code == 0, result.stderr
    assert not marker.exists(), "convert unpickled pytorch_model.bin"
    assert not (dst / "pytorch_model.bin").exists(), "the pickle was copied into the reward model"
    assert not [p.name for p in dst.iterdir() if p.suffix == ".bin"]
    checked = run_cli("validate", dst)
    assert_no_crash(checked)
    assert checked.exit_code == 0, checked.output + checked.stderr
    validated_src = run_cli("validate", src)  # a causal LM, so invalid, but it must not unpickle either
    assert_no_crash(validated_src)
    assert not marker.exists(), "validate unpickled pytorch_model.bin"
    assert snapshot(src) == before


# --- odd SRC and DST paths ---------------------------------------------------------------------


def test_dst_symlink_to_a_non_empty_directory_is_refused(source, out, tmp_path):
    target = tmp_path / "elsewhere" / "precious"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("precious\n")
    dst = out / "rm"
    dst.symlink_to(target, target_is_directory=True)
    before = state(target)
    assert_refused(source(), dst, [], [dst, target], "exists and is not empty", extra_dirs=[target.parent])
    assert state(target) == before
    assert dst.is_symlink() and os.readlink(dst) == str(target)


def test_dst_symlink_to_an_empty_directory_is_written_through(source, out, tmp_path, reference):
    """DST names an empty directory through a link: the result lands there, and the link still leads to it."""
    target = tmp_path / "elsewhere" / "rm-real"
    target.mkdir(parents=True)
    dst = out / "rm"
    dst.symlink_to(target, target_is_directory=True)
    src = source()
    before = snapshot(src)
    result = run_cli("convert", src, dst)
    assert_converted(result, dst)
    assert dst.is_symlink() and os.readlink(dst) == str(target)
    assert snapshot(target) == reference()
    assert snapshot(src) == before
    assert leftovers(out, target.parent) == []


def test_dst_symlink_loop_is_refused(source, out):
    dst = out / "rm"
    dst.symlink_to(dst.name)
    assert_refused(source(), dst, [], [dst], ("symbolic links", "symlink loop", "not a directory", "exists"))


def test_dst_parent_is_a_file(source, out):
    parent = out / "a-file"
    parent.write_text("not a directory\n")
    dst = parent / "rm"
    assert_refused(source(), dst, [], [parent, dst], ("does not exist", "not a directory", "Not a directory"))
    assert parent.read_text() == "not a directory\n"


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_src_with_a_trailing_slash(source, out, reference, sharded):
    src = source(sharded)
    before = snapshot(src)
    dst = out / "rm"
    result = run_cli("convert", f"{src}/", dst)
    assert_converted(result, dst)
    assert snapshot(dst) == reference(sharded)
    assert snapshot(src) == before
    assert leftovers(out, src.parent) == []


def test_dst_with_a_trailing_slash(source, out, reference):
    src, dst = source(), out / "rm"
    result = run_cli("convert", src, f"{dst}/")
    assert_converted(result, dst)
    assert snapshot(dst) == reference()
    assert leftovers(out) == []
