"""BLIP's attention through SDPA, and cross-attention K/V once per image, against Hugging
Face's eager modules on the same weights."""

import torch

from capfilt.captioning.blip_decoder import Captioner
from capfilt.captioning.settings import SamplingConfig
from capfilt.models.attention import image_kv_once, use_sdpa
from capfilt.models.loading import load_model
from capfilt.scoring.blip_itm import Scorer

TEXTS = [["a red square", "two birds on a wire", "a picture of nothing at all"],
         ["a dog"], [], ["a blue circle on the left", "a"]]


def _pixels(loaded, count: int = 4) -> torch.Tensor:
    size = loaded.processor.image_processor.size["height"]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_every_blip_attention_module_is_swapped(tiny_models):
    eager = load_model(str(tiny_models["filter"]), "filter", attention="eager")
    layers = eager.model.config.vision_config.num_hidden_layers
    text_layers = eager.model.config.text_config.num_hidden_layers
    # vision self-attention + text self- and cross-attention per layer
    assert use_sdpa(eager.model) == layers + 2 * text_layers


def test_filter_scores_match_eager_attention_with_kv_once_per_image(tiny_models):
    eager = load_model(str(tiny_models["filter"]), "filter", attention="eager")
    fast = load_model(str(tiny_models["filter"]), "filter")
    pixels = _pixels(eager)
    itm_e, itc_e = Scorer(eager)(pixels, TEXTS)
    itm_f, itc_f = Scorer(fast)(pixels, TEXTS)
    flat = lambda groups: torch.tensor([v for g in groups for v in g])  # noqa: E731
    assert len(flat(itm_e)) == 6
    assert torch.allclose(flat(itm_e), flat(itm_f), atol=1e-5)
    assert torch.allclose(flat(itc_e), flat(itc_f), atol=1e-5)
    # Scores of texts batched in small chunks (several chunks per image) agree too.
    itm_c, _ = Scorer(fast, text_batch_size=2)(pixels, TEXTS)
    assert torch.allclose(flat(itm_e), flat(itm_c), atol=1e-5)


def test_kv_once_gives_the_fused_states_of_per_text_image_copies(tiny_models):
    fast = load_model(str(tiny_models["filter"]), "filter")
    model = fast.model
    with torch.inference_mode():
        images = model.vision_model(pixel_values=_pixels(fast, 3))[0]
        owners = torch.tensor([0, 0, 2, 1, 2])
        ids = torch.randint(5, 40, (5, 7), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        copied = model.text_encoder(input_ids=ids, attention_mask=mask,
                                    encoder_hidden_states=images[owners]).last_hidden_state
        with image_kv_once(model.text_encoder, images, owners) as per_text:
            shared = model.text_encoder(input_ids=ids, attention_mask=mask,
                                        encoder_hidden_states=per_text).last_hidden_state
        # Outside the context the modules read their inputs again.
        again = model.text_encoder(input_ids=ids, attention_mask=mask,
                                   encoder_hidden_states=images[owners]).last_hidden_state
    assert torch.allclose(copied, shared, atol=1e-5)
    assert torch.equal(copied, again)


def test_captions_match_eager_attention_greedy_and_beam(tiny_models):
    eager = load_model(str(tiny_models["captioner"]), "captioner", attention="eager")
    fast = load_model(str(tiny_models["captioner"]), "captioner")
    pixels = _pixels(eager)
    keys = ["a", "b", "c", "d"]
    for sampling in (SamplingConfig(top_k=1, max_new_tokens=8),  # greedy through the KV cache
                     SamplingConfig(method="beam", num_beams=3, max_new_tokens=8)):
        assert Captioner(eager, sampling, seed=0)(pixels, keys) == \
            Captioner(fast, sampling, seed=0)(pixels, keys)
    with torch.inference_mode():
        ids = torch.randint(5, 40, (4, 6), generator=torch.Generator().manual_seed(2))
        logits_e = eager.model(pixel_values=pixels, input_ids=ids).logits
        logits_f = fast.model(pixel_values=pixels, input_ids=ids).logits
    assert torch.allclose(logits_e, logits_f, atol=1e-5)


def test_captions_of_one_image_share_its_cross_attention_keys(tiny_models):
    """Several sampled captions per image: the same captions as with the image embeddings
    copied per caption (the eager path), with the image tokens projected once per image."""
    eager = load_model(str(tiny_models["captioner"]), "captioner", attention="eager")
    fast = load_model(str(tiny_models["captioner"]), "captioner")
    sampling = SamplingConfig(num_captions=3, max_new_tokens=8)
    keys = ["a", "b", "c", "d"]
    layer = next(m for name, m in fast.model.text_decoder.named_modules()
                 if name.endswith("crossattention.self"))
    projected = []
    hook = layer.key.register_forward_hook(lambda m, args, out: projected.append(args[0].shape[0]))
    try:
        shared = Captioner(fast, sampling, seed=0)(_pixels(fast), keys)
    finally:
        hook.remove()
    assert shared == Captioner(eager, sampling, seed=0)(_pixels(eager), keys)
    assert projected == [4]  # once, at the first step; later steps read the cache
