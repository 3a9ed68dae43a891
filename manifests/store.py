"""Atomic JSON store on any fsspec filesystem: write to a temporary name, then rename."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import fsspec

from manifests.round import RoundManifest

MANIFEST_NAME = "manifest.json"
# Names of temporary files, visible or not (earlier versions wrote "NAME.tmp-<8 hex digits>").
TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}$")


class ManifestError(RuntimeError):
    """A manifest is missing, unreadable or not a capfilt round manifest."""


def write_json_atomic(url: str, data: Any) -> None:
    """Write ``data`` as JSON at ``url`` so readers see the old file or the new one, never half."""
    write_text_atomic(url, json.dumps(data, indent=2) + "\n")


def write_text_atomic(url: str, text: str) -> None:
    """Write ``text`` at ``url`` under a temporary name, then rename."""
    write_bytes_atomic(url, text.encode("utf-8"))


def temporary_name(path: str) -> str:
    """A hidden name beside ``path``: dataset readers (pyarrow, Ray Data, fsspec globs) skip
    names that start with "." or "_", so a writer killed mid-write leaves nothing they read."""
    folder, _, name = path.rpartition("/")
    hidden = f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    return f"{folder}/{hidden}" if folder else hidden


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` under a temporary name in the same folder, then rename over ``url``.

    A failed write (out of disk, say) leaves no half-written file behind; a killed writer
    leaves a hidden one, which the next run of the round sweeps (capfilt/rounds/folder.py).
    """
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = temporary_name(path)
    try:
        with fs.open(tmp, "wb") as handle:
            handle.write(data)
    except OSError:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    fs.mv(tmp, path)


def read_json(url: str) -> Any:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "r") as handle:
        return json.load(handle)


def write_manifest(round_dir: str, manifest: RoundManifest) -> str:
    """Write ``manifest.json`` in ``round_dir``: the round's commit point."""
    url = f"{round_dir.rstrip('/')}/{MANIFEST_NAME}"
    write_json_atomic(url, manifest.to_dict())
    return url


def read_manifest(round_dir: str) -> RoundManifest:
    url = f"{round_dir.rstrip('/')}/{MANIFEST_NAME}"
    try:
        data = read_json(url)
    except FileNotFoundError as exc:
        raise ManifestError(f"{url}: no manifest (the round never finished?)") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{url}: not valid JSON ({exc})") from exc
    if data.get("kind") != "capfilt-round":
        raise ManifestError(f"{url}: not a capfilt round manifest")
    return RoundManifest.from_dict(data)
