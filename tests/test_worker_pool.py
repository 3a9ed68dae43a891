"""How many workers a round starts, what each asks Ray for, and where each runs the step,
from the resources a cluster reports (``ray.cluster_resources()``'s keys)."""

from capfilt.step.stage_config import Placement
from workers.worker_pool import PoolSize, gpu_decoders, size_pool


def test_gpu_workers_decode_in_at_most_six_processes():
    assert gpu_decoders(16, 1) == 6
    assert gpu_decoders(16, 4) == 4
    assert gpu_decoders(2, 4) == 2


def test_one_worker_per_gpu_each_decoding_with_the_node_cores():
    size = size_pool({"GPU": 4.0, "CPU": 16.0}, workers=None, shards=10)
    assert size == PoolSize(count=4, gpus_each=1.0, cpus_each=1.0, torch_threads=None,
                            placement=Placement(device="cuda", decode_processes=4))


def test_no_more_workers_than_gpus_asked_for_or_shards():
    assert size_pool({"GPU": 8.0, "CPU": 64.0}, workers=2, shards=10).count == 2
    assert size_pool({"GPU": 8.0, "CPU": 64.0}, workers=None, shards=3).count == 3


def test_cpu_workers_leave_ray_half_the_cpu_slots_and_share_the_cores():
    """On this 2-core machine two actors asking for a whole CPU each left Ray's read tasks no
    slot and the round hung: each asks for a fraction, and torch gets its share of cores."""
    size = size_pool({"CPU": 2.0}, workers=2, shards=5)
    assert size == PoolSize(count=2, gpus_each=0.0, cpus_each=0.5, torch_threads=1,
                            placement=Placement(device="cpu"))
    assert size_pool({"CPU": 8.0}, workers=None, shards=5).count == 1
    assert size_pool({"CPU": 8.0}, workers=4, shards=1).count == 1


def test_cpu_workers_get_the_threads_of_the_workers_asked_for_whatever_shards_are_left():
    """Sums split across other thread counts round otherwise (an ITC score moved by 2e-8 on an
    AVX2 machine): a rerun with one shard left computes it as the first run did."""
    assert size_pool({"CPU": 2.0}, workers=2, shards=1).torch_threads == 1
    assert size_pool({"CPU": 8.0}, workers=4, shards=1).torch_threads == 2
    assert size_pool({"CPU": 8.0}, workers=None, shards=1).torch_threads == 8


def test_cpu_workers_decode_in_processes_only_when_asked():
    assert size_pool({"CPU": 2.0}, None, 1).placement.decode_processes == 0
    assert size_pool({"CPU": 2.0}, None, 1, cpu_decode_processes=2).placement == Placement(
        device="cpu", decode_processes=2)
