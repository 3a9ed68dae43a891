"""What every job manifest records alike: time stamps, versions, parent manifests."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

import capfilt


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def job_versions() -> dict[str, str]:
    import ray

    return {"capfilt": capfilt.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "ray": ray.__version__}


def parent_manifest(source: str) -> str | None:
    """The manifest a data or model source was written with, when there is one.

    A round folder, a training output or a model folder inside one (``OUT/filter``)."""
    path = Path(source.partition("@")[0])
    for folder in (path, path.parent):
        if (folder / "manifest.json").is_file():
            return str(folder / "manifest.json")
    return None
