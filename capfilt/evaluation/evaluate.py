"""Evaluate a filter and a captioner the way the BLIP paper does.

Retrieval: ITC similarity for every image-text pair, then the top ``k`` of each row re-ranked
by ITM (score = ITM match logit + ITC similarity, BLIP's ``evaluation`` in
``train_retrieval.py``), recall@1/5/10 both ways. Captioning: BLEU-4 against the references
and, when the caller gives a judge, the fraction of captions it accepts (a task accuracy).

The test set is img2dataset shards; rows with identical image bytes are one image with several
reference captions, as COCO's five captions per image are when downloaded that way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from capfilt.captioning.blip_decoder import Captioner
from capfilt.captioning.settings import SamplingConfig
from capfilt.evaluation.bleu import corpus_bleu
from capfilt.images.decode import decode_image
from capfilt.images.transform import ImageTransform
from capfilt.models.loading import LoadedModel
from capfilt.scoring.blip_itm import MAX_TEXT_TOKENS, enc_token_id
from capfilt.shards.input_rows import SUCCESS
from capfilt.shards.reader import expand_inputs, read_shard

RECALL_AT = (1, 5, 10)


@dataclass
class EvalSet:
    """Images (encoded), their keys and reference captions; ``text_image[j]`` owns text j."""

    keys: list[str]
    images: list[bytes]
    references: list[list[str]]

    @property
    def texts(self) -> list[str]:
        return [t for refs in self.references for t in refs]

    @property
    def text_image(self) -> list[int]:
        return [i for i, refs in enumerate(self.references) for _ in refs]


def load_eval_set(patterns: list[str], limit: int | None = None) -> EvalSet:
    """Read test shards; successful rows only, grouped by identical image bytes."""
    by_image: dict[str, int] = {}
    keys, images, references = [], [], []
    for url in expand_inputs(patterns):
        for row in read_shard(url).table.to_pylist():
            if row["status"] != SUCCESS or not row["jpg"] or not row["caption"]:
                continue
            digest = hashlib.sha256(row["jpg"]).hexdigest()
            if digest in by_image:
                references[by_image[digest]].append(row["caption"])
                continue
            if limit is not None and len(keys) >= limit:
                continue
            by_image[digest] = len(keys)
            keys.append(row["key"])
            images.append(row["jpg"])
            references.append([row["caption"]])
    if not keys:
        raise ValueError(f"no image with a caption in {', '.join(patterns)}")
    return EvalSet(keys, images, references)


def pixel_batches(images: list[bytes], transform: ImageTransform, batch_size: int):
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        yield start, torch.stack([transform(decode_image(b)) for b in chunk])


@torch.inference_mode()
def retrieval_recall(loaded: LoadedModel, data: EvalSet, k: int = 16, batch_size: int = 64,
                     itm_token: str = "enc") -> dict[str, float]:
    """Image-to-text and text-to-image recall@1/5/10, ITC then ITM re-ranking of the top k."""
    model, tokenizer, device = loaded.model, loaded.processor.tokenizer, loaded.device
    transform = ImageTransform.from_processor(loaded.processor.image_processor)
    embeds, image_feats = [], []
    for _, pixels in pixel_batches(data.images, transform, batch_size):
        out = model.vision_model(pixel_values=pixels.to(device, loaded.dtype))[0]
        embeds.append(out)
        image_feats.append(F.normalize(model.vision_proj(out[:, 0, :]).float(), dim=-1))
    embeds, image_feats = torch.cat(embeds), torch.cat(image_feats)
    texts = data.texts
    tokens = tokenizer(texts, padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS,
                       return_tensors="pt").to(device)
    text_feats = []
    for start in range(0, len(texts), batch_size):
        ids = tokens.input_ids[start : start + batch_size]
        mask = tokens.attention_mask[start : start + batch_size]
        out = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        text_feats.append(F.normalize(model.text_proj(out[:, 0, :]).float(), dim=-1))
    sim = image_feats @ torch.cat(text_feats).t()
    itm_ids = tokens.input_ids.clone()
    if itm_token == "enc":
        itm_ids[:, 0] = enc_token_id(tokenizer, model.config.text_config)

    def itm(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        scores = []
        for start in range(0, len(image_index), batch_size):
            i = image_index[start : start + batch_size]
            t = text_index[start : start + batch_size]
            image = embeds[i]
            fused = model.text_encoder(
                input_ids=itm_ids[t], attention_mask=tokens.attention_mask[t],
                encoder_hidden_states=image,
                encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long, device=device),
            ).last_hidden_state
            scores.append(model.itm_head(fused[:, 0, :]).float()[:, 1])
        return torch.cat(scores)

    i2t = _rerank(sim, min(k, sim.shape[1]), lambda rows, cols: itm(rows, cols))
    t2i = _rerank(sim.t(), min(k, sim.shape[0]), lambda rows, cols: itm(cols, rows))
    text_image = torch.tensor(data.text_image)
    owns = text_image.unsqueeze(0) == torch.arange(len(data.keys)).unsqueeze(1)
    return {**_recall(i2t, owns, "i2t"), **_recall(t2i, owns.t(), "t2i")}


def _rerank(sim: torch.Tensor, k: int, itm: Callable) -> torch.Tensor:
    """Scores with -inf outside each row's top k and ITM logit + ITC similarity inside."""
    top = sim.topk(k, dim=1)
    rows = torch.arange(sim.shape[0]).repeat_interleave(k)
    cols = top.indices.reshape(-1).cpu()
    scores = torch.full(sim.shape, float("-inf"))
    scores[rows, cols] = itm(rows, cols).cpu() + top.values.reshape(-1).cpu()
    return scores


def _recall(scores: torch.Tensor, right: torch.Tensor, prefix: str) -> dict[str, float]:
    """Fraction of rows whose best right answer ranks within the top K."""
    order = scores.argsort(dim=1, descending=True)
    hits = right.gather(1, order)
    first = hits.float().argmax(dim=1)
    return {f"{prefix}_r{n}": round(float((first < n).float().mean()), 4) for n in RECALL_AT}


@torch.inference_mode()
def caption_quality(loaded: LoadedModel, data: EvalSet, sampling: SamplingConfig,
                    judge: Callable[[str, str], bool] | None = None,
                    batch_size: int = 64) -> tuple[dict[str, float], list[str]]:
    """BLEU-4 of one caption per image against its references; ``judge(key, caption)`` gives
    the task accuracy. Returns (metrics, captions)."""
    captioner = Captioner(loaded, sampling, seed=0)
    transform = ImageTransform.from_processor(loaded.processor.image_processor)
    captions: list[str] = []
    for start, pixels in pixel_batches(data.images, transform, batch_size):
        keys = data.keys[start : start + len(pixels)]
        captions += [texts[0] for texts in captioner(pixels, keys)]
    metrics = {"bleu4": round(corpus_bleu(captions, data.references), 4)}
    if judge is not None:
        right = sum(bool(judge(key, text)) for key, text in zip(data.keys, captions))
        metrics["caption_accuracy"] = round(right / len(captions), 4)
    return metrics, captions
