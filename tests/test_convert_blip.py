"""``capfilt convert-blip``: a state dict in salesforce/BLIP's key layout (made from a tiny
Hugging Face model with BLIP's names, plus the momentum and queue entries its checkpoints
carry) converts back to a model that computes exactly what the source model computes."""

import re

import pytest
import torch
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.models.convert_blip import ConversionError, convert_checkpoint
from capfilt.models.tiny import tiny_config, tiny_processor
from pipelines.cli import main

# salesforce/BLIP's module names (models/vit.py, models/blip*.py), written out independently
# of the converter: transformers' name -> the original name.
TO_ORIGINAL = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.",
     r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
]


def original_layout(model: torch.nn.Module, extra: dict) -> dict:
    state = {}
    for key, tensor in model.state_dict().items():
        for pattern, replacement in TO_ORIGINAL:
            key = re.sub(pattern, replacement, key)
        state[key] = tensor.clone()
    return {**state, **extra}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A folder with the config and processor (what --processor-from names)."""
    folder = tmp_path_factory.mktemp("reference")
    processor = tiny_processor()
    config = tiny_config(len(processor.tokenizer))
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, config, processor


def inputs(processor):
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    text = processor.tokenizer(["a red circle", "two blue squares"], padding=True,
                               return_tensors="pt")
    return pixels, text


def test_a_retrieval_checkpoint_converts_to_a_filter_with_the_same_scores(
    reference, tmp_path, capsys
):
    folder, config, processor = reference
    torch.manual_seed(0)
    source = BlipForImageTextRetrieval(config).eval()
    momentum = {f"{k.replace('vision_model', 'visual_encoder_m', 1)}": v
                for k, v in list(source.state_dict().items())[:3]}
    training = {"image_queue": torch.zeros(8, 4), "text_queue": torch.zeros(8, 4),
                "idx_queue": torch.zeros(1, 4), "ptr_queue": torch.zeros(1, dtype=torch.long),
                "temp": torch.tensor(0.07), "text_encoder_m.embeddings.position_ids":
                torch.arange(4), "vision_proj_m.weight": torch.zeros(2, 2)}
    original = original_layout(source, {**momentum, **training})
    assert "visual_encoder.blocks.1.attn.qkv.weight" in original
    assert "visual_encoder.cls_token" in original and "itm_head.weight" in original
    pth = tmp_path / "model_base_retrieval_coco.pth"
    torch.save({"model": original, "config": {"note": "as the original files"}}, pth)
    out = tmp_path / "filter"
    assert main(["convert-blip", str(pth), "--kind", "filter", "--out", str(out),
                 "--processor-from", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "dropped 10: momentum encoders and queues" in printed
    converted = BlipForImageTextRetrieval.from_pretrained(out).eval()
    assert converted.state_dict().keys() == source.state_dict().keys()
    pixels, text = inputs(processor)
    with torch.no_grad():
        for itm in (True, False):
            ours = converted(pixel_values=pixels, use_itm_head=itm, **text)
            theirs = source(pixel_values=pixels, use_itm_head=itm, **text)
            assert torch.equal(ours[0], theirs[0])


def test_a_pretraining_checkpoint_gives_the_captioner_its_decoder(reference, tmp_path):
    folder, config, processor = reference
    torch.manual_seed(0)
    source = BlipForConditionalGeneration(config).eval()
    torch.manual_seed(5)
    filter_half = BlipForImageTextRetrieval(config).state_dict()
    other = {k: v for k, v in filter_half.items() if not k.startswith("vision_model")}
    original = original_layout(source, {**other, "text_decoder_m.cls.predictions.bias":
                                        torch.zeros(3), "temp": torch.tensor(0.07)})
    pth = tmp_path / "model_base_capfilt_large.pth"
    torch.save({"model": original}, pth)
    out = tmp_path / "captioner"
    conversion = convert_checkpoint(pth, "captioner", out, str(folder))
    assert len(conversion.dropped["the other model's part of the checkpoint"]) == len(other)
    converted = BlipForConditionalGeneration.from_pretrained(out).eval()
    pixels, text = inputs(processor)
    with torch.no_grad():
        assert torch.equal(converted(pixel_values=pixels, **text).logits,
                           source(pixel_values=pixels, **text).logits)
        generated = [m.generate(pixel_values=pixels, max_new_tokens=5, do_sample=False)
                     for m in (converted, source)]
    assert torch.equal(*generated)


def test_checkpoints_that_do_not_convert_cleanly_are_refused(reference, tmp_path):
    folder, config, _ = reference
    source = BlipForImageTextRetrieval(config)
    original = original_layout(source, {})
    del original["itm_head.weight"]
    torch.save({"model": original}, tmp_path / "missing.pth")
    with pytest.raises(ConversionError, match=r"missing \['itm_head.weight'\]"):
        convert_checkpoint(tmp_path / "missing.pth", "filter", tmp_path / "o", str(folder))
    torch.save({"model": {**original_layout(source, {}), "mystery.weight": torch.zeros(1)}},
               tmp_path / "extra.pth")
    with pytest.raises(ConversionError, match="mystery.weight"):
        convert_checkpoint(tmp_path / "extra.pth", "filter", tmp_path / "o", str(folder))

    class Payload:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"model": Payload()}, tmp_path / "pickle.pth")
    with pytest.raises(ConversionError, match="not a tensors-only"):
        convert_checkpoint(tmp_path / "pickle.pth", "filter", tmp_path / "o", str(folder))
