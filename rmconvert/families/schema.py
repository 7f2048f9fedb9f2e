"""Check configs against the JSON schemas (draft 2020-12) of the built-in and plugin architectures.

jsonschema is imported on first use: ``convert`` checks the output config while its copies run.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from .. import schemas

if TYPE_CHECKING:
    from referencing import Registry


@cache
def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@cache
def _registry() -> Registry:
    """Every built-in schema, addressable by its ``$id`` (``urn:rmconvert:schema:<name>``)."""
    from referencing import Registry, Resource

    resources = [Resource.from_contents(_load(p)) for p in sorted(schemas.HERE.glob("*.schema.json"))]
    return Registry().with_resources((r.id(), r) for r in resources)


def schema_errors(config: dict, schema_path: Path) -> list[str]:
    """Violations of the schema at ``schema_path`` by ``config``, each as ``<pointer>: <message>``."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(_load(Path(schema_path)), registry=_registry())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def config_schema(architecture, config: dict) -> Path:
    """The schema a reward-model config must satisfy: the architecture's, or for a kept MLP head (config
    ``score_inner_size``, docs/heads.md) the kept-head schema."""
    if type(config.get("score_inner_size")) is int:
        return schemas.path("kept-head-reward-model")
    return architecture.schema
