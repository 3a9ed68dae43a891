"""BLIP-2 and InstructBLIP checkpoints as the captioner, chosen by their own config (tiny OPT
and T5 language models here): a batch is one ``generate`` call, seeded per image and caption,
so it writes what one ``generate`` per caption wrote (``one_by_one``, the reference)."""

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
from capfilt.captioning.guards import Caption
from capfilt.captioning.language_model import LanguageModelCaptioner, RowDraws
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


def ends_some_captions(model, tokenizer, like: str, gain: float):
    """A random language model hardly ever writes its end token. Its embedding, tied to its
    output row, made ``gain`` times that of ``like``, it ends some captions early, not all."""
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        embedding[tokenizer.sep_token_id] = gain * embedding[tokenizer.convert_tokens_to_ids(like)]


def write_blip2(folder, language_model=opt, ends=("[SEP]", 3.0)):
    blip = tiny_processor()
    processor = Blip2Processor(image_processor=blip.image_processor, tokenizer=blip.tokenizer,
                               num_query_tokens=4)
    tokenizer = processor.tokenizer
    config = Blip2Config(vision_config=VISION, qformer_config=qformer(len(tokenizer)),
                         text_config=language_model(tokenizer), num_query_tokens=4,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    ends_some_captions(model, tokenizer, *ends)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


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
    model = InstructBlipForConditionalGeneration(config).eval()
    ends_some_captions(model, tokenizer, "[SEP]", 3.0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


WRITERS = {"blip2": write_blip2, "instructblip": write_instructblip,
           "blip2-t5": lambda folder: write_blip2(folder, t5, ends=("with", 1.0))}


@pytest.fixture(scope="module", params=list(WRITERS))
def lm_captioner(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "captioner"
    WRITERS[request.param](folder)
    return request.param, folder


def tinted_images(count: int, size: int = 32) -> torch.Tensor:
    """Noise images, each in its own tint: the random vision towers barely tell noise apart."""
    noise = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(2))
    tint = torch.linspace(-3, 3, count).view(count, 1, 1, 1) * torch.tensor([1, -1, 0.5])
    return noise + tint.view(count, 3, 1, 1)


def one_by_one(captioner: LanguageModelCaptioner, pixel_values: torch.Tensor,
               keys: list[str]) -> list[list[Caption]]:
    """The reference: one ``generate`` call per caption, after ``torch.manual_seed`` of its
    caption seed (how the captioner wrote captions before it batched them)."""
    model, cfg = captioner.model, captioner.sampling
    options = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens,
               "repetition_penalty": cfg.repetition_penalty}
    if cfg.method == "beam":
        options.update(num_beams=cfg.num_beams, num_return_sequences=cfg.num_beams,
                       do_sample=False)
    else:
        options.update(do_sample=True, top_p=cfg.top_p, top_k=cfg.top_k or 0)
    captions = []
    for i, key in enumerate(keys):
        group = []
        for n in range(cfg.num_captions):
            with torch.random.fork_rng():
                torch.manual_seed(caption_seed(captioner.seed, key, n))
                out = model.generate(pixel_values=pixel_values[i : i + 1],
                                     input_ids=captioner.input_ids.clone(),
                                     attention_mask=torch.ones_like(captioner.input_ids),
                                     **captioner.qformer_inputs, **options)
            row = out[n if cfg.method == "beam" else 0]
            if not model.config.text_config.is_encoder_decoder:
                row = row[captioner.input_ids.shape[1] :]  # decoder-only output repeats the prompt
            text = captioner.processor.tokenizer.decode(row, skip_special_tokens=True).strip()
            group.append(Caption(text, ended=not captioner.eos_ids.isdisjoint(row.tolist())))
        captions.append(group)
    return captions


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


@pytest.mark.parametrize("method", ["nucleus", "beam"])
def test_a_batch_is_one_generate_call_writing_the_one_by_one_captions(lm_captioner, method,
                                                                     monkeypatch):
    """Every caption of a batch from one ``generate``, each as its own seeded call wrote it:
    same text, same ``ended``, on rows that end at different steps."""
    kind, folder = lm_captioner
    loaded = load_model(str(folder), "captioner")
    # Beam search returns the best 2 of its 3 beams.
    sampling = SamplingConfig(method=method, num_captions=2, num_beams=3, max_new_tokens=12)
    captioner = make_captioner(loaded, sampling, seed=5)
    pixels = tinted_images(4)
    keys = ["k0", "k1", "k2", "k3"]
    expected = one_by_one(captioner, pixels, keys)
    calls = []
    generate = loaded.model.generate
    monkeypatch.setattr(loaded.model, "generate",
                        lambda **kwargs: calls.append(1) or generate(**kwargs))
    rng = torch.random.get_rng_state()
    assert captioner.captions(pixels, keys) == expected
    assert len(calls) == 1
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's stream is untouched
    groups = [tuple(c.text for c in group) for group in expected]
    if kind != "instructblip":  # its random Q-Former hardly reads the image
        assert len(set(groups)) > 1  # the images, not only the seeds, make the captions
    if method == "nucleus":  # rows that end while others run on: generate pads them
        assert {c.ended for group in expected for c in group} == {True, False}


def test_a_caption_does_not_depend_on_its_batch(lm_captioner):
    """The same key writes the same captions alone, with other images, first or last."""
    _, folder = lm_captioner
    loaded = load_model(str(folder), "captioner")
    captioner = make_captioner(loaded, SamplingConfig(num_captions=2, max_new_tokens=8), seed=3)
    pixels = tinted_images(5)
    keys = ["a", "b", "c", "d", "e"]
    whole = dict(zip(keys, captioner.captions(pixels, keys)))
    for order in ([4, 0], [2], [3, 1, 0, 4]):
        part = captioner.captions(pixels[order], [keys[i] for i in order])
        assert part == [whole[keys[i]] for i in order]


def test_a_row_draws_as_one_seeded_generate_draws():
    """``RowDraws`` uses each row's generator as ``torch.manual_seed`` then ``multinomial`` on
    that row alone uses the global one, step after step; its output leaves one choice."""
    scores = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0))  # rows, steps
    scores[:, :, 10:] = float("-inf")  # as top-k leaves them
    draws = RowDraws([torch.Generator().manual_seed(s) for s in (11, 12, 13)])
    picked = []
    for step in range(4):
        out = draws(None, scores[:, step].clone())
        assert torch.isfinite(out).sum(dim=1).tolist() == [1, 1, 1]
        picked.append(out.argmax(dim=1))
    picked = torch.stack(picked, dim=1)
    for row, seed in enumerate((11, 12, 13)):
        torch.manual_seed(seed)
        alone = [torch.multinomial(scores[row, step : step + 1].softmax(-1), 1).item()
                 for step in range(4)]
        assert picked[row].tolist() == alone
    assert (picked < 10).all()
