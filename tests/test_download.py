"""``capfilt download`` and ``capfilt run --url-list`` against real img2dataset and a real
HTTP server on 127.0.0.1 serving good, missing and broken images (``url_list_round``)."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capfilt.shards.reader import expand_inputs
from pipelines.cli import main


def test_download_writes_384px_parquet_shards_with_captions(url_list_round):
    work, _, _ = url_list_round
    shards = expand_inputs([str(work / "rounds" / "shards")])  # beside the round folder
    assert [s.rsplit("/", 1)[1] for s in shards] == ["00000.parquet"]
    rows = pa.concat_tables([pq.read_table(s) for s in shards]).to_pylist()
    assert len(rows) == 9  # img2dataset keeps failed rows too (in its own order)
    good = {r["caption"]: r for r in rows if r["status"] == "success"}
    assert len(good) == 7 and all(r["jpg"] for r in good.values())
    big = Image.open(io.BytesIO(good["a big red circle"]["jpg"]))
    assert (big.format, big.size) == ("JPEG", (512, 384))  # shorter side to BLIP's 384
    assert good["a red circle"]["width"] == 64  # small images are not blown up


def test_failures_reach_the_rounds_rejects_with_img2datasets_reason(url_list_round):
    _, _, round_dir = url_list_round
    rejects = pq.read_table(round_dir / "rejects").to_pylist()
    reasons = {r["caption"]: (r["reason"], r["message"]) for r in rejects}
    assert set(reasons) == {"a missing file", "a broken file"}
    assert reasons["a missing file"][0] == "failed_to_download"
    assert "404" in reasons["a missing file"][1]
    assert reasons["a broken file"][0] == "failed_to_resize" and reasons["a broken file"][1]
    assert pq.read_table(round_dir / "shards").num_rows == 7


def test_download_again_resumes_and_skips_finished_shards(url_list_round, capsys):
    work, urls, _ = url_list_round
    out = work / "rounds" / "shards"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # The server is gone: a shard downloaded again would fail. img2dataset's incremental
    # mode skips it, so nothing changes.
    assert main(["download", "--url-list", str(urls), "--output", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert "1 shards, 9 rows, 7 images, 2 failed" in capsys.readouterr().out


def test_download_refuses_bad_input_clearly(tmp_path, capsys):
    assert main(["download", "--url-list", str(tmp_path / "nope.parquet"), "--output",
                 str(tmp_path / "o")]) == 2
    assert "nope.parquet: not found" in capsys.readouterr().err
    odd = tmp_path / "urls.dat"
    odd.write_text("x")
    assert main(["download", "--url-list", str(odd), "--output", str(tmp_path / "o")]) == 2
    assert "--input-format" in capsys.readouterr().err
    pq.write_table(pa.table({"link": ["http://127.0.0.1:9/a.jpg"]}), tmp_path / "l.parquet")
    assert main(["download", "--url-list", str(tmp_path / "l.parquet"), "--output",
                 str(tmp_path / "o")]) == 2
    assert "no url column 'url'" in capsys.readouterr().err
