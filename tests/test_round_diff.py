"""``capfilt diff`` and the report's diff section, on real rounds over real img2dataset shards.

Round A keeps every text (threshold 0); over the same inputs, B keeps none (threshold 1), C
writes greedy captions (top-k 1) and keeps the best 3 texts of each image by ITC, D reads its
images from the caption column (every row rejected). A fifth round reads other inputs. The
counts the diff reports are checked against counts taken straight from the shard files.
"""

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.captioning.settings import SamplingConfig
from capfilt.evaluation.bleu import corpus_bleu
from capfilt.evaluation.caption_diversity import CaptionSample, distinct_n, self_bleu
from capfilt.rounds.diff import RoundDiffError, comparable_shards, diff_rounds
from capfilt.scoring.selection import Policy
from capfilt.shards.reader import ReaderOptions
from capfilt.shards.samples import IMG2DATASET_SCHEMA, sample_rows
from capfilt.step.stage_config import StageConfig
from manifests import read_manifest
from pipelines.cli import main
from pipelines.plan import RoundOptions
from pipelines.round import run_round
from tests.conftest import NO_GUARDS

# Entity-encoded, as alt text often is: the cleaned caption holds a terminal escape and a tag.
HOSTILE = "\x1b[31m a red &lt;script&gt;alert(1)&lt;/script&gt; circle"


def _shard(path: Path, seed: int, caption: str | None = None) -> Path:
    rows = sample_rows(4, 4, seed=seed)
    if caption is not None:
        rows[0]["caption"] = caption
    pq.write_table(pa.Table.from_pylist(rows, schema=IMG2DATASET_SCHEMA), path)
    return path


@pytest.fixture(scope="module")
def rounds(ray_local, tiny_models, img2dataset_parquet, tmp_path_factory):
    work = tmp_path_factory.mktemp("diff")
    hostile = _shard(work / "hostile.parquet", seed=3, caption=HOSTILE)
    other = _shard(work / "other.parquet", seed=4)
    same = [str(hostile), str(img2dataset_parquet)]  # the hostile row is the first example
    out = {}

    def run(name, inputs=same, sampling=SamplingConfig(num_captions=4),
            policy=Policy(threshold=0.0), parent=None, **reader):
        # Guards off: the tiny captioner's word pieces would be set aside unscored, and these
        # rounds compare what the filter and the policy do with every caption.
        stage = StageConfig(captioner=str(tiny_models["captioner"]),
                            filter=str(tiny_models["filter"]), sampling=sampling, policy=policy,
                            seed=3, guards=NO_GUARDS)
        out[name] = work / name
        run_round(RoundOptions(inputs=inputs, output=str(out[name]), stage=stage, batch_size=8,
                               workers=1, round=2 if parent else 1, parent=parent,
                               reader=ReaderOptions(**reader)))

    run("a")
    run("b", policy=Policy(threshold=1.0), parent=str(out["a"]))
    run("c", sampling=SamplingConfig(num_captions=4, top_k=1),
        policy=Policy(mode="topk", top_k=3, rank_by="itc"), parent=str(out["a"]))
    run("d", image_column="caption")
    run("other_inputs", inputs=[str(other), str(img2dataset_parquet)], parent=str(out["a"]))
    return out


def read_rows(folder: Path) -> dict:
    """(shard file, key) -> the scored row, or {"reason": ...} for a reject: from the files."""
    rows = {}
    for part, columns in (("shards", ["key", "web_caption", "kept_sources"]),
                          ("rejects", ["key", "reason"])):
        for path in sorted((folder / part).glob("*.parquet")):
            for row in pq.read_table(path, columns=columns).to_pylist():
                rows[(path.name, row["key"])] = row
    return rows


def kept_counts(row: dict | None) -> tuple[bool, int]:
    """(web caption kept, synthetic captions kept) of one row."""
    if row is None or "reason" in row:
        return False, 0
    return "web" in row["kept_sources"], row["kept_sources"].count("synthetic")


def count_flips(folder_a: Path, folder_b: Path) -> dict:
    a, b = read_rows(folder_a), read_rows(folder_b)
    assert a.keys() == b.keys()
    web, images, lost, gained, moved = Counter(), Counter(), 0, 0, Counter()
    for ident in a:
        ra, rb = a[ident], b[ident]
        if ("reason" in ra) != ("reason" in rb):
            moved["to rejected" if "reason" in rb else "to scored"] += 1
        scored = [r for r in (ra, rb) if "reason" not in r]
        if not scored:
            continue
        (web_a, syn_a), (web_b, syn_b) = kept_counts(ra), kept_counts(rb)
        if scored[0]["web_caption"] is not None:
            web[(web_a, web_b)] += 1
        images["fewer" if syn_b < syn_a else "more" if syn_b > syn_a else "same"] += 1
        lost += max(0, syn_a - syn_b)
        gained += max(0, syn_b - syn_a)
    return {"web": web, "images": images, "lost": lost, "gained": gained, "moved": moved}


def check_against_files(diff, folder_a, folder_b) -> dict:
    counted = count_flips(folder_a, folder_b)
    web = counted["web"]
    assert diff.web["kept_both"] == web[(True, True)]
    assert diff.web["dropped_both"] == web[(False, False)]
    assert sum(diff.web["kept_to_dropped"].values()) == web[(True, False)]
    assert sum(diff.web["dropped_to_kept"].values()) == web[(False, True)]
    syn = diff.synthetic
    assert (syn["images_fewer"], syn["images_more"], syn["images_same"]) == (
        counted["images"]["fewer"], counted["images"]["more"], counted["images"]["same"])
    assert sum(syn["texts_lost"].values()) == counted["lost"]
    assert sum(syn["texts_gained"].values()) == counted["gained"]
    assert sum(diff.rows["scored_to_rejected"].values()) == counted["moved"]["to rejected"]
    assert sum(diff.rows["rejected_to_scored"].values()) == counted["moved"]["to scored"]
    return counted


def test_a_stricter_threshold_drops_what_the_files_show(rounds):
    diff = diff_rounds(str(rounds["a"]), str(rounds["b"]))
    counted = check_against_files(diff, rounds["a"], rounds["b"])
    dropped = counted["web"][(True, False)]
    assert dropped == 14 and diff.web["kept_to_dropped"] == {"below the threshold": dropped}
    assert diff.synthetic["texts_lost"] == {"filter": 56} and diff.b.kept_synthetic == 0
    assert diff.rows["rejected_both"] == 4 and diff.rows["scored_both"] == 14
    assert diff.settings_changed == {"policy.threshold": [0.0, 1.0]}
    assert diff.a.synthetic_share == pytest.approx(56 / 70) and diff.b.synthetic_share is None
    assert diff.warning is None and "diversity not judged" in diff.note
    back = diff_rounds(str(rounds["b"]), str(rounds["a"]))
    check_against_files(back, rounds["b"], rounds["a"])
    assert back.web["dropped_to_kept"] == {"below the threshold": dropped}
    assert back.synthetic["texts_gained"] == {"filter": 56}


def test_greedy_captions_collapse_and_ranking_outranks(rounds):
    diff = diff_rounds(str(rounds["a"]), str(rounds["c"]))
    counted = check_against_files(diff, rounds["a"], rounds["c"])
    assert diff.web["kept_to_dropped"] == {"outranked (top-k)": counted["web"][(True, False)]}
    # the tiny filter puts some web captions below their image's greedy captions by ITC
    assert counted["web"][(True, False)] > 0 and not diff.web["dropped_to_kept"]
    assert diff.a.diversity.sample == diff.b.diversity.sample >= 20
    assert diff.b.diversity.distinct_2 < diff.a.diversity.distinct_2 * 2 / 3
    assert diff.warning.startswith("caption diversity collapsed from round 1 to round 2")
    back = diff_rounds(str(rounds["c"]), str(rounds["a"]))
    check_against_files(back, rounds["c"], rounds["a"])
    assert back.warning is None and back.note is None  # diversity rose: judged, no warning


def test_rows_rejected_in_one_round_flip_with_their_reason(rounds):
    diff = diff_rounds(str(rounds["a"]), str(rounds["d"]))
    check_against_files(diff, rounds["a"], rounds["d"])
    assert diff.rows["scored_to_rejected"] == {"undecodable_image": 14}
    assert diff.web["kept_to_dropped"] == {"row rejected: undecodable_image": 14}
    assert diff.settings_changed == {"reader.image_column": ["jpg", "caption"]}
    back = diff_rounds(str(rounds["d"]), str(rounds["a"]))
    assert back.rows["rejected_to_scored"] == {"undecodable_image": 14}


def test_the_diff_is_deterministic_and_json_plain(rounds):
    first = diff_rounds(str(rounds["a"]), str(rounds["b"]), examples=2).to_dict()
    again = diff_rounds(str(rounds["a"]), str(rounds["b"]), examples=2).to_dict()
    assert json.dumps(first) == json.dumps(again)
    assert len(first["examples"]["web_kept_to_dropped"]) == 2


def test_rounds_over_other_inputs_are_refused(rounds):
    a = read_manifest(str(rounds["a"]))
    fewer = replace(read_manifest(str(rounds["d"])), inputs=a.inputs[:1])  # as over 1 shard
    with pytest.raises(RoundDiffError, match=r"different inputs \(5 input shards in round 1, 1"):
        comparable_shards(a, fewer)
    with pytest.raises(RoundDiffError, match=r"input shard 00000: .*hostile.parquet in round 1, "
                                             r".*other.parquet in round 2, other contents"):
        diff_rounds(str(rounds["a"]), str(rounds["other_inputs"]))


def test_cli_prints_counts_and_escaped_examples(rounds, tmp_path, capsys):
    out_json = tmp_path / "diff.json"
    assert main(["diff", str(rounds["a"]), str(rounds["b"]), "--examples", "50",
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "web captions: 0 kept in both, 0 dropped in both; kept -> dropped 14 " \
           "(below the threshold 14); dropped -> kept 0" in out
    assert "rows: 14 scored in both, 4 rejected in both" in out
    assert "settings changed: policy.threshold 0.0 -> 1.0" in out
    assert "\x1b" not in out and '"\\x1b[31m a red <script>alert(1)</script> circle"' in out
    assert out.count("  web kept -> dropped (below the threshold): ") == 14
    written = json.loads(out_json.read_text())
    assert written == json.loads(json.dumps(
        diff_rounds(str(rounds["a"]), str(rounds["b"]), examples=50).to_dict()))


def test_cli_warns_when_diversity_collapses(rounds, capsys):
    assert main(["diff", str(rounds["a"]), str(rounds["c"])]) == 0
    out = capsys.readouterr().out
    assert "WARNING: caption diversity collapsed from round 1 to round 2" in out
    flipped = sum(diff_rounds(str(rounds["a"]), str(rounds["c"])).web["kept_to_dropped"].values())
    shown = out.count("  web kept -> dropped (outranked (top-k)): ")
    assert shown == min(3, flipped)  # --examples 3 by default


@pytest.mark.parametrize("which, message", [
    ("missing", "no manifest"),
    ("other_inputs", "different inputs (input shard 00000"),
    ("examples", "--examples -1: use a whole number"),
])
def test_cli_bad_input_is_one_line_and_exit_2(rounds, tmp_path, capsys, which, message):
    second = {"missing": str(tmp_path / "nowhere"), "examples": str(rounds["b"]),
              "other_inputs": str(rounds["other_inputs"])}[which]
    extra = ["--examples", "-1"] if which == "examples" else []
    assert main(["diff", str(rounds["a"]), second, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("capfilt: error: ") and message in err


def test_the_report_of_a_round_with_a_parent_shows_the_diff(rounds):
    html = (rounds["b"] / "report.html").read_text()
    section = html[html.index("<h2>Changes since the parent round</h2>"):html.index("<h2>Samples")]
    assert "<tr><th>web captions kept &rarr; dropped</th><td>14</td>" \
           "<td>below the threshold: 14</td></tr>" in section
    assert "<tr><td>policy.threshold</td><td>0.0</td><td>1.0</td></tr>" in section
    assert "<script>" not in section and "&lt;script&gt;alert(1)&lt;/script&gt;" in section
    collapsed = (rounds["c"] / "report.html").read_text()
    assert "Warning: caption diversity collapsed from round 1 to round 2" in collapsed
    other = (rounds["other_inputs"] / "report.html").read_text()
    assert "Not compared with the parent" in other and "different inputs" in other
    assert "Changes since the parent round" not in (rounds["a"] / "report.html").read_text()


def kept_synthetic(folder: Path) -> list[tuple[str, int, str]]:
    table = pq.read_table(folder / "shards", columns=["key", "kept_captions", "kept_sources"])
    return [(row["key"], place, text) for row in table.to_pylist()
            for place, text in enumerate(
                t for t, s in zip(row["kept_captions"], row["kept_sources"]) if s == "synthetic")]


def test_self_bleu_is_corpus_bleu_against_the_others(rounds):
    for folder in (rounds["a"], rounds["c"]):
        texts = [text for _, _, text in kept_synthetic(folder)][:40]
        slow = corpus_bleu(texts, [texts[:i] + texts[i + 1:] for i in range(len(texts))])
        assert self_bleu(texts) == pytest.approx(slow, abs=1e-12)
    greedy = kept_synthetic(rounds["c"])[0][2]
    assert self_bleu([greedy] * 3) == corpus_bleu([greedy], [[greedy, greedy]]) == 1.0
    assert self_bleu(["one caption"]) is None


def test_distinct_n_counts_unique_ngrams():
    assert distinct_n(["a b a b"], 1) == 2 / 4
    assert distinct_n(["a b a b", "b a"], 2) == 2 / 4  # (a b) (b a) (a b) (b a)
    assert distinct_n(["one"], 2) is None


def test_the_sample_is_the_same_in_any_order(rounds):
    captions = kept_synthetic(rounds["a"])
    shuffled = captions[:]
    random.Random(1).shuffle(shuffled)
    samples = CaptionSample(size=10), CaptionSample(size=10)
    for sample, order in zip(samples, (captions, shuffled)):
        for key, place, text in order:
            sample.add(key, place, text)
    assert samples[0].texts() == samples[1].texts() and len(samples[0].texts()) == 10
    assert samples[0].seen == len(captions)
