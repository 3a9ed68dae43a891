"""The captioner for BLIP-2 and InstructBLIP checkpoints: a frozen language model reading the
Q-Former's query outputs, through transformers' own ``generate``.

A batch is one ``generate`` call: the vision tower and Q-Former run once per image, and the
``num_captions`` captions of every image are its rows. Each caption stays seeded from (round
seed, image key, caption index), as BLIP's captioner seeds its rows, so a shard run again gives
the same captions. ``generate`` draws every row from one random stream, so ``RowDraws``, the
last logits processor, draws each row from its own generator and leaves ``generate``'s own draw
a single choice: a caption is the one ``torch.manual_seed(its seed)`` and a ``generate`` of its
image alone write, whatever its batch, up to rounding. A row's logits in a batch differ from
its logits alone in the last bits (at most 2e-6 on the tiny test models); a token changes only
where a draw or the top-p cut falls that close to a boundary, which no caption of
tests/test_lm_captioner.py or bench/lm_captioner.py did. Beam search is deterministic, batched
as it is.
"""

from __future__ import annotations

import torch
from transformers import (
    InstructBlipForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from capfilt.captioning.generation_length import fit_generation
from capfilt.captioning.guards import Caption
from capfilt.captioning.seeding import generators
from capfilt.captioning.settings import SamplingConfig
from capfilt.models.loading import LoadedModel


class RowDraws(LogitsProcessor):
    """Row ``i``'s next token drawn from ``generators[i]``, returned as the row's only finite
    score, so ``generate``'s own draw can pick nothing else.

    A row is drawn alone, as ``generate`` draws a batch of one (softmax, then ``multinomial``,
    which takes an exponential per vocabulary entry): the same random numbers, used the same
    way. Rows past their end token are drawn too; ``generate`` pads them."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        picks = torch.cat([torch.multinomial(scores[i : i + 1].softmax(dim=-1), 1, generator=g)
                           for i, g in enumerate(self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, picks, 0.0)


class LanguageModelCaptioner:
    """Pixel values of a batch of images -> ``num_captions`` captions per image."""

    def __init__(self, loaded: LoadedModel, sampling: SamplingConfig, seed: int):
        self.model = loaded.model
        self.processor = loaded.processor
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.sampling = sampling
        self.seed = seed
        config = self.model.config
        tokenizer = self.processor.tokenizer
        # The prompt after the image's query tokens: BLIP-2 places them before everything.
        prompt = tokenizer(sampling.prompt.strip(), add_special_tokens=False).input_ids
        bos = getattr(config.text_config, "bos_token_id", None)  # T5's config has none
        lead = [bos] if bos is not None and not config.text_config.is_encoder_decoder else []
        ids = [config.image_token_index] * config.num_query_tokens + lead + prompt
        self.input_ids = torch.tensor([ids], device=self.device)
        positions = getattr(config.text_config, "max_position_embeddings", None)
        if positions and not config.text_config.is_encoder_decoder:  # T5's are relative
            fit_generation(f"captioner model {self.model.name_or_path}", sampling.max_new_tokens,
                           len(ids), positions)
        # What ends a caption: generate's end tokens (one id or several); a row without one
        # ran to max_new_tokens.
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.instruct = isinstance(self.model, InstructBlipForConditionalGeneration)
        if self.instruct:
            qformer = self.processor.qformer_tokenizer(sampling.prompt.strip(), return_tensors="pt")
            self.qformer_inputs = {"qformer_input_ids": qformer.input_ids.to(self.device),
                                   "qformer_attention_mask": qformer.attention_mask.to(self.device)}
        else:
            self.qformer_inputs = {}

    def __call__(self, pixel_values: torch.Tensor, keys: list[str]) -> list[list[str]]:
        """The captions' texts, ``num_captions`` per image."""
        return [[c.text for c in group] for group in self.captions(pixel_values, keys)]

    @torch.inference_mode()
    def captions(self, pixel_values: torch.Tensor, keys: list[str]) -> list[list[Caption]]:
        """The captions with whether each ended before ``max_new_tokens`` (caption guards)."""
        n = self.sampling.num_captions
        if n == 0 or not keys:
            return [[] for _ in keys]
        pixels = pixel_values.to(self.device, self.dtype)
        # Every image needs its own prompt row: generate places image i's queries in row i.
        input_ids = self.input_ids.repeat(len(keys), 1)
        qformer_inputs = {name: ids.repeat(len(keys), 1)
                          for name, ids in self.qformer_inputs.items()}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # generate's own draw: the caller's stream
            out = self.model.generate(pixel_values=pixels, input_ids=input_ids,
                                      attention_mask=torch.ones_like(input_ids),
                                      **qformer_inputs, **self._options(keys))
        if not self.model.config.text_config.is_encoder_decoder:
            out = out[:, input_ids.shape[1] :]  # decoder-only output repeats the prompt
        texts = [self._caption(row) for row in out.tolist()]
        return [texts[i * n : (i + 1) * n] for i in range(len(keys))]

    def _options(self, keys: list[str]) -> dict:
        """``generate``'s settings; rows come image by image, ``num_captions`` each."""
        cfg = self.sampling
        options = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens,
                   "repetition_penalty": cfg.repetition_penalty,
                   "num_return_sequences": cfg.num_captions}
        if cfg.method == "beam":
            return {**options, "num_beams": cfg.num_beams, "do_sample": False}
        # generate puts a caller's processors before its own top-k and top-p: those are here,
        # before the draw, in generate's order, and generate's are off. Its other warpers
        # (a checkpoint's temperature, ...) would come after the draw and change nothing.
        last = []
        if cfg.top_k:
            last.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            last.append(TopPLogitsWarper(cfg.top_p))
        last.append(RowDraws(generators(self.seed, keys, cfg.num_captions, self.device)))
        return {**options, "do_sample": True, "top_k": 0, "top_p": 1.0,
                "logits_processor": LogitsProcessorList(last)}

    def _caption(self, row: list[int]) -> Caption:
        """A row's text up to its first end token (a batch pads the rest)."""
        end = next((i for i, token in enumerate(row) if token in self.eos_ids), None)
        text = self.processor.tokenizer.decode(row[:end], skip_special_tokens=True).strip()
        return Caption(text, ended=end is not None)
