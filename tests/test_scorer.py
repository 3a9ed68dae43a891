"""The filter: per-pair ITM and ITC equal Hugging Face's, with one vision pass per image."""

import itertools

import pytest
import torch

from capfilt.scoring.blip_itm import MAX_TEXT_TOKENS, Scorer, pad_right


# one chunk sorted by length; length buckets of 2 across images; one text, no padding
@pytest.mark.parametrize("text_batch", [256, 2, 1])
@pytest.mark.parametrize("itm_token", ["cls", "enc"])
def test_scores_equal_transformers_per_pair(loaded, itm_token, text_batch):
    """'cls' is HF's forward as it is; 'enc' is HF's forward with BLIP's [ENC] first."""
    scorer = Scorer(loaded["filter"], itm_token=itm_token, text_batch_size=text_batch)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = [["a red circle", "a blue square on the left"], ["two dogs"],
             ["x", "a picture of a cat", "the sky " * 40]]
    itm, itc = scorer(images, texts)
    model, tokenizer = loaded["filter"].model, loaded["filter"].processor.tokenizer
    for i, group in enumerate(texts):
        for j, text in enumerate(group):
            tokens = tokenizer([text], truncation=True, max_length=35, return_tensors="pt")
            itm_ids = tokens.input_ids.clone()
            if itm_token == "enc":
                itm_ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")
            with torch.no_grad():
                match = model(pixel_values=images[i : i + 1], input_ids=itm_ids,
                              attention_mask=tokens.attention_mask, use_itm_head=True)
                cosine = model(pixel_values=images[i : i + 1], input_ids=tokens.input_ids,
                               attention_mask=tokens.attention_mask, use_itm_head=False)
            assert itm[i][j] == pytest.approx(match.itm_score.softmax(-1)[0, 1].item(), abs=1e-5)
            assert itc[i][j] == pytest.approx(cosine.itm_score[0, 0].item(), abs=1e-5)


def test_vision_encoder_runs_once_per_image(loaded):
    model = loaded["filter"].model
    counted = []
    original = model.vision_model.forward

    def counting_forward(pixel_values=None, **kwargs):
        counted.append(pixel_values.shape[0])
        return original(pixel_values=pixel_values, **kwargs)

    model.vision_model.forward = counting_forward
    try:
        Scorer(loaded["filter"], text_batch_size=2)(
            torch.randn(4, 3, 32, 32), [["a", "b", "c"], ["d"], [], ["e", "f", "g", "h"]]
        )
    finally:
        model.vision_model.forward = original
    assert counted == [4]


def test_enc_and_cls_give_different_itm_but_the_same_itc(loaded):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = [["a red circle"], ["a blue square"]]
    enc_itm, enc_itc = Scorer(loaded["filter"], itm_token="enc")(images, texts)
    cls_itm, cls_itc = Scorer(loaded["filter"], itm_token="cls")(images, texts)
    assert enc_itc == cls_itc
    assert enc_itm != cls_itm


def test_each_text_chunk_projects_only_its_own_images_keys(loaded):
    """Texts are scored in chunks; a chunk's cross-attention keys come from its own images
    only, so a big batch does not project every image's tokens once per chunk."""
    model = loaded["filter"].model
    layer = next(m for name, m in model.text_encoder.named_modules()
                 if name.endswith("crossattention.self"))
    projected = []
    hook = layer.key.register_forward_hook(lambda m, args, out: projected.append(args[0].shape[0]))
    try:
        texts = [["a", "b", "c"], ["d"], [], ["e", "f"]]  # owners 0 0 0 1 3 3
        Scorer(loaded["filter"], text_batch_size=2)(torch.randn(4, 3, 32, 32), texts)
    finally:
        hook.remove()
    # ITM passes only (the unimodal ITC pass has no cross-attention): chunks [0 0] [0 1] [3 3]
    assert projected == [1, 2, 1]


def test_chunks_are_padded_as_the_tokenizer_pads_them(loaded):
    """The scorer tokenises a batch once and pads each chunk itself (``pad_right``): ids and
    mask must equal the tokenizer's own ``padding="longest"``, truncation included."""
    tokenizer = loaded["filter"].processor.tokenizer
    texts = ["a", "a red circle on a blue ground", "word " * 60, "", "two  spaces"]
    ids = tokenizer(texts, truncation=True, max_length=MAX_TEXT_TOKENS).input_ids
    expected = tokenizer(texts, padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS,
                         return_tensors="pt")
    got_ids, got_mask = pad_right(ids, tokenizer.pad_token_id)
    assert torch.equal(got_ids, expected.input_ids)
    assert torch.equal(got_mask, expected.attention_mask)


def test_length_buckets_give_each_text_its_own_scores(loaded):
    """Texts are scored sorted by token length and put back: each score must be its own text's
    and image's, as scoring the text alone, in a call of its own, gives it."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # lengths run against the owners' order, so sorting moves every text
    texts = [["the sky " * 20, "a dog on a red sofa"], ["a small house by the sea", "cat"],
             ["two birds", "a"], ["an old man with a long white beard", "sea " * 30]]
    scorer = Scorer(loaded["filter"], text_batch_size=3)
    itm, itc = scorer(images, texts)
    alone = [[scorer(images[i : i + 1], [[text]]) for text in group]
             for i, group in enumerate(texts)]
    alone_itm = [[pair[0][0][0] for pair in group] for group in alone]
    alone_itc = [[pair[1][0][0] for pair in group] for group in alone]
    for got, want in ((itm, alone_itm), (itc, alone_itc)):
        flat = [score for group in want for score in group]
        # any two texts' scores lie further apart than the tolerance: a swap would show
        assert min(abs(a - b) for a, b in itertools.combinations(flat, 2)) > 2e-6
        for got_group, want_group in zip(got, want):
            assert got_group == pytest.approx(want_group, abs=1e-6)
