"""Shared fixtures: tiny BLIP models, real img2dataset shards, and one local Ray for the session."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

import subprocess
from pathlib import Path

import pytest

from capfilt.captioning.blip_decoder import Captioner
from capfilt.captioning.guards import CaptionGuards
from capfilt.captioning.settings import SamplingConfig
from capfilt.images.transform import ImageTransform
from capfilt.models.loading import load_model
from capfilt.models.tiny import write_tiny_models
from capfilt.scoring.blip_itm import Scorer
from capfilt.scoring.selection import Policy
from capfilt.step.stage import CapFiltStage
from tests.web_world import img2dataset_download

# 4 shards of 5 rows from 12 images, a broken file and a missing one.
WEB_IMAGES = 12
PER_SHARD = 4


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def img2dataset_parquet(tmp_path_factory):
    """Folder of real img2dataset parquet output (4 shards, with failed rows)."""
    work = tmp_path_factory.mktemp("web")
    return img2dataset_download(work / "site", work, "parquet", PER_SHARD, WEB_IMAGES)


@pytest.fixture(scope="session")
def img2dataset_webdataset(tmp_path_factory):
    """Folder of real img2dataset webdataset output (tars with a metadata parquet each)."""
    work = tmp_path_factory.mktemp("webtar")
    return img2dataset_download(work / "site", work, "webdataset", PER_SHARD, WEB_IMAGES)


@pytest.fixture(scope="session")
def loaded(tiny_models):
    return {
        "captioner": load_model(str(tiny_models["captioner"]), "captioner"),
        "filter": load_model(str(tiny_models["filter"]), "filter"),
    }


# The tiny random captioner writes word pieces until its length limit, which the caption guards
# set aside unscored; tests of scoring and selection turn the guards off to score every caption.
NO_GUARDS = CaptionGuards(enabled=False)


def make_stage(loaded, sampling=SamplingConfig(), policy=Policy(), seed=0,
               guards=CaptionGuards()) -> CapFiltStage:
    return CapFiltStage(
        Captioner(loaded["captioner"], sampling, seed),
        Scorer(loaded["filter"]),
        policy,
        ImageTransform.from_processor(loaded["captioner"].processor.image_processor),
        ImageTransform.from_processor(loaded["filter"].processor.image_processor),
        guards=guards,
    )


@pytest.fixture(scope="session")
def blank(tmp_path_factory):
    """A tiny BLIP config + processor folder to train from scratch (weights there are not read)."""
    from capfilt.models.tiny import save_random_models, tiny_config, tiny_processor

    folder = tmp_path_factory.mktemp("blank")
    processor = tiny_processor(32)
    save_random_models(folder, tiny_config(len(processor.tokenizer), hidden=32,
                                           init_std=32 ** -0.5), processor)
    return folder


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every test that needs it (starting Ray costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def url_list_round(tmp_path_factory, ray_local, tiny_models):
    """``capfilt run --url-list`` for real: img2dataset downloads 6 small images, an 800x600
    one, a broken and a missing file from 127.0.0.1, then a round writes parquet and
    webdataset shards. Returns (work folder, url list, round folder)."""
    from pipelines.cli import main
    from tests.torch_free import torch_hidden_env
    from tests.web_world import write_url_list

    work = tmp_path_factory.mktemp("urllist")
    round_dir = work / "rounds" / "round-0001"
    # img2dataset's spawned downloader starts without torch (tests/torch_free.py); Ray's
    # workers, started with the session's Ray, keep their own environment.
    hidden = torch_hidden_env(work / "no-torch")["PYTHONPATH"]
    with write_url_list(work) as urls, pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", hidden)
        code = main(["run", "--url-list", str(urls), "--output", str(round_dir),
                     "--captioner", str(tiny_models["captioner"]),
                     "--filter", str(tiny_models["filter"]), "--workers", "1",
                     "--write", "webdataset", "--batch-size", "4"])
    assert code == 0
    return work, urls, round_dir


# A full disk, for real: a 2 MiB tmpfs mounted for the test (root only).
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path):
    point = tmp_path / "disk"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)], check=True)
    yield point
    subprocess.run(["umount", str(point)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros until the disk refuses more."""
    filler = folder / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler
