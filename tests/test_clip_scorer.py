"""CLIP as the filter, chosen by its config: BLIP-2's recipe (rank the web caption and the
synthetic captions by CLIP similarity, keep the best two) over real img2dataset rows."""

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from capfilt.captioning.settings import SamplingConfig
from capfilt.images.decode import decode_image
from capfilt.images.transform import ImageTransform
from capfilt.models.loading import load_model
from capfilt.models.tiny import tiny_processor
from capfilt.scoring.clip import ClipScorer
from capfilt.scoring.selection import Policy
from capfilt.shards.reader import read_shard
from capfilt.step.stage import CapFiltStage
from capfilt.step.stage_config import StageConfig
from pipelines.plan import PlanError, RoundOptions, plan_round
from tests.conftest import NO_GUARDS


@pytest.fixture(scope="module")
def clip_filter(tmp_path_factory):
    tokenizer = tiny_processor().tokenizer  # any tokenizer: the scorer takes the folder's
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 40, "bos_token_id": tokenizer.cls_token_id,
                     # CLIP pools the text at its end token: [SEP] for this tokenizer.
                     "eos_token_id": tokenizer.sep_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "filter"
    CLIPModel(config).eval().save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_blip2_recipe_with_a_clip_ranker(clip_filter, tiny_models, img2dataset_parquet):
    stage = CapFiltStage.from_config(StageConfig(
        captioner=str(tiny_models["captioner"]), filter=str(clip_filter),
        sampling=SamplingConfig(num_captions=3), policy=Policy("topk", top_k=2, rank_by="itc"),
        guards=NO_GUARDS))
    assert isinstance(stage.scorer, ClipScorer)
    shard = read_shard(f"{img2dataset_parquet}/00000.parquet").table
    rows, _ = stage(shard)
    for row in rows.to_pylist():
        assert row["web_itm"] is None and row["synthetic_itm"] == [None] * 3
        scores = {row["web_caption"]: row["web_itc"],
                  **dict(zip(row["synthetic_captions"], row["synthetic_itc"]))}
        assert len(row["kept_captions"]) == 2 and len(set(scores.values())) == 4
        assert [scores[c] for c in row["kept_captions"]] == sorted(scores.values(), reverse=True)[:2]


def test_clip_pixels_are_the_processors_and_a_threshold_is_refused(
    clip_filter, tiny_models, img2dataset_parquet, tmp_path
):
    loaded = load_model(str(clip_filter), "filter")
    row = read_shard(f"{img2dataset_parquet}/00000.parquet").table.to_pylist()[0]
    image = decode_image(row["jpg"]).resize((48, 40))  # not square: shorter side, then crop
    ours = ImageTransform.from_processor(loaded.processor.image_processor)(image)
    theirs = loaded.processor.image_processor(images=image, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    stage = StageConfig(captioner=str(tiny_models["captioner"]), filter=str(clip_filter))
    with pytest.raises(PlanError, match="--policy topk --rank-by itc"):
        plan_round(RoundOptions(inputs=[str(img2dataset_parquet)], output=str(tmp_path / "r"),
                                stage=stage))
