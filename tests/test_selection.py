"""Selection is a pure function of hand-made scores and the policy."""

import pytest

from capfilt.scoring.selection import Candidate, Policy, candidates, select

TEXTS = candidates(
    "web caption", 0.62, 0.30,
    ["syn a", "syn b", "syn c"], [0.91, 0.49, 0.50], [0.20, 0.45, 0.10],
)


def kept(policy):
    return [(c.text, c.source) for c in select(TEXTS, policy)]


def test_threshold_keeps_every_text_at_or_above_it_web_and_synthetic_alike():
    assert kept(Policy()) == [("web caption", "web"), ("syn a", "synthetic"),
                             ("syn c", "synthetic")]
    assert kept(Policy(threshold=0.95)) == []
    assert kept(Policy(threshold=0.0)) == [(c.text, c.source) for c in TEXTS]


def test_topk_ranks_web_and_synthetic_together():
    assert kept(Policy(mode="topk", top_k=2, rank_by="itm")) == [
        ("syn a", "synthetic"), ("web caption", "web")]
    assert kept(Policy(mode="topk", top_k=2, rank_by="itc")) == [
        ("syn b", "synthetic"), ("web caption", "web")]
    assert len(kept(Policy(mode="topk", top_k=10))) == 4


def test_both_ranks_only_what_passed_the_threshold():
    assert kept(Policy(mode="both", threshold=0.5, top_k=2, rank_by="itc")) == [
        ("web caption", "web"), ("syn a", "synthetic")]
    assert kept(Policy(mode="both", threshold=0.6, top_k=5, rank_by="itc")) == [
        ("web caption", "web"), ("syn a", "synthetic")]


def test_ties_keep_web_before_synthetic_and_missing_web_is_no_candidate():
    tied = [Candidate("w", "web", 0.7, 0.1), Candidate("s", "synthetic", 0.7, 0.1)]
    assert [c.text for c in select(tied, Policy(mode="topk", top_k=1))] == ["w"]
    only_synthetic = candidates(None, None, None, ["s"], [0.8], [0.2])
    assert [c.source for c in select(only_synthetic, Policy())] == ["synthetic"]


@pytest.mark.parametrize("bad", [dict(mode="best"), dict(threshold=1.5), dict(top_k=0),
                                 dict(rank_by="clip")])
def test_bad_policies_are_refused(bad):
    with pytest.raises(ValueError):
        Policy(**bad)
