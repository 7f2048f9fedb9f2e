"""``rmconvert validate``: findings with stable codes about a reward-model checkpoint, ours or anyone's.

The codes and the finding type live in :mod:`rmconvert.findings`; the checks that produce them are small
functions in :mod:`rmconvert.checks` (static: headers and JSON only) and :mod:`rmconvert.probes`
(``--load`` and ``--against``: these load the model). Plugins add checks through
``rmconvert_register_checks``.
"""

from __future__ import annotations

from pathlib import Path

from . import checks
from .checkpoint import open_checkpoint, read_json
from .errors import CheckpointError
from .findings import CODES, ERROR, WARNING, Finding, Subject
from .host import Registry, load_registry
from .tokenizer_files import TokenizerFiles

__all__ = ["CODES", "ERROR", "WARNING", "Finding", "Subject", "validate"]


def _read(path: Path, registry: Registry) -> Subject:
    ckpt = open_checkpoint(path)
    registered = registry.for_model_type(ckpt.model_type)
    try:
        tokenizer, tokenizer_error = TokenizerFiles.read(path), None
    except CheckpointError as exc:
        tokenizer, tokenizer_error = None, exc
    generation_config = read_json(path / "generation_config.json", required=False)
    architecture = registered.architecture if registered else None
    return Subject(path, ckpt, architecture, tokenizer, tokenizer_error, generation_config, registry)


def validate(
    path: str | Path, *, load: bool = False, against: str | Path | None = None, registry: Registry | None = None
) -> list[Finding]:
    """Every finding for the reward-model checkpoint at ``path``; no finding of severity error means sound.

    ``load`` also loads it with transformers and scores probe batches; ``against`` compares it with the
    checkpoint it was converted from (bytes, and with ``load`` hidden states and rewards).
    """
    path = Path(path)
    registry = registry or load_registry()
    try:
        subject = _read(path, registry)
    except CheckpointError as exc:
        where = Path(str(exc.path)) if exc.path is not None else path
        name = where.name if where.parent == path else str(where)
        return [Finding("RM001", ERROR, name, "", exc.message, CODES["RM001"].hint)]
    except Exception as exc:  # noqa: BLE001 (a checkpoint that breaks the reader is a finding, not a crash)
        message = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        return [Finding("RM005", ERROR, str(path), "read", message, CODES["RM005"].hint)]
    runs = [(check.__name__, check, ()) for check in checks.STATIC]
    runs += [(f"{plugin}:{check.__name__}", check, ()) for plugin, check in registry.checks]
    if load or against is not None:
        from . import probes  # imports torch and transformers: only when asked to load or compare

        if against is not None:
            runs.append(("against_source", probes.against_source, (Path(against), registry, load)))
        if load:
            runs.append(("loaded", probes.loaded, ()))
    return [f for name, check, args in runs for f in _run(subject, name, check, *args)]


def _run(subject: Subject, name: str, check, *args) -> list[Finding]:
    """The findings of one check; an unexpected exception is a finding (RM005) and the other checks still run."""
    found = []
    try:
        found.extend(check(subject, *args))  # a generator's findings before the exception are kept
    except Exception as exc:  # noqa: BLE001 (validate never crashes on a checkpoint it is asked about)
        found.append(subject.could_not_run(name, exc))
    return found
