"""Untrusted files stay data: pickled weights with code are refused and never run."""

import os
import shutil

import pytest
import torch

from capfilt.models import ModelSourceError, load_model


class RunsCode:
    """Unpickling this would run a shell command: the classic poisoned checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_that_would_run_code_are_refused(tiny_models, tmp_path):
    folder = tmp_path / "poisoned"
    shutil.copytree(tiny_models["filter"], folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"vision_proj.weight": RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="weights refused"):
        load_model(str(folder), "filter")
    assert not marker.exists()
