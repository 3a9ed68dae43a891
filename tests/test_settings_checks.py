"""Settings are checked before any work: out of range, of the wrong type in a TOML file, or a
path starting with ``~``; each refused in one line (exit 2) with nothing written."""

import json
from pathlib import Path

import pytest

from capfilt.captioning.guards import CaptionGuards
from capfilt.captioning.settings import SamplingConfig
from capfilt.scoring.selection import Policy
from capfilt.shards.samples import write_sample_shards
from pipelines.bootstrap import round_options_for
from pipelines.bootstrap_config import BootstrapConfigError, load_bootstrap_config
from pipelines.cli import main, parse_args, round_options

SCHEMA = Path(__file__).parents[1] / "manifests" / "round.schema.json"


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("settings-input")
    return write_sample_shards(folder, shards=1, rows=4, seed=3)[0]


def run_args(models, shard, output, *flags) -> list[str]:
    return ["run", "--input", str(shard), "--output", str(output),
            "--captioner", str(models["captioner"]), "--filter", str(models["filter"]),
            "--workers", "1", *flags]


@pytest.mark.parametrize("flag, value", [
    ("--top-k", "-1"), ("--num-beams", "0"), ("--min-new-tokens", "-1"),
    ("--num-captions", "-1"), ("--repetition-penalty", "0"), ("--round", "-1"),
    ("--top-p", "0"), ("--max-new-tokens", "0"), ("--threshold", "1.5"), ("--keep", "0"),
    ("--batch-size", "0"), ("--workers", "0"), ("--repetition-penalty", "nan"),
    ("--max-repeat-share", "1.5"), ("--repeat-ngram", "0"), ("--min-word-share", "-0.5"),
])
def test_a_setting_out_of_range_stops_the_run_before_any_work(tiny_models, shard, tmp_path,
                                                              capsys, flag, value):
    out = tmp_path / "round"
    assert main(run_args(tiny_models, shard, out, flag, value)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"capfilt: error: {flag}") and "use " in error
    assert len(error.splitlines()) == 1
    assert not out.exists()  # no plan.json pinning the bad setting


def schema_bounds(section: str) -> dict:
    properties = json.loads(SCHEMA.read_text())["properties"]["parameters"]["properties"]
    return properties[section]["properties"]


def accepted(make, **values) -> bool:
    try:
        make(**values)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("section, make", [("sampling", SamplingConfig), ("policy", Policy),
                                           ("guards", CaptionGuards)])
def test_the_dataclasses_refuse_exactly_what_the_manifest_schema_refuses(section, make):
    """Every bound in the schema, probed at the edge from both sides, and every enum."""
    for name, rule in schema_bounds(section).items():
        types = rule.get("type", [])
        whole = "integer" in types
        step = 1 if whole else 0.001
        if "minimum" in rule:
            assert accepted(make, **{name: rule["minimum"]}), (name, rule)
            assert not accepted(make, **{name: rule["minimum"] - step}), (name, rule)
        if "exclusiveMinimum" in rule:
            assert not accepted(make, **{name: rule["exclusiveMinimum"]}), (name, rule)
            assert accepted(make, **{name: rule["exclusiveMinimum"] + step}), (name, rule)
        if "maximum" in rule:
            assert accepted(make, **{name: rule["maximum"]}), (name, rule)
            assert not accepted(make, **{name: rule["maximum"] + step}), (name, rule)
        if whole:
            assert not accepted(make, **{name: 2.5}) and not accepted(make, **{name: True})
        if "enum" in rule:
            assert all(accepted(make, **{name: choice}) for choice in rule["enum"])
            assert not accepted(make, **{name: "other"})
        if "null" in types:
            assert accepted(make, **{name: None})


def test_round_zero_is_round_zero(tiny_models):
    args = parse_args(run_args(tiny_models, "s.parquet", "o", "--round", "0"))
    assert round_options(args).round == 0  # it became 1: 0 was taken for "not given"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize("text, message", [
    ("batch_size = 1.9", "batch_size = 1.9 is not a valid int"),
    ("batch_size = true", "batch_size = True is not a valid int"),
    ("num_captions = 2.0", "num_captions = 2.0 is not a valid int"),
    ("threshold = '0.5'", "threshold = '0.5' is not a valid float"),
    ("dry_run = 1", "dry_run = 1 is not a valid bool"),
    ("captioner = 5", "captioner = 5 is not a valid string"),
    ("input = 5", "input = 5 is not a valid list"),
    ("input = ['a', 3]", "input = 3 is not a valid string"),
    ("write = ['tar']", "write = 'tar'; choose one of webdataset"),
])
def test_toml_values_of_the_wrong_type_are_refused_not_coerced(tmp_path, capsys, text, message):
    config = write(tmp_path, text)
    assert main(["run", "--config", str(config), "--input", "a", "--output", "o",
                 "--captioner", "c", "--filter", "f", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert str(config) in error and message in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("text", ['write = "webdataset"', 'write = ["webdataset"]'])
def test_one_string_where_a_list_is_expected_takes_effect(tmp_path, text):
    config = write(tmp_path, text + '\ninput = "shards/"\nthreshold = 1')
    options = round_options(parse_args(["run", "--config", str(config), "--output", "o",
                                        "--captioner", "c", "--filter", "f"]))
    assert options.write == ("webdataset",)  # the string was taken letter by letter
    assert options.inputs == ["shards/"] and options.stage.policy.threshold == 1.0


def test_the_training_commands_refuse_wrong_types_too(tmp_path, capsys):
    config = write(tmp_path, "steps = 2.5")
    assert main(["pretrain", "--config", str(config), "--init", "scratch:m", "--data", "d",
                 "--output", "o", "--dry-run"]) == 2
    assert f"{config}: steps = 2.5 is not a valid int" in capsys.readouterr().err


def test_capfilt_eval_checks_its_settings_as_the_bootstrap_does(tmp_path, capsys):
    """One EvalSettings for both: the flag's value is refused before any model loads."""
    assert main(["eval", "--filter", str(tmp_path / "none"), "--data", str(tmp_path),
                 "--num-beams", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "capfilt: error: num_beams 0: use a whole number of at least 1")


BOOTSTRAP = 'output = "o"\nclean = ["c"]\nweb = "w"\ninit = "scratch:m"\n'


def bootstrap_text(top: str = "", **tables: str) -> str:
    """A bootstrap TOML: ``top`` lines, then each step's table (steps = 2) with ``tables``'s."""
    bodies = {name: "steps = 2" for name in ("pretrain", "finetune_captioner", "finetune_filter")}
    for name, line in tables.items():
        bodies[name] = f"{bodies.get(name, '')}\n{line}".strip()
    return BOOTSTRAP + top + "\n" + "".join(f"[{n}]\n{body}\n" for n, body in bodies.items())


@pytest.mark.parametrize("top, tables, message", [
    ('rounds = "2"', {}, "rounds = '2': expected an integer"),
    ('ablation = "false"', {}, "ablation = 'false': expected true or false"),
    ("seed = 1.5", {}, "seed = 1.5: expected an integer"),
    ("parallel = true", {}, "parallel = True: expected an integer"),
    ("rounds = -1", {}, "rounds -1: use a whole number of at least 0"),
    ("round = 3", {}, "round = 3: expected a table [round]"),
    ("test = 5", {}, "test = 5: expected a path or a list of paths"),
    ("", {"round": "batch_size = 1.9"}, "[round]: batch_size = 1.9 is not a valid int"),
    ("", {"round": "threshold = '0.5'"}, "[round]: threshold = '0.5' is not a valid float"),
    ("", {"round": "num_captions = -1"}, "[round]: --num-captions -1: use a whole number"),
    ("", {"round": "top_p = 0"}, "[round]: --top-p 0.0: use a number above 0 and at most 1"),
    ("", {"round": "bogus = 1"}, "[round]: unknown key 'bogus'; this command takes:"),
    ("", {"round": "output = 'x'"}, "[round]: output: the bootstrap sets these for each round"),
    ("", {"round": "policy = 'topk'\ntop_k = 2"},
     "[round]: top_k = 2 is the captioner's top-k sampling, as capfilt run's --top-k"),
    ("", {"round": "method = 'greedy'"}, "[round]: method = 'greedy'; choose one of nucleus, beam"),
    ("", {"round": "max_repeat_share = 2.0"}, "[round]: --max-repeat-share 2.0: use a number"),
    ("", {"eval": "k = true"}, "[eval] k = True: expected an integer"),
    ("", {"eval": "k = 0"}, "[eval] k 0: use a whole number of at least 1"),
    ("", {"eval": "models = 'zero-shot'"}, "[eval] models = 'zero-shot': use 'finetuned' or"),
    ("", {"pretrain": "lr = '1e-4'"}, "[pretrain] lr = '1e-4': expected a number"),
    ("", {"finetune_filter": "workers = 1.0"}, "[finetune_filter] workers = 1.0: expected an"),
])
def test_bootstrap_toml_values_are_typed_and_checked_when_read(tmp_path, top, tables, message):
    path = write(tmp_path, bootstrap_text(top, **tables))
    with pytest.raises(BootstrapConfigError) as caught:
        load_bootstrap_config(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_a_bootstrap_round_takes_every_setting_capfilt_run_takes(tmp_path):
    """One settings model: [round] is read by the flags of capfilt run, so beam search, the
    caption guards, repeated images and BLIP-2's kept count are all a round's to set."""
    text = bootstrap_text("seed = 7", round="method = 'beam'\nnum_beams = 5\npolicy = 'topk'\n"
                          "keep = 3\ncaption_guards = false\ndedup = 'near'\ntop_k = 20")
    config = load_bootstrap_config(write(tmp_path, text))
    options = round_options_for(config, {"captioner": "c", "filter": "f"}, 2, "out", "parent")
    assert (options.stage.sampling.method, options.stage.sampling.num_beams) == ("beam", 5)
    assert (options.stage.policy.mode, options.stage.policy.top_k) == ("topk", 3)
    assert options.stage.sampling.top_k == 20 and options.stage.seed == 7
    assert not options.stage.guards.enabled and options.dedup == "near"
    assert (options.round, options.parent, options.inputs) == (2, "parent", list(config.web))


def test_bootstrap_refusals_exit_2_and_a_single_path_is_a_list(tmp_path, capsys):
    good = load_bootstrap_config(write(tmp_path, bootstrap_text()))
    assert good.web == (str(tmp_path / "w"),)
    bad = write(tmp_path, bootstrap_text("rounds = 1.0"))
    assert main(["bootstrap", str(bad)]) == 2
    assert "rounds = 1.0: expected an integer" in capsys.readouterr().err


def test_home_in_paths_is_the_users_home(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (home / "c.toml").write_text('output = "~/r"\ncaptioner = "~/m/c"\n')
    args = parse_args(["run", "--config", "~/c.toml", "--input", "~/in/*.parquet",
                       "--filter", "~/m/f"])
    assert (args.output, args.captioner, args.filter) == (
        f"{home}/r", f"{home}/m/c", f"{home}/m/f")
    assert args.input == [f"{home}/in/*.parquet"]
    boot = load_bootstrap_config(write(tmp_path, bootstrap_text().replace('"o"', '"~/boot"')))
    assert boot.output == f"{home}/boot"
    assert main(["run", "--input", "a", "--output", "~no-such-user-here/x", "--captioner",
                 "c", "--filter", "f"]) == 2
    assert "no such user's home folder" in capsys.readouterr().err
    assert not (tmp_path / "~no-such-user-here").exists()


def test_a_round_into_home_is_written_there_whole(ray_local, tiny_models, shard, tmp_path,
                                                  monkeypatch):
    """It was: plan.json in the home folder (fsspec expands ``~``), then a crash on a folder
    literally named ``~``."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(run_args(tiny_models, shard, "~/round", "--batch-size", "4")) == 0
    assert (home / "round" / "manifest.json").exists() and (home / "round" / "plan.json").exists()
    assert not (tmp_path / "~").exists()


def test_a_training_config_may_give_epochs_where_it_would_give_steps(tmp_path, capsys):
    """``--steps`` and ``--epochs`` exclude each other on the command line; a config file
    takes either, typed as its flag."""
    config = write(tmp_path, 'epochs = 2.4\nsamples = "pairs"')
    assert main(["pretrain", "--config", str(config), "--init", "scratch:m", "--data", "d",
                 "--output", "o", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["epochs"], printed["steps"], printed["samples"]) == (2.4, 0, "pairs")
    config = write(tmp_path, 'epochs = "two"')
    assert main(["pretrain", "--config", str(config), "--init", "scratch:m", "--data", "d",
                 "--output", "o", "--dry-run"]) == 2
    assert "epochs = 'two' is not a valid float" in capsys.readouterr().err
