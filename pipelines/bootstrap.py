"""``capfilt bootstrap``: BLIP's loop of pre-training, fine-tuning and CapFilt rounds.

    round-0/  pretrain/ captioner/ filter/ eval.json     a model from the web data as it is
    round-1/  capfilt/                                   CapFilt of the web data by round 0's models
              pretrain/ captioner/ filter/ eval.json     a new model, from scratch (BLIP Table 13),
    ...                                                  on the kept pairs plus the clean set
    ablation/ kept_web/ web_and_synthetic/               BLIP Table 1: filter only, captioner only
    table.md, table.json, manifest.json                  written last

Every step writes its own manifest naming its parents and is skipped when run again after it
finished, so a killed bootstrap continues where it stopped. With ``parallel`` > 1, a round's
model and the ablation models, which do not depend on each other, train side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

from capfilt.step.stage_config import StageConfig
from manifests import JobManifest, validate_manifest, write_json_atomic
from manifests.store import read_json
from pipelines.bootstrap_config import BootstrapConfig, StepTraining
from pipelines.eval_settings import EvalJob
from pipelines.evaluate import run_eval
from pipelines.jobs import job_versions, now
from pipelines.plan import RoundOptions
from pipelines.round_settings import round_options
from pipelines.side_by_side import run_side_by_side
from pipelines.train import TrainJob, run_training

log = logging.getLogger(__name__)

# BLIP's Table 1: which captions of a CapFilt round a model is pre-trained on.
TABLE_ROWS = (
    ("no CapFilt", None),
    ("filter only", "kept_web"),
    ("captioner only", "web_and_synthetic"),
    ("CapFilt (both)", "kept"),
)


def train_model(cfg: BootstrapConfig, folder: Path, data: list[str],
                feeds_a_round: bool) -> dict[str, str]:
    """Pre-train from ``cfg.init`` on ``data``, fine-tune captioner and filter on the clean set
    (skipped when no round needs them and the table evaluates pre-trained models), evaluate on
    the test set. Returns the captioner and filter a round would use and the evaluated ones."""
    train_step(cfg.pretrain, "pretrain", cfg.init, data, folder / "pretrain", cfg.vision_init)
    pretrained = {"captioner": str(folder / "pretrain" / "captioner"),
                  "filter": str(folder / "pretrain" / "filter")}
    zero_shot = cfg.eval.models == "pretrained"
    models = dict(pretrained)
    if feeds_a_round or not zero_shot:
        # One after another, though neither needs the other: side by side, each on half the
        # cores, the demo's pair took 224 s against 215 s (the filter's, twice as long, ends
        # alone on one thread; bench/side_by_side.py --fine-tunes).
        train_step(cfg.finetune_captioner, "captioner", str(folder / "pretrain"),
                   list(cfg.clean), folder / "captioner")
        train_step(cfg.finetune_filter, "filter", str(folder / "pretrain"), list(cfg.clean),
                   folder / "filter")
        models = {"captioner": str(folder / "captioner" / "captioner"),
                  "filter": str(folder / "filter" / "filter")}
    evaluated = pretrained if zero_shot else models
    models |= {f"evaluated_{role}": path for role, path in evaluated.items()}
    if cfg.test:
        models["eval"] = str(folder / "eval.json")
        if not (folder / "eval.json").exists():
            run_eval(EvalJob(data=cfg.test, filter=evaluated["filter"],
                             captioner=evaluated["captioner"], output=models["eval"],
                             device=cfg.finetune_filter.device,
                             prompt="" if zero_shot else EvalJob.prompt, **cfg.eval.settings()))
    return models


def train_step(step: StepTraining, task: str, init: str, data: list[str], out: Path,
               vision_init: str | None = None) -> None:
    """One training of a bootstrap with its step's settings (skipped when already finished)."""
    run_training(TrainJob(task=task, init=init, data=tuple(data), output=str(out),
                          config=step.config, workers=step.workers, device=step.device,
                          negative_mix=step.negative_mix, vision_init=vision_init))


def capfilt_round(cfg: BootstrapConfig, number: int, models: dict[str, str], out: Path,
                  parent: str | None) -> str:
    """Run (or finish) the CapFilt round over the web shards with ``models``."""
    from pipelines.round import run_round

    if (out / "manifest.json").exists():
        return str(out)
    run_round(round_options_for(cfg, models, number, str(out), parent))
    return str(out)


def round_options_for(cfg: BootstrapConfig, models: dict[str, str], number: int, output: str,
                      parent: str | None) -> RoundOptions:
    """Round ``number`` of the bootstrap: its ``[round]`` settings, read as ``capfilt run``
    reads its own, over the web set with ``models``, seeded by the bootstrap's seed."""
    args = argparse.Namespace(**cfg.round, input=list(cfg.web), output=output,
                              captioner=models["captioner"], filter=models["filter"],
                              round=number, parent=parent, seed=cfg.seed, address=None,
                              url_list=None, download_to=None)
    return round_options(args)


def round_stage(cfg: BootstrapConfig, models: dict[str, str]) -> StageConfig:
    """The CapFilt step a round runs: the ``[round]`` settings with the models given."""
    return round_options_for(cfg, models, 1, "-", None).stage


def run_bootstrap(cfg: BootstrapConfig) -> JobManifest:
    root = Path(cfg.output)
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        return JobManifest.from_dict(read_json(str(manifest_path)))
    created, started = now(), time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, work):
        begin = time.perf_counter()
        result = work()
        timings[name] = round(time.perf_counter() - begin, 2)
        log.info("%s done in %.0fs", name, timings[name])
        return result

    def side_by_side(named: dict[str, partial]) -> dict:
        began = time.perf_counter()
        done = run_side_by_side(list(named.values()), cfg.parallel)
        for name, (_, seconds) in zip(named, done):
            timings[name] = seconds
            log.info("%s done in %.0fs", name, seconds)
        if len(named) > 1 and cfg.parallel > 1:
            timings[" + ".join(named) + " (side by side)"] = round(time.perf_counter() - began, 2)
        return {name: result for name, (result, _) in zip(named, done)}

    models = {0: timed("round-0 model", lambda: train_model(
        cfg, root / "round-0", [*cfg.web, *cfg.clean], feeds_a_round=cfg.rounds > 0))}
    rounds: dict[int, str] = {}
    ablations: dict[str, dict] = {}
    for number in range(1, cfg.rounds + 1):
        parent = rounds.get(number - 1)
        rounds[number] = timed(f"round-{number} capfilt", lambda: capfilt_round(
            cfg, number, models[number - 1], root / f"round-{number}" / "capfilt", parent))
        trainings = {f"round-{number} model": partial(
            train_model, cfg, root / f"round-{number}", [f"{rounds[number]}@kept", *cfg.clean],
            number < cfg.rounds)}
        if cfg.ablation and number == 1:  # Table 1's other rows train on round 1's views
            trainings |= {f"ablation {view}": partial(
                train_model, cfg, root / "ablation" / view, [f"{rounds[1]}@{view}", *cfg.clean],
                False) for _, view in TABLE_ROWS if view not in (None, "kept")}
        done = side_by_side(trainings)
        models[number] = done.pop(f"round-{number} model")
        ablations |= {name.removeprefix("ablation "): result for name, result in done.items()}
    table = []
    if cfg.ablation:
        for label, view in TABLE_ROWS:
            row_models = models[0] if view is None else models[1] if view == "kept" else ablations[view]
            table.append(table_row(label, view, row_models))
    else:
        table = [table_row(f"round {n}", None, models[n]) for n in sorted(models)]
    write_table(root, table)
    manifest = JobManifest(
        kind="bootstrap", status="complete",
        inputs=[{"role": role, "source": s} for role in ("web", "clean", "test")
                for s in getattr(cfg, role)] + [{"role": "init", "source": cfg.init}],
        outputs=[{"role": f"round-{n}", "path": str(root / f"round-{n}")} for n in models]
        + [{"role": "table", "path": str(root / "table.md")}],
        parameters=_plain(asdict(cfg)), results={"table": table, "rounds": rounds},
        timings={**timings, "wall_seconds": round(time.perf_counter() - started, 2)},
        versions=job_versions(),
        parents=[f"{path}/manifest.json" for path in rounds.values()],
        created_at=created, finished_at=now(),
    )
    validate_manifest(manifest.to_dict(), "job")
    write_json_atomic(str(manifest_path), manifest.to_dict())
    return manifest


def table_row(label: str, view: str | None, models: dict[str, str]) -> dict:
    row = {"row": label, "data": view or "web", "captioner": models["evaluated_captioner"],
           "filter": models["evaluated_filter"]}
    if "eval" in models:
        row.update(read_json(models["eval"])["results"]["metrics"])
    return row


METRIC_COLUMNS = (("i2t_r1", "TR@1"), ("t2i_r1", "IR@1"), ("bleu4", "BLEU-4"),
                  ("caption_accuracy", "caption acc."))


def format_table(table: list[dict], extra: tuple[tuple[str, str], ...] = ()) -> str:
    columns = [c for c in (*METRIC_COLUMNS, *extra) if any(c[0] in row for row in table)]
    lines = ["| pre-training data | " + " | ".join(name for _, name in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for row in table:
        cells = [_cell(row.get(key)) for key, _ in columns]
        lines.append(f"| {row['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def write_table(root: Path, table: list[dict]) -> None:
    (root / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (root / "table.md").write_text(format_table(table))


def _plain(value):
    return json.loads(json.dumps(value, default=str))
