"""Run the CapFilt step under a real memory limit (RLIMIT_AS), in its own process.

Used by test_out_of_memory: the limit is set after the models are loaded and the batch is
decoded, with room for a few images at a time but not for the whole batch.
"""

import json
import resource
import sys

import pyarrow as pa

from capfilt.models.loading import load_model
from capfilt.models.tiny import write_tiny_models
from capfilt.shards.input_rows import INPUT_SCHEMA
from capfilt.shards.samples import sample_rows
from tests.conftest import make_stage


def virtual_memory() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def main(folder: str, rows: int, headroom_mib: int) -> None:
    paths = write_tiny_models(folder, image_size=256)
    # Eager attention: its score matrices (1,025 image tokens at 256 px, patch 8) are what
    # fills the capped address space at 48 images; SDPA never materialises them and fits.
    loaded = {role: load_model(str(path), role, attention="eager") for role, path in paths.items()}
    stage = make_stage(loaded)
    table = pa.Table.from_pylist(
        [{k: r[k] for k in INPUT_SCHEMA.names} for r in sample_rows(0, rows + 2, seed=1)][:rows],
        schema=INPUT_SCHEMA,
    )
    prepared = stage.prepare(table)
    stage.compute(stage.prepare(table.slice(0, 1)))  # warm up at one image
    resource.setrlimit(resource.RLIMIT_AS,
                       (virtual_memory() + headroom_mib * 2**20, resource.RLIM_INFINITY))
    out, rejects = stage.compute(prepared)
    print(json.dumps({"rows": out.num_rows, "rejects": rejects.column("reason").to_pylist(),
                      "good": len(prepared), "max_rows": stage.max_rows}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
