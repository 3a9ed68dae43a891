"""Models that do not fit their own files are refused, and nothing is sized by a hostile number.

Every model here is a real folder written in the test: the tiny BLIP captioner and filter with
tensors deleted or added, configs edited, processor sizes raised. Refusals found from the files
alone (no torch) come before any work (exit 2); the rest when the workers load (exit 3).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.captioning.blip_decoder import Captioner
from capfilt.captioning.generation_length import check_generation_length
from capfilt.captioning.settings import SamplingConfig
from capfilt.models.convert_blip import convert_checkpoint
from capfilt.models.loading import load_model
from capfilt.models.source import ModelSourceError, check_model_source
from capfilt.scoring.blip_itm import MAX_TEXT_TOKENS, Scorer
from capfilt.scoring.for_checkpoint import make_scorer
from capfilt.shards.samples import write_sample_shards
from capfilt.train.build import build_task
from pipelines.cli import main
from tests.test_blip2_scorer import blip2_filter  # noqa: F401  (a fixture)
from tests.test_clip_scorer import clip_filter  # noqa: F401  (a fixture)
from tests.test_convert_blip import original_layout, reference  # noqa: F401  (reference: a fixture)
from tests.test_lm_captioner import write_blip2


def variant(source: Path, folder: Path, weights=None, config=None, processor=None) -> Path:
    """A copy of the model at ``source`` with its tensors, config or processor config edited."""
    shutil.copytree(source, folder)
    if weights is not None:
        state = weights(load_file(folder / "model.safetensors"))
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    for name, edit in (("config.json", config), ("processor_config.json", processor)):
        if edit is not None:
            data = json.loads((folder / name).read_text())
            edit(data)
            (folder / name).write_text(json.dumps(data))
    return folder


def without(prefix: str):
    return lambda state: {k: v for k, v in state.items() if not k.startswith(prefix)}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --- weights that do not fill the model -------------------------------------------------


@pytest.mark.parametrize("case", ["decoder-missing", "more-layers", "filter-as-captioner"])
def test_a_captioner_its_weights_do_not_fill_is_refused_before_any_work(
    case, tiny_models, tmp_path, capsys
):
    captioner = tiny_models["captioner"]
    if case == "decoder-missing":
        folder = variant(captioner, tmp_path / case, weights=without("text_decoder."))
        named = "text_decoder"
    elif case == "more-layers":
        folder = variant(captioner, tmp_path / case,
                         config=lambda c: c["text_config"].update(num_hidden_layers=4))
        named = "text_config.num_hidden_layers 4"
    else:  # a BLIP filter is model_type "blip" too: only its tensors tell it apart
        folder, named = tiny_models["filter"], "text_decoder"
    with pytest.raises(ModelSourceError, match=named) as caught:
        check_model_source(str(folder), "captioner")
    assert str(caught.value).startswith(f"captioner model {folder}")
    inputs = tmp_path / "in"
    write_sample_shards(inputs, shards=1, rows=4)
    code = main(["run", "--input", str(inputs), "--output", str(tmp_path / "round"),
                 "--captioner", str(folder), "--filter", str(tiny_models["filter"])])
    assert code == 2 and named in one_line_error(capsys)
    assert not (tmp_path / "round" / "shards").exists()


def test_tensors_missing_left_over_or_misshapen_refuse_the_load(tiny_models, reference, tmp_path):
    """What only loading can see: one tensor gone or added inside a module, a config's width
    unlike the weights', weights in a .bin. Converted BLIP checkpoints still load."""
    folder, config, _ = reference
    for kind, model_class in (("captioner", BlipForConditionalGeneration),
                              ("filter", BlipForImageTextRetrieval)):
        pth = tmp_path / f"{kind}.pth"
        torch.save({"model": original_layout(model_class(config), {})}, pth)
        convert_checkpoint(pth, kind, tmp_path / f"converted-{kind}", str(folder))
        check_model_source(str(tmp_path / f"converted-{kind}"), kind)
        load_model(str(tmp_path / f"converted-{kind}"), kind)
    gone = "text_decoder.bert.encoder.layer.1.output.dense.weight"
    cases = {
        "missing": (dict(weights=lambda s: {k: v for k, v in s.items() if k != gone}),
                    f"missing 1 tensor .*{gone}"),
        "unexpected": (dict(weights=lambda s: {**s, "text_decoder.bert.pooler.w": torch.ones(2)}),
                       "unexpected 1 tensor .*text_decoder.bert.pooler.w"),
        "misshapen": (dict(config=lambda c: c["text_config"].update(intermediate_size=80)),
                      r"other shapes.*intermediate.dense.weight \(weights \[64, 32\], "
                      r"config \[80, 32\]\)"),
    }
    for name, (edit, message) in cases.items():
        bad = variant(tiny_models["captioner"], tmp_path / name, **edit)
        with pytest.raises(ModelSourceError, match=message) as caught:
            load_model(str(bad), "captioner")
        assert str(caught.value).startswith(f"captioner model {bad}: ")
        assert "\n" not in str(caught.value)
    # A .bin's tensor names cannot be read without torch: loading refuses it.
    pickled = variant(tiny_models["captioner"], tmp_path / "bin")
    state = without("text_decoder.")(load_file(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="missing .* tensors .*text_decoder.bert"):
        load_model(str(pickled), "captioner")


def test_a_worker_that_cannot_load_its_models_stops_the_round_with_their_reason(
    tiny_models, tmp_path
):
    """``capfilt run`` in its own process with its own Ray: the dying worker's output stays in
    that process's stderr (in this one it would reach later tests' captured output)."""
    pickled = variant(tiny_models["captioner"], tmp_path / "bin")
    state = without("text_decoder.")(load_file(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    inputs = tmp_path / "in"
    write_sample_shards(inputs, shards=1, rows=4)
    ran = subprocess.run(
        [str(Path(sys.executable).parent / "capfilt"), "run", "--input", str(inputs),
         "--output", str(tmp_path / "round"), "--captioner", str(pickled),
         "--filter", str(tiny_models["filter"]), "--workers", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert ran.returncode == 3, ran.stderr[-3000:]
    last = ran.stderr.strip().splitlines()[-1]  # the reason in one line, not Ray's traceback
    assert last.startswith(f"capfilt: error: a worker could not start: ModelSourceError: "
                           f"captioner model {pickled}: its weights do not match "
                           "BlipForConditionalGeneration: missing"), ran.stderr[-3000:]
    for noise in ("Traceback", "Fatal Python error", "LOAD REPORT"):  # nor after it, from Ray
        assert noise not in ran.stderr, ran.stderr[-3000:]
    assert not (tmp_path / "round" / "manifest.json").exists()


# --- sizes checked before anything is allocated -----------------------------------------


@pytest.mark.parametrize("section, key, value", [
    ("text_config", "num_hidden_layers", 100_000),
    ("vision_config", "hidden_size", 1 << 20),
    ("text_config", "intermediate_size", 1 << 24),
    ("text_config", "vocab_size", 10**9),
    ("text_config", "max_position_embeddings", 10**8),
    ("vision_config", "image_size", 20_000),
    ("vision_config", "patch_size", 0),
])
def test_sizes_beyond_the_limits_are_refused_before_allocation(
    section, key, value, tiny_models, tmp_path
):
    folder = variant(tiny_models["filter"], tmp_path / "big",
                     config=lambda c: c[section].update({key: value}))
    with pytest.raises(ModelSourceError, match=rf"{section}\.{key} {value} is (above|below)"):
        check_model_source(str(folder), "filter")


def test_a_processor_size_beyond_the_limit_is_refused(tiny_models, tmp_path):
    folder = variant(tiny_models["filter"], tmp_path / "huge-pixels",
                     processor=lambda p: p["image_processor"]["size"].update(height=20_000))
    with pytest.raises(ModelSourceError, match=r"size\.height 20000 is above the limit 2048"):
        check_model_source(str(folder), "filter")


def test_a_config_that_describes_a_larger_model_than_its_weights_is_refused(tiny_models, tmp_path):
    wide = {"hidden_size": 1024, "intermediate_size": 4096, "encoder_hidden_size": 1024}
    folder = variant(tiny_models["filter"], tmp_path / "wide",
                     config=lambda c: (c["text_config"].update(wide),
                                       c["vision_config"].update(wide)))
    with pytest.raises(ModelSourceError, match="at least .* parameters; its weights hold"):
        check_model_source(str(folder), "filter")


def test_a_truncated_weights_file_is_refused(tiny_models, tmp_path):
    folder = variant(tiny_models["filter"], tmp_path / "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError, match="model.safetensors is truncated"):
        check_model_source(str(folder), "filter")


@pytest.mark.parametrize("text, message", [
    ("[]", "config.json is not a JSON object"),
    ('{"model_type": "blip", "text_config": 5}', "text_config is not a JSON object"),
    ('{"model_type": "blip", "text_config": {"num_hidden_layers": "12"}}',
     "text_config.num_hidden_layers '12' is not a whole number"),
    ('{"model_type": "blip", "vision_config": {"hidden_size": true}}',
     "vision_config.hidden_size True is not a whole number"),
])
def test_a_config_of_the_wrong_shape_is_one_line(text, message, tiny_models, tmp_path, capsys):
    folder = variant(tiny_models["filter"], tmp_path / "odd")
    (folder / "config.json").write_text(text)
    with pytest.raises(ModelSourceError, match=message):
        check_model_source(str(folder), "filter")
    inputs = tmp_path / "in"
    write_sample_shards(inputs, shards=1, rows=4)
    code = main(["run", "--input", str(inputs), "--output", str(tmp_path / "round"),
                 "--captioner", str(tiny_models["captioner"]), "--filter", str(folder)])
    assert code == 2 and message in one_line_error(capsys)


def test_training_refuses_to_start_from_weights_that_do_not_fill_the_model(
    tiny_models, tmp_path, capsys
):
    """A fine-tune or a continued pre-training would otherwise train random layers."""
    broken = variant(tiny_models["captioner"], tmp_path / "pair" / "captioner",
                     weights=without("text_decoder.bert.encoder.layer.1."))
    shutil.copytree(tiny_models["filter"], tmp_path / "pair" / "filter")
    for task in ("captioner", "pretrain"):
        with pytest.raises(ModelSourceError, match=r"captioner model .*: its weights do not "
                                                   r"match BlipForConditionalGeneration: missing"):
            build_task(task, str(tmp_path / "pair"))
    assert build_task("filter", str(tmp_path / "pair")).init_sources == {
        "filter": str(tmp_path / "pair" / "filter")}
    inputs = tmp_path / "clean"
    write_sample_shards(inputs, shards=1, rows=4)
    code = main(["finetune", "--as", "captioner", "--init", str(tmp_path / "pair"), "--data",
                 str(inputs), "--output", str(tmp_path / "out"), "--steps", "1",
                 "--batch-size", "2"])
    assert code == 2 and "missing" in one_line_error(capsys)


# --- generation length ------------------------------------------------------------------


def test_max_new_tokens_beyond_the_text_positions_is_refused(loaded, tiny_models, tmp_path):
    """The tiny captioner has 64 text positions and BLIP's prompt takes 4: 60 new tokens fit."""
    source = str(tiny_models["captioner"])
    check_generation_length(source, 60)
    with pytest.raises(ModelSourceError, match=r"needs 4 \+ 61 text positions; .* has 64 .*"
                                               r"--max-new-tokens 60 or fewer"):
        check_generation_length(source, 61)
    longest = SamplingConfig(max_new_tokens=60, min_new_tokens=60, top_k=None)
    captions = Captioner(loaded["captioner"], longest, 0)(torch.zeros(1, 3, 32, 32), ["k"])
    assert len(captions[0]) == 1
    with pytest.raises(ModelSourceError, match="--max-new-tokens 60 or fewer"):
        Captioner(loaded["captioner"], SamplingConfig(max_new_tokens=61), 0)
    blip2 = tmp_path / "blip2"
    write_blip2(blip2)  # 4 query tokens, bos and "a picture of" (3) before the new ones
    check_generation_length(str(blip2), 88)
    with pytest.raises(ModelSourceError, match=r"needs 8 \+ 89 text positions"):
        check_generation_length(str(blip2), 89)


def test_capfilt_run_refuses_max_new_tokens_beyond_the_positions_before_any_work(
    tiny_models, tmp_path, capsys
):
    """Before any work, so no plan.json pins the bad setting and the corrected rerun runs."""
    inputs, output = tmp_path / "in", tmp_path / "round"
    write_sample_shards(inputs, shards=1, rows=4)
    code = main(["run", "--input", str(inputs), "--output", str(output), "--max-new-tokens",
                 "61", "--captioner", str(tiny_models["captioner"]),
                 "--filter", str(tiny_models["filter"])])
    assert code == 2 and "--max-new-tokens 60 or fewer" in one_line_error(capsys)
    assert not (output / "plan.json").exists()


# --- texts cut before tokenising --------------------------------------------------------


@pytest.fixture(params=["blip", "blip2", "clip"])
def scorer_for(request, loaded, blip2_filter, clip_filter):  # noqa: F811
    if request.param == "blip":
        return Scorer(loaded["filter"])
    return make_scorer(load_model(str(blip2_filter if request.param == "blip2" else clip_filter),
                                  "filter"))


def test_a_huge_caption_is_cut_before_the_tokenizer_sees_it(scorer_for):
    """Five million characters used to take seconds of tokenising; the scores are those of the
    caption's first 35 tokens either way (a 200-character prefix holds more than that)."""
    huge = "a dog sitting on a red table " * 180_000
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    started = time.process_time()
    itm, itc = scorer_for(pixels, [[huge], ["a red circle"]])
    assert time.process_time() - started < 1.0
    itm_short, itc_short = scorer_for(pixels, [[huge[:200]], ["a red circle"]])
    flat = [score for group in itc + itm for score in group]
    flat_short = [score for group in itc_short + itm_short for score in group]
    assert flat == pytest.approx(flat_short, abs=1e-6)


def test_long_real_captions_keep_the_scores_of_their_first_tokens(loaded):
    """A caption longer than the cut scores as transformers' BLIP scores it whole (truncated at
    35 tokens by its tokenizer)."""
    caption = ("an old stone bridge crosses a quiet river at dawn while two people walk a brown "
               "dog along the bank and a small red boat waits under the trees ") * 12
    assert len(caption) > 1500
    model, tokenizer = loaded["filter"].model, loaded["filter"].processor.tokenizer
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    started = time.process_time()
    itm, itc = Scorer(loaded["filter"], itm_token="cls")(pixels, [[caption * 2000]])
    assert time.process_time() - started < 1.0
    tokens = tokenizer([caption], truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt")
    with torch.no_grad():
        match = model(pixel_values=pixels, use_itm_head=True, **tokens)
        cosine = model(pixel_values=pixels, use_itm_head=False, **tokens)
    assert itm[0][0] == pytest.approx(match.itm_score.softmax(-1)[0, 1].item(), abs=1e-5)
    assert itc[0][0] == pytest.approx(cosine.itm_score[0, 0].item(), abs=1e-5)
