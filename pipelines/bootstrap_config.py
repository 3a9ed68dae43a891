"""The settings of a bootstrap, read from one TOML file.

Top-level keys name the data and where models start; one table per step sets that step:

    output = "runs/boot"            clean = ["clean/"]     web = ["web/"]     test = ["test/"]
    init = "scratch:models/blank"   rounds = 1             ablation = true    seed = 0
    parallel = 3    (trainings that do not depend on each other at once; CPU, one worker each)
    vision_init = "timm:vit_base_patch16_224.augreg_in21k_ft_in1k"   (optional, with scratch:)
    [pretrain]            any TrainConfig field (steps or epochs, samples, batch_size, lr,
    [finetune_captioner]  min_lr, warmup_steps, weight_decay, augment, checkpoint_every,
    [finetune_filter]     log_every, momentum, queue_size, alpha, negative_all_rank, precision,
                          loader_workers, ...); and negative_mix, workers, device
    [round]               any setting of ``capfilt run``, named as in its --config files
                          (num_captions, method, top_p, top_k, max_new_tokens, policy,
                          threshold, keep, rank_by, caption_guards, dedup, batch_size, workers,
                          dtype, ...): pipelines/round_settings.py reads both
    [eval]                k, num_beams, max_new_tokens, limit, judge, models
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from capfilt.scoring.selection import check_whole
from capfilt.train.build import check_queue_size
from capfilt.train.loop import TrainConfig
from pipelines.config import ConfigError
from pipelines.eval_settings import EvalSettings
from pipelines.round_settings import round_table
from pipelines.train import uneven_shares


class BootstrapConfigError(ValueError):
    """A bootstrap config that cannot run; the message names the key."""


@dataclass(frozen=True)
class StepTraining:
    config: TrainConfig
    negative_mix: float = 0.0
    workers: int = 1
    device: str = "cpu"


@dataclass(frozen=True, kw_only=True)
class EvalTable(EvalSettings):
    """The bootstrap's [eval]: ``capfilt eval``'s settings, and which models a table row
    evaluates. "finetuned": each row's captioner and filter fine-tuned on the clean set (BLIP
    Table 1's FT columns); "pretrained": the pre-trained models themselves (its ZS columns),
    captions written with no prompt as pre-training's LM saw them. Models only a table row
    needs are then not fine-tuned at all."""

    models: str = "finetuned"

    def __post_init__(self):
        super().__post_init__()
        if self.models not in ("finetuned", "pretrained"):
            raise ValueError(f"models = {self.models!r}: use 'finetuned' or 'pretrained'")


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
    # Every round's settings, as capfilt run's flags name them (pipelines/round_settings.py).
    round: dict = field(default_factory=lambda: round_table({}, "[round]"))
    eval: EvalTable = field(default_factory=EvalTable)
    parallel: int = 1

    def __post_init__(self):
        try:
            check_whole("rounds", self.rounds, 0)
        except ValueError as exc:
            raise BootstrapConfigError(str(exc)) from exc
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
TABLES = ("pretrain", "finetune_captioner", "finetune_filter", "round", "eval")
PATH_LISTS = ("clean", "web", "test")
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _accepted(hint) -> tuple[type, ...]:
    """The TOML value types a field's annotation takes (``int | None``: an integer; TOML has no
    null); none for fields that are tables or lists, which are checked where they are read."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for arg in typing.get_args(hint) for t in _accepted(arg))
    return {int: (int,), float: (int, float), bool: (bool,), str: (str,)}.get(hint, ())


def _check_types(cls, table: dict, where: str) -> None:
    """Refuse, never coerce, a value of the wrong type (``batch_size = 1.9`` is not 1, and
    ``true`` is no integer although Python's bool is one)."""
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        accepted = _accepted(hints.get(key))
        if not accepted:
            continue
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            expected = " or ".join(dict.fromkeys(TYPE_NAMES[t] for t in accepted
                                                 if not (t is int and float in accepted)))
            raise BootstrapConfigError(f"{where}{key} = {value!r}: expected {expected}")


def _table(data: dict, name: str, path: Path) -> dict:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise BootstrapConfigError(f"{path}: {name} = {table!r}: expected a table [{name}]")
    return table


def _step(table: dict, name: str, seed: int, path: Path) -> StepTraining:
    known = {f.name for f in fields(TrainConfig)} | set(STEP_EXTRAS)
    unknown = sorted(set(table) - known)
    if unknown:
        raise BootstrapConfigError(f"[{name}]: unknown keys {unknown}; known: {sorted(known)}")
    extras = {k: table[k] for k in STEP_EXTRAS if k in table}
    settings = {k: v for k, v in table.items() if k not in STEP_EXTRAS}
    _check_types(TrainConfig, settings, f"{path}: [{name}] ")
    _check_types(StepTraining, extras, f"{path}: [{name}] ")
    settings.setdefault("seed", seed)
    if "steps" not in settings and "epochs" not in settings:
        raise BootstrapConfigError(f"[{name}]: steps or epochs is required")
    try:
        return StepTraining(TrainConfig(**settings), **extras)
    except ValueError as exc:
        raise BootstrapConfigError(f"{path}: [{name}] {exc}") from exc


def _round(table: dict, path: Path) -> dict:
    try:
        return round_table(table, "[round]")
    except ConfigError as exc:
        raise BootstrapConfigError(str(exc)) from exc


def _plain(cls, table: dict, name: str, path: Path):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise BootstrapConfigError(f"[{name}]: unknown keys {unknown}; known: {sorted(known)}")
    _check_types(cls, table, f"{path}: [{name}] ")
    try:
        return cls(**table)
    except ValueError as exc:
        raise BootstrapConfigError(f"{path}: [{name}] {exc}") from exc


def _paths(value, key: str, base: Path, path: Path) -> tuple[str, ...]:
    """A path or a list of paths; ``~`` is the user's home, relative ones are from ``base``."""
    items = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise BootstrapConfigError(f"{path}: {key} = {value!r}: expected a path or a list of paths")
    return tuple(_local_path(item, key, base, path) for item in items)


def _local_path(item: str, key: str, base: Path, path: Path) -> str:
    if "://" in item:
        return item
    expanded = os.path.expanduser(item)
    if expanded.startswith("~"):
        raise BootstrapConfigError(f"{path}: {key} = {item!r}: no such user's home folder; "
                                   "give the path in full")
    return expanded if Path(expanded).is_absolute() else str(base / expanded)


def load_bootstrap_config(path: str | Path) -> BootstrapConfig:
    """Read a bootstrap TOML; relative paths are taken from the file's folder."""
    path = Path(os.path.expanduser(str(path)))
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BootstrapConfigError(f"{path}: {exc}") from exc
    base = path.parent
    known = {f.name for f in fields(BootstrapConfig)}
    unknown = sorted(set(data) - known)
    if unknown:  # a misspelt key would otherwise leave its default in force, unseen
        raise BootstrapConfigError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    for key in ("output", "clean", "web", "init"):
        if key not in data:
            raise BootstrapConfigError(f"{path}: {key} is required")
    scalars = {k: v for k, v in data.items() if k not in TABLES and k not in PATH_LISTS}
    _check_types(BootstrapConfig, scalars, f"{path}: ")
    init = data["init"]
    if init.startswith("scratch:"):
        init = "scratch:" + _local_path(init[8:], "init", base, path)
    elif init.startswith("~"):
        init = _local_path(init, "init", base, path)
    tables = {name: _table(data, name, path) for name in TABLES}
    try:
        return _build(data, path, base, init, tables)
    except BootstrapConfigError as exc:  # every message names the file
        if str(exc).startswith(str(path)):
            raise
        raise BootstrapConfigError(f"{path}: {exc}") from exc


def _build(data: dict, path: Path, base: Path, init: str, tables: dict) -> BootstrapConfig:
    """The config from values whose types were checked; each part checks its own ranges."""
    seed = data.get("seed", 0)
    return BootstrapConfig(
        output=_paths(data["output"], "output", base, path)[0],
        clean=_paths(data["clean"], "clean", base, path),
        web=_paths(data["web"], "web", base, path),
        test=_paths(data.get("test"), "test", base, path),
        init=init,
        rounds=data.get("rounds", 1),
        ablation=data.get("ablation", False),
        parallel=data.get("parallel", 1),
        seed=seed,
        vision_init=data.get("vision_init"),
        pretrain=_step(tables["pretrain"], "pretrain", seed, path),
        finetune_captioner=_step(tables["finetune_captioner"], "finetune_captioner", seed, path),
        finetune_filter=_step(tables["finetune_filter"], "finetune_filter", seed, path),
        round=_round(tables["round"], path),
        eval=_plain(EvalTable, tables["eval"], "eval", path),
    )
