"""The CapFilt step: input rows -> (scored rows, reject rows), both Arrow tables.

Decode each image once (capfilt/images/batch_decoding.py), caption it, set aside the synthetic
captions a caption guard refuses (capfilt/captioning/guards.py), score the web caption and every
other synthetic caption, and record what the policy keeps. The same object runs in a test, in a
plain loop and inside a Ray actor.
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from capfilt.captioning.blip_decoder import Captioner
from capfilt.captioning.for_checkpoint import make_captioner
from capfilt.captioning.guards import CaptionGuards, guard
from capfilt.images.batch_decoding import ProcessDecoder, ThreadDecoder
from capfilt.images.decode import ImageRejected
from capfilt.images.torch_jpeg import TorchJpegDecoder
from capfilt.images.transform import ImageTransform
from capfilt.models.loading import load_model
from capfilt.scoring.blip_itm import Scorer
from capfilt.scoring.for_checkpoint import make_scorer
from capfilt.scoring.selection import Policy, candidates, select
from capfilt.step.stage_config import Placement, StageConfig

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
        # Per synthetic caption: the caption guard's reason, null where it passed and was scored.
        ("synthetic_guard", pa.list_(pa.string())),
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
    """Input rows (``input_rows.INPUT_SCHEMA``) -> (``OUTPUT_SCHEMA``, ``REJECT_SCHEMA``).

    ``guards``: which synthetic captions are set aside unscored (default: every guard on).
    """

    def __init__(self, captioner: Captioner, scorer: Scorer, policy: Policy,
                 caption_transform: ImageTransform, filter_transform: ImageTransform,
                 decode_threads: int = 2, decode_processes: int = 0,
                 guards: CaptionGuards = CaptionGuards(), jpeg_decoder: str = "pil"):
        self.captioner = captioner
        self.scorer = scorer
        self.policy = policy
        self.guards = guards
        self.caption_transform = caption_transform
        self.filter_transform = filter_transform
        # decode_processes > 0: decoding in that many processes (GPU workers:
        # capfilt/images/batch_decoding.py)
        self.decoder = (ProcessDecoder(caption_transform, filter_transform, decode_processes)
                        if decode_processes else
                        ThreadDecoder(caption_transform, filter_transform, decode_threads))
        if jpeg_decoder == "torchvision":  # JPEGs in torch on the captioner's device
            self.decoder = TorchJpegDecoder(caption_transform, filter_transform,
                                            str(captioner.device), self.decoder)
        self.max_rows: int | None = None  # lowered when a batch ran out of memory

    @classmethod
    def from_config(cls, config: StageConfig,
                    placement: Placement = Placement()) -> CapFiltStage:
        """The stage a worker runs: both models loaded (``from_pretrained``, refused when their
        weights do not fill them) on ``placement.device`` in ``config.dtype``, with the
        sampling, policy, caption guards, seed and ITM token ``config`` names, decoding images
        as ``placement`` says."""
        device = placement.device
        captioner_model = load_model(config.captioner, "captioner", device, config.dtype,
                                     config.attention)
        filter_model = load_model(config.filter, "filter", device, config.dtype,
                                  config.attention)
        return cls(
            make_captioner(captioner_model, config.sampling, config.seed),
            make_scorer(filter_model, config.itm_token),
            config.policy,
            ImageTransform.from_processor(captioner_model.processor.image_processor),
            ImageTransform.from_processor(filter_model.processor.image_processor),
            placement.decode_threads,
            placement.decode_processes,
            config.guards,
            placement.jpeg_decoder,
        )

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        return self.compute(self.prepare(table))

    def close(self) -> None:
        """Stop the decoding threads or processes."""
        self.decoder.close()

    def prepare(self, table: pa.Table) -> Prepared:
        """The CPU half: decode and resize every image (threads or processes) and stack each
        model's pixels into one uint8 batch, in pinned memory for a GPU. Runs ahead of
        ``compute``."""
        rows = table.to_pylist()
        decoded = self.decoder(rows, pin=torch.device(self.captioner.device).type == "cuda")
        prepared = Prepared(caption_pixels=decoded.caption_pixels,
                            filter_pixels=decoded.filter_pixels)
        for row, outcome in zip(rows, decoded.outcomes):
            if isinstance(outcome, ImageRejected):
                prepared.rejects.append(reject_row(row, outcome.reason, str(outcome)))
            else:
                prepared.rows.append(row)
                prepared.sizes.append(outcome)
        return prepared

    def compute(self, prepared: Prepared) -> tuple[pa.Table, pa.Table]:
        """The model half: caption, score and select the decoded images.

        Out of memory, the batch is split in halves and retried, and later batches stay at the
        size that fitted; only an image that fails alone is rejected (``out_of_memory``).
        """
        out, rejects = [], list(prepared.rejects)
        step = self.max_rows or len(prepared) or 1
        for start in range(0, len(prepared), step):
            out += self._score_fitting(prepared.slice(start, start + step), rejects)
        return (
            pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA),
            pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA),
        )

    def _score_fitting(self, batch: Prepared, rejects: list[dict]) -> list[dict]:
        try:
            return self._score(batch)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            message = " ".join(str(exc).split())[:300]
        release_memory()
        if len(batch) == 1:
            rejects.append(reject_row(batch.rows[0], "out_of_memory", message))
            return []
        half = len(batch) // 2
        self.max_rows = half
        log.warning("out of memory on %d images; retrying in batches of %d", len(batch), half)
        return (self._score_fitting(batch.slice(0, half), rejects)
                + self._score_fitting(batch.slice(half, len(batch)), rejects))

    def device_pixels(self, batch: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
        """The captioner's and the filter's float32 pixels for ``batch``, on their devices.

        uint8 crosses to the GPU (a quarter of float32's bytes, and once when both models
        share the transform) and is normalised there, the whole batch in one kernel.
        """
        caption = self.caption_transform.normalize(
            batch.caption_pixels.to(self.captioner.device, non_blocking=True))
        if batch.filter_pixels is batch.caption_pixels:
            return caption, caption
        return caption, self.filter_transform.normalize(
            batch.filter_pixels.to(self.scorer.device, non_blocking=True))

    def _score(self, batch: Prepared) -> list[dict]:
        keys = [row["key"] for row in batch.rows]
        caption_pixels, filter_pixels = self.device_pixels(batch)
        generated = self.captioner.captions(caption_pixels, keys)
        reasons = [[guard(c, self.guards) for c in group] for group in generated]
        passed = [[c.text for c, why in zip(group, whys) if why is None]
                  for group, whys in zip(generated, reasons)]
        webs, texts = scored_texts(batch.rows, passed)
        itm, itc = self.scorer(filter_pixels, texts)
        out = []
        for row, (width, height), web, group, whys, itm_i, itc_i in zip(
            batch.rows, batch.sizes, webs, generated, reasons, itm, itc
        ):
            offset = 1 if web else 0
            web_itm = itm_i[0] if web else None
            web_itc = itc_i[0] if web else None
            caps = [c.text for c in group]
            synthetic_itm = unguarded_scores(itm_i[offset:], whys)
            synthetic_itc = unguarded_scores(itc_i[offset:], whys)
            kept = select(
                candidates(web, web_itm, web_itc, caps, synthetic_itm, synthetic_itc, whys),
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
                    "synthetic_itm": synthetic_itm,
                    "synthetic_itc": synthetic_itc,
                    "kept_captions": [c.text for c in kept],
                    "kept_sources": [c.source for c in kept],
                    "synthetic_guard": whys,
                }
            )
        return out


def scored_texts(rows: list[dict], synthetic: list[list[str]]):
    """Each row's cleaned web caption (None if empty) and the texts the filter scores for it:
    the web caption, when there is one, then its synthetic captions."""
    webs = [clean_caption(row["caption"]) for row in rows]
    return webs, [([web] if web else []) + caps for web, caps in zip(webs, synthetic)]


def unguarded_scores(scores: list[float], reasons: list[str | None]) -> list[float | None]:
    """The scores of the captions that passed their guards, in place among all of an image's
    synthetic captions: None where a guard set the caption aside (it was never scored)."""
    given = iter(scores)
    return [next(given) if reason is None else None for reason in reasons]


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Prepared:
    """A batch after decoding: the usable rows, their sizes and stacked uint8 pixels per model
    (one tensor when both models share the transform), and the rows already rejected."""

    rows: list[dict] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    caption_pixels: torch.Tensor | None = None
    filter_pixels: torch.Tensor | None = None
    rejects: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def slice(self, start: int, end: int) -> Prepared:
        """Rows ``start:end`` and their pixels (views); no rejects."""
        caption = self.caption_pixels[start:end]
        shared = self.filter_pixels is self.caption_pixels
        return Prepared(self.rows[start:end], self.sizes[start:end], caption,
                        caption if shared else self.filter_pixels[start:end])


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
