"""A round shard as a webdataset tar for training loaders (open_clip, webdataset, Ray Data).

Each image with at least one kept text becomes ``{key}.jpg``, ``{key}.txt`` (the first kept
caption: for a ranking policy, the best) and ``{key}.json`` (every kept caption with its
source and scores). Images with no kept text are left out: a loader would train on nothing.
The tar is built in memory with fixed member metadata, so the same rows give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile

import pyarrow as pa

from capfilt.rounds.kept_texts import kept_texts

_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def member_stem(key: str) -> str:
    """The key itself when it is a plain name; else ``sha256=`` and a hash of it (keys with
    ``/``, ``..`` or dots would make paths or split webdataset's grouping). A plain name has
    no ``=``, so a hashed stem never equals a literal one. The key is always in the json."""
    if _SAFE_KEY.fullmatch(key):
        return key
    return "sha256=" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def webdataset_tar(rows: pa.Table) -> tuple[bytes, int]:
    """The tar's bytes and the number of samples in it."""
    buffer = io.BytesIO()
    samples = 0
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for row in rows.to_pylist():
            kept = kept_texts(row)
            if not kept or not row["jpg"]:
                continue
            stem = member_stem(row["key"])
            meta = {
                "key": row["key"], "url": row["url"], "width": row["width"],
                "height": row["height"], "captions": [k.caption for k in kept],
                "sources": [k.source for k in kept], "itm": [k.itm for k in kept],
                "itc": [k.itc for k in kept],
            }
            _add(archive, f"{stem}.jpg", row["jpg"])
            _add(archive, f"{stem}.txt", kept[0].caption.encode("utf-8"))
            _add(archive, f"{stem}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
            samples += 1
    return buffer.getvalue(), samples


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    archive.addfile(info, io.BytesIO(data))
