"""A BLIP-2 ITM checkpoint as the filter, chosen by its own config: scores equal transformers'
``Blip2ForImageTextRetrieval`` forward, pair by pair, with the image encoded once."""

import json
import shutil

import pytest
import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor

from capfilt.models.loading import load_model, model_class
from capfilt.models.source import ModelSourceError, check_model_source
from capfilt.models.tiny import tiny_processor
from capfilt.scoring.blip2_itm import Blip2Scorer
from capfilt.scoring.for_checkpoint import make_scorer
from capfilt.shards.reader import read_shard
from capfilt.step.stage import CapFiltStage
from capfilt.step.stage_config import StageConfig


@pytest.fixture(scope="module")
def blip2_filter(tmp_path_factory):
    blip = tiny_processor()
    processor = Blip2Processor(image_processor=blip.image_processor, tokenizer=blip.tokenizer)
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                       "initializer_range": 0.02},
        qformer_config={"vocab_size": len(processor.tokenizer), "hidden_size": 32,
                        "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 64, "encoder_hidden_size": 32,
                        "max_position_embeddings": 64, "use_qformer_text_input": True},
        num_query_tokens=4, image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("blip2") / "filter"
    Blip2ForImageTextRetrieval(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_the_config_picks_blip2_and_scores_match_transformers(blip2_filter):
    loaded = load_model(str(blip2_filter), "filter")
    assert isinstance(loaded.model, Blip2ForImageTextRetrieval)
    scorer = make_scorer(loaded, "enc")
    assert isinstance(scorer, Blip2Scorer)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    texts = [["a red circle", "two blue squares on a table"], ["a green star"]]
    itm, itc = scorer(pixels, texts)
    owners, flat = [0, 0, 1], [t for group in texts for t in group]
    tokens = loaded.processor.tokenizer(flat, padding="longest", return_tensors="pt")
    with torch.no_grad():
        matched = loaded.model(pixel_values=pixels[owners], input_ids=tokens.input_ids,
                               attention_mask=tokens.attention_mask,
                               use_image_text_matching_head=True)
        cosine = loaded.model(pixel_values=pixels, input_ids=tokens.input_ids,
                              attention_mask=tokens.attention_mask,
                              use_image_text_matching_head=False)
    expected_itm = matched.logits_per_image.softmax(dim=-1)[:, 1]
    expected_itc = cosine.logits_per_image[owners, range(3)]
    torch.testing.assert_close(torch.tensor([s for g in itm for s in g]), expected_itm)
    torch.testing.assert_close(torch.tensor([s for g in itc for s in g]), expected_itc)
    assert len({s for g in itm for s in g}) == 3  # a tower that tells pairs apart


def test_a_capfilt_step_with_a_blip2_filter(blip2_filter, tiny_models, img2dataset_parquet):
    stage = CapFiltStage.from_config(StageConfig(captioner=str(tiny_models["captioner"]),
                                                 filter=str(blip2_filter)))
    assert isinstance(stage.scorer, Blip2Scorer)
    assert model_class(str(blip2_filter), "filter") is Blip2ForImageTextRetrieval
    shard = read_shard(f"{img2dataset_parquet}/00000.parquet").table
    rows, rejects = stage(shard)
    assert rows.num_rows + rejects.num_rows == shard.num_rows and rows.num_rows > 0
    assert all(0 <= v <= 1 for v in rows.column("web_itm").to_pylist())


def test_a_blip2_checkpoint_of_the_other_kind_is_refused(blip2_filter, tmp_path):
    other = tmp_path / "captioner-as-filter"
    shutil.copytree(blip2_filter, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["Blip2ForConditionalGeneration"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="names Blip2ForConditionalGeneration"):
        check_model_source(str(other), "filter")
    with pytest.raises(ModelSourceError, match="names Blip2ForImageTextRetrieval, not "
                       "Blip2ForConditionalGeneration"):
        check_model_source(str(blip2_filter), "captioner")  # an ITM model cannot caption
