"""The round manifest's JSON Schema, shipped with the package, and validation against it."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema


@lru_cache(maxsize=4)
def load_schema(name: str = "round") -> dict[str, Any]:
    """The JSON Schema ``round`` (a CapFilt round) or ``job`` (training, eval, bootstrap)."""
    text = resources.files("manifests").joinpath(f"{name}.schema.json").read_text()
    return json.loads(text)


def validate_manifest(data: dict[str, Any], name: str = "round") -> None:
    """Raise ``jsonschema.ValidationError`` when ``data`` is not a valid manifest of ``name``."""
    validator = jsonschema.Draft202012Validator(
        load_schema(name), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    validator.validate(data)
