"""The patch embedding as a matrix product equals the convolution, inside the whole tower."""

import torch

from capfilt.models.patch_embedding import patches_as_products
from capfilt.models.tiny import tiny_config


def test_the_product_equals_the_convolution_and_the_tower_its_output():
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(0)
    model = BlipForConditionalGeneration(tiny_config(vocab_size=64, image_size=48)).eval()
    conv = model.vision_model.embeddings.patch_embedding
    pixels = torch.randn(3, 3, 48, 48)
    uneven = torch.randn(2, 3, 50, 44)  # not a whole number of patches: the convolution's answer
    with torch.no_grad():
        expected_uneven = conv(uneven)
        expected_patches = conv(pixels)
        expected = model.vision_model(pixel_values=pixels)[0]
        assert patches_as_products(model) == 1
        patches = conv(pixels)
        got = model.vision_model(pixel_values=pixels)[0]
        assert torch.equal(conv(uneven), expected_uneven)
    assert patches.shape == expected_patches.shape
    torch.testing.assert_close(patches, expected_patches, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(BlipForConditionalGeneration(model.config).state_dict())
