"""The model loop never asks the device for a value mid-batch.

On a GPU each such question (``bool(tensor)``, ``.item()``, ``.tolist()``, transformers'
``mask.all()`` checks) drains the queue, and the GPU then idles while Python launches the next
kernels: at 1,024 images per batch that was a third of an H100's time (bench/README.md). Here,
on the CPU, every such call is counted with where it came from.
"""

import traceback
from collections import Counter

import pytest
import torch

from capfilt.captioning.blip_decoder import Captioner
from capfilt.captioning.settings import SamplingConfig
from capfilt.scoring.blip_itm import Scorer


@pytest.fixture
def questions(monkeypatch):
    asked = Counter()
    for name in ("__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = traceback.extract_stack()[-2]
            asked[(_name, caller.filename.rsplit("/", 1)[-1], caller.name)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return asked


def test_a_batch_asks_the_device_only_when_each_model_is_done(loaded, questions):
    captioner = Captioner(loaded["captioner"], SamplingConfig(max_new_tokens=12, num_captions=2),
                          seed=0)
    captioner.late_stop_check = True  # as on a GPU
    scorer = Scorer(loaded["filter"], text_batch_size=3)  # several chunks, padded and not
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captions = captioner(images, ["a", "b", "c", "d"])
    scorer(images, [["a red circle", "a blue square on the left"] + row for row in captions])
    # The finished flag of each step, read one step late from a host copy (capfilt.models.transfer).
    flags = questions.pop(("__bool__", "transfer.py", "value"), 0)
    assert 1 <= flags <= 12
    assert dict(questions) == {
        # did the top-k candidates hold? (asked once, at the end)
        ("__bool__", "blip_decoder.py", "_sample"): 1,
        ("tolist", "blip_decoder.py", "_decode"): 1,  # the captions' tokens
        ("tolist", "blip_itm.py", "__call__"): 1,  # the scores
    }
