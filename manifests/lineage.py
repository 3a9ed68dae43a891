"""The rounds of a bootstrap: find their manifests under a folder and describe them.

Reads manifests only, so it works on any machine that can see the folder (no models, no Ray).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import fsspec

from manifests.job import JOB_KINDS
from manifests.round import RoundManifest
from manifests.store import MANIFEST_NAME, ManifestError, read_json, read_manifest


def _local(path: str) -> bool:
    return "://" not in path


def parent_as_stored(round_dir: str, parent: str | None) -> str | None:
    """A local parent named relative to the round folder, so a bootstrap's rounds moved or
    copied together keep their chain; a URL as given."""
    if parent is None or not (_local(parent) and _local(round_dir)):
        return parent
    return os.path.relpath(os.path.abspath(parent), os.path.abspath(round_dir))


def parent_folder(round_dir: str, parent: str | None) -> str | None:
    """Where a round's parent is: relative to its folder, as capfilt stores it; else as given
    (manifests written before parents were stored so named them from the working folder)."""
    if not parent or os.path.isabs(parent) or not (_local(parent) and _local(round_dir)):
        return parent
    beside = os.path.normpath(os.path.join(round_dir, parent))
    return beside if os.path.isfile(os.path.join(beside, MANIFEST_NAME)) else parent


@dataclass
class FoundRound:
    folder: str
    manifest: RoundManifest


def find_rounds(root: str, depth: int = 3) -> tuple[list[FoundRound], list[str]]:
    """Rounds under ``root`` (its own manifest too), by round number; and the folders whose
    manifest.json could not be read, with why."""
    fs, path = fsspec.core.url_to_fs(root)
    path = path.rstrip("/")
    candidates = [f"{path}/{MANIFEST_NAME}"]
    for level in range(1, depth + 1):
        candidates += fs.glob(f"{path}/{'*/' * level}{MANIFEST_NAME}")
    found, problems = [], []
    for manifest_path in sorted(p for p in dict.fromkeys(candidates) if fs.isfile(p)):
        folder = manifest_path[: -len(MANIFEST_NAME) - 1]
        # Shown as the user named the root: "rounds/round-0001", not an absolute path.
        url = root.rstrip("/") + folder[len(path):] if folder.startswith(path) else folder
        try:
            if read_json(f"{url}/{MANIFEST_NAME}").get("kind") in JOB_KINDS:
                continue  # a training, eval or bootstrap job of the same tree, not a round
            found.append(FoundRound(url, read_manifest(url)))
        except (ManifestError, KeyError, TypeError, ValueError, OSError) as exc:
            problems.append(f"{url}: {exc}")
    found.sort(key=lambda r: (r.manifest.round, r.folder))
    return found, problems


def kept_fraction(manifest: RoundManifest, source: str) -> float | None:
    texts = manifest.totals.texts_by_source.get(source, 0)
    return manifest.totals.kept_by_source.get(source, 0) / texts if texts else None


def model_source(manifest: RoundManifest, role: str) -> str:
    return next((m.source for m in manifest.models if m.role == role), "-")


def summary_row(found: FoundRound) -> dict:
    """One line of ``capfilt rounds``, as data."""
    m = found.manifest
    return {
        "round": m.round, "folder": found.folder, "parent": parent_folder(found.folder, m.parent),
        "status": m.status,
        "captioner": model_source(m, "captioner"), "filter": model_source(m, "filter"),
        "rows_in": m.totals.rows_in, "scored": m.totals.rows_out,
        "rejected": m.totals.rows_rejected,
        "kept_web": kept_fraction(m, "web"), "kept_synthetic": kept_fraction(m, "synthetic"),
    }


def describe(folder: str, manifest: RoundManifest) -> str:
    """A manifest as readable text: what went in, what ran, what came out."""
    t = manifest.totals
    p = manifest.parameters
    lines = [
        f"round {manifest.round} ({manifest.status}) in {folder}",
        f"  parent: {parent_folder(folder, manifest.parent) or '-'}",
        f"  created {manifest.created_at}, finished {manifest.finished_at}",
    ]
    for model in manifest.models:
        sha = (model.weights_sha256 or "-")[:12]
        lines.append(f"  {model.role}: {model.source} ({model.model_class}, weights {sha})")
    lines.append(f"  sampling: {json.dumps(p.get('sampling', {}), sort_keys=True)}")
    lines.append(f"  policy: {json.dumps(p.get('policy', {}), sort_keys=True)}; "
                 f"seed {p.get('seed')}, dtype {p.get('dtype')}, batch {p.get('batch_size')}")
    lines.append(f"  inputs: {len(manifest.inputs)} shards, {t.rows_in} rows; "
                 f"{t.shards_done} done, {t.shards_failed} failed")
    lines.append(f"  rows: {t.rows_out} scored, {t.rows_rejected} rejected "
                 f"{json.dumps(t.rejects_by_reason, sort_keys=True)}")
    for source in ("web", "synthetic"):
        fraction = kept_fraction(manifest, source)
        shown = "-" if fraction is None else f"{fraction:.1%}"
        lines.append(f"  {source} texts kept: {t.kept_by_source.get(source, 0)} of "
                     f"{t.texts_by_source.get(source, 0)} ({shown})")
    lines.append(f"  images with no kept text: {t.images_without_kept}")
    if "guards" in p:  # rounds before caption guards recorded none
        lines.append(f"  caption guards: {json.dumps(p['guards'], sort_keys=True)}; synthetic "
                     f"captions set aside {json.dumps(t.guarded_by_reason, sort_keys=True)}")
    for shard in manifest.shards:
        extra = f", tar {shard.webdataset_samples} samples" if shard.webdataset else ""
        state = shard.status if shard.status == "done" else f"FAILED: {shard.error}"
        lines.append(f"  shard {shard.index:05d}: {shard.rows_in} in, {shard.rows_out} scored, "
                     f"{shard.rows_rejected} rejected{extra} [{state}] <- {shard.input}")
    timings = manifest.timings
    lines.append(f"  time: {timings.get('wall_seconds', 0):.1f}s wall, "
                 f"{timings.get('images_per_second', 0):.1f} images/s")
    lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in sorted(manifest.versions.items())))
    return "\n".join(lines)
