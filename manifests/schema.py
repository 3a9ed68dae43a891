"""The round manifest's JSON Schema, shipped with the package, and validation against it."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    text = resources.files("manifests").joinpath("round.schema.json").read_text()
    return json.loads(text)


def validate_manifest(data: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` when ``data`` is not a valid round manifest."""
    validator = jsonschema.Draft202012Validator(
        load_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    validator.validate(data)
