"""Training: BLIP's sharing and losses, timm init, export that plugs into a round, resume, DDP."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipVisionConfig,
    BlipVisionModel,
)

from capfilt.evaluation.bleu import corpus_bleu
from capfilt.models.tiny import tiny_config, tiny_processor
from capfilt.shards.samples import COLOURS, IMG2DATASET_SCHEMA
from capfilt.train.blip_pair import BlipPair
from capfilt.train.checkpoints import list_checkpoints, load_checkpoint
from capfilt.train.loop import TrainConfig
from capfilt.train.objectives import hard_negatives
from capfilt.train.timm_vision import blip_vision_config, check_timm_vit, load_timm_into
from manifests import validate_manifest
from pipelines.train import TrainJob, run_training
from tests.test_faults import wait_for

# 48 images: a square of one colour on a background of another, captioned with both.
NAMES = list(COLOURS)
STEPS = 150


def square_rows(count: int = 48) -> list[dict]:
    rows = []
    for i in range(count):
        back, front = NAMES[i % len(NAMES)], NAMES[(i // len(NAMES)) % len(NAMES)]
        image = Image.new("RGB", (32, 32), COLOURS[back])
        ImageDraw.Draw(image).rectangle((8, 8, 24, 24), fill=COLOURS[front])
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        data = buffer.getvalue()
        rows.append(dict(key=f"{i:04d}", url=f"http://example.com/{i}.jpg",
                         caption=f"a {front} square on {back}", jpg=data, status="success",
                         error_message=None, width=32, height=32, original_width=32,
                         original_height=32, exif=None, sha256=hashlib.sha256(data).hexdigest()))
    return rows


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("squares")
    pq.write_table(pa.Table.from_pylist(square_rows(), schema=IMG2DATASET_SCHEMA),
                   folder / "00000.parquet")
    return folder


def job(task, init, data, output, steps=STEPS, workers=1, **config) -> TrainJob:
    # BLIP's momentum encoders and queue, the queue two batches long on this 48-image set.
    settings = {"steps": steps, "batch_size": 16, "lr": 3e-3, "min_lr": 1e-3, "warmup_steps": 5,
                "augment": "none", "log_every": 10, "queue_size": 32, **config}
    return TrainJob(task=task, init=str(init), data=tuple(str(d) for d in data),
                    output=str(output), config=TrainConfig(**settings), workers=workers)


@pytest.fixture(scope="module")
def pretrained(blank, squares, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "pre"
    return out, run_training(job("pretrain", f"scratch:{blank}", [squares], out))


def window(history, name, first: bool) -> float:
    part = history[:2] if first else history[-2:]
    return sum(r[name] for r in part) / len(part)


def test_each_pretraining_loss_goes_down(pretrained):
    _, manifest = pretrained
    history = manifest.results["history"]
    assert [r["step"] for r in history] == list(range(10, STEPS + 1, 10))
    for name in ("itc", "itm", "lm"):
        assert window(history, name, first=False) < window(history, name, first=True), name
    # Below log-loss of always answering the base rate (1 match in 3): it learned to match.
    assert window(history, "itm", first=False) < 0.62
    validate_manifest(manifest.to_dict(), "job")
    assert manifest.kind == "pretrain"
    assert {o["role"] for o in manifest.outputs} == {"filter", "captioner"}


def test_exported_models_load_and_run_a_round(pretrained, squares, ray_local, tmp_path):
    from capfilt.captioning.settings import SamplingConfig
    from capfilt.step.stage_config import StageConfig
    from pipelines.plan import RoundOptions
    from pipelines.round import run_round

    out, _ = pretrained
    BlipForConditionalGeneration.from_pretrained(out / "captioner")
    BlipForImageTextRetrieval.from_pretrained(out / "filter")
    stage = StageConfig(captioner=str(out / "captioner"), filter=str(out / "filter"),
                        sampling=SamplingConfig(num_captions=1))
    manifest = run_round(RoundOptions(inputs=[str(squares)], output=str(tmp_path / "round"),
                                      stage=stage, batch_size=16, workers=1))
    assert manifest.status == "complete"
    # 48 rows of 36 drawings (6 x 6 colours): each repeat is set aside, scored once.
    assert manifest.totals.rows_out == 36
    assert manifest.totals.rejects_by_reason == {"duplicate_image": 12}
    scores = pq.read_table(tmp_path / "round" / "shards").column("web_itm").to_pylist()
    assert len(set(scores)) > 24  # trained weights: each image and caption scores its own


def test_finetuned_captioner_and_filter_come_from_the_pretrained_model(pretrained, squares, tmp_path):
    out, pre_manifest = pretrained
    captioner = run_training(job("captioner", out, [squares], tmp_path / "cap", steps=10))
    filt = run_training(job("filter", out, [squares], tmp_path / "fil", steps=10))
    assert captioner.kind == "finetune-captioner" and filt.kind == "finetune-filter"
    assert [o["role"] for o in captioner.outputs] == ["captioner"]
    assert [o["role"] for o in filt.outputs] == ["filter"]
    assert str(out / "manifest.json") in captioner.parents
    # Starting where pre-training ended: the first losses are near its last ones.
    assert captioner.results["first"]["lm"] < pre_manifest.results["first"]["lm"]
    BlipForImageTextRetrieval.from_pretrained(tmp_path / "fil" / "filter")


def test_text_encoder_and_decoder_share_what_blip_shares():
    processor = tiny_processor(32)
    pair = BlipPair.from_config(tiny_config(len(processor.tokenizer)))
    encoder = dict(pair.filter.text_encoder.named_parameters(remove_duplicate=False))
    decoder = dict(pair.captioner.text_decoder.bert.named_parameters(remove_duplicate=False))
    assert set(encoder) == set(decoder)
    for name, param in decoder.items():
        shared = param is encoder[name]
        own = ".attention." in name  # self-attention, with its output dense and norm
        assert shared != own, name
    assert pair.captioner.vision_model is pair.filter.vision_model
    head = pair.captioner.text_decoder.cls.predictions
    assert head.decoder.weight is encoder["embeddings.word_embeddings.weight"]
    assert not any(p is head.transform.dense.weight for p in encoder.values())
    # Shared parameters are counted once: the model is smaller than its two halves.
    unique = sum(p.numel() for p in pair.parameters())
    halves = sum(p.numel() for p in pair.filter.parameters()) + sum(
        p.numel() for p in pair.captioner.parameters())
    assert unique < halves


def test_hard_negatives_differ_from_positives_and_follow_similarity():
    torch.manual_seed(0)
    size = 6
    sim = torch.randn(size, size)
    sim[torch.arange(size), (torch.arange(size) + 1) % size] = 8.0  # one near-twin each
    positive = torch.eye(size, dtype=torch.bool)
    positive[0, 3] = positive[3, 0] = True  # texts 0 and 3 are the same words
    sim[0, 3] = 9.0  # most similar, but positive: never a negative
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(size, size)
    for _ in range(200):
        texts, images = hard_negatives(sim, positive, generator)
        assert not positive[torch.arange(size), texts].any()
        assert not positive[images, torch.arange(size)].any()
        counts[torch.arange(size), texts] += 1
    twins = counts[torch.arange(size), (torch.arange(size) + 1) % size]
    assert (twins[1:] > 150).all()  # the most similar wrong text is drawn most often
    assert counts[0, 1] > 150


def test_timm_vit_weights_give_blip_the_same_features():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                            img_size=64, depth=2).eval()
    vision = BlipVisionModel(BlipVisionConfig(**blip_vision_config(vit, 64))).eval()
    load_timm_into(vision, vit)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = vit.forward_features(pixels)
        got = vision(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    scaled = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                               img_size=64, depth=1, init_values=1e-5)
    with pytest.raises(ValueError, match="layer scale"):
        check_timm_vit(scaled)


def test_bleu_on_known_values():
    assert corpus_bleu(["a red circle on the left"], [["a red circle on the left"]]) == 1.0
    # 5/6 unigrams, 3/5 bigrams, 1/4 trigrams match; same length: (1/8) ** (1/3) = 0.5.
    got = corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]], max_n=3)
    assert got == pytest.approx(0.5)
    assert corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]]) == 0.0
    # Shorter than its reference: brevity penalty exp(1 - 8/6).
    short = corpus_bleu(["a b c d e f"], [["a b c d e f g h"]], max_n=1)
    assert short == pytest.approx(torch.tensor(1 - 8 / 6).exp().item())


def ray_train_workers() -> list[int]:
    """Processes of Ray Train's workers (their title names the actor class)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_two_ray_train_workers_train_alike_and_one_lost_mid_run_resumes_from_the_checkpoint(
        blank, squares, pretrained, ray_local, tmp_path):
    """One Ray Train run for both (each start of a worker group costs seconds): two workers
    train as one process does, and when one is killed after the checkpoint at step 20 the
    group starts again from it, not from step 0."""
    import threading

    _, single = pretrained
    out = tmp_path / "ddp"
    killed = []

    def kill_one_worker():
        wait_for(lambda: (out / "checkpoints" / "step-000020").exists(), timeout=300)
        pid = wait_for(ray_train_workers, timeout=60)[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    manifest = run_training(job("pretrain", f"scratch:{blank}", [squares], out, workers=2,
                                checkpoint_every=20))
    killer.join(timeout=5)
    assert killed
    history = manifest.results["history"]
    assert [r["step"] for r in history] == list(range(10, STEPS + 1, 10))
    for name in ("itc", "lm"):
        assert window(history, name, first=False) < 0.5 * window(history, name, first=True)
        ratio = window(history, name, first=False) / window(single.results["history"], name, first=False)
        assert 0.2 < ratio < 5, (name, ratio)
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert state["step"] == STEPS and state["world"] == 2
    assert state["resumes"] and state["resumes"][0] >= 20
    assert manifest.results["resumes"] == state["resumes"]
    BlipForConditionalGeneration.from_pretrained(out / "captioner")


def test_a_batch_that_does_not_divide_by_the_workers_is_refused(blank, squares, tmp_path):
    with pytest.raises(ValueError, match="batch_size 16 does not divide by workers 3"):
        job("pretrain", f"scratch:{blank}", [squares], tmp_path / "x", workers=3)


def test_ray_train_drops_the_cleaner_that_would_wait_for_a_missing_dashboard():
    from ray.train import ScalingConfig

    from workers.train_worker import Trainer, dashboard_missing

    trainer = Trainer(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
    names = [type(c).__name__ for c in trainer._create_default_callbacks()]
    assert "BackendSetupCallback" in names
    assert dashboard_missing()  # what capfilt installs: ray[data], not ray[default]
    assert "PlacementGroupCleanerCallback" not in names


def test_a_killed_training_resumes_from_its_last_checkpoint(blank, squares, pretrained, tmp_path):
    _, uninterrupted = pretrained
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "pipelines.cli", "pretrain", "--init", f"scratch:{blank}",
               "--data", str(squares), "--output", str(out), "--steps", str(STEPS),
               "--batch-size", "16", "--lr", "3e-3", "--min-lr", "1e-3", "--warmup-steps", "5",
               "--augment", "none", "--log-every", "10", "--checkpoint-every", "20",
               "--queue-size", "32"]
    child = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "checkpoints" / "step-000020").exists(), timeout=300)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert not (out / "manifest.json").exists()
    manifest = run_training(job("pretrain", f"scratch:{blank}", [squares], out,
                                checkpoint_every=20))
    assert manifest.results["resumed_from"] >= 20
    # Batches, negatives and crops are functions of (seed, step): the resumed run's losses
    # are the uninterrupted run's.
    assert len(manifest.results["history"]) == len(uninterrupted.results["history"])
    for resumed, straight in zip(manifest.results["history"], uninterrupted.results["history"]):
        assert resumed["step"] == straight["step"]
        for name in ("itc", "itm", "lm"):
            assert resumed[name] == pytest.approx(straight[name], rel=1e-4), (resumed["step"], name)


def test_itc_across_two_ranks_is_itc_over_the_whole_batch(tmp_path):
    """Two real processes joined by gloo, each with half of one batch: the mean of their ITC
    losses is the one-process loss on the whole batch, and their feature gradients are the
    whole batch's times the number of ranks (DDP then averages over ranks)."""
    from capfilt.train.objectives import itc_loss, same_text
    from tests import itc_ranks

    root = Path(__file__).resolve().parent.parent
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.itc_ranks", str(rank), "2",
                               str(tmp_path / "init"), str(tmp_path)], cwd=root)
             for rank in range(2)]
    assert [r.wait(timeout=120) for r in ranks] == [0, 0]
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    image, text = (t.clone().requires_grad_() for t in itc_ranks.features())
    loss, sim = itc_loss(image, text, torch.tensor(itc_ranks.TEMP), same_text(itc_ranks.TEXTS))
    loss.backward()
    half = itc_ranks.BATCH // 2
    assert torch.allclose((got[0]["loss"] + got[1]["loss"]) / 2, loss, atol=1e-6)
    for rank, part in enumerate(got):
        rows = slice(rank * half, (rank + 1) * half)
        assert torch.allclose(part["image_grad"], 2 * image.grad[rows], atol=1e-6)
        assert torch.allclose(part["text_grad"], 2 * text.grad[rows], atol=1e-6)
        assert torch.allclose(part["sim"], sim[rows, rows].detach(), atol=1e-6)


def test_bf16_autocast_where_asked_and_by_default_on_cuda(blank, squares):
    from capfilt.train.build import build_task
    from capfilt.train.loader import rank_loader
    from capfilt.train.loop import autocast_dtype, train_step
    from capfilt.train.run import RankJob, stream_spec
    from capfilt.train.sources import Source, list_pieces

    assert autocast_dtype(TrainConfig(steps=1, precision="auto"), "cuda") == torch.bfloat16
    assert autocast_dtype(TrainConfig(steps=1, precision="auto"), "cpu") is None
    assert autocast_dtype(TrainConfig(steps=1, precision="fp32"), "cuda") is None
    config = TrainConfig(steps=1, batch_size=16, precision="bf16", queue_size=32,
                         loader_workers=0)
    rank_job = RankJob("pretrain", f"scratch:{blank}", (str(squares),), "unused", config)
    built = build_task("pretrain", rank_job.init, config=config)
    spec = stream_spec(rank_job, built, list_pieces([Source(str(squares))]), world=1)
    batch = next(iter(rank_loader(spec, 0, 1, 0, None)))
    seen = []
    layer = built.task.pair.filter.vision_proj
    layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    optimizer = torch.optim.AdamW(built.task.parameters())
    for dtype in (autocast_dtype(config, "cpu"), None):
        losses = train_step(built.task, optimizer, batch, spec.transform, "cpu", dtype,
                            torch.Generator().manual_seed(0), progress=0.0)
        assert all(torch.isfinite(v) for v in losses.values())
    # The projection ran in bf16 under autocast, in float32 without; weights stay float32.
    assert seen == [torch.bfloat16, torch.float32]
    assert layer.weight.dtype == torch.float32


def test_epochs_over_pairs_give_a_round_with_more_kept_texts_more_steps(blank, tmp_path):
    """BLIP trains every Table 1 row for the same epochs over its (image, text) pairs: a
    CapFilt round keeping two texts for an image trains on it twice an epoch."""
    round_dir = tmp_path / "round"
    (round_dir / "shards").mkdir(parents=True)
    rows = []
    for n, row in enumerate(square_rows()):
        both = [row["caption"], f"{row['caption']} again"]
        kept = [[], [row["caption"]], both, both][n % 4]
        rows.append({"key": row["key"], "jpg": row["jpg"], "web_caption": row["caption"],
                     "synthetic_captions": [f"{row['caption']} again"], "kept_captions": kept,
                     "kept_sources": ["web", "synthetic"][: len(kept)]})
    pq.write_table(pa.Table.from_pylist(rows), round_dir / "shards" / "00000.parquet")
    (round_dir / "manifest.json").write_text("{}")
    pairs = sum(len(r["kept_captions"]) for r in rows)
    assert pairs == 12 * 1 + 24 * 2
    data = [f"{round_dir}@kept"]
    by_pairs = run_training(job("pretrain", f"scratch:{blank}", data, tmp_path / "pairs",
                                steps=0, epochs=2, samples="pairs", momentum=False))
    assert by_pairs.results["rows"] == pairs
    assert by_pairs.results["steps"] == 8  # 2 epochs of 60 pairs, 16 a batch: 7.5 steps
    assert by_pairs.inputs[-1]["skipped"] == {}  # an image with no kept text is no sample
    assert by_pairs.parameters["epochs"] == 2 and by_pairs.parameters["steps"] == 0
    by_images = run_training(job("pretrain", f"scratch:{blank}", data, tmp_path / "images",
                                 steps=0, epochs=2, samples="images", momentum=False))
    assert by_images.results["rows"] == len(rows)
    # Images: an epoch is the view's rows, those without a text among them (counted from
    # footers); they are skipped as they come, so the 6 steps read past the second epoch.
    assert by_images.results["steps"] == 6
    assert by_images.inputs[-1]["skipped"]["no_caption"] > 12 * 2
    # The same job again is the finished one: its identity is the epochs asked for.
    again = run_training(job("pretrain", f"scratch:{blank}", data, tmp_path / "pairs",
                             steps=0, epochs=2, samples="pairs", momentum=False))
    assert again.finished_at == by_pairs.finished_at
    with pytest.raises(ValueError, match="steps .* or epochs"):
        TrainConfig(steps=10, epochs=1)
    with pytest.raises(ValueError, match="samples"):
        TrainConfig(steps=10, samples="captions")
