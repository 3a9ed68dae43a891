"""The settings of BLIP's evaluation, and one evaluation job: plain data, read by ``capfilt
eval``'s flags and the bootstrap's [eval] alike, importing neither torch nor transformers."""

from __future__ import annotations

from dataclasses import dataclass, fields

from capfilt.scoring.selection import check_whole


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How BLIP's evaluation runs, for ``capfilt eval`` and a bootstrap's [eval] alike: ITM
    re-ranks the ``k`` best texts by ITC per image; captions come from beam search
    (``num_beams``, ``max_new_tokens``); ``limit`` takes the first test images only; ``judge``
    (``world:TRUTH_DIR``) adds caption accuracy against the demo world's truth."""

    k: int = 16
    num_beams: int = 3
    max_new_tokens: int = 20
    limit: int | None = None
    judge: str | None = None

    def __post_init__(self):
        for name in ("k", "num_beams", "max_new_tokens"):
            check_whole(name, getattr(self, name), 1)
        if self.limit is not None:
            check_whole("limit", self.limit, 1)

    def settings(self) -> dict:
        """These settings alone, without the fields a subclass adds."""
        return {f.name: getattr(self, f.name) for f in fields(EvalSettings)}


@dataclass(frozen=True, kw_only=True)
class EvalJob(EvalSettings):
    """One evaluation: the test shards, the filter and/or captioner, where the manifest goes."""

    data: tuple[str, ...]
    filter: str | None = None
    captioner: str | None = None
    output: str | None = None
    device: str = "cpu"
    prompt: str = "a picture of "  # "" for a pre-trained model: its LM saw no prompt
