"""``rmconvert validate``: findings with stable codes about a reward-model checkpoint, ours or anyone's.

The codes and the finding type live in :mod:`rmconvert.doctor.findings`; the checks that produce them are small
functions in :mod:`rmconvert.doctor.checks` (static: headers and JSON only) and :mod:`rmconvert.doctor.probes`
(``--load`` and ``--against``: these load the model). Plugins add checks through
``rmconvert_register_checks``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, UsageError, summary
from ..families.host import Registry, load_registry
from ..sources.checkpoint import open_checkpoint, read_json, require_directory
from ..sources.hub import resolve_source
from ..sources.tokenizer_files import TOKENIZER, TokenizerFiles
from . import checks
from .findings import CODES, ERROR, WARNING, Finding, Subject

__all__ = ["CODES", "ERROR", "WARNING", "Finding", "Subject", "validate"]


def _read(path: Path, registry: Registry, repo: tuple[str, str | None] | None = None) -> Subject:
    ckpt = open_checkpoint(path)
    registered = registry.for_model_type(ckpt.model_type)
    try:
        tokenizer, tokenizer_error = TokenizerFiles.read(path), None
    except CheckpointError as exc:
        tokenizer, tokenizer_error = None, exc
    generation_config = read_json(path / "generation_config.json", required=False)
    architecture = registered.architecture if registered else None
    return Subject(path, ckpt, architecture, tokenizer, tokenizer_error, generation_config, registry, repo)


def _policy(path: Path, subject: Subject) -> TokenizerFiles:
    """The tokenizer of the policy at ``path``; refused (bad input) when it is of another family than the
    reward model's: fewer than half of its tokens have the same id in both."""
    require_directory(path)
    policy = TokenizerFiles.read(path)
    if subject.tokenizer is not None:
        same = sum(subject.tokenizer.ids.get(token) == i for token, i in policy.ids.items())
        if 2 * same < len(policy.ids):
            raise CheckpointError(
                f"not the reward model's tokenizer family: {same} of its {len(policy.ids)} tokens have the same id",
                policy.path / TOKENIZER,
            )
    return policy


def validate(
    path: str | Path,
    *,
    load: bool = False,
    against: str | Path | None = None,
    policy: str | Path | None = None,
    adapter: str | Path | None = None,
    registry: Registry | None = None,
    revision: str | None = None,
    against_revision: str | None = None,
) -> list[Finding]:
    """Every finding for the reward-model checkpoint at ``path``; no finding of severity error means sound.

    ``load`` also loads it with transformers and scores probe batches; ``against`` compares it with the
    checkpoint it was converted from (bytes, and with ``load`` hidden states and rewards); ``adapter`` is the
    LoRA adapter merged into ``against``, whose merged tensors are compared with a fresh merge. ``policy``
    checks that its vocabulary is the tokenizer's of the policy checkpoint at ``policy`` (a directory
    without a tokenizer, or one of another family, raises CheckpointError). ``path`` and ``against`` may be
    Hub repo ids ``org/name``, at ``revision`` and ``against_revision``.
    """
    if against is None and against_revision is not None:
        raise UsageError("--against-revision applies to --against SRC, which is not given")
    spec, path = path, resolve_source(path, revision)
    repo = None if path == Path(spec) else (str(spec), revision)  # a repo id resolves to a cache snapshot
    if against is not None:
        against = resolve_source(against, against_revision)
    registry = registry or load_registry()
    try:
        subject = _read(path, registry, repo)
    except CheckpointError as exc:
        where = Path(str(exc.path)) if exc.path is not None else path
        name = where.name if where.parent == path else str(where)
        return [Finding("RM001", ERROR, name, "", exc.message, CODES["RM001"].hint)]
    except Exception as exc:  # noqa: BLE001 (a checkpoint that breaks the reader is a finding, not a crash)
        return [Finding("RM005", ERROR, str(path), "read", summary(exc), CODES["RM005"].hint)]
    if policy is not None:
        subject.policy = _policy(Path(policy), subject)
    runs = [(check.__name__, check, ()) for check in checks.STATIC]
    runs += [(f"{plugin}:{getattr(check, '__name__', repr(check))}", check, ()) for plugin, check in registry.checks]
    if load or against is not None:
        from . import probes  # imports torch and transformers: only when asked to load or compare

        if against is not None:
            adapter_path = Path(adapter) if adapter is not None else None
            runs.append(("against_source", probes.against_source, (Path(against), registry, load, adapter_path)))
        if load:
            runs.append(("loaded", probes.loaded, ()))
    return [f for name, check, args in runs for f in _run(subject, name, check, *args)]


def _run(subject: Subject, name: str, check, *args) -> list[Finding]:
    """The findings of one check; an unexpected exception or a malformed finding is a finding (RM005) and the other
    checks still run."""
    found = []
    try:
        for finding in check(subject, *args):  # a generator's findings before the exception are kept
            found.append(_checked(subject, name, finding))
    except Exception as exc:  # noqa: BLE001 (validate never crashes on a checkpoint it is asked about)
        found.append(subject.could_not_run(name, exc))
    return found


def _checked(subject: Subject, name: str, finding) -> Finding:
    """``finding``, a path in it as text; RM005 naming the check for anything but a Finding of text fields and a
    known severity."""
    if isinstance(finding, Finding):
        values = {k: str(v) if isinstance(v, Path) else v for k, v in vars(finding).items()}
        if values["severity"] in (ERROR, WARNING) and all(isinstance(v, str) for v in values.values()):
            return Finding(**values)
    return subject.finding("RM005", str(subject.path), name, f"not a Finding of a known severity: {finding!r}"[:300])
