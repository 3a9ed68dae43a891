"""The captioner: per-image seeding, the prompt removed by tokens, and agreement with HF generate."""

import torch

from capfilt.captioning.blip_decoder import Captioner
from capfilt.captioning.sampling import (
    TIE_ROOM,
    apply_repetition_penalty,
    row_uniforms,
    sample_candidates,
    sample_rows,
    top_k_top_p,
)
from capfilt.captioning.seeding import caption_seed
from capfilt.captioning.settings import SamplingConfig


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_captions_depend_on_the_image_key_not_on_batch_mates(loaded):
    captioner = Captioner(loaded["captioner"], SamplingConfig(num_captions=2), seed=7)
    images, keys = pixels(6), [f"k{i}" for i in range(6)]
    whole = captioner(images, keys)
    assert all(len(c) == 2 for c in whole)
    in_pairs = captioner(images[:2], keys[:2]) + captioner(images[2:4], keys[2:4]) + captioner(
        images[4:], keys[4:]
    )
    reordered = captioner(images.flip(0), keys[::-1])[::-1]
    assert whole == in_pairs == reordered
    # Two captions of one image differ (their seeds differ), and another seed changes them.
    assert any(a != b for a, b in whole)
    assert Captioner(loaded["captioner"], SamplingConfig(num_captions=2), seed=8)(images, keys) != whole


def test_greedy_decoding_matches_transformers_generate(loaded):
    """With top-k 1 the sampler is greedy: it must give generate()'s tokens, prompt removed."""
    settings = SamplingConfig(top_k=1, max_new_tokens=8, min_new_tokens=3, repetition_penalty=1.1)
    captioner = Captioner(loaded["captioner"], settings, seed=0)
    images = pixels(3, seed=1)
    ours = captioner(images, ["a", "b", "c"])
    model, tokenizer = loaded["captioner"].model, loaded["captioner"].processor.tokenizer
    prompt = tokenizer(["a picture of "] * 3, return_tensors="pt")
    out = model.generate(pixel_values=images, input_ids=prompt.input_ids, do_sample=False,
                         max_new_tokens=8, min_new_tokens=3, repetition_penalty=1.1)
    prompt_length = prompt.input_ids.shape[1] - 1  # generate dropped the trailing [SEP]
    expected = []
    for row in out[:, prompt_length:].tolist():
        sep = tokenizer.sep_token_id
        row = row[: row.index(sep)] if sep in row else row
        expected.append([tokenizer.decode(row, skip_special_tokens=True).strip()])
    assert ours == expected


def test_prompt_is_removed_and_lengths_are_respected(loaded):
    settings = SamplingConfig(max_new_tokens=5, min_new_tokens=5, num_captions=3)
    captioner = Captioner(loaded["captioner"], settings, seed=0)
    for captions in captioner(pixels(2), ["x", "y"]):
        for caption in captions:
            assert not caption.startswith("a picture of")
            # A token decodes to at most one word (word pieces join their word).
            assert 1 <= len(caption.split()) <= 5


def test_beam_search_is_deterministic_and_returns_distinct_beams(loaded):
    settings = SamplingConfig(method="beam", num_beams=3, num_captions=2, max_new_tokens=6)
    captioner = Captioner(loaded["captioner"], settings, seed=0)
    first = captioner(pixels(2), ["x", "y"])
    assert first == captioner(pixels(2), ["other", "keys"])
    assert all(len(c) == 2 and c[0] != c[1] for c in first)


def test_task_tokens_never_reach_a_caption(loaded):
    """[DEC] and [ENC] are ordinary vocabulary to the tokenizer, so decode would print them."""
    settings = SamplingConfig(num_captions=8, max_new_tokens=16, top_k=None, top_p=1.0)
    captioner = Captioner(loaded["captioner"], settings, seed=0)
    captions = [c for group in captioner(pixels(8), [str(i) for i in range(8)]) for c in group]
    assert not any("[DEC]" in c or "[ENC]" in c for c in captions)


def test_each_rows_uniforms_are_its_generators_draws_one_at_a_time():
    """The decoder draws all of a row's uniforms before the first step; they are the numbers
    one draw per step would give, so a caption does not depend on how they were drawn."""
    seeds = [caption_seed(0, key, 0) for key in ("a", "b", "c")]
    together = row_uniforms([torch.Generator().manual_seed(s) for s in seeds], 20, "cpu")
    one_at_a_time = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        one_at_a_time.append(torch.stack([torch.rand((), generator=g) for _ in range(20)]))
    assert torch.equal(together, torch.stack(one_at_a_time))


def test_a_stop_check_one_step_late_writes_the_same_captions(loaded):
    """On a GPU the "all finished" check reads the previous step's answer, so that the host
    never waits for the queue mid-decoding: the captions must not change, at one extra step."""
    model = loaded["captioner"].model
    eos = model.config.text_config.sep_token_id
    bias = model.text_decoder.cls.predictions.decoder.bias
    saved = bias.detach().clone()
    calls = []
    hook = model.text_decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            bias[eos] += 6.0  # most captions end within a few tokens, all before the limit
        settings = SamplingConfig(max_new_tokens=30, num_captions=2)
        captions, steps = {}, {}
        for late in (False, True):
            captioner = Captioner(loaded["captioner"], settings, seed=3)
            captioner.late_stop_check = late
            calls.clear()
            captions[late] = captioner(pixels(5, seed=4), [f"k{i}" for i in range(5)])
            steps[late] = len(calls)
    finally:
        hook.remove()
        with torch.no_grad():
            bias.copy_(saved)
    assert steps[False] < settings.max_new_tokens  # the early stop was reached
    assert steps[True] == steps[False] + 1
    assert captions[True] == captions[False]
    assert any(len(c.split()) > 1 for row in captions[False] for c in row)


def bf16_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Peaked logits rounded to bfloat16 (ties near the k-th are common), some then divided
    by a repetition penalty, in float32 as the sampler gets them."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(torch.bfloat16).float()
    seen = torch.randint(0, vocab, (rows, 6), generator=g)
    apply_repetition_penalty(logits, seen, 1.1)
    return logits


def test_sampling_among_the_top_k_draws_what_the_whole_vocabulary_draws():
    vocab, top_k, top_p = 30524, 50, 0.9
    logits = bf16_logits(2048, vocab, seed=5)
    uniform = torch.rand(2048, generator=torch.Generator().manual_seed(6))
    full = sample_rows(top_k_top_p(logits, top_k, top_p), uniform)
    fast, held = sample_candidates(logits, top_k, top_p, uniform)
    assert bool(held.all())
    assert torch.equal(fast, full)
    # ties at the k-th logit were there to be broken (by token id, as the full sort does)
    kth = torch.topk(logits, top_k).values[:, -1:]
    assert ((logits == kth).sum(dim=1) > 1).sum() > 50
    # a row whose k-th logit has more ties than the candidates hold is reported
    logits[7] = 0.0
    _, held = sample_candidates(logits, top_k, top_p, uniform)
    assert held.tolist() == [i != 7 for i in range(2048)]


def test_captions_fall_back_to_the_whole_vocabulary_when_ties_overflow(loaded):
    """A decoder whose logits are all equal ties every token: the candidates cannot hold the
    ties, and the captions must be those of sampling over the whole vocabulary."""
    model = loaded["captioner"].model
    head = model.text_decoder.cls.predictions
    saved = {name: p.detach().clone() for name, p in head.named_parameters()}
    vocab = model.config.text_config.vocab_size
    settings = SamplingConfig(top_k=4, max_new_tokens=6)  # top-k + TIE_ROOM < vocab
    assert settings.top_k + TIE_ROOM < vocab
    try:
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
        captioner = Captioner(loaded["captioner"], settings, seed=1)
        assert captioner.candidates
        fast = captioner(pixels(3), ["a", "b", "c"])
        captioner.candidates = False
        assert fast == captioner(pixels(3), ["a", "b", "c"])
    finally:
        with torch.no_grad():
            for name, p in head.named_parameters():
                p.copy_(saved[name])
