"""What every job manifest records alike: time stamps, versions, parent manifests."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import capfilt


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def job_versions() -> dict[str, str]:
    """Installed versions, read from package metadata: a round's driver never imports torch."""
    return {"capfilt": capfilt.__version__, "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "transformers", "ray")}}


def parent_manifest(source: str) -> str | None:
    """The manifest a data or model source was written with, when there is one.

    A round folder, a training output or a model folder inside one (``OUT/filter``)."""
    path = Path(source.partition("@")[0])
    for folder in (path, path.parent):
        if (folder / "manifest.json").is_file():
            return str(folder / "manifest.json")
    return None
