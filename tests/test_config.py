"""TOML configs and presets: flags override them, mistakes name the file, key and fix."""

import pytest

from pipelines.cli import main, parse_args, round_options
from pipelines.config import load_config, preset_names


def test_presets_resolve_and_flags_override_them():
    assert {"blip-base-paper", "blip-large", "blip2-ranking", "demo"} <= set(preset_names())
    args = parse_args(["run", "--config", "blip2-ranking", "--input", "s/*.parquet",
                       "--output", "r", "--keep", "3"])
    options = round_options(args)
    assert options.stage.captioner == "Salesforce/blip-image-captioning-large"
    assert options.stage.sampling.num_captions == 10
    assert (options.stage.policy.mode, options.stage.policy.top_k,
            options.stage.policy.rank_by) == ("topk", 3, "itc")
    assert options.settings["keep"] == 3 and options.settings["dtype"] == "bfloat16"
    paper = round_options(parse_args(["run", "--config", "blip-base-paper", "--input", "x",
                                      "--output", "r"]))
    assert (paper.stage.sampling.top_p, paper.stage.policy.threshold,
            paper.stage.itm_token) == (0.9, 0.5, "enc")


def test_dry_run_prints_the_resolved_settings_as_toml(tmp_path, capsys):
    config = tmp_path / "mine.toml"
    config.write_text('captioner = "m/c"\nfilter = "m/f"\n[sampling]\nnum-captions = 4\n')
    assert main(["run", "--config", str(config), "--input", "a", "b", "--output", "o",
                 "--seed", "7", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert load_config(str(config))[1]["num_captions"] == 4
    for line in ('captioner = "m/c"', "num_captions = 4", "seed = 7", 'input = ["a", "b"]'):
        assert line in printed.splitlines()


@pytest.mark.parametrize("text, message", [
    ('polcy = "topk"', "unknown key 'polcy'; this command takes:"),
    ('policy = "best"', "policy = 'best'; choose one of threshold, topk, both"),
    ("num_captions = 'many'", "num_captions = 'many' is not a valid int"),
    ("captioner = [", "not valid TOML"),
])
def test_config_mistakes_are_named(tmp_path, capsys, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    assert main(["run", "--config", str(config), "--input", "a", "--output", "o",
                 "--captioner", "c", "--filter", "f", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert str(config) in error and message in error


def test_missing_settings_and_unknown_presets(capsys):
    with pytest.raises(SystemExit):
        parse_args(["run", "--input", "a", "--output", "o"])
    assert "missing --captioner, --filter" in capsys.readouterr().err
    assert main(["run", "--config", "no-such-preset", "--dry-run"]) == 2
    assert "not a preset (presets: blip-base-paper" in capsys.readouterr().err
