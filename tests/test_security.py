"""Untrusted files stay data: pickled weights with code are refused and never run."""

import http.server
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from capfilt.models.loading import load_model
from capfilt.models.source import ModelSourceError, check_model_source
from capfilt.terminal import terminal_safe


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


def test_model_files_that_never_end_are_refused_before_they_are_read(tiny_models, tmp_path):
    """A FIFO would hang the driver hashing the weights; a link to /dev/zero would never end."""
    for name, make in (("fifo", os.mkfifo), ("zero", lambda p: os.symlink("/dev/zero", p))):
        folder = tmp_path / name
        shutil.copytree(tiny_models["filter"], folder)
        (folder / "model.safetensors").unlink()
        make(folder / "model.safetensors")
        with pytest.raises(ModelSourceError, match="model.safetensors is not a regular file"):
            check_model_source(str(folder), "filter")


def test_terminal_output_cannot_be_steered_by_web_text():
    hostile = "caption\x1b[2J\x1b[31m red\x07\rrewritten\u202e"
    shown = terminal_safe(hostile)
    assert "\x1b" not in shown and "\r" not in shown and "\x07" not in shown
    assert "\u202e" not in shown
    assert shown.startswith("caption\\x1b[2J") and "red" in shown


class CountingHub(http.server.BaseHTTPRequestHandler):
    """Stands in for the hub's address on 127.0.0.1: counts requests, answers 404."""

    requests: list[str] = []

    def _answer(self):
        CountingHub.requests.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


def test_local_models_never_touch_the_network_and_hub_ids_do(tiny_models):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    # One process (the hub's address is read at import): the local folders load first, then a
    # hub id is checked. Every request the hub sees must be the hub id's: none for the folders.
    script = ("import sys\nfrom capfilt.models.source import ModelSourceError, check_model_source\n"
              "from capfilt.models.loading import load_model\n"
              "load_model(sys.argv[1], 'captioner'); load_model(sys.argv[2], 'filter')\n"
              "print('LOCAL-LOADED', flush=True)\n"
              "try:\n    check_model_source('someone/blip-captioner', 'captioner')\n"
              "except ModelSourceError as exc:\n    print('HUB-REFUSED', exc)\n")
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        run = subprocess.run(
            [sys.executable, "-c", script, str(tiny_models["captioner"]),
             str(tiny_models["filter"])], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "LOCAL-LOADED" in run.stdout and "HUB-REFUSED" in run.stdout, run.stderr[-2000:]
        assert CountingHub.requests  # the hub id was looked up on the (local) hub
        assert all("someone/blip-captioner" in path for path in CountingHub.requests)
    finally:
        server.shutdown()
