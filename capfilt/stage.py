"""The CapFilt step: input rows -> (scored rows, reject rows), both Arrow tables.

Decode each image once (in threads), caption it, score the web caption and every synthetic
caption, and record what the policy keeps. The same object runs in a test, in a plain loop
and inside a Ray actor.
"""

from __future__ import annotations

import html
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import torch

from capfilt.captioner import Captioner, SamplingConfig
from capfilt.captioners import make_captioner
from capfilt.images import ImageRejected, ImageTransform, decode_image
from capfilt.models import load_model
from capfilt.scorer import Scorer
from capfilt.scorers import make_scorer
from capfilt.selection import Policy, candidates, select
from capfilt.shard_reader import SUCCESS

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("jpg", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("web_caption", pa.string()),
        ("web_itm", pa.float32()),
        ("web_itc", pa.float32()),
        ("synthetic_captions", pa.list_(pa.string())),
        ("synthetic_itm", pa.list_(pa.float32())),
        ("synthetic_itc", pa.list_(pa.float32())),
        ("kept_captions", pa.list_(pa.string())),
        ("kept_sources", pa.list_(pa.string())),
    ]
)
REJECT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("jpg", pa.binary()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)


@dataclass(frozen=True)
class StageConfig:
    """Everything a worker needs to build the step; plain data, so it pickles to Ray actors."""

    captioner: str
    filter: str
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    policy: Policy = field(default_factory=Policy)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    itm_token: str = "enc"
    decode_threads: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


_TAG = re.compile(r"<[^>]{0,500}>")


def clean_caption(text: str | None) -> str | None:
    """The web caption as text: HTML tags dropped, entities decoded, whitespace collapsed.

    Empty becomes None: the image then has no web text, and its synthetic captions alone are
    scored.
    """
    if text is None:
        return None
    if "<" in text or "&" in text:
        text = html.unescape(_TAG.sub(" ", text))
    text = " ".join(text.split())
    return text or None


class CapFiltStage:
    """Input rows (``shard_reader.INPUT_SCHEMA``) -> (``OUTPUT_SCHEMA``, ``REJECT_SCHEMA``)."""

    def __init__(self, captioner: Captioner, scorer: Scorer, policy: Policy,
                 caption_transform: ImageTransform, filter_transform: ImageTransform,
                 decode_threads: int = 2):
        self.captioner = captioner
        self.scorer = scorer
        self.policy = policy
        self.caption_transform = caption_transform
        self.filter_transform = filter_transform
        self.same_transform = filter_transform == caption_transform  # then resize once
        self.pool = ThreadPoolExecutor(max_workers=max(1, decode_threads))
        self.max_rows: int | None = None  # lowered when a batch ran out of memory

    @classmethod
    def from_config(cls, config: StageConfig) -> CapFiltStage:
        captioner_model = load_model(config.captioner, "captioner", config.device, config.dtype)
        filter_model = load_model(config.filter, "filter", config.device, config.dtype)
        return cls(
            make_captioner(captioner_model, config.sampling, config.seed),
            make_scorer(filter_model, config.itm_token),
            config.policy,
            ImageTransform.from_processor(captioner_model.processor.image_processor),
            ImageTransform.from_processor(filter_model.processor.image_processor),
            config.decode_threads,
        )

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        return self.compute(self.prepare(table))

    def prepare(self, table: pa.Table) -> Prepared:
        """The CPU half: decode and transform every image (threads). Runs ahead of ``compute``."""
        rows = table.to_pylist()
        prepared = Prepared()
        for row, decoded in zip(rows, self.pool.map(self._prepare, rows)):
            if isinstance(decoded, ImageRejected):
                prepared.rejects.append(reject_row(row, decoded.reason, str(decoded)))
            else:
                prepared.good.append((row, *decoded))
        return prepared

    def compute(self, prepared: Prepared) -> tuple[pa.Table, pa.Table]:
        """The model half: caption, score and select the decoded images.

        Out of memory, the batch is split in halves and retried, and later batches stay at the
        size that fitted; only an image that fails alone is rejected (``out_of_memory``).
        """
        out, rejects = [], list(prepared.rejects)
        good = prepared.good
        step = self.max_rows or len(good) or 1
        for start in range(0, len(good), step):
            out += self._score_fitting(good[start : start + step], rejects)
        return (
            pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA),
            pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA),
        )

    def _score_fitting(self, good: list, rejects: list[dict]) -> list[dict]:
        try:
            return self._score(good)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            message = " ".join(str(exc).split())[:300]
        release_memory()
        if len(good) == 1:
            rejects.append(reject_row(good[0][0], "out_of_memory", message))
            return []
        half = len(good) // 2
        self.max_rows = half
        log.warning("out of memory on %d images; retrying in batches of %d", len(good), half)
        return self._score_fitting(good[:half], rejects) + self._score_fitting(good[half:], rejects)

    def _prepare(self, row: dict):
        """Decode once and build both models' pixels; a rejected image comes back as the error."""
        if row["status"] != SUCCESS:
            # img2dataset's own status (failed_to_download, failed_to_resize) is the reason.
            return ImageRejected(row["status"] or "failed", row["error_message"] or "no image")
        try:
            image = decode_image(row["jpg"])
        except ImageRejected as exc:
            return exc
        caption_pixels = self.caption_transform(image)
        filter_pixels = (
            caption_pixels
            if self.same_transform
            else self.filter_transform(image)
        )
        return caption_pixels, filter_pixels, image.size

    def _score(self, good) -> list[dict]:
        keys = [row["key"] for row, *_ in good]
        synthetic = self.captioner(torch.stack([g[1] for g in good]), keys)
        webs = [clean_caption(row["caption"]) for row, *_ in good]
        texts = [([web] if web else []) + caps for web, caps in zip(webs, synthetic)]
        itm, itc = self.scorer(torch.stack([g[2] for g in good]), texts)
        out = []
        for (row, _, _, (width, height)), web, caps, itm_i, itc_i in zip(
            good, webs, synthetic, itm, itc
        ):
            offset = 1 if web else 0
            web_itm = itm_i[0] if web else None
            web_itc = itc_i[0] if web else None
            kept = select(
                candidates(web, web_itm, web_itc, caps, itm_i[offset:], itc_i[offset:]),
                self.policy,
            )
            out.append(
                {
                    "key": row["key"],
                    "url": row["url"],
                    "jpg": row["jpg"],
                    "width": width,
                    "height": height,
                    "web_caption": web,
                    "web_itm": web_itm,
                    "web_itc": web_itc,
                    "synthetic_captions": caps,
                    "synthetic_itm": itm_i[offset:],
                    "synthetic_itc": itc_i[offset:],
                    "kept_captions": [c.text for c in kept],
                    "kept_sources": [c.source for c in kept],
                }
            )
        return out


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Prepared:
    """A batch after decoding: usable rows with their pixels, and the rows already rejected."""

    good: list = field(default_factory=list)  # (row, caption pixels, filter pixels, size)
    rejects: list[dict] = field(default_factory=list)


def reject_row(row: dict, reason: str, message: str) -> dict:
    return {
        "key": row["key"],
        "url": row["url"],
        "caption": row["caption"],
        "jpg": row["jpg"],
        "status": row["status"],
        "reason": reason,
        "message": message,
    }
