"""``capfilt calibrate`` on a real round (tiny models, real img2dataset shards, real Ray):
its figures against a count over the round's parquet, labels as CSV and parquet, bad label
files, the snippet ``capfilt run --config`` reads, and the report's section."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.calibration.labels import GUARDED, join_labels, read_labels
from capfilt.calibration.record import calibrate_round
from capfilt.calibration.thresholds import MIN_KEPT, CalibrationError, build_curve
from capfilt.captioning.settings import SamplingConfig
from capfilt.report.round_report import build_report
from capfilt.step.stage_config import StageConfig
from pipelines.cli import main
from pipelines.plan import RoundOptions
from pipelines.round import run_round
from tests.conftest import NO_GUARDS


@pytest.fixture(scope="module")
def scored_round(ray_local, tiny_models, img2dataset_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrate") / "round-0001"
    # The tiny captioner writes word pieces the caption guards would set aside unscored; this
    # round scores every text (test_a_label_on_a_guarded_caption_is_counted_apart: guards on).
    stage = StageConfig(captioner=str(tiny_models["captioner"]),
                        filter=str(tiny_models["filter"]),
                        sampling=SamplingConfig(num_captions=2), seed=5, guards=NO_GUARDS)
    manifest = run_round(RoundOptions(inputs=[str(img2dataset_parquet)], output=str(out),
                                      stage=stage, batch_size=4, workers=1))
    assert manifest.status == "complete"
    return out


def test_a_label_on_a_guarded_caption_is_counted_apart(ray_local, tiny_models,
                                                       img2dataset_parquet, tmp_path):
    """A caption a guard set aside has no score to calibrate: its label is counted unmatched,
    with that reason; the web captions beside it calibrate."""
    stage = StageConfig(captioner=str(tiny_models["captioner"]),
                        filter=str(tiny_models["filter"]),
                        sampling=SamplingConfig(num_captions=1), seed=5)
    out = tmp_path / "guarded"
    run_round(RoundOptions(inputs=[str(img2dataset_parquet)], output=str(out), stage=stage,
                           batch_size=4, workers=1))
    rows = pq.read_table(out / "shards").drop(["jpg"]).to_pylist()
    guarded = [r for r in rows if r["synthetic_guard"][0] is not None]
    assert guarded
    labels = [{"key": r["key"], "source": "web", "caption": "", "label": "right" if i % 2 else
               "wrong"} for i, r in enumerate(rows)]
    labels += [{"key": r["key"], "source": "synthetic", "caption": r["synthetic_captions"][0],
                "label": "wrong"} for r in guarded]
    joined = join_labels(str(out), read_labels(str(write_csv(tmp_path / "labels.csv", labels))))
    assert len(joined.right) == len(rows)
    assert dict(joined.unmatched) == {GUARDED: len(guarded)}
    assert None not in joined.scores["itm"]


@pytest.fixture
def round_dir(scored_round, tmp_path) -> Path:
    """A copy of the round per test: calibrate writes calibration.json and the report in it."""
    return Path(shutil.copytree(scored_round, tmp_path / "round"))


def texts_of(round_dir: Path) -> list[dict]:
    """Every scored text of the round, read straight from its parquet shards."""
    rows = pq.read_table(round_dir / "shards").drop(["jpg"]).to_pylist()
    texts = []
    for row in rows:
        texts.append({"key": row["key"], "source": "web", "caption": row["web_caption"],
                      "itm": row["web_itm"], "itc": row["web_itc"]})
        for text, itm, itc in zip(row["synthetic_captions"], row["synthetic_itm"],
                                  row["synthetic_itc"]):
            texts.append({"key": row["key"], "source": "synthetic", "caption": text,
                          "itm": itm, "itc": itc})
    return texts


def audit(texts: list[dict]) -> list[bool]:
    """An auditor's verdicts: right above the median ITM, with every fourth verdict by score
    flipped, and the best-scored text wrong (so no cut reaches a precision of 1)."""
    ranked = sorted(range(len(texts)), key=lambda i: texts[i]["itm"])
    right = [False] * len(texts)
    for rank, i in enumerate(ranked):
        right[i] = (rank >= len(texts) // 2) != (rank % 4 == 0)
    right[ranked[-1]] = False
    return right


def label_rows(texts: list[dict], right: list[bool]) -> list[dict]:
    """Web captions named by source, synthetic ones by their text."""
    return [{"key": t["key"], "source": t["source"],
             "caption": t["caption"] if t["source"] == "synthetic" else "",
             "label": "right" if r else "wrong"} for t, r in zip(texts, right)]


def write_csv(path: Path, rows: list[dict], columns=("key", "source", "caption", "label")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def calibrate(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["calibrate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_threshold_matches_a_count_over_the_round(round_dir, tmp_path):
    texts = texts_of(round_dir)
    right = audit(texts)
    labels = write_csv(tmp_path / "labels.csv", label_rows(texts, right))
    found = calibrate_round(str(round_dir), str(labels))
    assert (found.labels, found.matched, found.unmatched) == (36, 36, {})
    for score in ("itm", "itc"):
        curve = found.curves[score]
        scores = [t[score] for t in texts]
        assert (curve.labelled, curve.right) == (36, sum(right))
        assert len(curve.points) == len(set(scores))
        thresholds = [p.threshold for p in curve.points]
        assert thresholds == sorted(thresholds)
        for point in curve.points:
            kept = [r for s, r in zip(scores, right) if s >= point.threshold]
            assert point.kept == len(kept)
            assert point.precision == pytest.approx(sum(kept) / len(kept))
            assert point.recall == pytest.approx(sum(kept) / sum(right))
            assert point.keep_rate == pytest.approx(len(kept) / len(texts))
            for value, (low, high) in ((point.precision, point.precision_ci),
                                       (point.recall, point.recall_ci),
                                       (point.keep_rate, point.keep_rate_ci)):
                assert low - 1e-9 <= value <= high + 1e-9


def test_parquet_labels_give_the_curve_the_csv_gives(round_dir, tmp_path):
    texts = texts_of(round_dir)
    right = audit(texts)
    rows = label_rows(texts, right)
    from_csv = calibrate_round(str(round_dir), str(write_csv(tmp_path / "l.csv", rows)))
    for kind, value in ((pa.bool_(), lambda r: r), (pa.int64(), int)):
        table = pa.table({"key": [r["key"] for r in rows],
                          "caption": [t["caption"] for t in texts],  # every text by itself
                          "label": pa.array([value(r) for r in right], type=kind)})
        pq.write_table(table, tmp_path / "labels.parquet")
        from_parquet = calibrate_round(str(round_dir), str(tmp_path / "labels.parquet"))
        assert from_parquet.curves == from_csv.curves  # bootstrap seeded: equal to the bit


def test_intervals_are_seeded_and_narrow_with_more_labels():
    scores = [i / 40 for i in range(40)]
    right = [i % 3 != 0 or i > 30 for i in range(40)]
    once = build_curve(scores, right)
    assert build_curve(scores, right) == once
    four = build_curve(scores * 4, right * 4)
    for score in (0.25, 0.5, 0.75):
        few = next(p for p in once.points if p.threshold == score)
        many = next(p for p in four.points if p.threshold == score)
        assert many.precision == pytest.approx(few.precision)
        width = many.precision_ci[1] - many.precision_ci[0]
        assert width < few.precision_ci[1] - few.precision_ci[0]
    with pytest.raises(CalibrationError, match="all 40 labelled texts are right"):
        build_curve(scores, [True] * 40)
    with pytest.raises(CalibrationError, match="only 19 labelled texts"):
        build_curve(scores[:19], right[:19])


def test_precision_target_gives_the_lowest_threshold_whose_bound_reaches_it(
        round_dir, tmp_path, capsys, tiny_models):
    texts = texts_of(round_dir)
    right = audit(texts)
    labels = write_csv(tmp_path / "labels.csv", label_rows(texts, right))
    snippet = tmp_path / "threshold.toml"
    code, out, err = calibrate(capsys, round_dir, "--labels", labels, "--precision", 0.45,
                               "--write", snippet)
    assert code == 0, err
    record = json.loads((round_dir / "calibration.json").read_text())
    points = record["curves"]["itm"]["points"]
    expected = next(p for p in points if p["kept"] >= MIN_KEPT and p["precision_ci"][0] >= 0.45)
    threshold = record["recommendations"]["itm"]["point"]["threshold"]
    assert threshold == expected["threshold"]
    assert f"recommended: ITM >= {threshold:g}, the lowest threshold" in out
    kept = [r for t, r in zip(texts, right) if t["itm"] >= threshold]
    assert sum(kept) / len(kept) >= 0.45
    web = [t for t in texts if t["source"] == "web"]
    web_kept = sum(t["itm"] >= threshold for t in web)
    assert f"on the whole round it keeps {web_kept:,} of 12 web texts" in out
    # The snippet is what capfilt run --config reads.
    capsys.readouterr()
    assert main(["run", "--config", str(snippet), "--input", str(tmp_path),
                 "--output", str(tmp_path / "next"), "--captioner", str(tiny_models["captioner"]),
                 "--filter", str(tiny_models["filter"]), "--dry-run"]) == 0
    resolved = capsys.readouterr().out
    assert f"threshold = {threshold!r}\n" in resolved and 'policy = "threshold"\n' in resolved


def test_keep_rate_target_gives_the_closest_keep_rate(round_dir, tmp_path, capsys):
    texts = texts_of(round_dir)
    labels = write_csv(tmp_path / "labels.csv", label_rows(texts, audit(texts)))
    code, out, err = calibrate(capsys, round_dir, "--labels", labels, "--keep-rate", 0.3,
                               "--score", "itc")
    assert code == 0, err
    scores = sorted(t["itc"] for t in texts)
    closest = min((sum(s >= cut for s in scores) / len(scores) for cut in scores),
                  key=lambda rate: abs(rate - 0.3))
    point = json.loads((round_dir / "calibration.json").read_text())[
        "recommendations"]["itc"]["point"]
    assert point["keep_rate"] == pytest.approx(closest)
    assert f"recommended: ITC >= {point['threshold']:g}, the threshold whose keep-rate" in out
    assert "ITM: the same target is met at >= " in out


def test_labels_that_match_no_text_are_counted_by_reason(round_dir, tmp_path, capsys):
    texts = texts_of(round_dir)
    rows = label_rows(texts, audit(texts))
    key = rows[0]["key"]
    rows += [{"key": "no-such-key", "source": "web", "caption": "", "label": "right"},
             {"key": key, "source": "", "caption": "not a caption of it", "label": "wrong"},
             {"key": key, "source": "synthetic", "caption": "", "label": "wrong"},
             dict(rows[0])]
    labels = write_csv(tmp_path / "labels.csv", rows)
    code, out, err = calibrate(capsys, round_dir, "--labels", labels)
    assert code == 0, err
    assert "labels: 40 rows in" in out and "36 match a scored text" in out
    for line in ("not matched: 1 (key not in the round)",
                 "not matched: 1 (caption not among the texts of its image)",
                 "not matched: 1 (source synthetic, but the image has several synthetic "
                 "captions (give the caption))",
                 "not matched: 1 (text labelled more than once (the first label counts))"):
        assert line in out.splitlines()
    assert "give --precision P or --keep-rate K" in out


def test_a_target_no_threshold_reaches_exits_1_and_writes_no_snippet(round_dir, tmp_path, capsys):
    texts = texts_of(round_dir)
    labels = write_csv(tmp_path / "labels.csv", label_rows(texts, audit(texts)))
    code, out, err = calibrate(capsys, round_dir, "--labels", labels, "--precision", 1.0,
                               "--write", tmp_path / "t.toml")
    assert code == 1, err
    assert "no ITM threshold's precision has a lower 95% bound of 1 or more" in out
    assert not (tmp_path / "t.toml").exists() and (round_dir / "calibration.json").exists()


def bad_files(folder: Path, texts: list[dict]) -> dict[str, tuple[list, str]]:
    rows = label_rows(texts, audit(texts))
    few = write_csv(folder / "few.csv", rows[:5])
    maybe = write_csv(folder / "maybe.csv", rows[:3] + [dict(rows[3], label="maybe")] + rows[4:])
    wrong_only = write_csv(folder / "wrong.csv", [dict(r, label="wrong") for r in rows])
    no_label = write_csv(folder / "nolabel.csv", rows, ("key", "source"))
    no_text = write_csv(folder / "notext.csv", rows, ("key", "label"))
    odd_source = write_csv(folder / "source.csv", [dict(rows[0], source="alt", caption="")])
    (folder / "labels.json").write_text("[]")
    (folder / "broken.parquet").write_bytes(b"not parquet")
    good = write_csv(folder / "good.csv", rows)
    return {
        "few": ([few], "only 5 of the 5 labels match a scored text of the round"),
        "bad label": ([maybe], "row 5: label 'maybe': use right/wrong, true/false or 1/0"),
        "one class": ([wrong_only], "all 36 labelled texts are wrong"),
        "no label column": ([no_label], "no 'label' column (columns: key, source)"),
        "no text column": ([no_text], "no 'caption' or 'source' column"),
        "bad source": ([odd_source], "row 2: source 'alt': use web or synthetic"),
        "json": ([folder / "labels.json"], "use a .csv or .parquet file"),
        "missing": ([folder / "gone.csv"], "gone.csv: no such file"),
        "broken parquet": ([folder / "broken.parquet"], "not a readable parquet file"),
        "itc snippet": ([good, "--precision", 0.9, "--score", "itc", "--write", folder / "x.toml"],
                        "--write: capfilt run's policy thresholds ITM only"),
        "snippet without target": ([good, "--write", folder / "x.toml"],
                                   "--write needs a target"),
        "precision above 1": ([good, "--precision", 1.5], "--precision 1.5: use a number"),
        "two targets": ([good, "--precision", 0.9, "--keep-rate", 0.5],
                        "give --precision or --keep-rate, not both"),
    }


def test_bad_label_files_and_flags_exit_2_with_one_line(round_dir, tmp_path, capsys):
    for case, (args, message) in bad_files(tmp_path, texts_of(round_dir)).items():
        code, out, err = calibrate(capsys, round_dir, "--labels", *args)
        assert code == 2, (case, out, err)
        assert err.startswith("capfilt: error: ") and err.count("\n") == 1, (case, err)
        assert message in err, (case, err)
    code, _, err = calibrate(capsys, round_dir)
    assert code == 2 and "--labels FILE is required" in err
    code, _, err = calibrate(capsys, tmp_path / "no-round", "--labels", tmp_path / "good.csv")
    assert code == 2 and err.startswith("capfilt: error: ") and err.count("\n") == 1
    assert not (round_dir / "calibration.json").exists()


def test_the_report_draws_the_curves_once_labels_exist(round_dir, tmp_path, capsys):
    assert "Threshold calibration" not in build_report(str(round_dir))
    texts = texts_of(round_dir)
    labels = write_csv(tmp_path / "labels.csv", label_rows(texts, audit(texts)))
    code, out, err = calibrate(capsys, round_dir, "--labels", labels, "--precision", 0.45)
    assert code == 0, err
    threshold = json.loads((round_dir / "calibration.json").read_text())[
        "recommendations"]["itm"]["point"]["threshold"]
    html = (round_dir / "report.html").read_text()  # calibrate writes the report again
    section = html[html.index("<h2>Threshold calibration</h2>"):html.index("<h2>What was kept")]
    assert section.count("<svg") == 2 and section.count("<polyline") == 6  # 3 figures x 2 scores
    assert f"recommended {threshold:g}" in section and "round 0.5" in section
    assert "<script" not in section
    record = json.loads((round_dir / "calibration.json").read_text())
    record["filter_sha256"] = "0" * 64  # labels calibrated against another filter's scores
    (round_dir / "calibration.json").write_text(json.dumps(record))
    assert "run capfilt calibrate again" in build_report(str(round_dir))
