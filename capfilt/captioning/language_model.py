"""The captioner for BLIP-2 and InstructBLIP checkpoints: a frozen language model reading the
Q-Former's query outputs, through transformers' own ``generate``.

Each caption is one ``generate`` call seeded from (round seed, image key, caption index), as
BLIP's captioner seeds its rows: a shard run again, in any batch, gives the same captions. That
is reproducible but not fast (one sequence per call); BLIP's own captioner batches its sampling.
"""

from __future__ import annotations

import torch
from transformers import InstructBlipForConditionalGeneration

from capfilt.captioning.generation_length import fit_generation
from capfilt.captioning.guards import Caption
from capfilt.captioning.seeding import caption_seed
from capfilt.captioning.settings import SamplingConfig
from capfilt.models.loading import LoadedModel


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
        bos = getattr(config.text_config, "bos_token_id", None)
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
        pixels = pixel_values.to(self.device, self.dtype)
        return [[self._one(pixels[i : i + 1], key, n) for n in range(self.sampling.num_captions)]
                for i, key in enumerate(keys)]

    def _one(self, pixels: torch.Tensor, key: str, index: int) -> Caption:
        cfg = self.sampling
        options = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens,
                   "repetition_penalty": cfg.repetition_penalty}
        if cfg.method == "beam":
            options.update(num_beams=cfg.num_beams, num_return_sequences=cfg.num_beams,
                           do_sample=False)
        else:
            options.update(do_sample=True, top_p=cfg.top_p, top_k=cfg.top_k or 0)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(caption_seed(self.seed, key, index))
            out = self.model.generate(pixel_values=pixels, input_ids=self.input_ids,
                                      attention_mask=torch.ones_like(self.input_ids),
                                      **self.qformer_inputs, **options)
        row = out[index if cfg.method == "beam" else 0]
        if not self.model.config.text_config.is_encoder_decoder:
            row = row[self.input_ids.shape[1] :]  # decoder-only output repeats the prompt
        text = self.processor.tokenizer.decode(row, skip_special_tokens=True).strip()
        return Caption(text, ended=not self.eos_ids.isdisjoint(row.tolist()))
