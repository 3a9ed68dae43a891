"""The captioner: BLIP's image-grounded decoder writing synthetic captions.

Nucleus sampling with a per-image seed (BLIP's CapFilt), or beam search. The vision encoder
runs once per image; the decoder's cross-attention keys and values are cached after the first
step and reused for every later token.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from capfilt.captioning.generation_length import fit_generation
from capfilt.captioning.guards import Caption
from capfilt.captioning.sampling import (
    apply_repetition_penalty,
    row_uniforms,
    sample_candidates,
    sample_rows,
    top_k_top_p,
)
from capfilt.captioning.seeding import generators
from capfilt.captioning.settings import SamplingConfig
from capfilt.models.attention import captions_share_image, uses_sdpa
from capfilt.models.loading import LoadedModel
from capfilt.models.transfer import LaterFlag


class Captioner:
    """Pixel values of a batch of images -> ``num_captions`` captions per image."""

    def __init__(self, loaded: LoadedModel, sampling: SamplingConfig, seed: int):
        self.model = loaded.model
        self.tokenizer = loaded.processor.tokenizer
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.sampling = sampling
        self.seed = seed
        text_config = self.model.config.text_config
        self.bos_id = text_config.bos_token_id
        self.eos_id = text_config.sep_token_id
        self.pad_id = text_config.pad_token_id
        # BLIP's prompt handling: [CLS] becomes [DEC], the trailing [SEP] is dropped.
        # BLIP's task tokens are not "special" to its tokenizer: never let them into a caption.
        self.task_ids = {self.bos_id, self.bos_id + 1}
        ids = self.tokenizer(sampling.prompt, add_special_tokens=True).input_ids[:-1]
        self.prompt_ids = torch.tensor([self.bos_id] + ids[1:], device=self.device)
        # Past its positions every shard would fail with a shape error: refuse at the start.
        fit_generation(f"captioner model {self.model.name_or_path}", sampling.max_new_tokens,
                       self.prompt_ids.numel(), text_config.max_position_embeddings)
        # Stop checks a step late on a GPU: reading "all finished" at once would drain the queue
        # every step (the host then launches the next step onto an idle GPU). The late check
        # costs one decoding step per batch, whose tokens are padding past every caption's end.
        self.late_stop_check = self.device.type == "cuda"
        # top-k: sample among the top-k tokens only, not over the whole vocabulary (sampling.py)
        self.candidates = sampling.top_k is not None and 0 < sampling.top_k < text_config.vocab_size

    def __call__(self, pixel_values: torch.Tensor, keys: list[str]) -> list[list[str]]:
        """The captions' texts, ``num_captions`` per image."""
        return [[c.text for c in group] for group in self.captions(pixel_values, keys)]

    @torch.inference_mode()
    def captions(self, pixel_values: torch.Tensor, keys: list[str]) -> list[list[Caption]]:
        """The captions with whether each ended before ``max_new_tokens`` (caption guards)."""
        if self.sampling.num_captions == 0 or not keys:
            return [[] for _ in keys]
        pixels = pixel_values.to(self.device, self.dtype)
        image_embeds = self.model.vision_model(pixel_values=pixels)[0]
        if self.sampling.method == "beam":
            tokens = self._beam(image_embeds)
        else:
            rows = generators(self.seed, keys, self.sampling.num_captions)
            tokens = self._sample(image_embeds, rows)
        texts = self._decode(tokens)
        n = self.sampling.num_captions
        return [texts[i * n : (i + 1) * n] for i in range(len(keys))]

    def _sample(self, image_embeds: torch.Tensor, rows: list[torch.Generator]) -> torch.Tensor:
        cfg = self.sampling
        captions = image_embeds.shape[0] * cfg.num_captions
        if cfg.num_captions > 1 and uses_sdpa(self.model):  # image K/V once, not per caption
            embeds = image_embeds
            shared = captions_share_image(self.model.text_decoder, cfg.num_captions)
        else:
            embeds = image_embeds.repeat_interleave(cfg.num_captions, dim=0)
            shared = nullcontext()
        uniforms = row_uniforms(rows, cfg.max_new_tokens, self.device)
        with shared:
            tokens, held = self._sample_loop(embeds, captions, uniforms, self.candidates)
            if not bool(held):  # a k-th logit with more ties than TIE_ROOM: the whole vocabulary
                tokens, _ = self._sample_loop(embeds, captions, uniforms, candidates=False)
        return tokens

    def _sample_loop(self, embeds, captions: int, uniforms, candidates: bool):
        """(new tokens per caption, whether every step's candidates held their ties)."""
        cfg = self.sampling
        sequence = self.prompt_ids.unsqueeze(0).repeat(captions, 1)
        finished = torch.zeros(captions, dtype=torch.bool, device=self.device)
        held = torch.ones((), dtype=torch.bool, device=self.device)
        step_input, cache, all_done = sequence, None, None
        for step in range(cfg.max_new_tokens):
            # No image mask: every image token is attended, and transformers would check an
            # all-ones mask at each step (``mask.all()``), waiting for the GPU's queue.
            out = self.model.text_decoder(
                input_ids=step_input,
                encoder_hidden_states=embeds,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.cache
            logits = out.logits[:, -1, :].float()
            apply_repetition_penalty(logits, sequence, cfg.repetition_penalty)
            if step < cfg.min_new_tokens:
                logits[:, self.eos_id] = float("-inf")
            if candidates:
                token, row_held = sample_candidates(logits, cfg.top_k, cfg.top_p, uniforms[:, step])
                held &= (row_held | finished).all()  # a finished row's draw is padding anyway
            else:
                token = sample_rows(top_k_top_p(logits, cfg.top_k, cfg.top_p), uniforms[:, step])
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            sequence = torch.cat([sequence, token.unsqueeze(1)], dim=1)
            finished |= token == self.eos_id
            if self.late_stop_check:  # the previous step's answer, then queue this one's
                if all_done is not None and all_done.value():
                    break
                all_done = LaterFlag(finished.all())
            elif bool(finished.all()):
                break
            step_input = token.unsqueeze(1)
        return sequence[:, self.prompt_ids.numel() :], held

    def _beam(self, image_embeds: torch.Tensor) -> torch.Tensor:
        cfg = self.sampling
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device)
        prompt = self.prompt_ids.unsqueeze(0).repeat(image_embeds.shape[0], 1)
        out = self.model.text_decoder.generate(
            input_ids=prompt,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            num_beams=cfg.num_beams,
            num_return_sequences=cfg.num_captions,
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens,
            repetition_penalty=cfg.repetition_penalty,
            do_sample=False,
        )
        return out[:, self.prompt_ids.numel() :]

    def _decode(self, tokens: torch.Tensor) -> list[Caption]:
        """Each row's text up to its end token; a row without one ran to ``max_new_tokens``."""
        texts = []
        for row in tokens.tolist():
            ended = self.eos_id in row
            if ended:
                row = row[: row.index(self.eos_id)]
            row = [t for t in row if t not in self.task_ids]
            texts.append(Caption(self.tokenizer.decode(row, skip_special_tokens=True).strip(),
                                 ended))
        return texts
