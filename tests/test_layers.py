"""The package's folders are its pipeline: each layer imports only the layers below it, and no module comes back to
itself through others. Function-level (lazy) imports count too: they are dependencies all the same."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import rmconvert

ROOT = Path(rmconvert.__file__).parent
#: Bottom to top: where a checkpoint comes from -> what each tensor is -> the plan and the bytes -> the doctor
#: -> the kit -> the command line. ``rmconvert`` itself is the public facade above them all.
LAYERS = (
    ("rmconvert.errors", "rmconvert.dtypes", "rmconvert.schemas"),
    ("rmconvert.io",),
    ("rmconvert.sources",),
    ("rmconvert.families",),
    ("rmconvert.engine",),
    ("rmconvert.doctor",),
    ("rmconvert.testing", "rmconvert.tiny_vlm", "rmconvert.conformance", "rmconvert.coverage", "rmconvert.demo"),
    ("rmconvert.cli",),
)


def layer(module: str) -> int | None:
    for level, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return level
    return None


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, path: Path, known: dict[str, Path]) -> set[tuple[str, str]]:
    """(imported rmconvert module, name taken) for every import in ``path``, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {(a.name, "") for a in node.names if a.name.startswith("rmconvert")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("rmconvert"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                package_data = base == "rmconvert" and alias.name in ("schemas", "plugins")  # installed beside
                out.add((sub, "") if sub in known or package_data else (base, alias.name))
    return out


def graph() -> dict[str, set[tuple[str, str]]]:
    known = modules()
    return {m: {(t, n) for t, n in imports(m, p, known) if t != m} for m, p in known.items()}


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "rmconvert" and layer(m) is None and ".plugins" not in m] == []


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module, targets in graph().items():
        if layer(module) is None:
            continue  # the facade and the built-in plugins sit above every layer
        for target, name in targets:
            if target == "rmconvert" and name == "__version__":
                continue  # set before the facade imports anything
            if layer(target) is None or layer(target) > layer(module):
                upward.append(f"{module} -> {target}{'.' + name if name else ''}")
    assert upward == []


def test_no_import_cycles():
    edges = {m: {t for t, _ in ts if t in graph_modules} for m, ts in graph().items() if m != "rmconvert"}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert cycles == []


graph_modules = set(modules()) - {"rmconvert"}


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk resolves relative imports at any depth (else the tests above would pass on anything)."""
    source = tmp_path / "rmconvert" / "sources" / "fake.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from ..engine.plan import Plan\n    from . import hub\n")
    known = {"rmconvert.engine.plan": Path(), "rmconvert.sources.hub": Path()}
    found = imports("rmconvert.sources.fake", source, known)
    assert found == {("rmconvert.engine.plan", "Plan"), ("rmconvert.sources.hub", "")}
    assert layer("rmconvert.engine.plan") > layer("rmconvert.sources.fake")


def test_the_flat_package_names_still_import_with_a_warning():
    """A plugin written against the flat package (``from rmconvert.host import load_registry``) keeps working: each
    old module name is the module that now holds its code, and importing it says where that is."""
    for old, new in rmconvert.MOVED.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        assert [str(w.message) for w in caught if w.category is DeprecationWarning] == [f"{old} is now {new}"]
        assert old.rpartition(".")[2] not in {p.stem for p in ROOT.glob("*.py")}  # the file really moved
    with pytest.raises(ImportError):
        importlib.import_module("rmconvert.no_such_module")
