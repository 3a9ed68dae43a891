"""Caption guards: a synthetic caption that is empty, loops, is mostly non-words or was cut at
the length limit is set aside unscored with its reason, never selected, and counted."""

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch

from capfilt.captioning.blip_decoder import Captioner
from capfilt.captioning.guards import Caption, CaptionGuards, guard, repeat_share, word_share
from capfilt.captioning.settings import SamplingConfig
from capfilt.report.round_report import build_report
from capfilt.rounds.check import check_round
from capfilt.rounds.kept_texts import kept_texts
from capfilt.rounds.pairs import pairs_table
from capfilt.scoring.blip_itm import Scorer
from capfilt.shards.reader import read_shard
from capfilt.step.shard_runner import run_shard
from capfilt.step.stage_config import StageConfig
from capfilt.train.sources import round_captions
from manifests import read_manifest
from manifests.lineage import describe
from pipelines.cli import parse_args, round_options
from pipelines.plan import PlanError, RoundOptions, plan_round
from tests.conftest import NO_GUARDS, make_stage

DEFAULTS = CaptionGuards()
# Captions BLIP-base wrote for COCO images (the model card's and the paper's examples): none
# may be refused by the defaults.
GOOD = [
    "a woman sitting on the beach with her dog",
    "a man riding a wave on top of a surfboard",
    "a black and white photo of a black and white cat",
    "there is a plate of food with a fork and a knife on it",
    "a close up of a t-shirt with a picture of a dog, on a table.",
    "two dogs playing with a frisbee in the grass",
]


@pytest.mark.parametrize("text", GOOD)
def test_real_captions_pass_every_default_guard(text):
    assert guard(Caption(text), DEFAULTS) is None


@pytest.mark.parametrize("text, ended, reason", [
    ("", True, "empty"),
    ("  \t ", True, "empty"),
    ("a dog a dog a dog a dog", True, "repetition"),
    ("the the the the the the", False, "repetition"),  # a loop is named before the cut
    ("of the table of the table of the table of the", False, "repetition"),
    ("!!!!", True, "non_words"),
    ("! ? . , ; : -", True, "non_words"),
    # What the tiny random captioner wrote (word pieces, symbols), run to its limit:
    ("##t f its _ o ' bottom brown4 : 7y _2 city standing", False, "non_words"),
    # Without a dictionary, letter strings ("someg", "ov") and numbers count as words: 9 of
    # these 12 tokens; the caption is set aside for its cut.
    ("% 5 someg 9 h left ov sea8 : dog 5 cata", False, "unfinished"),
    ("a man riding a wave on top of a", False, "unfinished"),  # cut at max_new_tokens
])
def test_broken_captions_get_their_reason(text, ended, reason):
    assert guard(Caption(text, ended), DEFAULTS) == reason


def test_the_measures_the_thresholds_read():
    assert repeat_share("a dog a dog a dog a dog".split(), 2) == 5 / 7
    assert repeat_share("a dog".split(), 3) == 0.0  # fewer words than n: nothing repeats
    assert repeat_share("A dog, a dog.".split(), 2) == 1 / 3  # case and edge punctuation
    assert word_share("a dog !!".split()) == 2 / 3
    assert word_share("(a) don't t-shirt 1,200 2.5".split()) == 1.0
    assert word_share("brown4 ##t _2 dog".split()) == 1 / 4


def test_each_guard_has_a_setting_that_turns_it_off():
    loop, junk, cut = Caption("a dog a dog a dog a dog"), Caption("!!!! ???"), Caption("a", False)
    assert guard(loop, CaptionGuards(max_repeat_share=1.0)) is None
    assert guard(loop, CaptionGuards(max_repeat_share=0.75)) is None  # 5 of 7 bigrams repeat
    assert guard(junk, CaptionGuards(min_word_share=0.0)) is None
    assert guard(cut, CaptionGuards(reject_unfinished=False)) is None
    assert guard(Caption(""), NO_GUARDS) is None and guard(loop, NO_GUARDS) is None
    assert guard(Caption("a dog a dog"), CaptionGuards(max_repeat_share=0.3)) == "repetition"


@pytest.mark.parametrize("values, flag", [
    ({"max_repeat_share": 1.5}, "--max-repeat-share"),
    ({"max_repeat_share": float("nan")}, "--max-repeat-share"),
    ({"min_word_share": -0.1}, "--min-word-share"),
    ({"repeat_ngram": 0}, "--repeat-ngram"),
    ({"repeat_ngram": 2.0}, "--repeat-ngram"),
    ({"enabled": "yes"}, "--caption-guards"),
    ({"reject_unfinished": 1}, "--reject-unfinished"),
])
def test_bad_settings_are_refused_naming_their_flag(values, flag):
    with pytest.raises(ValueError, match=f"^{flag} "):
        CaptionGuards(**values)


def test_the_captioner_says_which_captions_ran_to_the_length_limit(loaded):
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    keys = list("abcd")
    # The end token is held back for min_new_tokens steps: at min = max no caption can end.
    cut = Captioner(loaded["captioner"], SamplingConfig(num_captions=2, max_new_tokens=3,
                                                        min_new_tokens=3), seed=0)
    captions = cut.captions(pixels, keys)
    assert [[c.text for c in group] for group in captions] == cut(pixels, keys)
    assert all(not c.ended for group in captions for c in group)
    roomy = Captioner(loaded["captioner"], SamplingConfig(num_captions=8, max_new_tokens=40),
                      seed=0)
    ended = Counter(c.ended for group in roomy.captions(pixels, keys) for c in group)
    assert ended[True] > 0 and ended[False] > 0  # the random decoder ends some, not all


class CountingScorer(Scorer):
    """The real filter, counting the texts it is given."""

    texts = 0

    def __call__(self, pixel_values, texts):
        self.texts += sum(map(len, texts))
        return super().__call__(pixel_values, texts)


def test_guarded_captions_are_shown_unscored_and_never_selected(loaded, img2dataset_parquet,
                                                                tmp_path):
    shard = f"{img2dataset_parquet}/00000.parquet"
    sampling = SamplingConfig(num_captions=4)
    guarded_stage = make_stage(loaded, sampling=sampling)
    guarded_stage.scorer = CountingScorer(loaded["filter"])
    result = run_shard(guarded_stage, 0, shard, str(tmp_path / "on"), batch_size=8)
    on = pq.read_table(tmp_path / "on" / "shards" / "00000.parquet").to_pylist()
    off_result = run_shard(make_stage(loaded, sampling=sampling, guards=NO_GUARDS), 0, shard,
                           str(tmp_path / "off"), batch_size=8)
    off = pq.read_table(tmp_path / "off" / "shards" / "00000.parquet").to_pylist()

    reasons = Counter(r for row in on for r in row["synthetic_guard"] if r is not None)
    assert result.guarded_by_reason == dict(reasons) and sum(reasons.values()) > 0
    assert off_result.guarded_by_reason == {}
    assert result.texts_by_source == off_result.texts_by_source  # every caption still counted
    passed = 0
    for row, plain in zip(on, off):
        # The guards change no caption, and only leave the guarded ones unscored.
        assert row["synthetic_captions"] == plain["synthetic_captions"]
        assert plain["synthetic_guard"] == [None] * 4
        for text, reason, itm, itc, plain_itm in zip(
                row["synthetic_captions"], row["synthetic_guard"], row["synthetic_itm"],
                row["synthetic_itc"], plain["synthetic_itm"]):
            # Every reason but "unfinished" is read off the text alone.
            assert guard(Caption(text), DEFAULTS) == (None if reason == "unfinished" else reason)
            if reason is None:
                passed += 1
                assert itm == pytest.approx(plain_itm, abs=1e-5) and itc is not None
            else:
                assert itm is None and itc is None
        kept_synthetic = [t for t, s in zip(row["kept_captions"], row["kept_sources"])
                          if s == "synthetic"]
        unguarded = [t for t, r in zip(row["synthetic_captions"], row["synthetic_guard"])
                     if r is None]
        assert all(t in unguarded for t in kept_synthetic)
    webs = sum(1 for row in on if row["web_caption"] is not None)
    assert guarded_stage.scorer.texts == webs + passed  # the filter scored no guarded caption


def test_a_guarded_copy_of_a_kept_caption_lends_it_no_scores():
    row = {"kept_captions": ["a dog"], "kept_sources": ["synthetic"],
           "synthetic_captions": ["a dog", "a dog"], "synthetic_itm": [None, 0.9],
           "synthetic_itc": [None, 0.4], "synthetic_guard": ["unfinished", None],
           "web_caption": "web", "web_itm": 0.2, "web_itc": 0.1}
    assert [(k.itm, k.itc) for k in kept_texts(row)] == [(0.9, 0.4)]
    # Training's unfiltered view leaves out what a guard set aside; rounds without the
    # column offer every synthetic caption, as before.
    assert round_captions(row, "web_and_synthetic") == ["web", "a dog"]
    del row["synthetic_guard"]
    assert round_captions(row, "web_and_synthetic") == ["web", "a dog", "a dog"]


def test_a_round_counts_records_and_reports_its_guards(url_list_round, tiny_models):
    """The url-list round (a session-wide fixture) ran with the default guards."""
    _, _, round_dir = url_list_round
    manifest = read_manifest(str(round_dir))
    assert manifest.parameters["guards"] == DEFAULTS.to_dict()
    rows = pq.read_table(round_dir / "shards").to_pylist()
    reasons = Counter(r for row in rows for r in row["synthetic_guard"] if r is not None)
    assert manifest.totals.guarded_by_reason == dict(reasons) and reasons
    assert check_round(str(round_dir)) == []  # the manifest's schema takes the new counts
    guarded = {(row["key"], t) for row in rows
               for t, r in zip(row["synthetic_captions"], row["synthetic_guard"]) if r}
    assert not guarded & {(p["key"], p["caption"]) for p in pairs_table(str(round_dir))
                          .to_pylist() if p["source"] == "synthetic"}
    page = build_report(str(round_dir))
    total = sum(reasons.values())
    each = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
    assert f"<th>synthetic captions guarded</th><td>{total} ({each})</td>" in page
    assert "guarded: " in page  # the sample grid names a guarded caption's reason
    shown = describe(str(round_dir), manifest)  # capfilt show
    assert f"synthetic captions set aside {json.dumps(dict(reasons), sort_keys=True)}" in shown


def test_flags_and_config_set_the_guards_and_a_rerun_must_match(tiny_models, tmp_path,
                                                                img2dataset_parquet):
    config = tmp_path / "guards.toml"
    config.write_text("[guards]\nmin_word_share = 0.75\nreject_unfinished = false\n")
    args = parse_args(["run", "--config", str(config), "--input", str(img2dataset_parquet),
                       "--output", str(tmp_path / "r"), "--captioner",
                       str(tiny_models["captioner"]), "--filter", str(tiny_models["filter"]),
                       "--repeat-ngram", "3"])
    options = round_options(args)
    assert options.stage.guards == CaptionGuards(min_word_share=0.75, reject_unfinished=False,
                                                 repeat_ngram=3)
    assert options.parameters()["guards"]["min_word_share"] == 0.75
    plan_round(options)  # records the settings in ROUND/plan.json
    other = StageConfig(captioner=options.stage.captioner, filter=options.stage.filter,
                        guards=CaptionGuards())
    with pytest.raises(PlanError, match="guards"):
        plan_round(RoundOptions(inputs=options.inputs, output=options.output, stage=other,
                                reader=options.reader))


def test_no_caption_guards_flag_scores_every_caption(tiny_models):
    args = parse_args(["run", "--input", "x", "--output", "o", "--captioner", "c",
                       "--filter", "f", "--no-caption-guards", "--no-reject-unfinished"])
    guards = round_options(args).stage.guards
    assert not guards.enabled and not guards.reject_unfinished


def test_real_shard_rows_keep_their_count_when_every_caption_is_guarded(loaded,
                                                                        img2dataset_parquet):
    """Every caption cut at its limit (the end token is held back for all 3 steps): every
    image stays in the output with its web caption scored, and nothing is lost."""
    table = read_shard(f"{img2dataset_parquet}/00001.parquet").table
    cut = SamplingConfig(max_new_tokens=3, min_new_tokens=3)
    only_unfinished = CaptionGuards(max_repeat_share=1.0, min_word_share=0.0)
    out, rejects = make_stage(loaded, sampling=cut, guards=only_unfinished)(table)
    assert out.num_rows + rejects.num_rows == table.num_rows and out.num_rows > 0
    for row in out.to_pylist():
        assert row["synthetic_guard"] == ["unfinished"] and row["synthetic_itm"] == [None]
        assert (row["web_itm"] is None) == (row["web_caption"] is None)
        assert set(row["kept_sources"]) <= {"web"}
