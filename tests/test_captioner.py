"""The captioner: per-image seeding, the prompt removed by tokens, and agreement with HF generate."""

import torch

from capfilt.captioner import Captioner, SamplingConfig
from capfilt.sampling import row_uniforms
from capfilt.seeding import caption_seed


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
