"""The settings of a bootstrap, read from one TOML file.

Top-level keys name the data and where models start; one table per step sets that step:

    output = "runs/boot"            clean = ["clean/"]     web = ["web/"]     test = ["test/"]
    init = "scratch:models/blank"   rounds = 1             ablation = true    seed = 0
    parallel = 3    (trainings that do not depend on each other at once; CPU, one worker each)
    vision_init = "timm:vit_base_patch16_224.augreg_in21k_ft_in1k"   (optional, with scratch:)
    [pretrain]            any TrainConfig field (steps, batch_size, lr, min_lr, warmup_steps,
    [finetune_captioner]  weight_decay, augment, checkpoint_every, log_every, momentum,
    [finetune_filter]     queue_size, alpha, negative_all_rank, precision, loader_workers, ...);
                          and negative_mix, workers, device
    [round]               num_captions, threshold, policy, top_k, rank_by, batch_size, workers,
                          max_new_tokens, top_p, dtype
    [eval]                k, num_beams, max_new_tokens, limit, judge, models
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from capfilt.models import DTYPES
from capfilt.train.build import check_queue_size
from capfilt.train.loop import TrainConfig
from pipelines.train import uneven_shares


class BootstrapConfigError(ValueError):
    """A bootstrap config that cannot run; the message names the key."""


@dataclass(frozen=True)
class StepTraining:
    config: TrainConfig
    negative_mix: float = 0.0
    workers: int = 1
    device: str = "cpu"


@dataclass(frozen=True)
class RoundSettings:
    num_captions: int = 1
    policy: str = "threshold"
    threshold: float = 0.5
    top_k: int = 2
    rank_by: str = "itm"
    top_p: float = 0.9
    max_new_tokens: int = 16
    batch_size: int = 64
    workers: int | None = None
    dtype: str = "float32"  # the round's models; "bfloat16" on a GPU

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise BootstrapConfigError(f"[round] dtype = {self.dtype!r}: use one of {sorted(DTYPES)}")


@dataclass(frozen=True)
class EvalSettings:
    k: int = 16
    num_beams: int = 3
    max_new_tokens: int = 20
    limit: int | None = None
    judge: str | None = None
    # "finetuned": each row's captioner and filter fine-tuned on the clean set, then evaluated
    # (BLIP Table 1's FT columns); "pretrained": the pre-trained models themselves (its ZS
    # columns), captions written with no prompt as pre-training's LM saw them. Models only a
    # table row needs are then not fine-tuned at all.
    models: str = "finetuned"

    def __post_init__(self):
        if self.models not in ("finetuned", "pretrained"):
            raise BootstrapConfigError(
                f"[eval] models = {self.models!r}: use 'finetuned' or 'pretrained'")


@dataclass(frozen=True)
class BootstrapConfig:
    output: str
    clean: tuple[str, ...]
    web: tuple[str, ...]
    init: str
    pretrain: StepTraining
    finetune_captioner: StepTraining
    finetune_filter: StepTraining
    test: tuple[str, ...] = ()
    rounds: int = 1
    ablation: bool = False
    seed: int = 0
    vision_init: str | None = None
    round: RoundSettings = field(default_factory=RoundSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    parallel: int = 1

    def __post_init__(self):
        if self.ablation and self.rounds < 1:
            raise BootstrapConfigError("ablation = true needs rounds >= 1 (its rows train on round 1)")
        if self.parallel < 1:
            raise BootstrapConfigError(f"parallel = {self.parallel}: use 1 or more")
        steps = {"pretrain": self.pretrain, "finetune_captioner": self.finetune_captioner,
                 "finetune_filter": self.finetune_filter}
        for name, step in steps.items():
            uneven = uneven_shares(step.config.batch_size, step.workers)
            if uneven:
                raise BootstrapConfigError(f"[{name}] {uneven}")
            if name != "finetune_captioner" and step.config.momentum:  # ITC's queue
                try:
                    check_queue_size(step.config.queue_size, step.config.batch_size)
                except ValueError as exc:
                    raise BootstrapConfigError(f"[{name}] {exc}") from exc
        if self.parallel > 1:
            for name, step in steps.items():
                if step.device != "cpu" or step.workers != 1:
                    # Processes side by side split this machine's cores; a GPU or Ray Train
                    # job would contend for what it holds.
                    raise BootstrapConfigError(
                        f"parallel = {self.parallel} runs trainings side by side on this "
                        f"machine's cores: [{name}] must have device = 'cpu' and workers = 1")


STEP_EXTRAS = ("negative_mix", "workers", "device")


def _step(table: dict, name: str, seed: int) -> StepTraining:
    known = {f.name for f in fields(TrainConfig)} | set(STEP_EXTRAS)
    unknown = sorted(set(table) - known)
    if unknown:
        raise BootstrapConfigError(f"[{name}]: unknown keys {unknown}; known: {sorted(known)}")
    extras = {k: table[k] for k in STEP_EXTRAS if k in table}
    settings = {k: v for k, v in table.items() if k not in STEP_EXTRAS}
    settings.setdefault("seed", seed)
    if "steps" not in settings:
        raise BootstrapConfigError(f"[{name}]: steps is required")
    return StepTraining(TrainConfig(**settings), **extras)


def _plain(cls, table: dict, name: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise BootstrapConfigError(f"[{name}]: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**table)


def _paths(value, key: str, base: Path) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value or [])
    return tuple(item if "://" in item or Path(item).is_absolute() else str(base / item)
                 for item in items)


def load_bootstrap_config(path: str | Path) -> BootstrapConfig:
    """Read a bootstrap TOML; relative paths are taken from the file's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BootstrapConfigError(f"{path}: {exc}") from exc
    base = path.parent
    seed = int(data.get("seed", 0))
    known = {f.name for f in fields(BootstrapConfig)}
    unknown = sorted(set(data) - known)
    if unknown:  # a misspelt key would otherwise leave its default in force, unseen
        raise BootstrapConfigError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    try:
        for key in ("output", "clean", "web", "init"):
            if key not in data:
                raise BootstrapConfigError(f"{path}: {key} is required")
        init = data["init"]
        if init.startswith("scratch:") and not Path(init[8:]).is_absolute():
            init = "scratch:" + str(base / init[8:])
        return BootstrapConfig(
            output=_paths(data["output"], "output", base)[0],
            clean=_paths(data["clean"], "clean", base),
            web=_paths(data["web"], "web", base),
            test=_paths(data.get("test"), "test", base),
            init=init,
            rounds=int(data.get("rounds", 1)),
            ablation=bool(data.get("ablation", False)),
            parallel=int(data.get("parallel", 1)),
            seed=seed,
            vision_init=data.get("vision_init"),
            pretrain=_step(data.get("pretrain", {}), "pretrain", seed),
            finetune_captioner=_step(data.get("finetune_captioner", {}), "finetune_captioner", seed),
            finetune_filter=_step(data.get("finetune_filter", {}), "finetune_filter", seed),
            round=_plain(RoundSettings, data.get("round", {}), "round"),
            eval=_plain(EvalSettings, data.get("eval", {}), "eval"),
        )
    except TypeError as exc:
        raise BootstrapConfigError(f"{path}: {exc}") from exc
