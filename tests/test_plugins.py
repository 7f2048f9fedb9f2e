"""Plugins through real pluggy: the built-ins, an in-process plugin, conflicts, and plugins installed
as real distributions with an ``rmconvert`` entry point, exercised in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import rmconvert
from rmconvert import Architecture, hookimpl
from rmconvert.cli import cli
from rmconvert.errors import PluginError
from rmconvert.families.host import DISABLE_AUTOLOAD, ENTRY_POINT_GROUP, get_plugin_manager, load_registry

BUILTINS = {
    "llama": ("rmconvert.plugins.llama", ["llama"]),
    "olmo2": ("rmconvert.plugins.olmo2", ["olmo2"]),
    "olmoe": ("rmconvert.plugins.olmoe", ["olmoe"]),
    "qwen2_vl": ("rmconvert.plugins.qwen2_vl", ["qwen2_5_vl", "qwen2_vl"]),
}
BUILTIN = {*BUILTINS, "generic", "composite"}  # every built-in architecture: the specific ones and the catch-alls


class PluginObject:
    """A third-party plugin as an object: registers the architectures it was given."""

    def __init__(self, *architectures: Architecture):
        self.architectures = architectures

    @hookimpl
    def rmconvert_register_architectures(self, register):
        for architecture in self.architectures:
            register(architecture)


def make_architecture(name: str, model_types: tuple[str, ...], class_name: str | None = None) -> Architecture:
    attrs = {"name": name, "model_types": model_types, "sequence_classification_class": class_name}
    return type(f"Arch_{name.replace('-', '_')}", (Architecture,), attrs)()


# --- built-ins ---------------------------------------------------------------------------------


def test_builtins_are_listed_with_their_distribution_version_and_model_types():
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["architecture"]: row for row in json.loads(result.stdout)}
    for name, (plugin, model_types) in BUILTINS.items():
        assert rows[name] == {
            "architecture": name,
            "plugin": plugin,
            "distribution": "rmconvert",
            "version": rmconvert.__version__,
            "model_types": model_types,
        }
    generic = rows["generic"]
    assert (generic["plugin"], generic["distribution"], generic["version"]) == (
        "rmconvert.plugins.generic",
        "rmconvert",
        rmconvert.__version__,
    )
    assert not {"llama", "olmo2", "olmoe"} & set(generic["model_types"])
    assert {"qwen2", "mistral", "gemma"} <= set(generic["model_types"])


def test_builtin_registry_resolves_model_types():
    registry = load_registry(get_plugin_manager(autoload=False))
    assert set(registry.entries) == BUILTIN
    for model_type in ("llama", "olmo2", "olmoe"):
        assert registry.for_model_type(model_type).architecture.name == model_type
    assert registry.for_model_type("qwen2").architecture.name == "generic"
    assert registry.for_model_type("qwen2_vl").architecture.name == "qwen2_vl"  # torch-free, before composite
    assert registry.for_model_type("llava").architecture.name == "composite"
    assert registry.for_model_type("llama4") is None  # no composite backbone class: refused
    assert registry.entries["generic"].architecture.fallback
    assert registry.entries["composite"].architecture.fallback


# --- an in-process third-party plugin ----------------------------------------------------------


def test_in_process_plugin_takes_its_model_type_from_the_fallback_and_converts(build, tmp_path):
    pm = get_plugin_manager(autoload=False)
    custom = make_architecture("qwen2-custom", ("qwen2",), "Qwen2ForSequenceClassification")
    pm.register(PluginObject(custom), name="acme-qwen2")
    registry = load_registry(pm)

    entry = registry.entries["qwen2-custom"]
    assert (entry.plugin, entry.distribution, entry.version) == ("acme-qwen2", "(in-process)", "")
    assert registry.for_model_type("qwen2") is entry

    dst = tmp_path / "rm"
    report = rmconvert.convert(build("qwen2"), dst, registry=registry)
    assert report["architecture"] == "qwen2-custom"
    assert report["class"] == "Qwen2ForSequenceClassification"
    assert json.loads((dst / "config.json").read_text())["architectures"] == ["Qwen2ForSequenceClassification"]

    model, info = rmconvert.load_reward_model(dst, output_loading_info=True, registry=registry)
    assert type(model).__name__ == "Qwen2ForSequenceClassification"
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], (key, info[key])
    # Loading with the default registry (generic fallback) gives the same clean result.
    model, info = rmconvert.load_reward_model(dst, output_loading_info=True)
    assert type(model).__name__ == "Qwen2ForSequenceClassification"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_in_process_plugin_is_only_used_when_registered(build, tmp_path):
    report = rmconvert.convert(
        build("qwen2"), tmp_path / "rm", registry=load_registry(get_plugin_manager(autoload=False))
    )
    assert report["architecture"] == "generic"


@pytest.mark.parametrize(
    "architectures, message",
    [
        pytest.param(
            [make_architecture("llama", ("llama-fork",))],
            "plugins 'rmconvert.plugins.llama' and 'acme' both register architecture 'llama'",
            id="name-taken-by-builtin",
        ),
        pytest.param(
            [make_architecture("llama-alt", ("llama",))],
            "plugins 'rmconvert.plugins.llama' (llama) and 'acme' (llama-alt) both claim model_type 'llama'",
            id="model-type-taken-by-builtin",
        ),
        pytest.param(
            [make_architecture("olmoe-moe", ("olmoe", "olmoe-x"))],
            "plugins 'rmconvert.plugins.olmoe' (olmoe) and 'acme' (olmoe-moe) both claim model_type 'olmoe'",
            id="one-of-several-model-types-taken",
        ),
    ],
)
def test_claims_on_a_builtin_fail_naming_both_plugins(architectures, message):
    pm = get_plugin_manager(autoload=False)
    pm.register(PluginObject(*architectures), name="acme")
    with pytest.raises(PluginError) as info:
        load_registry(pm)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "first, second, what",
    [
        pytest.param(("twin", ("qwen2",)), ("twin", ("mistral",)), "architecture 'twin'", id="same-name"),
        pytest.param(("qwen-a", ("qwen2",)), ("qwen-b", ("qwen2",)), "model_type 'qwen2'", id="same-model-type"),
    ],
)
def test_two_third_party_plugins_in_conflict_fail_naming_both(first, second, what):
    pm = get_plugin_manager(autoload=False)
    pm.register(PluginObject(make_architecture(*first)), name="vendor-one")
    pm.register(PluginObject(make_architecture(*second)), name="vendor-two")
    with pytest.raises(PluginError) as info:
        load_registry(pm)
    message = str(info.value)
    assert "'vendor-one'" in message and "'vendor-two'" in message and what in message


def test_a_fallback_claim_does_not_conflict_with_a_specific_one():
    pm = get_plugin_manager(autoload=False)
    pm.register(PluginObject(make_architecture("gemma-special", ("gemma",))), name="acme")
    registry = load_registry(pm)
    assert registry.for_model_type("gemma").architecture.name == "gemma-special"
    assert registry.entries["generic"].architecture.claims("gemma")


def test_registering_something_else_than_an_architecture_names_the_plugin():
    pm = get_plugin_manager(autoload=False)
    pm.register(PluginObject(object()), name="acme")
    with pytest.raises(PluginError, match="plugin 'acme' registered <object .*>, not a named rmconvert.Architecture"):
        load_registry(pm)


class MisspelledHook:
    @hookimpl
    def rmconvert_register_architecture(self, register):  # singular: not a hook of rmconvert
        register(make_architecture("never", ("never",)))


def test_in_process_plugin_with_a_misspelled_hook_is_rejected_by_load_registry():
    pm = get_plugin_manager(autoload=False)
    pm.register(MisspelledHook(), name="typo-in-process")
    with pytest.raises(PluginError) as error:
        load_registry(pm)
    assert "rmconvert_register_architecture" in str(error.value) and "typo-in-process" in str(error.value)


# --- plugins installed as real distributions with an entry point --------------------------------

MYARCH = """\
    from rmconvert import Architecture, hookimpl


    class MyArch(Architecture):
        name = "myarch"
        model_types = ("qwen2",)
        sequence_classification_class = "Qwen2ForSequenceClassification"


    @hookimpl
    def rmconvert_register_architectures(register):
        register(MyArch())
"""

BROKEN = """\
    raise ImportError("libacme is not installed")
"""

TYPO = """\
    from rmconvert import Architecture, hookimpl


    @hookimpl
    def rmconvert_register_architecture(register):
        register(Architecture())
"""


def install_distribution(root: Path, dist: str, version: str, entry: str, module: str, source: str) -> Path:
    """pip-install a one-module distribution with an ``rmconvert`` entry point into ``root/site``."""
    project = root / dist
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=69", "wheel"]\nbuild-backend = "setuptools.build_meta"\n'
    )
    (project / "setup.cfg").write_text(
        f"[metadata]\nname = {dist}\nversion = {version}\n\n[options]\npy_modules = {module}\n\n"
        f"[options.entry_points]\n{ENTRY_POINT_GROUP} =\n    {entry} = {module}\n"
    )
    (project / f"{module}.py").write_text(textwrap.dedent(source))
    site = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run(
        [*pip, "--target", str(site), str(project)], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return site


@pytest.fixture(scope="module")
def myarch_site(tmp_path_factory):
    return install_distribution(
        tmp_path_factory.mktemp("myarch"), "rmconvert-myarch", "1.2.3", "myarch", "myarch_plugin", MYARCH
    )


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    return install_distribution(
        tmp_path_factory.mktemp("broken"), "rmconvert-broken", "0.0.1", "broken", "broken_plugin", BROKEN
    )


@pytest.fixture(scope="module")
def typo_site(tmp_path_factory):
    return install_distribution(tmp_path_factory.mktemp("typo"), "rmconvert-typo", "0.0.1", "typo", "typo_plugin", TYPO)


def run_rmconvert(*args: str, site: Path | None, cwd: Path, disable_autoload: bool = False):
    """``rmconvert ARGS`` in a fresh interpreter that sees ``site`` (installed plugins) on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != DISABLE_AUTOLOAD}
    paths = [str(site)] if site else []
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if disable_autoload:
        env[DISABLE_AUTOLOAD] = "1"
    command = [sys.executable, "-c", "from rmconvert.cli import main; main()", *args]
    return subprocess.run(command, check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_entry_point_plugin_is_listed_with_its_distribution(myarch_site, tmp_path):
    done = run_rmconvert("plugins", "--json", site=myarch_site, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {row["architecture"]: row for row in json.loads(done.stdout)}
    assert rows["myarch"] == {
        "architecture": "myarch",
        "plugin": "myarch",
        "distribution": "rmconvert-myarch",
        "version": "1.2.3",
        "model_types": ["qwen2"],
    }
    assert set(BUILTINS) <= set(rows)
    assert "qwen2" not in rows["generic"]["model_types"]  # now claimed by a specific plugin


def test_entry_point_plugin_converts_its_model_type(myarch_site, build, tmp_path):
    src, dst = build("qwen2"), tmp_path / "rm"
    done = run_rmconvert("convert", str(src), str(dst), "--json", site=myarch_site, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["architecture"] == "myarch"
    assert report["class"] == "Qwen2ForSequenceClassification"
    done = run_rmconvert("validate", str(dst), "--json", site=myarch_site, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["valid"] is True


def test_disabling_autoload_hides_entry_point_plugins(myarch_site, build, tmp_path):
    done = run_rmconvert("plugins", "--json", site=myarch_site, cwd=tmp_path, disable_autoload=True)
    assert done.returncode == 0, done.stderr
    rows = {row["architecture"]: row for row in json.loads(done.stdout)}
    assert set(rows) == BUILTIN
    assert "qwen2" in rows["generic"]["model_types"]
    done = run_rmconvert(
        "convert",
        str(build("qwen2")),
        str(tmp_path / "rm"),
        "--json",
        site=myarch_site,
        cwd=tmp_path,
        disable_autoload=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["architecture"] == "generic"


def test_broken_entry_point_plugin_fails_in_one_line_naming_itself(broken_site, tmp_path):
    done = run_rmconvert("plugins", site=broken_site, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "rmconvert: error: plugin 'broken' (broken_plugin) failed to load: ImportError: libacme is not installed"
    ]


def test_broken_entry_point_plugin_is_skipped_when_autoload_is_disabled(broken_site, tmp_path):
    done = run_rmconvert("plugins", "--json", site=broken_site, cwd=tmp_path, disable_autoload=True)
    assert done.returncode == 0, done.stderr
    assert {row["architecture"] for row in json.loads(done.stdout)} == BUILTIN


def test_misspelled_hook_in_an_entry_point_plugin_fails_check_pending_loudly(typo_site, tmp_path):
    done = run_rmconvert("plugins", site=typo_site, cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("rmconvert: error: plugin 'typo': ")
    assert "unknown hook 'rmconvert_register_architecture'" in lines[0]


def test_misspelled_hook_in_an_entry_point_plugin_raises_plugin_error_in_process(typo_site, monkeypatch):
    monkeypatch.syspath_prepend(str(typo_site))
    monkeypatch.delenv(DISABLE_AUTOLOAD, raising=False)
    with pytest.raises(PluginError) as info:
        get_plugin_manager()
    assert "plugin 'typo'" in str(info.value)
    assert "unknown hook 'rmconvert_register_architecture'" in str(info.value)
    # the same plugin is not even imported when autoload is off
    assert get_plugin_manager(autoload=False).get_plugin("typo") is None
