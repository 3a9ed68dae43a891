"""Training checkpoints: written whole or not at all, found again after a crash.

``DIR/step-000120/state.pt`` holds the task's weights, the optimiser and schedule, the step and
the loss history. The folder is written under a temporary name and renamed, so a checkpoint
that exists is complete; the last ``keep`` are kept. Loading uses ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def save_checkpoint(root: Path, step: int, state: dict, keep: int = 2) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    staging = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    torch.save(state, staging / "state.pt")
    with open(staging / "state.pt", "rb") as handle:
        os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
