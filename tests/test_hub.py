"""Hub ids as sources: ``org/name`` and ``--revision`` through a Hugging Face cache built as huggingface_hub
writes one, offline; which files an online conversion fetches. Nothing is downloaded.

The CLI runs as its own process: huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` when imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download, try_to_load_from_cache
from safetensors.numpy import load_file, save_file

from rmconvert.sources.hub import files_to_fetch, repo_id_problem, revision_problem, weights_of
from rmconvert.testing import LFS_SUFFIXES, add_to_hub_cache, git_blob_id, snapshot

LLAMA = "tiny-org/llama2"
SHARDED = "tiny-org/llama2-sharded"
RM = "tiny-org/llama2-rm"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def rmconvert_script() -> str:
    script = Path(sys.executable).with_name("rmconvert")
    found = str(script) if script.exists() else shutil.which("rmconvert")
    assert found, "the rmconvert console script is not installed"
    return found


def hub_env(cache: Path, **extra) -> dict[str, str]:
    """The environment of an offline run against ``cache`` (no token, no telemetry, no update check)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(cache.parent / "hf-home"),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
    )
    env.update(extra)
    return env


def run(*args, cache: Path, cwd: Path, **extra) -> subprocess.CompletedProcess:
    """``rmconvert ARGS`` as a process with the offline environment of ``cache``."""
    command = [rmconvert_script(), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=hub_env(cache, **extra), cwd=cwd, check=False)


def assert_one_error(result, culprit: str, *problems: str) -> None:
    """Exit 1, nothing on stdout, one line ``rmconvert: error: <culprit>: ...`` holding every problem."""
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"rmconvert: error: {culprit}: "), lines[0]
    for problem in problems:
        assert problem in lines[0], lines[0]


@pytest.fixture(scope="module")
def hub(build, tmp_path_factory):
    """A Hugging Face cache (read-only): LLAMA at main and at branch v2 (other weights), SHARDED, and RM (a reward
    model converted from LLAMA); with the local checkpoints each snapshot was made from."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    sources = {
        (LLAMA, "main"): build("llama2"),
        (LLAMA, "v2"): build("llama2", seed=1),
        (SHARDED, "main"): build("llama2", max_shard_size="100KB"),
    }
    rm = root / "rm"
    result = run("convert", sources[LLAMA, "main"], rm, cache=cache, cwd=root)
    assert result.returncode == 0, result.stderr
    sources[RM, "main"] = rm
    snaps = {key: add_to_hub_cache(src, cache, *key) for key, src in sources.items()}
    return cache, sources, snaps


@pytest.fixture
def cwd(tmp_path) -> Path:
    """An empty working directory (no local org/name to take precedence)."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def converted(src, dst: Path, cache: Path, cwd: Path, *options) -> dict[str, str]:
    """Convert SRC (a path or a repo id) to DST; the output's files and hashes."""
    result = run("convert", src, dst, *options, cache=cache, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return output_of(dst)


def output_of(dst: Path) -> dict[str, str]:
    """The files and hashes of a converted DST, with the repo id and commit recorded in rmconvert.json left out
    (only a conversion from the cache has them): equal for the same weights, options and source hashes."""
    files = snapshot(dst)
    manifest = json.loads((dst / "rmconvert.json").read_text())
    manifest.pop("source_repo", None)
    files["rmconvert.json"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return files


# --- the cache is the one huggingface_hub writes -----------------------------------------------


def test_huggingface_hub_itself_resolves_the_cache_offline(hub):
    cache, sources, snaps = hub
    for (repo, ref), snap in snaps.items():
        found = snapshot_download(repo, revision=ref, cache_dir=cache, local_files_only=True)
        assert Path(found) == snap
        assert Path(snapshot_download(repo, revision=snap.name, cache_dir=cache, local_files_only=True)) == snap
        for file in sources[repo, ref].iterdir():
            cached = hf_hub_download(repo, file.name, revision=ref, cache_dir=cache, local_files_only=True)
            assert Path(cached) == snap / file.name
            assert Path(cached).read_bytes() == file.read_bytes()
            assert try_to_load_from_cache(repo, file.name, cache_dir=cache, revision=ref) == cached
    scanned = {repo.repo_id: repo for repo in scan_cache_dir(cache).repos}  # raises on a malformed layout
    assert sorted(scanned) == sorted({LLAMA, SHARDED, RM})
    assert set(scanned[LLAMA].refs) == {"main", "v2"}
    assert {r.commit_hash for r in scanned[LLAMA].revisions} == {snaps[LLAMA, "main"].name, snaps[LLAMA, "v2"].name}
    weights = next(f for f in next(iter(scanned[RM].revisions)).files if f.file_name == SINGLE)
    assert weights.blob_path.name == hashlib.sha256((sources[RM, "main"] / SINGLE).read_bytes()).hexdigest()
    config = next(f for f in next(iter(scanned[RM].revisions)).files if f.file_name == "config.json")
    assert config.blob_path.name == git_blob_id((sources[RM, "main"] / "config.json").read_bytes())


# --- convert -----------------------------------------------------------------------------------


@pytest.mark.parametrize("repo", [LLAMA, SHARDED])
def test_convert_a_repo_id_offline_as_the_local_checkpoint(hub, tmp_path, cwd, repo):
    cache, sources, snaps = hub
    before = snapshot(cache)
    from_hub = converted(repo, tmp_path / "from-hub", cache, cwd)
    local = converted(sources[repo, "main"], tmp_path / "local", cache, cwd)
    assert from_hub == local  # rmconvert.json included: the same hashes and options
    manifest = json.loads((tmp_path / "from-hub" / "rmconvert.json").read_text())
    assert manifest["source_repo"] == {"repo_id": repo, "commit": snaps[repo, "main"].name}
    assert "source_repo" not in json.loads((tmp_path / "local" / "rmconvert.json").read_text())
    assert not [p for p in (tmp_path / "from-hub").iterdir() if p.is_symlink()]
    assert snapshot(cache) == before


def test_revision_selects_a_branch_or_a_commit(hub, tmp_path, cwd):
    cache, sources, snaps = hub
    main = converted(LLAMA, tmp_path / "main", cache, cwd)
    v2 = converted(LLAMA, tmp_path / "v2", cache, cwd, "--revision", "v2")
    by_commit = converted(LLAMA, tmp_path / "commit", cache, cwd, "--revision", snaps[LLAMA, "v2"].name)
    assert v2 == by_commit == converted(sources[LLAMA, "v2"], tmp_path / "local-v2", cache, cwd)
    assert v2[SINGLE] != main[SINGLE]


def test_provenance_of_cached_files_is_their_blob_name_or_content_hash(hub, tmp_path, cwd):
    """LFS blobs are named by their sha256 (recorded without reading them); other blobs by their git sha1, so
    their sha256 is computed: either way the value is the file's sha256, as for a local directory."""
    cache, sources, snaps = hub
    converted(SHARDED, tmp_path / "rm", cache, cwd)
    recorded = json.loads((tmp_path / "rm" / "rmconvert.json").read_text())["source_files"]
    snap = snaps[SHARDED, "main"]
    assert set(recorded) >= {INDEX, "config.json", "tokenizer.json"} and len(recorded) > 5
    lfs = 0
    for name, value in recorded.items():
        blob = (snap / name).resolve()
        assert value == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest(), name
        if name.endswith(".safetensors"):
            assert value == "sha256:" + blob.name
            lfs += 1
        else:
            assert blob.name == git_blob_id(blob.read_bytes())
    assert lfs == len(list(sources[SHARDED, "main"].glob("*.safetensors"))) > 1


def test_a_local_directory_named_like_a_repo_id_wins(hub, tmp_path, cwd):
    cache, sources, _ = hub
    shutil.copytree(sources[LLAMA, "v2"], cwd / LLAMA)  # ./tiny-org/llama2 holds the v2 weights, the cache main
    local = converted(LLAMA, tmp_path / "rm", cache, cwd)
    assert local == converted(sources[LLAMA, "v2"], tmp_path / "v2", cache, cwd)
    result = run("convert", LLAMA, tmp_path / "other", "--revision", "v2", cache=cache, cwd=cwd)
    assert result.returncode == 2, result.stderr
    assert f"--revision applies to a Hugging Face repo id, but {LLAMA} is a local path" in result.stderr
    assert not (tmp_path / "other").exists()


def test_converting_a_repo_id_imports_neither_torch_nor_transformers(hub, tmp_path, cwd, imported_by_convert):
    cache, _, _ = hub
    assert imported_by_convert(LLAMA, tmp_path / "rm", env=hub_env(cache), cwd=cwd) == {"huggingface_hub"}
    assert (tmp_path / "rm" / SINGLE).exists()


# --- validate ----------------------------------------------------------------------------------


def test_validate_a_repo_id(hub, cwd):
    cache, _, _ = hub
    result = run("validate", RM, cache=cache, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == f"{RM}: valid (0 errors, 0 warnings)"
    report = json.loads(run("validate", RM, "--json", cache=cache, cwd=cwd).stdout)
    assert report["path"] == RM and report["valid"]


def test_validate_a_causal_lm_repo_id_suggests_converting_it_by_id(hub, cwd):
    """The fix names the repo id and a new local directory, never the cache's snapshot folder."""
    cache, _, _ = hub
    result = run("validate", LLAMA, "--revision", "v2", cache=cache, cwd=cwd)
    assert result.returncode == 1
    fixes = [line.split("fix:", 1)[1].strip() for line in result.stdout.splitlines() if "fix:" in line]
    assert f"rmconvert convert {LLAMA} --revision v2 llama2-fixed" in fixes, result.stdout
    assert str(cache) not in result.stdout


def test_validate_against_a_repo_id(hub, tmp_path, cwd):
    cache, _, _ = hub
    converted(LLAMA, tmp_path / "rm", cache, cwd)
    same = run("validate", tmp_path / "rm", "--against", LLAMA, cache=cache, cwd=cwd)
    assert same.returncode == 0, same.stdout + same.stderr
    other = run("validate", tmp_path / "rm", "--against", LLAMA, "--against-revision", "v2", cache=cache, cwd=cwd)
    assert other.returncode == 1
    assert any(line.startswith("RM120") and "bytes differ" in line for line in other.stdout.splitlines()), other.stdout
    assert run("validate", RM, "--against", LLAMA, cache=cache, cwd=cwd).returncode == 0


# --- bad input ---------------------------------------------------------------------------------


def test_repo_id_missing_from_the_cache_offline(hub, tmp_path, cwd):
    cache, _, _ = hub
    result = run("convert", "tiny-org/absent", tmp_path / "rm", cache=cache, cwd=cwd)
    assert_one_error(
        result,
        "tiny-org/absent",
        f"not in the Hugging Face cache ({cache})",
        "HF_HUB_OFFLINE",
        "run once online, or `hf download tiny-org/absent`",
    )
    assert not (tmp_path / "rm").exists()
    checked = run("validate", "tiny-org/absent", cache=cache, cwd=cwd)
    assert_one_error(checked, "tiny-org/absent", "not in the Hugging Face cache")


def test_revision_missing_from_the_cache_offline(hub, tmp_path, cwd):
    cache, _, _ = hub
    result = run("convert", LLAMA, tmp_path / "rm", "--revision", "v3", cache=cache, cwd=cwd)
    assert_one_error(
        result, LLAMA, "revision 'v3' is not in the Hugging Face cache", f"`hf download {LLAMA} --revision v3`"
    )
    against = run("validate", tmp_path, "--against", LLAMA, "--against-revision", "v3", cache=cache, cwd=cwd)
    assert_one_error(against, LLAMA, "revision 'v3' is not in the Hugging Face cache")


def test_partial_cache_offline(hub, tmp_path, cwd):
    """A snapshot missing a shard (an interrupted download): huggingface_hub returns the folder; rmconvert
    names the repo, the missing file and what to do."""
    cache, _, snaps = hub
    partial = tmp_path / "cache"
    shutil.copytree(
        cache / "models--tiny-org--llama2-sharded", partial / "models--tiny-org--llama2-sharded", symlinks=True
    )
    snap = partial / snaps[SHARDED, "main"].relative_to(cache)
    last = max(snap.glob("model-*.safetensors"))
    last.unlink()
    result = run("convert", SHARDED, tmp_path / "rm", cache=partial, cwd=cwd)
    assert_one_error(
        result,
        SHARDED,
        "the Hugging Face cache holds only part of revision 'main'",
        f"no {last.name}",
        f"`hf download {SHARDED}`",
    )


def test_cached_index_with_a_weight_map_that_is_not_an_object_offline(hub, tmp_path, cwd):
    """The index of a cached snapshot whose weight_map is a list: one line naming it, as for a local directory."""
    cache, _, snaps = hub
    damaged = tmp_path / "cache"
    shutil.copytree(
        cache / "models--tiny-org--llama2-sharded", damaged / "models--tiny-org--llama2-sharded", symlinks=True
    )
    index = damaged / snaps[SHARDED, "main"].relative_to(cache) / INDEX
    index.unlink()
    problem = "weight_map must map tensor names to file names"
    for weight_map in ([], [SHARDS[0]], "model-00001-of-00002.safetensors"):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        assert_one_error(run("convert", SHARDED, tmp_path / "rm", cache=damaged, cwd=cwd), str(index), problem)
        assert not (tmp_path / "rm").exists()
        checked = run("validate", SHARDED, cache=damaged, cwd=cwd)
        assert checked.returncode == 1 and "Traceback" not in checked.stderr, checked.stderr
        assert any(line.startswith("RM001") and problem in line for line in checked.stdout.splitlines()), checked


def test_unreachable_hub_falls_back_to_the_cache(hub, tmp_path, cwd):
    """Online but the endpoint refuses connections: the cached snapshot is used, as huggingface_hub does; a repo
    that is not cached is one line naming it."""
    cache, sources, _ = hub
    closed = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    result = run("convert", LLAMA, tmp_path / "rm", cache=cache, cwd=cwd, **closed)
    assert result.returncode == 0, result.stderr
    assert output_of(tmp_path / "rm") == converted(sources[LLAMA, "main"], tmp_path / "local", cache, cwd)
    missing = run("convert", "tiny-org/absent", tmp_path / "rm2", cache=cache, cwd=cwd, **closed)
    assert_one_error(missing, "tiny-org/absent", "cannot reach the Hugging Face Hub", "not in the cache")


# --- what an online conversion fetches ---------------------------------------------------------

# fmt: off
METADATA = ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
            "tokenizer_config.json"]
UNRELATED = [".gitattributes", "onnx/model.onnx", "original/consolidated.00.pth", "original/params.json",
             "tf_model.h5", "flax_model.msgpack", "model.onnx", "consolidated.safetensors", "params.json",
             "modeling_custom.py", "images/figure.png", "additional_chat_templates/tools.jinja"]
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
BIN_SHARDS = [f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)]
LICENSE_AND_TOKENIZER = ["config.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                         "chat_template.jinja", "qwen.tiktoken", "LICENSE", "LICENSE.txt", "NOTICE", "README.md",
                         "USE_POLICY.md"]

FETCHED = [
    pytest.param([*METADATA, *UNRELATED, SINGLE], None, [*METADATA, SINGLE], id="safetensors"),
    pytest.param([*METADATA, *UNRELATED, "pytorch_model.bin"], None, [*METADATA, "pytorch_model.bin"], id="bin"),
    pytest.param([*METADATA, SINGLE, "pytorch_model.bin", *UNRELATED], None, [*METADATA, SINGLE], id="both"),
    pytest.param([*METADATA, INDEX, *SHARDS, *UNRELATED], None, [*METADATA, INDEX], id="sharded-index-first"),
    pytest.param([*METADATA, INDEX, *SHARDS, *UNRELATED], {"a": SHARDS[0], "b": SHARDS[2], "c": SHARDS[1]},
                 [*METADATA, INDEX, *SHARDS], id="sharded"),
    pytest.param([*METADATA, INDEX, *SHARDS, "pytorch_model.bin.index.json", *BIN_SHARDS], {"a": SHARDS[0]},
                 [*METADATA, INDEX, SHARDS[0]], id="sharded-both-formats"),
    pytest.param([*METADATA, "pytorch_model.bin.index.json", *BIN_SHARDS, *UNRELATED],
                 {"a": BIN_SHARDS[0], "b": BIN_SHARDS[1], "c": "../escape.bin", "d": "not-in-repo.bin"},
                 [*METADATA, "pytorch_model.bin.index.json", *BIN_SHARDS], id="sharded-bin"),
    pytest.param([SINGLE, INDEX, *SHARDS], {"a": SHARDS[0]}, [INDEX, SHARDS[0]], id="index-over-single"),
    pytest.param([*LICENSE_AND_TOKENIZER, "sub/tokenizer.json", "notes.txt", SINGLE], None,
                 [*LICENSE_AND_TOKENIZER, SINGLE], id="tokenizer-and-license-files"),
    pytest.param([*METADATA, *UNRELATED], None, METADATA, id="no-weights"),
    pytest.param([*METADATA, SINGLE, "value_head.bin", "value_head.safetensors", "sub/value_head.bin"], None,
                 [*METADATA, SINGLE, "value_head.safetensors"], id="value-head-safetensors-first"),
    pytest.param([*METADATA, INDEX, *SHARDS, "value_head.bin", *UNRELATED], {"a": SHARDS[0]},
                 [*METADATA, INDEX, SHARDS[0], "value_head.bin"], id="value-head-bin"),
]
# fmt: on


@pytest.mark.parametrize("repo_files, weight_map, expected", FETCHED)
def test_files_fetched_for_a_conversion(repo_files, weight_map, expected):
    assert files_to_fetch(repo_files, weight_map) == sorted(expected)


def test_weights_of_prefers_safetensors_and_the_index():
    assert weights_of([SINGLE, "pytorch_model.bin"]) == SINGLE
    assert weights_of([INDEX, SINGLE]) == INDEX
    assert weights_of(["pytorch_model.bin.index.json", "pytorch_model.bin"]) == "pytorch_model.bin.index.json"
    assert weights_of(["pytorch_model.bin", "tf_model.h5"]) == "pytorch_model.bin"
    assert weights_of(["consolidated.safetensors", "tf_model.h5", "onnx/model.onnx"]) is None


@pytest.mark.parametrize(
    "spec, valid",
    [
        ("allenai/OLMo-2-1124-7B-SFT", True),
        ("meta-llama/Llama-3.1-8B", True),
        ("org_1/name.v2", True),
        ("name", False),
        ("org/..", False),
        ("../name", False),
        ("org/../../etc", False),
        ("/org/name", False),
        ("org\\name", False),
        ("org//name", False),
        ("org/name/", False),
        ("org/./name", False),
        ("org/na--me", False),
        ("org/-name", False),
        ("org/name.git", False),
        ("org/na me", False),
        ("org/" + "n" * 96, False),
    ],
)
def test_repo_ids(spec, valid):
    assert (repo_id_problem(spec) is None) == valid, repo_id_problem(spec)


@pytest.mark.parametrize(
    "revision, valid",
    [
        ("main", True),
        ("v2.0", True),
        ("refs/pr/1", True),
        ("0123456789abcdef0123456789abcdef01234567", True),
        ("", False),
        ("../../models--other--repo/refs/main", False),
        ("/etc/passwd", False),
        ("a\\b", False),
        ("refs//pr", False),
        ("main/", False),
        ("ma in", False),
        ("main\n", False),
    ],
)
def test_revisions(revision, valid):
    assert (revision_problem(revision) is None) == valid, revision_problem(revision)


# --- online, against a local stand-in for the Hub's HTTP API -----------------------------------


class Hub(ThreadingHTTPServer):
    """The parts of the Hub's HTTP API that huggingface_hub uses to download a model: ``/api/models/<repo>``
    (and ``/revision/<rev>``, ``/tree/<rev>``), and ``/<repo>/resolve/<rev>/<file>`` with the headers the Hub
    sends (X-Repo-Commit, ETag: the git sha1, or the sha256 of an LFS file). Errors carry the Hub's
    X-Error-Code. ``downloads`` records every file whose bytes were sent."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos: dict[str, dict] = {}  # repo id -> {"refs": {name: commit}, "commits": {commit: files}, ...}
        self.downloads: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes], ref: str = "main", gated: bool = False) -> str:
        """Publish ``files`` as branch ``ref`` of ``repo_id``; returns the commit hash."""
        commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "gated": gated})
        repo["refs"][ref] = commit
        repo["commits"][commit] = files
        return commit


class HubHandler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def send(self, status: int, data: bytes, body: bool, **headers) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def error(self, status: int, code: str, body: bool) -> None:
        message = json.dumps({"error": code}).encode()
        self.send(status, message, body, **{"X-Error-Code": code, "Content-Type": "application/json"})

    def answer(self, body: bool) -> None:
        path = unquote(self.path.split("?")[0])
        api = path.startswith("/api/models/")
        parts = path.removeprefix("/api/models/" if api else "/").split("/")
        repo = self.server.repos.get("/".join(parts[:2]))
        if repo is None:
            return self.error(404, "RepoNotFound", body)
        rest = parts[2:]
        if api:
            kind, revision = (rest[0], "/".join(rest[1:])) if rest else ("info", "main")
            if kind == "tree":
                revision = rest[1]
        else:  # <repo>/resolve/<revision>/<file>
            kind, revision = "resolve", rest[1]
        commit = revision if revision in repo["commits"] else repo["refs"].get(revision)
        if commit is None:
            return self.error(404, "RevisionNotFound", body)
        files = repo["commits"][commit]
        if kind in ("info", "revision"):
            siblings = [{"rfilename": name} for name in sorted(files)]
            info = {"id": "/".join(parts[:2]), "sha": commit, "siblings": siblings, "gated": repo["gated"] and "auto"}
            return self.send(200, json.dumps(info).encode(), body, **{"Content-Type": "application/json"})
        if kind == "tree":
            tree = [self.entry(name, data) for name, data in sorted(files.items())]
            return self.send(200, json.dumps(tree).encode(), body, **{"Content-Type": "application/json"})
        if repo["gated"]:
            return self.error(403, "GatedRepo", body)
        name = "/".join(rest[2:])
        if name not in files:
            return self.error(404, "EntryNotFound", body)
        entry = self.entry(name, files[name])
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        if body:
            self.server.downloads.append(name)
        self.send(200, files[name], body, **{"X-Repo-Commit": commit, "ETag": f'"{etag}"'})

    @staticmethod
    def entry(name: str, data: bytes) -> dict:
        """A file of the /tree listing: its git oid, and for an LFS file its sha256."""
        entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


@pytest.fixture
def online(tmp_path):
    """A stand-in Hub on a local port, and the environment of an online run against it with an empty cache."""
    server = Hub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    cache = tmp_path / "cache"
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": server.endpoint, "HF_HUB_DISABLE_XET": "1"}
    yield server, cache, env
    server.shutdown()
    server.server_close()


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


JUNK = {
    "pytorch_model.bin": b"PK\x03\x04 a pickle twin",
    "tf_model.h5": b"\x89HDF",
    "flax_model.msgpack": b"\x80",
    "onnx/model.onnx": b"onnx",
    "original/consolidated.00.pth": b"PK",
    "consolidated.safetensors": b"\0" * 8,
    "modeling_custom.py": b"raise SystemExit('never run')\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
}


def test_online_conversion_downloads_only_what_it_reads(online, build, tmp_path, cwd):
    server, cache, env = online
    source = build("llama2", max_shard_size="100KB")
    published = {**files_of(source), "README.md": b"---\nlicense: apache-2.0\n---\n", **JUNK}
    server.add(SHARDED, published)
    result = run("convert", SHARDED, tmp_path / "rm", cache=cache, cwd=cwd, **env)
    assert result.returncode == 0, result.stderr
    assert sorted(server.downloads) == sorted([*files_of(source), "README.md"])
    local = tmp_path / "local"
    shutil.copytree(source, local)
    (local / "README.md").write_bytes(published["README.md"])
    assert output_of(tmp_path / "rm") == converted(local, tmp_path / "local-rm", cache, cwd)
    # the cache now serves an offline run, refs/main included
    server.downloads.clear()
    assert converted(SHARDED, tmp_path / "offline", cache, cwd) == output_of(tmp_path / "rm")
    again = run("convert", SHARDED, tmp_path / "again", cache=cache, cwd=cwd, **env)
    assert again.returncode == 0, again.stderr
    assert server.downloads == []  # everything was cached


def test_online_revision_and_bin_only_repo(online, build, tmp_path, cwd):
    server, cache, env = online
    server.add(LLAMA, files_of(build("llama2")))
    server.add(LLAMA, files_of(build("llama2", seed=1)), ref="v2")
    result = run("convert", LLAMA, tmp_path / "v2", "--revision", "v2", cache=cache, cwd=cwd, **env)
    assert result.returncode == 0, result.stderr
    assert output_of(tmp_path / "v2") == converted(build("llama2", seed=1), tmp_path / "local-v2", cache, cwd)

    pickled = {k: v for k, v in files_of(build("llama2")).items() if k != SINGLE}
    server.add("tiny-org/pickled", {**pickled, "pytorch_model.bin": JUNK["pytorch_model.bin"], "tf_model.h5": b"h5"})
    server.downloads.clear()
    run("convert", "tiny-org/pickled", tmp_path / "pickled", cache=cache, cwd=cwd, **env)  # the .bin reader decides
    assert sorted(server.downloads) == sorted([*pickled, "pytorch_model.bin"])


def test_online_errors(online, build, tmp_path, cwd):
    server, cache, env = online
    files = files_of(build("llama2"))
    server.add("tiny-org/gated", files, gated=True)
    server.add("tiny-org/no-weights", {k: v for k, v in files.items() if k != SINGLE})
    server.add(LLAMA, files)
    cases = [
        ("tiny-org/absent", [], "no such repository on the Hugging Face Hub (if it is private, log in with `hf auth"),
        (
            "tiny-org/gated",
            [],
            f"a gated repository: accept its terms at {server.endpoint}/tiny-org/gated, then log in with `hf auth login`",
        ),
        (LLAMA, ["--revision", "v9"], "no revision 'v9' on the Hugging Face Hub"),
        (
            "tiny-org/no-weights",
            [],
            "revision 'main' has no config.json, or no model.safetensors, pytorch_model.bin or shard index",
        ),
    ]
    for repo, options, problem in cases:
        result = run("convert", repo, tmp_path / "rm", *options, cache=cache, cwd=cwd, **env)
        assert_one_error(result, repo, problem)
        assert not (tmp_path / "rm").exists()
        checked = run("validate", repo, *options, cache=cache, cwd=cwd, **env)
        assert_one_error(checked, repo, problem)
    assert server.downloads == []


def test_a_destination_that_cannot_be_written_fails_before_any_download(online, build, tmp_path, cwd):
    server, cache, env = online
    server.add(LLAMA, files_of(build("llama2")))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    for dst, culprit, problem in [
        (occupied, occupied, "exists and is not empty (use --overwrite to replace it)"),
        (tmp_path / "no-parent" / "rm", tmp_path / "no-parent", "parent directory does not exist"),
    ]:
        assert_one_error(run("convert", LLAMA, dst, cache=cache, cwd=cwd, **env), str(culprit), problem)
    assert server.downloads == []
    assert (occupied / "keep.txt").read_text() == "mine" and sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


# --- a value head saved beside the weights (LlamaFactory, ms-swift) -----------------------------

VALUE_HEAD_REPO = "tiny-org/llama2-value-head"


@pytest.fixture(scope="module")
def value_head_source(build, tmp_path_factory) -> Path:
    """llama2 with a trained value head in value_head.safetensors beside model.safetensors."""
    src = Path(shutil.copytree(build("llama2"), tmp_path_factory.mktemp("value-head") / "src"))
    hidden = json.loads((src / "config.json").read_text())["hidden_size"]
    weight = np.random.default_rng(1).standard_normal((1, hidden), dtype=np.float32)
    head = {"v_head.summary.weight": weight, "v_head.summary.bias": np.zeros(1, np.float32)}
    save_file(head, src / "value_head.safetensors", metadata={"format": "pt"})
    return src


def assert_value_head_kept(dst: Path, src: Path) -> None:
    """DST was converted from a value-head model: its score head is the value head's weight, byte for byte."""
    assert json.loads((dst / "rmconvert.json").read_text())["result"]["source_kind"] == "value-head model"
    head = load_file(src / "value_head.safetensors")["v_head.summary.weight"]
    assert load_file(dst / SINGLE)["score.weight"].tobytes() == head.tobytes()


def test_a_value_head_file_is_fetched_and_read_from_the_cache(online, value_head_source, tmp_path, cwd):
    """Online, offline from the cache that download left, and offline from a cache with no record of the repo's
    file list: the same output as converting the directory, the trained value head as score."""
    server, cache, env = online
    server.add(VALUE_HEAD_REPO, files_of(value_head_source))
    local = converted(value_head_source, tmp_path / "local", cache, cwd)
    assert_value_head_kept(tmp_path / "local", value_head_source)
    result = run("convert", VALUE_HEAD_REPO, tmp_path / "online", cache=cache, cwd=cwd, **env)
    assert result.returncode == 0, result.stderr
    assert "value_head.safetensors" in server.downloads
    assert output_of(tmp_path / "online") == local
    assert converted(VALUE_HEAD_REPO, tmp_path / "offline", cache, cwd) == local
    unlisted = tmp_path / "unlisted-cache"
    add_to_hub_cache(value_head_source, unlisted, VALUE_HEAD_REPO)
    assert converted(VALUE_HEAD_REPO, tmp_path / "unlisted", unlisted, cwd) == local


def test_a_cached_repo_missing_its_listed_value_head_file_offline(online, value_head_source, tmp_path, cwd):
    """A cache that records the repo's files but lacks its value head (downloaded without it): offline, one line
    naming the file; online, the value head alone is fetched and the conversion keeps it."""
    import huggingface_hub

    if not hasattr(huggingface_hub, "get_cached_repo_tree"):
        pytest.skip(f"huggingface_hub {huggingface_hub.__version__} records no repo listing in its cache")
    server, cache, env = online
    server.add(VALUE_HEAD_REPO, files_of(value_head_source))
    snap = Path(snapshot_download(VALUE_HEAD_REPO, cache_dir=cache, endpoint=server.endpoint))
    blob = (snap / "value_head.safetensors").resolve()
    (snap / "value_head.safetensors").unlink()
    blob.unlink()
    result = run("convert", VALUE_HEAD_REPO, tmp_path / "rm", cache=cache, cwd=cwd)
    assert_one_error(
        result,
        VALUE_HEAD_REPO,
        "the Hugging Face cache holds only part of revision 'main'",
        "no value_head.safetensors",
        f"`hf download {VALUE_HEAD_REPO}`",
    )
    assert not (tmp_path / "rm").exists()
    server.downloads.clear()
    again = run("convert", VALUE_HEAD_REPO, tmp_path / "rm", cache=cache, cwd=cwd, **env)
    assert again.returncode == 0, again.stderr
    assert server.downloads == ["value_head.safetensors"]
    assert output_of(tmp_path / "rm") == converted(value_head_source, tmp_path / "local", cache, cwd)
