"""The conversion engine: resolve the source, plan the reward model from headers, write it by copying bytes."""

from __future__ import annotations

from pathlib import Path

from ..errors import OutputError, UsageError
from ..families.host import Registry, load_registry
from ..io.output import check_destination, staged
from ..sources import is_repo_id_source, resolve
from .options import Options, parse_size
from .plan import Plan, plan_conversion
from .write import write_plan

__all__ = ["Options", "Plan", "convert", "plan_conversion", "write_plan"]


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    link: bool = False,
    adapter: str | Path | None = None,
    registry: Registry | None = None,
    progress=None,
    revision: str | None = None,
    on_bytes=None,
    **options,
) -> dict:
    """Convert the checkpoint at ``src`` into a reward model at ``dst``; returns the report.

    ``src`` is a directory, or a Hub repo id ``org/name`` at ``revision`` (see :func:`rmconvert.sources.hub.resolve_source`).
    ``options`` are the fields of :class:`Options`. ``link`` reflinks or hard-links shards that are
    unchanged instead of copying them (a hard-linked file shares its inode with the source).
    ``progress(message)`` is called as each shard is written, ``on_bytes(done, total)`` from the workers
    as bytes are copied, written and hashed.
    ``adapter`` is a PEFT LoRA adapter directory merged into ``src`` first; ``src`` may itself be an adapter
    whose ``base_model_name_or_path`` names the base.
    """
    options["max_shard_size"] = parse_size(options.get("max_shard_size"))
    opts = Options(**options)
    opts.check()
    dst = Path(dst)
    if is_repo_id_source(src):
        check_destination(None, dst, overwrite)  # what DST alone decides, before the download
    source = resolve(src, revision, adapter)
    for path in source.paths:
        check_destination(path, dst, overwrite)
    registry = registry or load_registry()
    ckpt = source.checkpoint
    registered = registry.resolve(ckpt.model_type, opts.arch, ckpt.config_path)
    if opts.text_only:  # the language model alone, as its text family's checkpoint
        if source.adapter is not None:
            raise UsageError("--text-only with a LoRA adapter: convert the merged model first, then --text-only")
        ckpt = registered.architecture.text_only(ckpt)
        registered = registry.resolve(ckpt.model_type, "auto", ckpt.config_path)
    plan = plan_conversion(ckpt, registered, opts, source.adapter)
    try:
        with staged(dst, overwrite) as out:
            plan.report["written"] = write_plan(plan, out, opts, link, progress, on_bytes)
    except OSError as exc:
        raise OutputError(f"write failed: {exc.strerror or exc}", exc.filename or dst) from None
    plan.report["destination"] = str(dst)
    return plan.report
