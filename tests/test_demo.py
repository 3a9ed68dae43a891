"""The README's main command in its quick form: the whole bootstrap on the synthetic world."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from manifests import validate_manifest
from manifests.store import read_json
from pipelines.bootstrap import round_stage
from pipelines.bootstrap_config import BootstrapConfigError, load_bootstrap_config

STEP_MANIFESTS = [
    "round-0/pretrain", "round-0/captioner", "round-0/filter", "round-1/capfilt",
    "round-1/pretrain", "ablation/kept_web/pretrain", "ablation/web_and_synthetic/pretrain",
]


def demo(out: Path, capsys, *flags: str) -> str:
    """``capfilt demo --quick`` through the command line's entry, in this process and on the
    tests' Ray (its own process would spend about 15 s importing and starting Ray; test_round
    runs the installed ``capfilt`` in its own process)."""
    from pipelines.cli import main

    capsys.readouterr()
    code = main(["demo", "--quick", "--output", str(out), *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


def test_quick_demo_runs_the_bootstrap_and_prints_table_1(ray_local, tmp_path, capsys):
    out = tmp_path / "demo"
    # Trainings side by side, as the full demo runs them: round 1's model and the ablation
    # models, two at a time, each in a spawned process.
    printed = demo(out, capsys, "--parallel", "2")
    assert load_bootstrap_config(out / "bootstrap.toml").parallel == 2
    for row in ("no CapFilt", "filter only", "captioner only", "CapFilt (both)"):
        assert f"| {row} |" in printed
    assert "precision" in printed and "web captions kept by kind" in printed
    summary = json.loads((out / "demo.json").read_text())
    assert [row["row"] for row in summary["table"]] == [
        "no CapFilt", "filter only", "captioner only", "CapFilt (both)"]
    for row in summary["table"]:
        assert 0 <= row["i2t_r1"] <= 1 and 0 <= row["caption_accuracy"] <= 1
    # The web set's noise as the world wrote it: 40% of its captions are wrong.
    assert summary["table"][0]["noise_ratio"] == pytest.approx(0.4, abs=0.01)
    kinds = summary["audit"]["web_kept_by_kind"]
    assert sum(v["of"] for v in kinds.values()) == 192
    by_attribute = summary["audit"]["attribute_errors_kept"]
    assert sum(v["of"] for v in by_attribute.values()) == kinds["attribute"]["of"]
    assert sum(v["kept"] for v in by_attribute.values()) == kinds["attribute"]["kept"]
    synthetic = summary["audit"]["synthetic"]
    assert sum(v["of"] for v in synthetic["by_error"].values()) == synthetic["of"]
    assert sum(v["kept"] for v in synthetic["by_error"].values()) == synthetic["kept"]
    assert "synthetic captions kept, by what they get wrong" in printed
    # Half the web captions labelled from the truth calibrate the threshold; all of them judge it.
    calibration = summary["calibration"]
    assert (calibration["labels"], calibration["web_captions"]) == (96, 192)
    assert calibration["round"]["kept"] == sum(v["kept"] for v in kinds.values())
    assert len((out / "labels.csv").read_text().splitlines()) == 97
    assert "threshold for web-caption precision 0.95 from 96 labelled web captions" in printed
    assert (out / "round-1/capfilt/calibration.json").exists()
    # The caption guards' counts, audited: each reason's captions and the right ones among them.
    guarded = summary["audit"]["guarded"]
    capfilt = read_json(str(out / "round-1" / "capfilt" / "manifest.json"))
    assert {k: v["of"] for k, v in guarded.items()} == capfilt["totals"]["guarded_by_reason"]
    assert all(0 <= v["right"] <= v["of"] for v in guarded.values())
    assert "synthetic captions set aside by the caption guards" in printed
    # Every step wrote a valid manifest naming its parents; the round-1 model learned from
    # the CapFilt round, which used round 0's fine-tuned models.
    for step in STEP_MANIFESTS:
        data = read_json(str(out / step / "manifest.json"))
        validate_manifest(data, "round" if step.endswith("capfilt") else "job")
    pretrain = read_json(str(out / "round-1/pretrain/manifest.json"))
    assert str(out / "round-1/capfilt/manifest.json") in pretrain["parents"]
    capfilt_round = read_json(str(out / "round-1/capfilt/manifest.json"))
    assert {m["source"] for m in capfilt_round["models"]} == {
        str(out / "round-0/captioner/captioner"), str(out / "round-0/filter/filter")}
    validate_manifest(read_json(str(out / "manifest.json")), "job")
    # The demo's table evaluates pre-trained models (BLIP's zero-shot columns): only round 0,
    # whose models run the CapFilt round, is fine-tuned; each row's eval names its pre-training.
    for folder in ("round-1", "ablation/kept_web", "ablation/web_and_synthetic"):
        assert not (out / folder / "captioner").exists() and not (out / folder / "filter").exists()
    for row, folder in zip(summary["table"], ("round-0", "ablation/kept_web",
                                               "ablation/web_and_synthetic", "round-1")):
        assert row["captioner"] == str(out / folder / "pretrain" / "captioner")
        evaluated = read_json(str(out / folder / "eval.json"))
        assert {i["source"] for i in evaluated["inputs"] if i["role"] in ("filter", "captioner")} == {
            str(out / folder / "pretrain" / "filter"), str(out / folder / "pretrain" / "captioner")}
    # Run again: every step is skipped, the same table comes back.
    began = time.monotonic()
    assert demo(out, capsys).splitlines()[:6] == printed.splitlines()[:6]
    assert time.monotonic() - began < 30


def test_bootstrap_config_mistakes_are_named(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('output = "o"\nclean = ["c"]\nweb = ["w"]\ninit = "scratch:m"\n'
                    "[pretrain]\nsteps = 10\nlearning_rate = 1\n")
    with pytest.raises(BootstrapConfigError, match="learning_rate"):
        load_bootstrap_config(path)
    path.write_text('output = "o"\nclean = ["c"]\nweb = ["w"]\ninit = "scratch:m"\nablaton = true\n')
    with pytest.raises(BootstrapConfigError, match=r"unknown keys \['ablaton'\]"):
        load_bootstrap_config(path)
    path.write_text('output = "o"\nclean = ["c"]\ninit = "scratch:m"\n')
    with pytest.raises(BootstrapConfigError, match="web is required"):
        load_bootstrap_config(path)
    path.write_text('output = "o"\nclean = ["c"]\nweb = ["w"]\ninit = "scratch:m"\n'
                    '[pretrain]\nsteps = 1\n[finetune_captioner]\nsteps = 1\n'
                    '[finetune_filter]\nsteps = 1\n[eval]\nmodels = "zero-shot"\n')
    with pytest.raises(BootstrapConfigError, match="models = 'zero-shot'"):
        load_bootstrap_config(path)
    path.write_text(path.read_text().replace('models = "zero-shot"', "")
                    + '[round]\ndtype = "bf16"\n')
    with pytest.raises(BootstrapConfigError, match="dtype = 'bf16'"):
        load_bootstrap_config(path)
    path.write_text(path.read_text().replace('dtype = "bf16"', "")
                    .replace("[pretrain]\n", '[pretrain]\ndevice = "cuda"\n'))
    load_bootstrap_config(path)  # one training at a time may use the GPU
    path.write_text(path.read_text().replace("[finetune_filter]\n",
                                             "[finetune_filter]\nworkers = 3\nbatch_size = 64\n"))
    with pytest.raises(BootstrapConfigError, match=r"\[finetune_filter\] batch_size 64 does not "
                                                   "divide by workers 3"):
        load_bootstrap_config(path)
    path.write_text(path.read_text().replace("workers = 3\n", "workers = 2\n"))
    load_bootstrap_config(path)
    path.write_text("parallel = 3\n" + path.read_text())
    with pytest.raises(BootstrapConfigError, match=r"parallel = 3 .*\[pretrain\] must have device"):
        load_bootstrap_config(path)


def test_the_gpu_bootstraps_run_their_rounds_in_bfloat16_and_train_as_blip(tmp_path):
    models = {"captioner": "c", "filter": "f"}
    for name in ("blip-base-paper", "blip2-ranking"):
        config = load_bootstrap_config(Path(__file__).parents[1] / "pipelines" / "bootstraps"
                                       / f"{name}.toml")
        stage = round_stage(config, models)
        # The device is the worker pool's, from the cluster: one actor per GPU (test_worker_pool).
        assert stage.dtype == "bfloat16"
        assert stage.sampling.num_captions == config.round["num_captions"]
        # BLIP's pre-training at the paper's batch: momentum, the whole queue, 8 workers each
        # streaming with its own decoding processes; the filter's negatives from every rank.
        pre, filt = config.pretrain, config.finetune_filter
        assert (pre.config.momentum, pre.config.queue_size, pre.config.batch_size) == (
            True, 57600, 2880)
        assert pre.workers == 8 and pre.config.loader_workers == 6
        assert filt.config.negative_all_rank and filt.config.queue_size % 256 == 0
    path = tmp_path / "odd.toml"
    path.write_text((Path(__file__).parents[1] / "pipelines" / "bootstraps"
                     / "blip-base-paper.toml").read_text().replace("batch_size = 2880", "batch_size = 2888"))
    with pytest.raises(BootstrapConfigError, match=r"\[pretrain\] queue_size 57600 is not a multiple"):
        load_bootstrap_config(path)


def test_demo_parallel_below_one_is_named(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["demo", "--quick", "--parallel", "0", "--output", str(tmp_path / "d")]) != 0
    assert "parallel = 0: use 1 or more" in capsys.readouterr().err


def test_long_demo_writes_the_alt_text_world_and_pre_trains_until_the_data_is_the_limit(
        tmp_path, capsys):
    """``--long``'s bootstrap without running it: BLIP's regime, where the default is not."""
    import pyarrow.parquet as pq

    from pipelines.cli import main, parse_args
    from pipelines.demo import write_demo

    assert parse_args(["demo", "--long"]).profile == "long"
    assert parse_args(["demo"]).profile == "default"
    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--long", "--output", str(tmp_path / "both")])
    assert "not allowed with argument" in capsys.readouterr().err
    cfg = load_bootstrap_config(write_demo(tmp_path, "long", seed=3))
    default = load_bootstrap_config(write_demo(tmp_path / "default", "default", seed=3))
    assert (cfg.pretrain.config.steps, default.pretrain.config.steps) == (2000, 300)
    assert (cfg.finetune_filter.config.steps, default.finetune_filter.config.steps) == (500, 900)
    assert cfg.finetune_captioner == default.finetune_captioner
    # Seeds of training on one world: --world-seed keeps the world, --seed seeds the rest (another
    # seed's world has other bytes: test_world.py).
    other = load_bootstrap_config(write_demo(tmp_path / "other", "long", seed=4, world_seed=3))
    assert other.seed == 4
    assert (pq.read_table(tmp_path / "other" / "world" / "web").equals(
        pq.read_table(tmp_path / "world" / "web")))
    kinds = pq.read_table(tmp_path / "world" / "truth" / "web_noise.parquet").column("kind")
    shares = {kind: kinds.to_pylist().count(kind) / len(kinds) for kind in set(kinds.to_pylist())}
    assert shares["partial"] == pytest.approx(0.45, abs=0.01)
    assert shares["correct"] == pytest.approx(0.15, abs=0.01)
    assert sum(v for k, v in shares.items() if k not in ("partial", "correct")) == pytest.approx(
        0.40, abs=0.01)
