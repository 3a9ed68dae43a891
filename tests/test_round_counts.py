"""A shard's counts and the round's totals are one type: what a shard counts, the round sums."""

import dataclasses

from manifests import ShardResult, ShardStatus
from manifests.round import Counts, Totals


def test_shard_results_and_totals_count_the_same_things():
    counted = {f.name for f in dataclasses.fields(Counts)}
    assert counted <= {f.name for f in dataclasses.fields(ShardResult)}
    assert {f.name for f in dataclasses.fields(Totals)} == counted | {"shards_done",
                                                                      "shards_failed"}


def test_totals_sum_the_finished_shards_and_merge_their_counts_by_key():
    first = ShardResult(index=0, input="a.parquet", status=ShardStatus.DONE, rows_in=5,
                        rows_out=4, rows_rejected=1, rejects_by_reason={"decode_error": 1},
                        kept_by_source={"web": 3, "synthetic": 2}, images_without_kept=1,
                        guarded_by_reason={"repetition": 1})
    second = ShardResult(index=1, input="b.parquet", status=ShardStatus.DONE, rows_in=3,
                         rows_out=1, rows_rejected=2,
                         rejects_by_reason={"decode_error": 1, "duplicate_image": 1},
                         kept_by_source={"synthetic": 1}, texts_by_source={"web": 1})
    failed = ShardResult(index=2, input="c.parquet", status=ShardStatus.FAILED, rows_in=7,
                         error="unreadable")
    totals = Totals.of([first, second, failed])
    assert totals == Totals(rows_in=8, rows_out=5, rows_rejected=3,
                            rejects_by_reason={"decode_error": 2, "duplicate_image": 1},
                            kept_by_source={"web": 3, "synthetic": 3},
                            texts_by_source={"web": 1}, images_without_kept=1,
                            guarded_by_reason={"repetition": 1}, shards_done=2, shards_failed=1)
    assert first.kept_by_source == {"web": 3, "synthetic": 2}  # the shards are not changed


def test_a_manifest_written_before_keeps_reading_the_same():
    """The JSON stays flat: a shard's counts beside its other fields, as before."""
    data = {"index": 0, "input": "a.parquet", "status": "done", "rows_in": 2, "rows_out": 2,
            "kept_by_source": {"web": 2}, "seconds": 1.5, "unknown_later_field": 1}
    shard = ShardResult.from_dict(data)
    assert (shard.rows_in, shard.kept_by_source, shard.seconds) == (2, {"web": 2}, 1.5)
    assert dataclasses.asdict(shard)["rows_out"] == 2
