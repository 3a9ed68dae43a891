"""Problems found before any work starts: full disk, read-only output, bad model folders.

The disks are real: small tmpfs mounts made by the test (it needs root, as CI runs).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from capfilt.models.source import ModelSourceError, check_model_source
from capfilt.shards.samples import write_sample_shards
from capfilt.step.stage_config import StageConfig
from pipelines.plan import PlanError, RoundOptions, plan_round

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


@needs_root
def test_a_full_disk_and_a_read_only_output_are_refused_before_any_work(
    small_disk, tiny_models, tmp_path
):
    inputs = tmp_path / "in"
    write_sample_shards(inputs, shards=4, rows=64)
    stage = StageConfig(captioner=str(tiny_models["captioner"]), filter=str(tiny_models["filter"]))
    full = small_disk("full", "128k")
    with pytest.raises(PlanError, match="MiB free; this round needs about"):
        plan_round(RoundOptions(inputs=[str(inputs)], output=str(full / "round"), stage=stage))
    assert not (full / "round" / "shards").exists()
    read_only = small_disk("ro", "1m", read_only=True)
    with pytest.raises(PlanError, match="is not writable"):
        plan_round(RoundOptions(inputs=[str(inputs)], output=str(read_only / "r"), stage=stage))


def test_missing_or_incomplete_model_folders_are_named(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["filter"], broken)
    (broken / "model.safetensors").unlink()
    no_processor = tmp_path / "no-processor"
    shutil.copytree(tiny_models["filter"], no_processor)
    (no_processor / "processor_config.json").unlink()
    cases = {
        "./missing/filter": "no such folder",
        str(broken): "no weights",
        str(no_processor): "no image processor config",
        str(tmp_path): "no config.json",
    }
    for source, message in cases.items():
        with pytest.raises(ModelSourceError, match=message) as caught:
            check_model_source(source, "filter")
        assert "filter model" in str(caught.value)
