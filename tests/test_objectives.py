"""BLIP's training objectives, piece by piece, against what salesforce/BLIP's code computes:
momentum encoders, the feature queues, momentum distillation and its alpha ramp, hard negatives
(per rank and across ranks), export without the momentum copies, gradient checkpointing.

Tiny real models on the CPU; the cross-rank checks run two real processes joined by gloo
(this file is also their entry point: ``python -m tests.test_objectives RANK ...``).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.checkpoint import set_checkpoint_early_stop
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.models.tiny import tiny_processor
from capfilt.train import tasks as tasks_module
from capfilt.train.build import build_task
from capfilt.train.loop import TrainConfig
from capfilt.train.momentum import MOMENTUM_PARTS, MomentumEncoders
from capfilt.train.objectives import (
    hard_negatives,
    itc_distilled,
    itc_loss,
    negative_weights,
    same_text,
    text_ids,
)

BATCH, QUEUE = 4, 12
# One batch per step; texts repeat within a batch (rows 0 and 2) and across steps.
STEP_TEXTS = [
    ["a red square on blue", "a blue circle", "a red square on blue", "the dog on the beach"],
    ["a green star", "two cats", "a red square on blue", "a house by the sea"],
    ["a tree", "a man walking", "a woman sitting", "a car on the road"],
    ["a blue circle", "a plate of food", "a big window", "people on the street"],
    ["a small table", "a yellow triangle", "a cat", "the sky over water"],
]


def train_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"steps": 10, "batch_size": BATCH, "queue_size": QUEUE, **overrides})


def build(blank, task: str, config: TrainConfig | None = None, **overrides):
    config = train_config(**overrides) if config is None else config
    return build_task(task, f"scratch:{blank}", config=config).task.train()


def batch(task, step: int, texts: list[str] | None = None):
    texts = STEP_TEXTS[step % len(STEP_TEXTS)] if texts is None else texts
    pixels = torch.randn(len(texts), 3, 32, 32, generator=torch.Generator().manual_seed(step))
    ids, mask = task.text_encoding(texts)
    return pixels, ids, mask, texts


def online_model(task) -> BlipForImageTextRetrieval:
    return task.pair.filter if task.name == "pretrain" else task.filter


def temperature(task) -> torch.Tensor:
    return (task.pair.temp if task.name == "pretrain" else task.temp).detach()


def part_params(model, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in getattr(model, name).named_parameters()}


@torch.no_grad()
def itc_features(model, pixels, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ITC features of ``model``'s four parts, as BLIP computes them."""
    embeds = model.vision_model(pixel_values=pixels)[0]
    image = F.normalize(model.vision_proj(embeds[:, 0, :]), dim=-1)
    text = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return image, F.normalize(model.text_proj(text[:, 0, :]), dim=-1)


def train_step(task, optimizer, step: int, progress: float = 0.0) -> dict:
    losses = task(*batch(task, step), torch.Generator().manual_seed(step), progress)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    return losses


# --- momentum encoders -------------------------------------------------------------------------

def test_momentum_encoders_start_as_copies_and_move_by_ema_not_by_gradient(blank):
    task = build(blank, "pretrain", momentum_decay=0.9)
    online, momentum = task.pair.filter, task.momentum
    for name in MOMENTUM_PARTS:
        for (key, m), (_, p) in zip(getattr(momentum, name).named_parameters(),
                                    getattr(online, name).named_parameters()):
            assert torch.equal(m, p) and m is not p, (name, key)
            assert not m.requires_grad
    # As the loop does: every parameter to AdamW, weight decay on.
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2, weight_decay=0.05)
    train_step(task, optimizer, 0)
    assert all(p.grad is None for p in momentum.parameters())
    old = {name: part_params(momentum, name) for name in MOMENTUM_PARTS}
    new = {name: part_params(online, name) for name in MOMENTUM_PARTS}
    # The optimizer step moved the online weights away from their copies.
    assert any(not torch.equal(old[n][k], new[n][k]) for n in old for k in old[n])
    train_step(task, optimizer, 1)  # its forward updates the copies first
    changed = 0
    for name in MOMENTUM_PARTS:
        for key, value in getattr(momentum, name).named_parameters():
            expected = 0.9 * old[name][key] + 0.1 * new[name][key]
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
            changed += not torch.equal(value, old[name][key])
    assert changed > 10


# --- the queue --------------------------------------------------------------------------------

def test_queue_holds_the_momentum_features_of_the_last_global_batches(blank):
    task = build(blank, "filter", momentum_decay=0.8)
    start_image = task.momentum.image_queue.clone()
    assert torch.allclose(start_image.norm(dim=0), torch.ones(QUEUE))  # random, normalised
    # An independent momentum model: a copy of the online one, moved by hand.
    reference = copy.deepcopy(task.filter)
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2)
    expected = []
    for step in range(5):
        with torch.no_grad():
            for name in MOMENTUM_PARTS:
                mine = dict(getattr(reference, name).named_parameters())
                for key, p in getattr(task.filter, name).named_parameters():
                    mine[key].copy_(0.8 * mine[key] + 0.2 * p)
        pixels, ids, mask, texts = batch(task, step)
        expected.append((*itc_features(reference, pixels, ids, mask), text_ids(texts)))
        train_step(task, optimizer, step)
        if step == 0:
            assert int(task.momentum.queue_ptr) == BATCH
            # Only the first batch's columns were written.
            assert torch.equal(task.momentum.image_queue[:, BATCH:], start_image[:, BATCH:])
    # 5 batches of 4 into 12 columns: steps 3, 4 at columns 0-3, 4-7; step 2 still at 8-11.
    assert int(task.momentum.queue_ptr) == 5 * BATCH % QUEUE == 8
    for step, columns in ((3, slice(0, 4)), (4, slice(4, 8)), (2, slice(8, 12))):
        image, text, ids = expected[step]
        torch.testing.assert_close(task.momentum.image_queue[:, columns], image.t(), atol=1e-5, rtol=0)
        torch.testing.assert_close(task.momentum.text_queue[:, columns], text.t(), atol=1e-5, rtol=0)
        assert torch.equal(task.momentum.id_queue[columns], ids)


def test_a_queue_size_that_does_not_divide_by_the_global_batch_is_refused(blank):
    for task in ("pretrain", "filter"):
        with pytest.raises(ValueError, match="queue_size 100 is not a multiple of the global batch_size 16"):
            build(blank, task, batch_size=16, queue_size=100)
        with pytest.raises(ValueError, match="queue_size 8 is not a multiple of the global batch_size 16"):
            build(blank, task, batch_size=16, queue_size=8)
    # No queue, nothing to refuse: momentum off, or the captioner (BLIP's has no momentum).
    assert build(blank, "filter", batch_size=16, queue_size=100, momentum=False).momentum is None
    build(blank, "captioner", batch_size=16, queue_size=100)
    # And at run time, a batch that does not fit.
    encoders = MomentumEncoders(build(blank, "filter").filter, queue_size=QUEUE)
    with pytest.raises(ValueError, match="queue size 12 does not divide by the global batch 5"):
        encoders.enqueue(torch.zeros(5, 32), torch.zeros(5, 32))


# --- distillation -----------------------------------------------------------------------------

def test_distillation_targets_are_alpha_softmax_of_momentum_sims_plus_hard_targets():
    generator = torch.Generator().manual_seed(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=generator), dim=-1)

    rows, queue, dim, alpha = 4, 6, 8, 0.3
    image, text = unit(rows, dim).requires_grad_(), unit(rows, dim).requires_grad_()
    image_m, text_m = unit(rows, dim), unit(rows, dim)
    image_queue, text_queue = unit(queue, dim).t(), unit(queue, dim).t()
    temp = torch.tensor(0.1, requires_grad=True)
    positive = same_text(["a", "b", "a", "c"])
    queue_positive = torch.zeros(rows, queue, dtype=torch.bool)
    queue_positive[1, 4] = True  # text "b" is also queued at column 4
    got = itc_distilled(image, text, image_m, text_m, image_queue, text_queue, temp, positive,
                        alpha, queue_positive)

    def by_hand(feat_m, other_m, other_queue, pos):
        candidates = torch.cat([other_m, other_queue.t()])  # rows + queue columns, as rows
        targets = torch.zeros(rows, rows + queue)
        for i in range(rows):
            sims = torch.tensor([float(feat_m[i] @ c) / 0.1 for c in candidates])
            soft = sims.exp() / sims.exp().sum()
            hits = [j for j in range(rows) if pos[i, j]] + [rows + k for k in range(queue)
                                                            if queue_positive[i, k]]
            hard = torch.zeros(rows + queue)
            hard[hits] = 1.0 / len(hits)
            targets[i] = alpha * soft + (1 - alpha) * hard
        return targets, candidates

    targets_i2t, texts_all = by_hand(image_m, text_m, text_queue, positive)
    targets_t2i, images_all = by_hand(text_m, image_m, image_queue, positive.t())
    torch.testing.assert_close(got.targets_i2t, targets_i2t, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.targets_t2i, targets_t2i, atol=1e-6, rtol=0)
    assert targets_i2t[0, 2] > 0.3 and targets_i2t[1, rows + 4] > 0.3  # the hard positives
    loss_i2t = -(F.log_softmax(image @ texts_all.t() / 0.1, dim=1) * targets_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(text @ images_all.t() / 0.1, dim=1) * targets_t2i).sum(1).mean()
    torch.testing.assert_close(got.loss, (loss_i2t + loss_t2i) / 2)
    got.loss.backward()
    assert image.grad is not None and text.grad is not None and temp.grad is not None
    # Under the loop's bf16 autocast the similarities stay float32 (bf16 would be off by ~1e-2).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = itc_distilled(image, text, image_m, text_m, image_queue, text_queue, temp,
                              positive, alpha, queue_positive)
    assert mixed.sim_i2t.dtype == torch.float32
    torch.testing.assert_close(mixed.sim_i2t, got.sim_i2t, rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed.loss, got.loss, rtol=0, atol=1e-6)


def test_alpha_ramps_over_two_epochs_in_pretraining_and_one_in_the_filter_finetune(blank):
    pretrain, filter_task = build(blank, "pretrain"), build(blank, "filter")
    length = 7  # batches per epoch
    for epoch in range(4):
        for i in range(length):
            progress = (epoch * length + i) / length
            # pretrain.py: alpha * min(1, (epoch * len + i) / (2 * len))
            assert pretrain.alpha_at(progress) == pytest.approx(0.4 * min(1, (epoch * length + i) / (2 * length)))
            # train_retrieval.py: alpha in later epochs, alpha * min(1, i / len) in the first
            blip = 0.4 if epoch > 0 else 0.4 * min(1, i / length)
            assert filter_task.alpha_at(progress) == pytest.approx(blip)
    assert pretrain.alpha_at(1.0) == pytest.approx(0.2) and filter_task.alpha_at(1.0) == pytest.approx(0.4)
    assert build(blank, "filter", momentum=False).alpha_at(5.0) == 0.0


@pytest.mark.parametrize("name, progress", [("pretrain", 1.0), ("filter", 0.5)])
def test_a_tasks_itc_is_blips_distilled_loss_and_its_negatives_blips_draw(blank, monkeypatch,
                                                                          name, progress):
    """The task's ITC, recomputed here from its online model, the momentum features it queued
    and the queue before the step, at alpha = 0.2 (pretrain: 0.4 * 1.0 / 2 epochs; filter:
    0.4 * 0.5 / 1 epoch); and the similarities ITM's negatives were drawn from."""
    task = build(blank, name)
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2)
    train_step(task, optimizer, 0)  # batch 0 now in the queue; batch 1 repeats one of its texts
    drawn = {}

    def recording(sim_i2t, positive, generator=None, uniform_mix=0.0, *, sim_t2i=None, floor=0.0):
        drawn.update(sim_i2t=sim_i2t, sim_t2i=sim_t2i, floor=floor, positive=positive)
        return hard_negatives(sim_i2t, positive, generator, uniform_mix, sim_t2i=sim_t2i, floor=floor)

    monkeypatch.setattr(tasks_module, "hard_negatives", recording)
    image_queue, text_queue = task.momentum.queues()
    id_queue = task.momentum.id_queue.clone() if task.momentum.with_ids else None
    pixels, ids, mask, texts = batch(task, 1)
    ptr = int(task.momentum.queue_ptr)
    losses = task(pixels, ids, mask, texts, torch.Generator().manual_seed(1), progress)
    image_m = task.momentum.image_queue[:, ptr:ptr + BATCH].t()  # what it queued: its momentum
    text_m = task.momentum.text_queue[:, ptr:ptr + BATCH].t()    # features of this batch
    image, text = itc_features(online_model(task), pixels, ids, mask)
    temp = temperature(task)

    def itc_by_hand(alpha: float, queue_positives: bool) -> torch.Tensor:
        total = 0.0
        for feat, feat_m, others_m, queue in ((image, image_m, text_m, text_queue),
                                              (text, text_m, image_m, image_queue)):
            candidates = torch.cat([others_m, queue.t()])
            soft = F.softmax(feat_m @ candidates.t() / temp, dim=1)
            hard = torch.zeros_like(soft)
            for i in range(BATCH):
                for j in range(BATCH):
                    hard[i, j] = float(texts[i] == texts[j])
                if queue_positives:
                    hard[i, BATCH:] = (id_queue == text_ids([texts[i]])[0]).float()
            hard = hard / hard.sum(1, keepdim=True)
            targets = alpha * soft + (1 - alpha) * hard
            total = total - (F.log_softmax(feat @ candidates.t() / temp, dim=1) * targets).sum(1).mean()
        return total / 2

    queued_positive = name == "filter"  # BLIP's retrieval keeps ids in the queue; pre-training not
    expected = itc_by_hand(0.2, queued_positive)
    torch.testing.assert_close(losses["itc"].detach(), expected, atol=1e-5, rtol=1e-5)
    assert abs(float(itc_by_hand(0.4, queued_positive) - expected)) > 1e-3
    if queued_positive:
        assert int((id_queue == text_ids(["a red square on blue"])[0]).sum()) == 2
        assert abs(float(itc_by_hand(0.2, False) - expected)) > 1e-3

    if name == "pretrain":  # blip_pretrain.py: online against momentum features, + 1e-4
        torch.testing.assert_close(drawn["sim_i2t"], image @ text_m.t() / temp, atol=1e-5, rtol=0)
        torch.testing.assert_close(drawn["sim_t2i"], text @ image_m.t() / temp, atol=1e-5, rtol=0)
        assert drawn["floor"] == 1e-4
    else:  # blip_retrieval.py: online against online, nothing added
        torch.testing.assert_close(drawn["sim_i2t"], image @ text.t() / temp, atol=1e-5, rtol=0)
        assert drawn["sim_t2i"] is None and drawn["floor"] == 0.0
    assert torch.equal(drawn["positive"], same_text(texts))


def test_with_momentum_off_itc_is_the_in_batch_loss_as_before(blank):
    task = build_task("filter", f"scratch:{blank}").task.train()  # no config: as before it
    assert task.momentum is None and not any("momentum" in k for k in task.state_dict())
    pixels, ids, mask, texts = batch(task, 0)
    losses = task(pixels, ids, mask, texts, torch.Generator().manual_seed(0))
    image, text = itc_features(task.filter, pixels, ids, mask)
    expected, _ = itc_loss(image, text, temperature(task), same_text(texts))
    torch.testing.assert_close(losses["itc"].detach(), expected)


# --- hard negatives ---------------------------------------------------------------------------

def test_negative_weights_are_softmax_plus_floor_with_positives_zeroed():
    sim = torch.tensor([[1.0, 2.0, -30.0], [0.5, 0.0, 3.0]])
    positive = torch.tensor([[True, False, False], [False, True, True]])
    got = negative_weights(sim, positive, floor=1e-4)
    expected = F.softmax(sim, dim=1) + 1e-4
    expected[positive] = 0
    torch.testing.assert_close(got, expected)
    assert got[0, 2] == pytest.approx(1e-4)  # BLIP's floor: a far candidate can still be drawn
    assert negative_weights(sim, positive)[0, 2] < 1e-13
    # More candidates than rows (a gathered batch), and a row with no negative left.
    wide = negative_weights(torch.zeros(2, 4), torch.tensor([[True] * 4, [True, False, True, True]]))
    assert wide[0].tolist() == [0.0, 1.0, 1.0, 1.0] and wide[1].tolist() == [0.0, 0.25, 0.0, 0.0]


def test_negative_images_follow_the_text_to_image_sims_when_given():
    """BLIP's pre-training draws a text's negative image from text-online against
    image-momentum similarities, not from the transpose of the image-to-text ones."""
    sim_i2t = torch.zeros(3, 3)
    sim_i2t[1, 0] = 9.0  # image 1 and text 0 look alike
    sim_t2i = torch.zeros(3, 3)
    sim_t2i[0, 2] = 9.0  # text 0 and image 2 look alike, to the momentum encoder
    positive = torch.eye(3, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    given = [hard_negatives(sim_i2t, positive, generator, sim_t2i=sim_t2i) for _ in range(50)]
    transposed = [hard_negatives(sim_i2t, positive, generator) for _ in range(50)]
    assert sum(int(images[0]) == 2 for _, images in given) > 45
    assert sum(int(images[0]) == 1 for _, images in transposed) > 45
    # The negative texts follow sim_i2t either way: image 1's is text 0.
    assert sum(int(texts[1]) == 0 for texts, _ in given + transposed) > 90


# --- export, state_dict, resume ------------------------------------------------------------------

def test_exports_hold_no_momentum_and_the_state_dict_does(blank, tmp_path):
    task = build(blank, "pretrain")
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2)
    train_step(task, optimizer, 0)
    state = task.state_dict()
    for key in ("momentum.image_queue", "momentum.text_queue", "momentum.queue_ptr",
                "momentum.vision_proj.weight", "momentum.text_proj.weight"):
        assert key in state
    assert any(k.startswith("momentum.vision_model.") for k in state)
    assert any(k.startswith("momentum.text_encoder.") for k in state)
    assert int(state["momentum.queue_ptr"]) == BATCH

    paths = task.export(tmp_path / "out", tiny_processor(32))
    assert set(paths) == {"filter", "captioner"}
    for role, model_class, online in (("filter", BlipForImageTextRetrieval, task.pair.filter),
                                      ("captioner", BlipForConditionalGeneration, task.pair.captioner)):
        with safe_open(str(paths[role] / "model.safetensors"), "pt") as saved:
            keys = list(saved.keys())
        assert keys and not [k for k in keys if "momentum" in k or "queue" in k]
        loaded = model_class.from_pretrained(paths[role])
        for key, value in online.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key

    # A training checkpoint resumes the copies and the queue: the next step is the same.
    resumed = build(blank, "pretrain", seed=5)  # another queue start, to be overwritten
    assert not torch.equal(resumed.momentum.image_queue, task.momentum.image_queue)
    resumed.load_state_dict(state)
    first = task(*batch(task, 1), torch.Generator().manual_seed(1), 0.5)
    second = resumed(*batch(task, 1), torch.Generator().manual_seed(1), 0.5)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    assert torch.equal(task.momentum.image_queue, resumed.momentum.image_queue)
    assert "momentum.id_queue" in build(blank, "filter").state_dict()


# --- gradient checkpointing -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pretrain", "filter", "captioner"])
def test_gradient_checkpointing_recomputes_layers_and_changes_no_loss_or_gradient(blank, name):
    results = {}
    for checkpointing in (False, True, "whole"):
        task = build(blank, name, grad_checkpointing=bool(checkpointing))
        layers = {"vision": task.online_models()[0].vision_model.encoder.layers[0].mlp}
        if name == "captioner":
            layers["text"] = task.captioner.text_decoder.bert.encoder.layer[0].intermediate
        else:
            layers["text"] = online_model(task).text_encoder.encoder.layer[0].intermediate
        if name == "pretrain":  # the decoder's own self-attention
            layers["decoder"] = task.pair.captioner.text_decoder.bert.encoder.layer[0].attention
        calls = dict.fromkeys(layers, 0)
        for key, module in layers.items():
            module.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        # "whole": torch stops a recomputation once it has every tensor the backward needs
        # (here inside the vision layers' MLP, before its forward hook fires); without that
        # early stop, all of a layer reruns and every hook fires again.
        with set_checkpoint_early_stop(checkpointing != "whole"):
            losses = task(*batch(task, 0), torch.Generator().manual_seed(0), 1.0)
            sum(losses.values()).backward()
        grads = {k: p.grad.clone() for k, p in task.named_parameters() if p.grad is not None}
        results[checkpointing] = (losses, grads, calls)
    (plain, plain_grads, plain_calls), (ckpt, ckpt_grads, _) = results[False], results[True]
    whole_calls = results["whole"][2]
    # Every checkpointed layer ran once more, in the backward pass.
    for key in plain_calls:
        assert plain_calls[key] > 0 and whole_calls[key] == 2 * plain_calls[key], (key, plain_calls, whole_calls)
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 20
    for key in plain_grads:
        torch.testing.assert_close(ckpt_grads[key], plain_grads[key], rtol=1e-5, atol=1e-6)


# --- two ranks ----------------------------------------------------------------------------------

# Rank 1's texts are longer (other token lengths); "a blue circle" is on both ranks.
RANK_TEXTS = [
    ["a blue circle", "a red square", "a dog", "two cats"],
    ["a green star on a black background", "a blue circle", "a man walking on the street",
     "a small house next to a big tree"],
]
RANK_STEPS = 8


def test_two_ranks_draw_negatives_from_the_global_batch_and_share_one_queue(blank, tmp_path):
    root = Path(__file__).resolve().parent.parent
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.test_objectives", str(rank), "2",
                               str(tmp_path / "init"), str(blank), str(tmp_path)], cwd=root)
             for rank in range(2)]
    assert [r.wait(timeout=180) for r in ranks] == [0, 0]
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    tokenizer = tiny_processor(32).tokenizer
    every = RANK_TEXTS[0] + RANK_TEXTS[1]
    # Every rank's texts as token ids with [ENC] first, padded to the longest on any rank.
    enc = tokenizer(every, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    enc_ids = enc.input_ids.clone()
    enc_ids[:, 0] = got[0]["enc_id"]
    embeds = torch.cat([got[0]["embeds"], got[1]["embeds"]])
    assert not torch.equal(got[0]["embeds"], got[1]["embeds"])

    other_rank_draws = 0
    for rank, part in enumerate(got):
        own = slice(rank * BATCH, (rank + 1) * BATCH)
        positive = same_text(every)[own]
        other = slice(BATCH, 2 * BATCH) if rank == 0 else slice(0, BATCH)
        assert positive[:, other].any()  # "a blue circle" is on both ranks
        for call in part["all_rank"]:
            assert call["width"] == 2 * BATCH
            assert torch.equal(call["positive"], positive)
            for picks in call["picks"]:
                assert not positive[torch.arange(BATCH), picks].any()  # never a positive
                other_rank_draws += int(((picks < own.start) | (picks >= own.stop)).sum())
            # What ITM was run on: this rank's pairs, then the drawn texts and images.
            neg_text, neg_image = call["picks"]
            assert torch.equal(call["itm_ids"][BATCH:2 * BATCH], enc_ids[neg_text])
            assert torch.equal(call["itm_ids"][:BATCH], enc_ids[own])
            torch.testing.assert_close(call["itm_images"][2 * BATCH:], embeds[neg_image])
        for call in part["per_rank"]:  # negative_all_rank off: this rank's rows only
            assert call["width"] == BATCH
            assert all(int(p.max()) < BATCH for p in call["picks"])
    assert other_rank_draws > RANK_STEPS  # out of 2 ranks x 8 steps x 8 draws

    # One queue on both ranks, fed with the global batch in rank order.
    for mode in ("all_rank", "ddp"):
        first, second = got[0][f"{mode}_queue"], got[1][f"{mode}_queue"]
        for key in first:
            assert torch.equal(first[key], second[key]), (mode, key)
    queue = got[0]["all_rank_queue"]
    ptr = RANK_STEPS * 2 * BATCH % 16
    assert int(queue["queue_ptr"]) == ptr == 0
    last = slice(16 - 2 * BATCH, 16)  # the last step's global batch
    assert torch.equal(queue["id_queue"][last], text_ids(every))
    momentum = torch.cat([got[0]["momentum_image"], got[1]["momentum_image"]])
    torch.testing.assert_close(queue["image_queue"][:, last], momentum.t(), atol=1e-6, rtol=0)
    # Under DDP (gloo), training steps keep the ranks' weights, copies and queues equal.
    for key in got[0]["ddp_params"]:
        assert torch.equal(got[0]["ddp_params"][key], got[1]["ddp_params"][key]), key
    assert got[0]["ddp_moved"] and got[1]["ddp_moved"]


def _rank_main(rank: int, world: int, init_file: str, blank: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        calls: list[dict] = []

        def recording(sim_i2t, positive, generator=None, uniform_mix=0.0, *, sim_t2i=None,
                      floor=0.0):
            picks = hard_negatives(sim_i2t, positive, generator, uniform_mix, sim_t2i=sim_t2i,
                                   floor=floor)
            calls.append({"width": sim_i2t.shape[1], "positive": positive.clone(), "picks": picks})
            return picks

        tasks_module.hard_negatives = recording
        texts = RANK_TEXTS[rank]
        pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(100 + rank))
        saved: dict = {}
        for mode in ("all_rank", "per_rank"):
            calls.clear()
            config = TrainConfig(steps=1, batch_size=2 * BATCH, queue_size=16,
                                 negative_all_rank=mode == "all_rank")
            task = build_task("filter", f"scratch:{blank}", config=config).task.train()
            ids, mask = task.text_encoding(texts)
            itm_inputs = []

            def capture(module, args, kwargs):
                if kwargs.get("encoder_hidden_states") is not None:
                    itm_inputs.append((kwargs["input_ids"].clone(),
                                       kwargs["encoder_hidden_states"].detach().clone()))

            task.filter.text_encoder.register_forward_pre_hook(capture, with_kwargs=True)
            momentum_features = []
            features = task.momentum.features
            task.momentum.features = lambda *a: momentum_features.append(features(*a)) or momentum_features[-1]
            for step in range(RANK_STEPS):
                generator = torch.Generator().manual_seed(step * 101 + rank)
                task(pixels, ids, mask, texts, generator, 0.5)
            for call, (itm_ids, itm_images) in zip(calls, itm_inputs):
                call.update(itm_ids=itm_ids, itm_images=itm_images)
            saved[mode] = list(calls)
            if mode == "all_rank":
                saved["all_rank_queue"] = {k: v.clone() for k, v in task.momentum.named_buffers()}
                saved["momentum_image"] = momentum_features[-1][0]
                saved["enc_id"] = task.enc_id
                with torch.no_grad():
                    saved["embeds"] = task.filter.vision_model(pixel_values=pixels)[0]

        # DDP as Ray Train's prepare_model wraps it (buffers broadcast, gloo on the CPU).
        tasks_module.hard_negatives = hard_negatives
        config = TrainConfig(steps=1, batch_size=2 * BATCH, queue_size=16, negative_all_rank=True,
                             grad_checkpointing=True)
        task = build_task("filter", f"scratch:{blank}", config=config).task.train()
        model = DistributedDataParallel(task)
        optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2)
        ids, mask = task.text_encoding(texts)
        start = task.filter.itm_head.weight.detach().clone()
        start_m = task.momentum.text_proj.weight.detach().clone()
        for step in range(3):
            losses = model(pixels, ids, mask, texts, torch.Generator().manual_seed(step + rank), 0.5)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
        saved["ddp_params"] = {k: v.detach().clone() for k, v in task.state_dict().items()}
        saved["ddp_queue"] = {k: v.clone() for k, v in task.momentum.named_buffers()}
        saved["ddp_moved"] = (not torch.equal(task.filter.itm_head.weight, start)
                              and not torch.equal(task.momentum.text_proj.weight, start_m))
        torch.save(saved, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
