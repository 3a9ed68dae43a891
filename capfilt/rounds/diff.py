"""What changed between two rounds over the same inputs (other models or settings).

Rows are matched by input shard index and key (the n-th row of a key in a shard, for the
duplicate-key rejects that share it). For each web caption: kept or not in each round, and why
not (a rejected row, the threshold, the ranking). Synthetic captions differ between rounds, so
they are compared per image by how many were kept. Then each round's synthetic share of the
kept texts and the diversity of its kept synthetic captions
(capfilt/evaluation/caption_diversity.py), with a warning when it collapses. Shard files are
found by index in the folders given, as the report and ``capfilt validate`` find them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from capfilt.evaluation.caption_diversity import CaptionSample, Diversity, diversity
from capfilt.rounds.folder import read_columns, rejects_path, shard_path
from capfilt.scoring.selection import SYNTHETIC, WEB, check_whole
from manifests import RoundManifest, read_manifest

SCORED_COLUMNS = ["key", "web_caption", "web_itm", "synthetic_captions", "kept_captions",
                  "kept_sources"]
# Diversity has collapsed when the later round's distinct-2 is under two thirds of the
# earlier's (it fell by more than a third), or its self-BLEU-4 is more than 0.2 higher; judged
# only on samples of at least MIN_JUDGED captions each.
COLLAPSE_DISTINCT_2 = 2 / 3
COLLAPSE_SELF_BLEU = 0.2
MIN_JUDGED = 20
# Parameters that do not change what a round writes.
NOT_SETTINGS = ("resolved_settings", "workers")


class RoundDiffError(ValueError):
    """The two rounds cannot be compared; the message says why."""


@dataclass
class RoundSide:
    """One round as the diff saw it: where, which, and what it kept on the compared shards."""

    folder: str
    round: int
    images: int = 0  # rows scored
    rejected: int = 0
    kept_web: int = 0
    kept_synthetic: int = 0
    images_without_kept: int = 0
    diversity: Diversity | None = None

    @property
    def synthetic_share(self) -> float | None:
        kept = self.kept_web + self.kept_synthetic
        return self.kept_synthetic / kept if kept else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["synthetic_share"] = self.synthetic_share
        return out


@dataclass
class RoundDiff:
    """Round A -> round B. Counters are keyed by reason; every list is in shard, row order."""

    a: RoundSide
    b: RoundSide
    settings_changed: dict[str, list] = field(default_factory=dict)
    shards_compared: int = 0
    shards_skipped: list[str] = field(default_factory=list)
    rows: dict = field(default_factory=lambda: {
        "scored_both": 0, "rejected_both": 0, "only_a": 0, "only_b": 0,
        "scored_to_rejected": Counter(), "rejected_to_scored": Counter(),
        "reason_changed": Counter()})
    web: dict = field(default_factory=lambda: {
        "kept_both": 0, "dropped_both": 0, "kept_to_dropped": Counter(),
        "dropped_to_kept": Counter()})
    synthetic: dict = field(default_factory=lambda: {
        "images_fewer": 0, "images_more": 0, "images_same": 0, "texts_lost": Counter(),
        "texts_gained": Counter()})
    examples: dict = field(default_factory=lambda: {
        "web_kept_to_dropped": [], "web_dropped_to_kept": [], "synthetic_fewer": [],
        "synthetic_more": []})
    warning: str | None = None
    note: str | None = None

    def to_dict(self) -> dict:
        """Plain JSON data, keys sorted where they come from the rows (deterministic output)."""
        def plain(value):
            if isinstance(value, dict):
                return {k: plain(value[k]) for k in sorted(value)}
            return value
        return {"round_a": self.a.to_dict(), "round_b": self.b.to_dict(),
                "settings_changed": plain(self.settings_changed),
                "shards_compared": self.shards_compared, "shards_skipped": self.shards_skipped,
                "rows": plain(self.rows), "web": plain(self.web),
                "synthetic": plain(self.synthetic), "examples": self.examples,
                "warning": self.warning, "note": self.note}


def diff_rounds(round_a: str, round_b: str, examples: int = 5) -> RoundDiff:
    """Compare round B with round A (same inputs); ``examples`` flipped rows kept per kind.

    Raises ``RoundDiffError`` when their inputs differ, ``ManifestError`` when either folder
    holds no round manifest.
    """
    check_whole("--examples", examples, 0)
    manifest_a, manifest_b = read_manifest(round_a), read_manifest(round_b)
    compared, skipped = comparable_shards(manifest_a, manifest_b)
    diff = RoundDiff(RoundSide(round_a, manifest_a.round), RoundSide(round_b, manifest_b.round),
                     settings_changed=settings_changed(manifest_a, manifest_b),
                     shards_compared=len(compared), shards_skipped=skipped)
    policies = (manifest_a.parameters.get("policy", {}), manifest_b.parameters.get("policy", {}))
    samples = (CaptionSample(), CaptionSample())
    for index in compared:
        rows_a, rows_b = _shard_rows(round_a, index), _shard_rows(round_b, index)
        for identity in list(rows_a) + [i for i in rows_b if i not in rows_a]:
            _compare_row(diff, identity[0], rows_a.get(identity), rows_b.get(identity),
                         policies, samples, examples)
    _judge_diversity(diff, samples)
    return diff


def comparable_shards(a: RoundManifest, b: RoundManifest) -> tuple[list[int], list[str]]:
    """The input shard indices both rounds finished, and a line for each one skipped.

    Refuses rounds whose inputs differ: another number of input shards, or a shard read with
    another sha256 (paths may differ: a copied input is the same input).
    """
    if len(a.inputs) != len(b.inputs):
        raise RoundDiffError(
            f"the rounds read different inputs ({len(a.inputs)} input shards in round "
            f"{a.round}, {len(b.inputs)} in round {b.round}); a diff compares rounds over the "
            "same inputs")
    by_index_b = {i.index: i for i in b.inputs}
    for shard in a.inputs:
        other = by_index_b.get(shard.index)
        if other is None or (shard.sha256 and other.sha256 and shard.sha256 != other.sha256):
            raise RoundDiffError(
                f"the rounds read different inputs (input shard {shard.index:05d}: "
                f"{shard.path} in round {a.round}, {other.path if other else 'none'} in round "
                f"{b.round}, other contents); a diff compares rounds over the same inputs")
    done_a = {s.index for s in a.shards if s.status == "done"}
    done_b = {s.index for s in b.shards if s.status == "done"}
    skipped = [f"shard {i:05d}: not finished in round {a.round if i not in done_a else b.round}"
               for i in sorted((done_a | done_b) - (done_a & done_b))]
    return sorted(done_a & done_b), skipped


def settings_changed(a: RoundManifest, b: RoundManifest) -> dict[str, list]:
    """Each parameter or model weights hash that differs, dotted name -> [in A, in B]."""
    def flat(values: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in values.items():
            if prefix == "" and key in NOT_SETTINGS:
                continue
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    def weights(m: RoundManifest) -> dict:
        return {f"{model.role}_weights_sha256": model.weights_sha256 for model in m.models}

    before = {**flat(a.parameters), **weights(a)}
    after = {**flat(b.parameters), **weights(b)}
    return {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)}


def _read(url: str, columns: list[str]) -> list[dict]:
    try:
        return read_columns(url, columns).to_pylist()
    except ValueError as exc:
        raise RoundDiffError(str(exc)) from exc


def _shard_rows(round_dir: str, index: int) -> dict[tuple, dict]:
    """A shard's rows by (key, n-th row of that key): scored rows as read, rejects as
    ``{"reason": ...}``."""
    rows: dict[tuple, dict] = {}
    seen: Counter = Counter()
    scored = _read(shard_path(round_dir, index), SCORED_COLUMNS)
    rejected = _read(rejects_path(round_dir, index), ["key", "reason"])
    for row in scored + [{"reason": r["reason"] or "unknown", "key": r["key"]} for r in rejected]:
        rows[(row["key"], seen[row["key"]])] = row
        seen[row["key"]] += 1
    return rows


def why_web_dropped(row: dict, policy: dict) -> str:
    """Why a round did not keep a row's web caption: its reject reason, or the policy's."""
    if "reason" in row:
        return f"row rejected: {row['reason']}"
    mode = policy.get("mode", "threshold")
    itm = row["web_itm"]
    if mode in ("threshold", "both") and (itm is None or itm < policy.get("threshold", 0.5)):
        return "below the threshold"
    return "outranked (top-k)"


def _kept(row: dict | None, source: str) -> list[str]:
    if row is None or "reason" in row:
        return []
    return [t for t, s in zip(row["kept_captions"], row["kept_sources"]) if s == source]


def _tally(side: RoundSide, row: dict | None, sample: CaptionSample) -> None:
    if row is None:
        return
    if "reason" in row:
        side.rejected += 1
        return
    side.images += 1
    web, synthetic = _kept(row, WEB), _kept(row, SYNTHETIC)
    side.kept_web += len(web)
    side.kept_synthetic += len(synthetic)
    side.images_without_kept += not (web or synthetic)
    for place, text in enumerate(synthetic):
        sample.add(row["key"], place, text)


def _compare_row(diff: RoundDiff, key, a: dict | None, b: dict | None, policies: tuple,
                 samples: tuple, examples: int) -> None:
    _tally(diff.a, a, samples[0])
    _tally(diff.b, b, samples[1])
    rows = diff.rows
    if a is None or b is None:
        rows["only_a" if b is None else "only_b"] += 1
        return
    rejected_a, rejected_b = "reason" in a, "reason" in b
    if rejected_a and rejected_b:
        rows["rejected_both"] += 1
        if a["reason"] != b["reason"]:
            rows["reason_changed"][f"{a['reason']} -> {b['reason']}"] += 1
        return
    if rejected_a or rejected_b:
        moved = "rejected_to_scored" if rejected_a else "scored_to_rejected"
        rows[moved][(a if rejected_a else b)["reason"]] += 1
    else:
        rows["scored_both"] += 1
    _compare_web(diff, key, a, b, policies, examples)
    _compare_synthetic(diff, key, a, b, examples)


def _compare_web(diff: RoundDiff, key, a: dict, b: dict, policies: tuple, examples: int) -> None:
    caption = next((r["web_caption"] for r in (a, b) if "reason" not in r), None)
    if caption is None:
        return
    kept_a, kept_b = bool(_kept(a, WEB)), bool(_kept(b, WEB))
    if kept_a == kept_b:
        diff.web["kept_both" if kept_a else "dropped_both"] += 1
        return
    flip = "kept_to_dropped" if kept_a else "dropped_to_kept"
    reason = why_web_dropped(b, policies[1]) if kept_a else why_web_dropped(a, policies[0])
    diff.web[flip][reason] += 1
    shown = diff.examples[f"web_{flip}"]
    if len(shown) < examples:
        shown.append({"key": key, "caption": caption, "itm_a": a.get("web_itm"),
                      "itm_b": b.get("web_itm"), "reason": reason})


def _compare_synthetic(diff: RoundDiff, key, a: dict, b: dict, examples: int) -> None:
    kept_a, kept_b = _kept(a, SYNTHETIC), _kept(b, SYNTHETIC)
    if len(kept_a) == len(kept_b):
        diff.synthetic["images_same"] += 1
        return
    fewer = len(kept_b) < len(kept_a)
    # Why the round that kept fewer did: its row was rejected, it wrote fewer captions than
    # the other kept, or its filter and policy passed fewer.
    short = b if fewer else a
    if "reason" in short:
        reason = f"row rejected: {short['reason']}"
    elif len(short["synthetic_captions"]) < max(len(kept_a), len(kept_b)):
        reason = "fewer captions written"
    else:
        reason = "filter"
    diff.synthetic["images_fewer" if fewer else "images_more"] += 1
    diff.synthetic["texts_lost" if fewer else "texts_gained"][reason] += abs(
        len(kept_a) - len(kept_b))
    shown = diff.examples["synthetic_fewer" if fewer else "synthetic_more"]
    if len(shown) < examples:
        shown.append({"key": key, "kept_a": kept_a, "kept_b": kept_b, "reason": reason})


def _judge_diversity(diff: RoundDiff, samples: tuple[CaptionSample, CaptionSample]) -> None:
    """Both rounds measured on samples of one size; a warning when B's collapsed."""
    texts = [s.texts() for s in samples]
    size = min(len(texts[0]), len(texts[1]))
    diff.a.diversity = diversity(texts[0][:size], samples[0].seen)
    diff.b.diversity = diversity(texts[1][:size], samples[1].seen)
    if size < MIN_JUDGED:
        diff.note = (f"diversity not judged: {size} kept synthetic captions to compare, "
                     f"fewer than {MIN_JUDGED}")
        return
    diff.warning = collapse_warning(diff.a.diversity, diff.b.diversity, diff.a.round,
                                    diff.b.round)


def collapse_warning(a: Diversity, b: Diversity, round_a: int, round_b: int) -> str | None:
    """One line when B's kept synthetic captions are much less varied than A's, else None."""
    found = []
    if (a.distinct_2 and b.distinct_2 is not None
            and b.distinct_2 < COLLAPSE_DISTINCT_2 * a.distinct_2):
        found.append(f"distinct-2 {a.distinct_2:.3f} -> {b.distinct_2:.3f} (fell by "
                     f"{1 - b.distinct_2 / a.distinct_2:.0%}, more than a third)")
    if (a.self_bleu_4 is not None and b.self_bleu_4 is not None
            and b.self_bleu_4 - a.self_bleu_4 > COLLAPSE_SELF_BLEU):
        found.append(f"self-BLEU-4 {a.self_bleu_4:.3f} -> {b.self_bleu_4:.3f} (rose by "
                     f"{b.self_bleu_4 - a.self_bleu_4:.3f}, more than {COLLAPSE_SELF_BLEU:g})")
    if not found:
        return None
    return (f"caption diversity collapsed from round {round_a} to round {round_b}: "
            + "; ".join(found))
