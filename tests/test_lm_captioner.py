"""BLIP-2 and InstructBLIP checkpoints as the captioner, chosen by their own config (tiny OPT
and T5 language models here): seeded per image and caption, so a batch gives what one image does."""

from collections import Counter

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)

from capfilt.captioning.for_checkpoint import make_captioner
from capfilt.captioning.language_model import LanguageModelCaptioner
from capfilt.captioning.seeding import caption_seed
from capfilt.captioning.settings import SamplingConfig
from capfilt.models.loading import load_model
from capfilt.models.tiny import tiny_processor
from capfilt.shards.reader import read_shard
from capfilt.step.stage import CapFiltStage
from capfilt.step.stage_config import StageConfig

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "initializer_range": 0.02}


def qformer(vocab: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "encoder_hidden_size": 32,
            "max_position_embeddings": 64}


def opt(tokenizer) -> dict:
    return {"model_type": "opt", "vocab_size": len(tokenizer), "hidden_size": 32, "ffn_dim": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "word_embed_proj_dim": 32,
            "max_position_embeddings": 96, "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}


def t5(tokenizer) -> dict:
    """A Flan-T5-like encoder-decoder: T5 starts its decoder from the pad token."""
    return {"model_type": "t5", "vocab_size": len(tokenizer), "d_model": 32, "d_kv": 16,
            "d_ff": 64, "num_layers": 2, "num_heads": 2,
            "decoder_start_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}


def write_blip2(folder, language_model=opt):
    blip = tiny_processor()
    processor = Blip2Processor(image_processor=blip.image_processor, tokenizer=blip.tokenizer,
                               num_query_tokens=4)
    tokenizer = processor.tokenizer
    config = Blip2Config(vision_config=VISION, qformer_config=qformer(len(tokenizer)),
                         text_config=language_model(tokenizer), num_query_tokens=4,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)


def write_blip2_t5(folder):
    """BLIP-2 with a T5 language model. The random T5 never writes its end token; its end
    token's embedding (tied to its output row) made that of a common word, it ends some
    captions, as the OPT ones do."""
    write_blip2(folder, t5)
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    tokenizer = Blip2Processor.from_pretrained(folder).tokenizer
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        embedding[tokenizer.sep_token_id] = embedding[tokenizer.convert_tokens_to_ids("with")]
    model.save_pretrained(folder)


def write_instructblip(folder):
    blip, questions = tiny_processor(), tiny_processor().tokenizer
    processor = InstructBlipProcessor(image_processor=blip.image_processor,
                                      tokenizer=blip.tokenizer, qformer_tokenizer=questions,
                                      num_query_tokens=4)
    tokenizer = processor.tokenizer
    config = InstructBlipConfig(vision_config=VISION, qformer_config=qformer(len(questions)),
                                text_config=opt(tokenizer), num_query_tokens=4,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    InstructBlipForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)


WRITERS = {"blip2": write_blip2, "blip2-t5": write_blip2_t5, "instructblip": write_instructblip}


@pytest.fixture(scope="module", params=list(WRITERS))
def lm_captioner(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "captioner"
    WRITERS[request.param](folder)
    return request.param, folder


def test_captions_are_seeded_per_image_and_caption(lm_captioner):
    kind, folder = lm_captioner
    loaded = load_model(str(folder), "captioner")
    expected = (InstructBlipForConditionalGeneration if kind == "instructblip"
                else Blip2ForConditionalGeneration)
    assert type(loaded.model) is expected
    sampling = SamplingConfig(num_captions=2, max_new_tokens=4, prompt="a picture of")
    captioner = make_captioner(loaded, sampling, seed=7)
    assert isinstance(captioner, LanguageModelCaptioner)
    torch.manual_seed(3)
    pixels, keys = torch.randn(2, 3, 32, 32), ["a", "b"]
    captions = captioner(pixels, keys)
    assert [len(c) for c in captions] == [2, 2]
    assert all(isinstance(t, str) for c in captions for t in c)
    assert captioner(pixels[1:2], keys[1:2]) == captions[1:2]  # a batch changes nothing
    assert make_captioner(loaded, sampling, seed=8)(pixels[1:2], keys[1:2]) != captions[1:2]
    # The prompt layout transformers' generate expects: the queries' places, then the prompt.
    assert captioner.input_ids[0, :4].tolist() == [loaded.model.config.image_token_index] * 4
    torch.manual_seed(caption_seed(7, "b", 1))
    out = loaded.model.generate(pixel_values=pixels[1:2], input_ids=captioner.input_ids,
                                **captioner.qformer_inputs, do_sample=True, top_p=0.9, top_k=50,
                                repetition_penalty=1.1, max_new_tokens=4, min_new_tokens=1)
    # A decoder-only model's output repeats the prompt; T5's decoder starts afresh.
    start = 0 if kind == "blip2-t5" else captioner.input_ids.shape[1]
    text = loaded.processor.tokenizer.decode(out[0, start:], skip_special_tokens=True).strip()
    assert text == captions[1][1]


def test_a_capfilt_step_with_a_blip2_captioner(lm_captioner, tiny_models, img2dataset_parquet):
    kind, folder = lm_captioner
    if kind != "blip2":
        pytest.skip("one family is enough for the whole step")
    stage = CapFiltStage.from_config(StageConfig(
        captioner=str(folder), filter=str(tiny_models["filter"]),
        sampling=SamplingConfig(num_captions=1, max_new_tokens=4)))
    shard = read_shard(f"{img2dataset_parquet}/00000.parquet").table
    rows, rejects = stage(shard)
    assert rows.num_rows + rejects.num_rows == shard.num_rows and rows.num_rows > 0
    assert all(len(c) == 1 for c in rows.column("synthetic_captions").to_pylist())
    assert all(len(s) == 1 for s in rows.column("synthetic_itm").to_pylist())


def test_each_caption_says_whether_it_ended_before_the_limit(lm_captioner):
    """What the caption guards read: a caption cut at max_new_tokens did not end."""
    _, folder = lm_captioner
    loaded = load_model(str(folder), "captioner")
    pixels, keys = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), ["a", "b"]
    # The end token is held back for min_new_tokens: at min = max no caption can end.
    cut = make_captioner(loaded, SamplingConfig(num_captions=2, max_new_tokens=3,
                                                min_new_tokens=3), seed=0)
    captions = cut.captions(pixels, keys)
    assert [[c.text for c in group] for group in captions] == cut(pixels, keys)
    assert not any(c.ended for group in captions for c in group)
    roomy = make_captioner(loaded, SamplingConfig(num_captions=4, max_new_tokens=40), seed=0)
    ended = Counter(c.ended for group in roomy.captions(pixels, keys) for c in group)
    assert ended[True] > 0 and ended[False] > 0  # the random model ends some, not all

