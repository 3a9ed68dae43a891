"""The round report, opened in a real headless Chromium: no console errors, plots and grid
on screen, and a caption carrying a script tag stays inert text."""

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.captioning.settings import SamplingConfig
from capfilt.shards.samples import IMG2DATASET_SCHEMA, sample_rows, write_sample_shards
from capfilt.step.stage_config import StageConfig
from pipelines.plan import RoundOptions
from pipelines.round import run_round

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Entity-encoded, as alt text often is: the cleaned web caption holds a literal <script> tag.
HOSTILE = "a red circle &lt;script&gt;document.body.setAttribute('data-pwned','yes')&lt;/script&gt;"
HOSTILE_URL = "javascript:alert(1)\"><script>document.title='pwned'</script>"
LONG_CAPTION = "a very long caption " * 5000  # 100,000 characters, stored whole in the shard
LONG_URL = "http://example.com/" + "x" * 100_000
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def report(ray_local, tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    write_sample_shards(work / "in", shards=2, rows=10, seed=3)
    rows = sample_rows(2, 4, seed=3)[:2]
    rows[0].update(caption=HOSTILE, url=HOSTILE_URL)
    rows[1].update(caption=LONG_CAPTION, url=LONG_URL)
    pq.write_table(pa.Table.from_pylist(rows, schema=IMG2DATASET_SCHEMA),
                   work / "in" / "00002.parquet")
    stage = StageConfig(captioner=str(tiny_models["captioner"]), filter=str(tiny_models["filter"]),
                        sampling=SamplingConfig(num_captions=2))
    out = work / "round"
    run_round(RoundOptions(inputs=[str(work / "in")], output=str(out), stage=stage,
                           batch_size=4, workers=1))
    return out / "report.html"


def chromium(*args, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_is_written_with_every_section(report):
    html = report.read_text()
    assert "<b>web</b> a red circle &lt;script&gt;document.body" in html
    for heading in ("Scores", "What was kept", "Caption lengths", "Rejected rows", "Samples"):
        assert f"<h2>{heading}</h2>" in html
    assert "ITM match probability" in html and "threshold 0.5" in html
    scored = json.loads((report.parent / "manifest.json").read_text())["totals"]["rows_out"]
    assert scored == 18 and html.count('<figure class="card">') == scored  # small round: all
    assert "undecodable_image" in html and "failed_to_download" in html


def test_long_texts_are_cut_in_the_report(report):
    """A caption or URL of any length shows its first few hundred characters and an ellipsis."""
    html = report.read_text()
    stored = pq.read_table(report.parent / "shards", columns=["web_caption", "url"]).to_pylist()
    assert any(len(r["web_caption"] or "") > 90_000 for r in stored)  # the shard keeps it whole
    assert html.count("a very long caption") < 30 and "x" * 1000 not in html
    assert "a very long caption a very long caption" in html and "&hellip;" in html
    assert "http://example.com/xxxxxxxx" in html
    assert len(html) < 500_000


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_in_headless_chromium(report, tmp_path):
    dom = chromium("--dump-dom", report.as_uri(), profile=tmp_path / "a")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []  # no errors, no blocked script, no blocked resource
    # The script never ran (it would have set an attribute on <body>), and no script element
    # exists: the caption and the URL are text.
    assert "<body>" in dom.stdout and 'data-pwned="yes"' not in dom.stdout
    assert "<script" not in dom.stdout
    assert "&lt;script&gt;document.body.setAttribute" in dom.stdout  # the caption, as text
    assert "&lt;script&gt;document.title='pwned'" in dom.stdout  # the URL, as text
    assert "<title>capfilt round 1</title>" in dom.stdout

    shot = tmp_path / "report.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1280,2600", report.as_uri(),
                     profile=tmp_path / "b")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    pixels = Image.open(shot).convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20)
    counted = {colour: n for n, colour in colours}
    # The histograms' web and synthetic bars and the kept-fraction bars are on screen...
    assert counted.get((217, 130, 43), 0) > 200 and counted.get((59, 115, 185), 0) > 200
    assert counted.get((58, 154, 91), 0) > 2000
    # ...and so are the sample thumbnails: the drawn shapes' saturated colours.
    shapes = sum(n for n, (r, g, b) in colours if max(r, g, b) - min(r, g, b) > 120)
    assert shapes > 20000
