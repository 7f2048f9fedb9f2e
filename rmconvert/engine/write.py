"""Write a plan: two workers copy, assemble and hash; signals stop them cleanly; the manifest last."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from .. import __version__
from ..errors import CheckpointError
from ..families.schema import config_schema, schema_errors
from ..io.hashing import sha256
from ..io.output import FILE_MODE, sync_file, write_file
from ..io.safetensors import ByteRange, Header, OutTensor, layout, write_parts
from ..sources.checkpoint import INDEX, Checkpoint
from ..sources.hub import snapshot_origin
from .options import Options
from .plan import MANIFEST, Plan

FICLONE = 0x40049409  # ioctl: share the source's extents (reflink) on XFS, btrfs, ...


def _dump(obj: dict) -> bytes:
    """Pretty JSON in UTF-8; escaped ASCII when the data holds lone surrogates (valid JSON, not UTF-8)."""
    try:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(obj, indent=2) + "\n").encode()


def _link(source: Path, target: Path) -> str | None:
    """Reflink, else hard-link ``source`` to the new ``target``; the method used, or None if neither works."""
    with open(source, "rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            fcntl.ioctl(fd, FICLONE, src.fileno())
            return "reflink"
        except OSError:
            os.unlink(target)
        finally:
            os.close(fd)
    try:
        os.link(source, target)
        return "hardlink"
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return None
        raise


def _manifest(plan: Plan, options: Options, hashes: dict[str, str]) -> dict:
    entry = plan.registered
    return {
        "rmconvert": __version__,
        "architecture": {
            "name": entry.architecture.name,
            "plugin": entry.plugin,
            "distribution": entry.distribution,
            "version": entry.version,
        },
        "options": options.recorded(),
        **({"source_repo": origin} if (origin := snapshot_origin(plan.checkpoint.path)) else {}),
        "source_files": hashes,
        "result": {
            k: plan.report[k]
            for k in ("class", "target", "source_kind", "head", "pad", "vocab", "dtype", "dropped", "value_head")
            if k in plan.report
        },
        **({"adapter": plan.report["adapter"]} if "adapter" in plan.report else {}),
    }


def _check_config(plan: Plan, stop=None) -> None:
    """The output config must satisfy the architecture's JSON schema."""
    schema = config_schema(plan.registered.architecture, plan.json_files["config.json"])
    problems = schema_errors(plan.json_files["config.json"], schema)
    if problems:
        raise CheckpointError(
            f"the converted config would not satisfy {schema.name}: {problems[0]}", plan.checkpoint.config_path
        )


@dataclass(frozen=True)
class _Job:
    """One unit of the workers' work: check the config, write a shard or file, or hash a source file."""

    kind: str  # "check", "assemble", "copy" or "hash"
    size: int
    name: str  # the output file written, or the source file hashed
    run: partial
    reads: frozenset[Path] = frozenset()  # source files it reads whole


class _Queue:
    """Which job a free worker takes next: a priority queue, not first in first out.

    The config check comes first and nothing is written before it passes (a schema error stops the run before
    any copy); meanwhile the other worker may hash sources, which writes nothing. Then the hash of a file that
    was just copied (it is in the page cache: hashed while the other worker reads the next file from the
    disk), then assembled shards (they also compute: the mean row, the head), then copies, biggest first so
    that the workers finish together, then hashes of files not yet read.
    """

    def __init__(self, jobs: list[_Job]):
        self.jobs = jobs
        self.checked = not any(j.kind == "check" for j in jobs)
        self.read: set[Path] = set()

    def _rank(self, job: _Job) -> tuple:
        kind = {"check": 0, "hash": 1 if job.reads <= self.read else 4, "assemble": 2, "copy": 3}[job.kind]
        return (kind, -job.size, job.name)

    def take(self) -> _Job | None:
        """The most urgent job that may run now, or None (every other job waits for the config check)."""
        ready = [j for j in self.jobs if self.checked or j.kind in ("check", "hash")]
        if not ready:
            return None
        job = min(ready, key=self._rank)
        self.jobs.remove(job)
        return job

    def done(self, job: _Job) -> None:
        self.checked |= job.kind == "check"
        self.read |= job.reads


WORKERS = 2  # this machine class has two cores


@contextmanager
def _signals_set(stop: threading.Event):
    """While the workers run, SIGINT and SIGTERM set ``stop`` instead of raising in this thread; yields the
    signals received.

    A KeyboardInterrupt raised at an arbitrary point of this thread can land inside the executor's own locked
    sections (``submit``, ``wait``) and leave a lock held that the cleanup then waits on forever. Only signals
    whose handler would raise are taken over (not an ignored SIGINT, not SIGTERM outside the CLI), and only
    from the main thread, the one Python delivers signals to.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum, frame):
        received.append(signum)
        stop.set()

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if callable(h)}
    for s in previous:
        signal.signal(s, record)
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def write_plan(
    plan: Plan, out: Path, options: Options, link: bool = False, progress=None, on_bytes=None
) -> dict[str, int]:
    """Write every file of ``plan`` into the empty directory ``out``; returns how many shards were written how.

    ``progress(message)`` is called when a shard is written; ``on_bytes(done, total)``, from the workers,
    as bytes are copied, written and hashed.

    Two workers check the config, copy shards and hash the sources in the order of :class:`_Queue`; a third
    thread flushes each finished file to the disk while the rest run. Only this thread receives signals, and
    it imports nothing meanwhile: a Ctrl-C or SIGTERM that broke off an import here would leave a module lock
    held, and a worker's own import (numpy, jsonschema) would wait on it forever. On an error, Ctrl-C or
    SIGTERM the workers stop at their next chunk, so nothing runs on after the staging dir is removed; a
    signal only sets ``stop`` (:func:`_signals_set`), and the loop raises KeyboardInterrupt once the workers
    have returned.
    """
    ckpt = plan.checkpoint
    read = [s.path.name for s in ckpt.shards] + plan.copies + [n for n in plan.json_files if (ckpt.path / n).exists()]
    read += [ckpt.index_name] if ckpt.index_name is not None else []
    size = lambda name: (ckpt.path / name).stat().st_size
    jobs = [_Job("check", 0, "config.json", partial(_check_config, plan))]
    for name, shard in plan.shards.items():
        if isinstance(shard, Header):
            reads = frozenset({shard.path})
        else:
            reads = frozenset(p.path for t in shard for p in t.parts if isinstance(p, ByteRange))
        kind = "assemble" if isinstance(shard, list) else "copy"
        jobs.append(_Job(kind, _shard_bytes(shard), name, partial(_write_shard, out / name, shard, ckpt, link), reads))
    jobs += [
        _Job("copy", size(n), n, partial(_write_copy, out / n, ckpt.path / n), frozenset({ckpt.path / n}))
        for n in plan.copies
    ]
    if options.hash_sources:
        jobs += [
            _Job("hash", size(n), n, partial(sha256, ckpt.path / n), frozenset({ckpt.path / n})) for n in set(read)
        ]
    meter = _Meter(sum(j.size for j in jobs), on_bytes)
    jobs = [j if j.kind == "check" else replace(j, run=partial(j.run, advance=meter.add)) for j in jobs]
    queue = _Queue(jobs)
    stop = threading.Event()
    with (
        _signals_set(stop) as received,
        ThreadPoolExecutor(max_workers=WORKERS) as pool,
        ThreadPoolExecutor(max_workers=1) as background,
    ):
        try:
            running: dict = {}
            methods = {"copied": 0, "assembled": 0, "reflink": 0, "hardlink": 0}
            digests, flushes = {}, []
            while True:
                while not received and len(running) < WORKERS and (job := queue.take()) is not None:
                    running[pool.submit(job.run, stop)] = job
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                if received:
                    raise KeyboardInterrupt
                for future in finished:
                    job = running.pop(future)
                    result = future.result()
                    queue.done(job)
                    if job.kind == "hash":
                        digests[job.name] = result
                    if result in ("copied", "assembled", "file"):  # linked files share the source's blocks
                        flushes.append(background.submit(sync_file, out / job.name))
                    if result in methods:
                        methods[result] += 1
                        if progress:
                            progress(f"[{sum(methods.values())}/{len(plan.shards)}] {job.name}")
            for future in flushes:
                future.result()
            if received:
                raise KeyboardInterrupt
        except BaseException:  # an error, Ctrl-C or SIGTERM: stop every worker now
            stop.set()
            pool.shutdown(cancel_futures=True)
            background.shutdown(cancel_futures=True)
            raise
    for name, obj in plan.json_files.items():
        write_file(out / name, _dump(dict(sorted(obj.items())) if name == "config.json" else obj))
    for name, data in plan.generated.items():
        write_file(out / name, data)
    if plan.index is not None:
        write_file(out / INDEX, _dump(plan.index))
    write_file(out / MANIFEST, _dump(_manifest(plan, options, dict(sorted(digests.items())))))
    return methods


def _shard_bytes(shard: Header | list[OutTensor]) -> int:
    return shard.size if isinstance(shard, Header) else sum(t.nbytes for t in shard)


class _Meter:
    """Bytes done out of a total, summed across the workers, reported to ``callback(done, total)``."""

    def __init__(self, total: int, callback):
        self.total, self.done, self.callback = total, 0, callback
        self.lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        if self.callback is not None:
            with self.lock:
                self.done += nbytes
                self.callback(self.done, self.total)


def _write_shard(
    target: Path, shard: Header | list[OutTensor], ckpt: Checkpoint, link: bool, stop, advance=None
) -> str:
    """Write one shard: linked or copied whole when unchanged, else assembled; returns which."""
    if isinstance(shard, Header) and link:
        method = _link(shard.path, target)
        if method:
            if advance is not None:
                advance(shard.size)
            return method
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        if isinstance(shard, Header):
            write_parts(fd, [ByteRange(shard.path, 0, shard.size)], stop, advance)
            return "copied"
        header, ordered = layout(shard, _metadata(ckpt, shard))
        write_parts(fd, [header] + [p for t in ordered for p in t.parts], stop, advance)
        return "assembled"
    finally:
        os.close(fd)


def _write_copy(target: Path, source: Path, stop, advance=None) -> str:
    """Copy a file that needs no change (tokenizer model, chat template, README, ...)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        write_parts(fd, [ByteRange(source, 0, source.stat().st_size)], stop, advance)
    finally:
        os.close(fd)
    return "file"


def _metadata(ckpt: Checkpoint, tensors: list[OutTensor]) -> dict[str, str]:
    """``__metadata__`` of an assembled shard: the first source shard's, with ``format: pt``."""
    first = next((s for s in ckpt.shards if any(t.name in s.tensors for t in tensors)), ckpt.shards[0])
    return {**(first.metadata or {}), "format": "pt"}
