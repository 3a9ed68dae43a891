"""The manifest's JSON Schema ships inside the package, found the way an installed copy finds it."""

import json
import tomllib
from importlib import resources
from pathlib import Path


def test_the_schema_is_package_data_found_by_importlib_resources():
    schema = resources.files("manifests").joinpath("round.schema.json")
    assert schema.is_file()
    data = json.loads(schema.read_text())
    assert data["properties"]["kind"] == {"const": "capfilt-round"}
    assert "webdataset" in data["$defs"]["shard"]["properties"]
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert "*.schema.json" in project["tool"]["setuptools"]["package-data"]["manifests"]
