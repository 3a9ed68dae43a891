"""One rank of the two-process ITC check (``test_training``): gloo on CPU, a fixed batch split
in halves, each rank's loss and feature gradients saved for the test to compare."""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from capfilt.train.objectives import itc_loss_across_ranks

BATCH, WIDTH = 8, 16
# Texts repeat across the halves (t0 at rows 0 and 6, t1 at 1 and 7): positives across ranks.
TEXTS = [f"t{i % 6}" for i in range(BATCH)]
TEMP = 0.07


def features() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (F.normalize(torch.randn(BATCH, WIDTH, generator=generator), dim=-1),
            F.normalize(torch.randn(BATCH, WIDTH, generator=generator), dim=-1))


def rank_main(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        image, text = features()
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        image, text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
        loss, sim = itc_loss_across_ranks(image, text, torch.tensor(TEMP), TEXTS[rows])
        loss.backward()
        torch.save({"loss": loss.detach(), "sim": sim.detach(), "image_grad": image.grad,
                    "text_grad": text.grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
