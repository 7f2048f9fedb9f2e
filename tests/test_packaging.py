"""The built wheel: package_dir maps plugins/ and schemas/ under rmconvert, and an installed wheel works
on its own (console script, built-in plugins, schemas, demo) without the repository on sys.path."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import rmconvert

REPO = Path(__file__).resolve().parents[1]
BUILTINS = ("llama", "olmo2", "olmoe", "qwen2_vl", "generic", "composite")
DEMO_KINDS = ("llama3", "llama2", "olmo2", "olmoe", "qwen2")
# Working-tree state that must not reach the build: VCS data, other builds, caches, virtualenvs.
NOT_SOURCES = {".git", ".tox", "build", "dist", ".pytest_cache", ".ruff_cache", "__pycache__"}


def run(command, *, cwd: Path, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _ignore(directory: str, names: list[str]) -> set[str]:
    here = Path(directory)
    ignored = {n for n in names if n in NOT_SOURCES or n.endswith(".egg-info") or n.startswith(".venv")}
    if here == REPO / "bench":
        ignored |= {n for n in names if n == "cache"}
    return ignored


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a clean copy of the working tree (no stale build/ can leak into it)."""
    root = tmp_path_factory.mktemp("wheel")
    source = Path(shutil.copytree(REPO, root / "source", ignore=_ignore))
    done = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            root / "dist",
            source,
        ],
        cwd=root,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = (root / "dist").glob("rmconvert-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> dict:
    """A fresh venv holding only the installed wheel; the test env's dependencies come through a .pth file.

    Paths listed in a .pth file are appended to sys.path, but .pth files inside them are not processed, so
    the editable install's ``__editable__*.pth`` (and its import finder) in the test env stays inert, and the
    venv's own site-packages precedes them: its rmconvert is the one imported.
    """
    root = tmp_path_factory.mktemp("venv")
    home = root / "venv"
    done = run([sys.executable, "-m", "venv", home], cwd=root)
    assert done.returncode == 0, done.stderr
    python, bindir = home / "bin" / "python", home / "bin"
    done = run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    purelib = Path(
        run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    )
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    assert parents, "the test environment has no site-packages"
    (purelib / "zz_test_env_dependencies.pth").write_text("".join(f"{p}\n" for p in parents))
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}}
    env["VIRTUAL_ENV"] = str(home)
    env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", "")])
    work = root / "cwd"  # not the repository: its plugins/ and schemas/ must not be importable by accident
    work.mkdir()
    return {"home": home, "python": python, "rmconvert": bindir / "rmconvert", "env": env, "cwd": work}


def in_venv(venv, *command, timeout=600) -> subprocess.CompletedProcess:
    return run(command, cwd=venv["cwd"], env=venv["env"], timeout=timeout)


def test_wheel_maps_plugins_and_schemas_under_rmconvert(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = f"rmconvert-{rmconvert.__version__}.dist-info"
    expected = {
        "rmconvert/__init__.py",
        "rmconvert/cli.py",
        "rmconvert/families/host.py",
        "rmconvert/families/hookspecs.py",
        "rmconvert/plugins/__init__.py",
        "rmconvert/plugins/llama.py",
        "rmconvert/plugins/olmo2.py",
        "rmconvert/plugins/olmoe.py",
        "rmconvert/plugins/generic.py",
        "rmconvert/plugins/composite.py",
        "rmconvert/plugins/qwen2_vl.py",
        "rmconvert/schemas/__init__.py",
        "rmconvert/schemas/llama.schema.json",
        "rmconvert/schemas/olmo2.schema.json",
        "rmconvert/schemas/olmoe.schema.json",
        "rmconvert/schemas/reward-model.schema.json",
    }
    expected |= {f"rmconvert/plugins/{p.name}" for p in (REPO / "plugins").glob("*.py")}
    expected |= {f"rmconvert/schemas/{p.name}" for p in (REPO / "schemas").glob("*.py")}
    expected |= {f"rmconvert/schemas/{p.name}" for p in (REPO / "schemas").glob("*.json")}
    expected |= {
        f"rmconvert/{p.relative_to(REPO / 'rmconvert').as_posix()}" for p in (REPO / "rmconvert").rglob("*.py")
    }
    assert expected <= names, sorted(expected - names)
    assert {n.split("/")[0] for n in names} == {"rmconvert", dist_info}, sorted(names)
    assert not [n for n in names if n.startswith(("plugins/", "schemas/", "tests/", "bench/"))]
    metadata = zipfile.ZipFile(wheel)
    top_level = metadata.read(f"{dist_info}/top_level.txt").decode().split()
    assert top_level == ["rmconvert"]
    entry_points = metadata.read(f"{dist_info}/entry_points.txt").decode()
    assert "rmconvert = rmconvert.cli:main" in entry_points


def test_installed_wheel_is_what_gets_imported(venv):
    script = (
        "import json, importlib.metadata as md, sys, rmconvert, rmconvert.plugins, rmconvert.schemas;"
        "print(json.dumps({'files': [rmconvert.__file__, rmconvert.plugins.__file__, rmconvert.schemas.__file__,"
        " str(rmconvert.schemas.path('llama'))], 'dist': str(md.distribution('rmconvert').locate_file('')),"
        " 'version': md.version('rmconvert'),"
        " 'editable': sorted(m for m in sys.modules if m.startswith('__editable__')),"
        " 'finders': [type(f).__name__ if not isinstance(f, type) else f.__name__ for f in sys.meta_path]}))"
    )
    done = in_venv(venv, venv["python"], "-c", script)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    home = venv["home"].resolve()
    for path in found["files"]:
        assert Path(path).resolve().is_relative_to(home), path
        assert Path(path).is_file(), path
    assert Path(found["dist"]).resolve().is_relative_to(home)
    assert found["version"] == rmconvert.__version__
    assert found["editable"] == []
    assert not [f for f in found["finders"] if "Editable" in f]


def test_installed_console_script_help(venv):
    done = in_venv(venv, venv["rmconvert"], "--help")
    assert done.returncode == 0, done.stderr
    for command in ("convert", "validate", "plugins", "demo"):
        assert command in done.stdout
    done = in_venv(venv, venv["rmconvert"], "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"rmconvert, version {rmconvert.__version__}"


def test_installed_plugins_lists_the_builtins(venv):
    done = in_venv(venv, venv["rmconvert"], "plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["architecture"]: row for row in json.loads(done.stdout)}
    assert set(rows) == set(BUILTINS)
    for name in BUILTINS:
        row = rows[name]
        assert (row["plugin"], row["distribution"], row["version"]) == (
            f"rmconvert.plugins.{name}",
            "rmconvert",
            rmconvert.__version__,
        )
    assert "qwen2" in rows["generic"]["model_types"]


@pytest.mark.parametrize("name", ["plugins", "schemas"])
def test_installed_wheel_adds_no_bare_top_level_package(venv, name):
    done = in_venv(venv, venv["python"], "-c", f"import {name}")
    assert done.returncode == 1
    assert f"ModuleNotFoundError: No module named '{name}'" in done.stderr


def test_installed_demo_converts_every_builtin_family(venv, tmp_path):
    done = in_venv(venv, venv["rmconvert"], "demo", tmp_path / "demo")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    for kind in DEMO_KINDS:
        mine = [r for r in rows if r and r[0] == kind]
        assert [r[1] for r in mine] == ["scalar", "bt"], done.stdout
        for row in mine:
            assert "yes" in row and "same" in row, row
