"""Hub ids as sources: ``org/name`` (at a revision) resolved to a snapshot directory of the Hugging Face cache.

Offline (``HF_HUB_OFFLINE=1``) the snapshot comes from the cache; online only the files a conversion reads are
downloaded (config, generation config, tokenizer files, model card and license, the weights of one format, a
value-head side file).
Everything else in rmconvert sees a local directory. huggingface_hub is imported only for a repo id.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointError, UsageError, summary
from .checkpoint import BIN_SINGLE, FORMATS, SINGLE, VALUE_HEAD_FILES, read_json

#: Files a conversion reads or carries over besides the weights (top level of the repo only).
METADATA = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "README.md",  # the model card: its front matter carries the license
        "USE_POLICY.md",
    }
)
#: Also carried over: tiktoken vocabularies, license and notice files.
METADATA_PATTERN = re.compile(r"[^/]+\.tiktoken|(LICENSE|NOTICE)[^/]*")
NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
MAX_REPO_ID = 96  # huggingface_hub's limit


def repo_id_problem(spec: str) -> str | None:
    """Why ``spec`` is not a Hub repo id ``org/name``; None when it is one."""
    if "\\" in spec:
        return "backslashes are not allowed"
    parts = spec.split("/")
    if any(part in (".", "..") for part in parts):
        return "'.' and '..' are not names"
    if "" in parts:
        return "an empty part"
    if len(parts) != 2:
        return "a repo id is org/name"
    if len(spec) > MAX_REPO_ID:
        return f"longer than {MAX_REPO_ID} characters"
    if not all(NAME.fullmatch(part) and "--" not in part and ".." not in part for part in parts):
        return "names are letters, digits, '-', '_' and '.', not starting or ending with '-' or '.', no '--' or '..'"
    if spec.endswith(".git"):
        return "a repo id does not end with .git"
    return None


def revision_problem(revision: str) -> str | None:
    """Why ``revision`` cannot be a branch, tag or commit (it must stay inside the cache's refs/ and snapshots/)."""
    if not revision:
        return "it is empty"
    if revision.startswith("/") or "\\" in revision:
        return "absolute paths and backslashes are not allowed"
    if any(part in ("", ".", "..") for part in revision.split("/")):
        return "empty parts, '.' and '..' are not allowed"
    if any(c.isspace() or not c.isprintable() for c in revision):
        return "whitespace and control characters are not allowed"
    return None


def is_repo_id_source(spec: str | os.PathLike) -> bool:
    """Whether :func:`resolve_source` takes ``spec`` from the Hub: a repo id that is not an existing local path."""
    return not isinstance(spec, os.PathLike) and not os.path.exists(spec) and repo_id_problem(spec) is None


def resolve_source(spec: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory for ``spec``.

    An existing path, or any ``os.PathLike``, is a local path (``revision`` must then be None). A string that
    is a repo id ``org/name`` resolves to its snapshot in the Hugging Face cache at ``revision`` (a branch, tag
    or commit; default main), downloaded first unless offline. A relative spec with ``..``, an empty part or a
    backslash is refused (neither a directory nor a repo id); anything else is returned as a path, for the
    caller's "no such directory". Raises CheckpointError (one line naming the spec) or UsageError.
    """
    local = isinstance(spec, os.PathLike) or os.path.exists(spec)
    if revision is not None:
        problem = revision_problem(revision)
        if problem:
            raise UsageError(f"--revision {revision!r} is not a branch, tag or commit: {problem}")
        if local:
            raise UsageError(f"--revision applies to a Hugging Face repo id, but {os.fspath(spec)} is a local path")
    if local:
        return Path(spec)
    problem = repo_id_problem(spec)
    if problem is None:
        return _from_hub(spec, revision)
    if not os.path.isabs(spec) and ("\\" in spec or any(part in ("", "..") for part in spec.split("/"))):
        raise CheckpointError(f"no such directory, and not a Hugging Face repo id: {problem}", spec)
    return Path(spec)


def snapshot_origin(path: Path) -> dict | None:
    """``{"repo_id", "commit"}`` of a Hugging Face cache snapshot directory
    (``<cache>/models--org--name/snapshots/<commit>``); None for any other directory."""
    path = Path(path).resolve()
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--") or "--" not in repo[8:]:
        return None
    return {"repo_id": repo[8:].replace("--", "/", 1), "commit": path.name}


def weights_of(repo_files: Iterable[str]) -> str | None:
    """The weights a conversion reads among ``repo_files``: the shard index or single file of safetensors, else of
    PyTorch ``.bin``; None when there are neither."""
    files = set(repo_files)
    for index, single, _ in FORMATS:
        if index in files:
            return index
        if single in files:
            return single
    return None


def value_head_of(repo_files: Iterable[str]) -> str | None:
    """The value-head side file a conversion reads among ``repo_files`` (the first of VALUE_HEAD_FILES), or None."""
    files = set(repo_files)
    return next((name for name in VALUE_HEAD_FILES if name in files), None)


def files_to_fetch(repo_files: Iterable[str], weight_map: dict | None = None) -> list[str]:
    """The files of a repo a conversion reads: metadata at the top level, the weights of one format and a value head.

    For a sharded checkpoint, the shards are the files ``weight_map`` (of the chosen index) names; without it,
    only the index. Other weight formats, subfolders and unrelated files are never fetched.
    """
    files = set(repo_files)
    chosen = {name for name in files if name in METADATA or METADATA_PATTERN.fullmatch(name)}
    weights = weights_of(files)
    chosen |= {name for name in (weights, value_head_of(files)) if name is not None}
    if weights is not None and weights.endswith(".index.json") and weight_map:
        chosen |= {name for name in weight_map.values() if isinstance(name, str) and name in files}
    return sorted(chosen)


def _command(repo_id: str, revision: str | None) -> str:
    return f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")


def _from_hub(repo_id: str, revision: str | None) -> Path:
    """The snapshot directory of ``repo_id`` at ``revision``: from the cache offline, else downloaded."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return _from_cache(repo_id, revision, "HF_HUB_OFFLINE is set")
    return _download(repo_id, revision)


def _from_cache(repo_id: str, revision: str | None, why: str) -> Path:
    """The cached snapshot, complete for a conversion; ``why`` says why the Hub is not asked."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = Path(constants.HF_HUB_CACHE)
    try:  # the pattern limits huggingface_hub's own completeness check to a file every checkpoint has
        folder = Path(
            snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns="config.json")
        )
    except LocalEntryNotFoundError as exc:
        if type(exc).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x knows the repo's file list
            problem = f"the Hugging Face cache holds only part of revision {revision or 'main'!r}"
        elif (cache / ("models--" + repo_id.replace("/", "--"))).is_dir():
            problem = f"revision {revision or 'main'!r} is not in the Hugging Face cache ({cache})"
        else:
            problem = f"not in the Hugging Face cache ({cache})"
        raise CheckpointError(
            f"{problem} and {why}: run once online, or `{_command(repo_id, revision)}`", repo_id
        ) from None
    files = os.listdir(folder)
    weights = weights_of(files)
    wanted = ("config.json", value_head_of(_listed(repo_id, revision)))  # a listed value head must be cached
    missing = [name for name in wanted if name is not None and name not in files]
    if weights is None:
        missing.append(SINGLE)
    elif weights.endswith(".index.json"):
        weight_map = read_json(folder / weights).get("weight_map")  # not an object: open_checkpoint says so
        if isinstance(weight_map, dict):
            missing += sorted({n for n in weight_map.values() if isinstance(n, str)} - set(files))
    if missing:
        raise CheckpointError(
            f"the Hugging Face cache holds only part of revision {revision or 'main'!r} ({folder}; no {missing[0]})"
            f" and {why}: run once online, or `{_command(repo_id, revision)}`",
            repo_id,
        )
    return folder


def _listed(repo_id: str, revision: str | None) -> list[str]:
    """The repo's files as the cache recorded them when it was downloaded; none when it did not (huggingface_hub
    before 1.x, or files fetched one by one): the snapshot is then read as it is."""
    try:
        from huggingface_hub import get_cached_repo_tree

        return [entry.path for entry in get_cached_repo_tree(repo_id, revision=revision)]
    except Exception:  # noqa: BLE001 (an older huggingface_hub, no listing cached, an unreadable one)
        return []


def _download(repo_id: str, revision: str | None) -> Path:
    """Download the files a conversion reads (huggingface_hub's progress bars on stderr); the snapshot."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except RevisionNotFoundError as exc:
        raise _explained(exc, repo_id, revision) from None
    except Exception as exc:  # noqa: BLE001 (unreachable, offline, gated, unknown: the cache may still have it)
        try:
            return _from_cache(repo_id, revision, f"the Hub cannot be asked ({summary(exc, 200)})")
        except CheckpointError:
            raise _explained(exc, repo_id, revision) from None
    files = [sibling.rfilename for sibling in info.siblings or ()]
    weights = weights_of(files)
    if weights is None or "config.json" not in files:
        raise CheckpointError(
            f"revision {revision or 'main'!r} has no config.json, or no {SINGLE},"
            f" {BIN_SINGLE} or shard index, at the top of the repo: not a transformers checkpoint",
            repo_id,
        )
    try:  # by revision, not commit: huggingface_hub then records refs/<revision> for later offline runs
        hf_hub_download(repo_id, "config.json", revision=revision)  # a gated repo refuses here, before any bar
        weight_map = None
        if weights.endswith(".index.json"):
            weight_map = read_json(Path(hf_hub_download(repo_id, weights, revision=revision))).get("weight_map")
        wanted = files_to_fetch(files, weight_map if isinstance(weight_map, dict) else None)
        patterns = [glob.escape(name) for name in wanted]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 (gated files, a dropped connection, a full disk: one line each)
        raise _explained(exc, repo_id, revision, downloading=True) from None


def _explained(exc: Exception, repo_id: str, revision: str | None, downloading: bool = False) -> CheckpointError:
    """One line for what the Hub answered (``downloading``: while fetching files, else when asked for the repo)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, GatedRepoError):
        return CheckpointError(
            f"a gated repository: accept its terms at {constants.ENDPOINT}/{repo_id}, then log in with `hf auth login`",
            repo_id,
        )
    if isinstance(exc, RepositoryNotFoundError):
        return CheckpointError(
            "no such repository on the Hugging Face Hub (if it is private, log in with `hf auth login`)", repo_id
        )
    if isinstance(exc, RevisionNotFoundError):
        return CheckpointError(f"no revision {revision!r} on the Hugging Face Hub (a branch, tag or commit)", repo_id)
    if downloading:
        return CheckpointError(f"download failed ({summary(exc, 200)}): run again to resume it", repo_id)
    return CheckpointError(
        f"cannot reach the Hugging Face Hub ({summary(exc, 200)}) and it is not in the cache ({constants.HF_HUB_CACHE})",
        repo_id,
    )
