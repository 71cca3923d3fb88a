"""Aspect-ratio buckets (--enable_bucket): kohya's bucket sizes and assignment, the one-bucket-per-step plan, crops
and SDXL size ids per bucket, and training runs that compile once per bucket and resume exactly."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from flax_lora.buckets import StepPlan, assign_buckets, bucket_resolutions, cover_size
from flax_lora.config import TrainConfig, parse_args
from flax_lora.data import (
    BadImageError, BatchLoader, crop_to_bucket, load_image_folder, mirrored_size_ids, read_image_sizes,
)


class CharTokenizer:
    """Texts -> int32 (N, 8) ids, as flax_lora.tokenizer.CLIPTokenizer is called."""

    def __call__(self, texts):
        return np.array([[ord(c) % 100 for c in t[:8].ljust(8)] for t in texts], np.int32)


# Three aspect ratios (width, height) at --resolution 32 with 8 px steps: 2:1, 1:2 and square.
SIZES = [(64, 32), (32, 64), (48, 48)]
BUCKET_FLAGS = dict(enable_bucket=True, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=8)


def build_aspect_dataset(out_dir, sizes=SIZES, per_size=2) -> str:
    """An image folder (metadata.jsonl) of colored shapes, `per_size` images of each (width, height)."""
    os.makedirs(out_dir, exist_ok=True)
    rows, rng = [], np.random.default_rng(0)
    colors = {"red": (220, 30, 30), "blue": (40, 70, 220), "green": (30, 170, 60)}
    for k, (w, h) in enumerate(sizes * per_size):
        name, color = f"{k:03d}.png", list(colors)[k % len(colors)]
        img = Image.new("RGB", (w, h), (255, 255, 255))
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        ImageDraw.Draw(img).ellipse((x0, y0, x0 + w // 2, y0 + h // 2), fill=colors[color])
        img.save(os.path.join(out_dir, name))
        rows.append({"file_name": name, "text": f"a {color} circle"})
    with open(os.path.join(out_dir, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(out_dir)


@pytest.fixture(scope="module")
def aspect_dir(tmp_path_factory):
    return build_aspect_dataset(tmp_path_factory.mktemp("data") / "aspects")


# ------------------------------------------------------------------------------------- bucket sizes


def test_sd_default_buckets_are_kohyas_list():
    """--resolution 512 with kohya's defaults (256..1024, steps 64): the list kohya's users know."""
    half = [(256, 1024), (256, 960), (256, 896), (256, 832), (320, 768), (320, 704), (384, 640), (448, 576)]
    expected = sorted(half + [(h, w) for w, h in half] + [(512, 512)])
    assert bucket_resolutions(512, 256, 1024, 64) == expected


@pytest.mark.parametrize(
    "resolution,low,high,steps", [(1024, 512, 2048, 64), (768, 256, 1024, 32), (32, 16, 64, 8), (200, 96, 400, 16)]
)
def test_buckets_follow_kohyas_rules(resolution, low, high, steps):
    got = bucket_resolutions(resolution, low, high, steps)
    area = resolution * resolution
    assert got == sorted(set(got))
    square = max(s for s in range(steps, resolution + 1, steps) if s * s <= area)
    assert (square, square) in got
    for w, h in got:
        assert w % steps == 0 and h % steps == 0 and low <= min(w, h) and max(w, h) <= high
        assert (h, w) in got  # both orientations
        assert w * h <= area
    # For every width on the grid, the tallest height within the area and --max_bucket_reso (if not below the minimum).
    for w in range(low, high + 1, steps):
        fits = [h for h in range(low, high + 1, steps) if w * h <= area]
        if fits:
            assert (w, max(fits)) in got
    others = {(w, h) for w, h in got if (w, h) != (square, square)}
    for w, h in others:  # nothing else: each non-square bucket is some width's tallest height, or its mirror
        tallest = lambda a: max(b for b in range(low, high + 1, steps) if a * b <= area)  # noqa: E731
        assert h == tallest(w) or w == tallest(h)


def test_min_and_max_are_rounded_to_the_steps_as_kohya():
    assert bucket_resolutions(512, 250, 1000, 64) == bucket_resolutions(512, 192, 1024, 64)


# -------------------------------------------------------------------------------------- assignment


def test_each_image_takes_the_bucket_of_nearest_aspect_ratio_and_covers_it():
    sizes = [(640, 480), (480, 640), (1000, 250), (300, 300), (512, 512), (1920, 1080), (333, 777), (448, 576)]
    buckets = assign_buckets(sizes, 512, 256, 1024, 64)
    resos = bucket_resolutions(512, 256, 1024, 64)
    assert buckets.sizes == resos
    for i, (w, h) in enumerate(sizes):
        bw, bh = buckets.size_of(i)
        best = min(abs(a / b - w / h) for a, b in resos)
        assert abs(bw / bh - w / h) == best, (w, h, bw, bh)
        rw, rh = buckets.resized_of(i)
        assert rw >= bw and rh >= bh and (rw == bw or rh == bh)  # covers the bucket, one side exactly
        assert abs(rw / rh - w / h) < 0.02  # the aspect ratio kept (up to rounding)
    assert buckets.size_of(7) == (448, 576) and buckets.resized_of(7) == (448, 576)  # a bucket's own size: as is
    assert buckets.size_of(4) == (512, 512)
    counts = buckets.counts(np.arange(len(sizes)))
    assert sum(counts.values()) == len(sizes) and counts[(512, 512)] == 2  # 300x300 and 512x512


def test_no_upscale_buckets_never_enlarge():
    sizes = [(50, 40), (200, 100), (40, 40), (10, 40)]
    buckets = assign_buckets(sizes, 64, steps=16, no_upscale=True)
    # Under the 64x64 area: the size rounded down to the steps, not resized.
    assert buckets.size_of(0) == (48, 32) and buckets.resized_of(0) == (50, 40)
    assert buckets.size_of(2) == (32, 32) and buckets.resized_of(2) == (40, 40)
    # 200x100 is larger than 64*64: shrunk to that area keeping 2:1 (90.5 x 45.3); of width 80 (height 40 -> 32,
    # ratio 2.5) and height 32 (width 64, ratio 2.0), the height keeps the aspect ratio: resized 64x32.
    assert buckets.size_of(1) == (64, 32) and buckets.resized_of(1) == (64, 32)
    # A side shorter than one step: that side alone is enlarged, to one step.
    assert buckets.size_of(3) == (16, 32) and buckets.resized_of(3) == (16, 64)
    assert buckets.sizes == sorted({(48, 32), (64, 32), (32, 32), (16, 32)})


def test_bucket_flags_are_checked():
    with pytest.raises(ValueError, match="--min_bucket_reso .*add --enable_bucket"):
        TrainConfig(min_bucket_reso=128)
    with pytest.raises(ValueError, match="--bucket_no_upscale .*add --enable_bucket"):
        TrainConfig(bucket_no_upscale=True)
    with pytest.raises(ValueError, match="--bucket_reso_steps must be a positive multiple of 8"):
        TrainConfig(enable_bucket=True, bucket_reso_steps=12)
    with pytest.raises(ValueError, match="--resolution 64 must lie between --min_bucket_reso 256"):
        TrainConfig(enable_bucket=True, resolution=64)
    with pytest.raises(ValueError, match="--resolution 2048 must lie between"):
        TrainConfig(enable_bucket=True, resolution=2048)
    config = parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--enable_bucket",
                         "--bucket_reso_steps", "32", "--bucket_no_upscale"])  # fmt: skip
    assert config.enable_bucket and config.bucket_reso_steps == 32 and config.bucket_no_upscale


# ------------------------------------------------------------------------------------------ the plan


def test_every_step_is_one_bucket_and_every_image_is_seen_each_epoch():
    options = [(64, 32), (32, 64), (32, 32)]
    sizes = [options[k] for k in np.random.default_rng(0).integers(0, 3, 23)]  # uneven bucket counts
    buckets = assign_buckets(sizes, 32, 16, 64, 8)
    examples = np.arange(23)[np.arange(23) != 5]  # one example held out
    plan = StepPlan(buckets, examples, per_step=4, seed=3)
    counts = buckets.counts(examples)
    assert plan.steps_per_epoch == sum(math.ceil(c / 4) for c in counts.values())
    for epoch in range(2):
        seen = []
        for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
            bucket, members = plan.step(step)
            assert len(members) == 4 and set(buckets.of[members]) == {bucket}
            seen += list(members)
        assert set(seen) == set(examples)  # every image at least once; the leftover filled with the same bucket
        assert len(seen) - len(set(seen)) == 4 * plan.steps_per_epoch - len(examples)
    fresh = StepPlan(buckets, examples, per_step=4, seed=3)  # a resumed run's plan
    for step in (0, 7, 13):
        np.testing.assert_array_equal(fresh.step(step)[1], plan.step(step)[1])
    def order(p, e):
        return [tuple(p.step(s)[1]) for s in range(e * p.steps_per_epoch, (e + 1) * p.steps_per_epoch)]

    assert order(plan, 0) != order(plan, 1)  # reshuffled each epoch
    assert order(plan, 0) != order(StepPlan(buckets, examples, 4, seed=4), 0)  # and by the seed


def test_loader_rows_of_a_bucketed_step_tile_it(aspect_dir):
    data = load_image_folder(aspect_dir)
    buckets = assign_buckets([data.image_size(i) for i in range(len(data))], 32, 16, 64, 8)
    kw = dict(global_batch=4, accum=2, seed=1, random_flip=True, buckets=buckets)
    whole = BatchLoader(data, CharTokenizer(), 32, rows=[0, 1, 2, 3], **kw)
    halves = [BatchLoader(data, CharTokenizer(), 32, rows=r, num_workers=2, **kw) for r in ([0, 1], [2, 3])]
    assert whole.steps_per_epoch == 3  # two images per bucket, 8 per step: one step per bucket
    shapes = set()
    for step in range(4):
        full = whole.batch(step)
        bucket_w, bucket_h = buckets.sizes[whole._plan.step(step)[0]]
        assert full["pixel_values"].shape == (2, 4, 3, bucket_h, bucket_w)  # every micro-batch of the step, one bucket
        shapes.add((bucket_w, bucket_h))
        parts = [h.batch(step) for h in halves]
        for key in ("pixel_values", "input_ids"):
            np.testing.assert_array_equal(full[key], np.concatenate([p[key] for p in parts], axis=1))
    # At 32 px in 8 px steps the widest buckets under the area are 40x24 (ratio 1.67) and 48x16 (3.0): 2:1 takes 40x24.
    assert shapes == {(40, 24), (24, 40), (32, 32)}


def test_held_out_examples_are_scored_bucket_by_bucket(aspect_dir):
    """--validation_split's loader: one bucket a batch, and its steps_per_epoch batches score every held-out image."""
    data = load_image_folder(aspect_dir)
    buckets = assign_buckets([data.image_size(i) for i in range(len(data))], 32, 16, 64, 8)
    held = np.array([0, 1, 3])  # two 2:1 images and one 1:2
    loader = BatchLoader(data, CharTokenizer(), 32, global_batch=2, rows=[0, 1], valid=held, buckets=buckets)
    assert loader.steps_per_epoch == 2
    seen = set()
    for i in range(loader.steps_per_epoch):
        batch = loader.batch(i)
        assert batch["pixel_values"].shape[:2] == (1, 2)
        seen.update(loader.example_at(i * 2 + r) for r in range(2))
    assert seen == set(held.tolist())


def test_bad_images_have_no_bucket_or_are_replaced_from_their_own(aspect_dir, tmp_path):
    import shutil

    for name in os.listdir(aspect_dir):
        shutil.copy(os.path.join(aspect_dir, name), tmp_path / name)
    (tmp_path / "001.png").write_bytes(b"not a png")  # a 1:2 image whose header cannot be read
    truncated = (tmp_path / "000.png").read_bytes()  # a 2:1 image whose header reads but pixels do not
    (tmp_path / "000.png").write_bytes(truncated[: len(truncated) // 2])
    data = load_image_folder(str(tmp_path))
    sizes = read_image_sizes(data)
    assert sizes[1] is None and sizes[0] == (64, 32)
    buckets = assign_buckets(sizes, 32, 16, 64, 8)
    loader = BatchLoader(data, CharTokenizer(), 32, global_batch=2, rows=[0, 1], buckets=buckets)
    assert 1 not in loader.valid and loader.num_examples == 5
    for step in range(loader.steps_per_epoch):
        batch = loader.batch(step)  # the truncated 2:1 image is replaced by the other 2:1 one: same shape
        assert batch["pixel_values"].shape[-2:] == tuple(reversed(buckets.sizes[loader._plan.step(step)[0]]))
    assert loader.bad_images == {0}
    with pytest.raises(BadImageError, match="001.png"):
        read_image_sizes(data, skip_bad_images=False)


# ----------------------------------------------------------------------------- crops and SDXL size ids


def test_crop_to_bucket_and_sdxl_size_ids():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 100, 3), np.uint8))  # 100 wide, 40 high: wider than 2:1
    bucket = (48, 24)
    resized = cover_size(100, 40, bucket)
    assert resized == (60, 24)  # the height matched, the width covers
    assert cover_size(90, 50, bucket) == (48, int(50 * 48 / 90 + 0.5))  # narrower than 2:1: the width matched
    big = np.asarray(img.resize(resized, Image.BILINEAR), np.float32) / 127.5 - 1
    seen = set()
    for seed in range(16):
        pixels, ids = crop_to_bucket(img, bucket, resized, False, True, np.random.default_rng(seed))
        h, w, top, left, target_h, target_w = ids.astype(int)
        assert (h, w, target_h, target_w) == (40, 100, 24, 48) and top == 0 and 0 <= left <= resized[0] - 48
        plain = big[top : top + 24, left : left + 48].transpose(2, 0, 1)
        flipped = big[:, ::-1][top : top + 24, left : left + 48].transpose(2, 0, 1)
        if np.allclose(pixels, flipped) and not np.allclose(pixels, plain):
            seen.add("flip")
            mirror = mirrored_size_ids(ids, resized[0])  # the same region, measured in the unflipped image
            m = int(mirror[3])
            np.testing.assert_allclose(big[:, m : m + 48][:, ::-1], big[:, ::-1][:, left : left + 48])
        else:
            np.testing.assert_allclose(pixels, plain)
            seen.add("plain")
    assert seen == {"flip", "plain"}
    _, centre = crop_to_bucket(img, bucket, resized, True, False, np.random.default_rng(0))
    assert tuple(centre) == (40, 100, 0, round((resized[0] - 48) / 2), 24, 48)


def test_sdxl_loader_time_ids_name_each_images_bucket(aspect_dir):
    data = load_image_folder(aspect_dir)
    buckets = assign_buckets([data.image_size(i) for i in range(len(data))], 32, 16, 64, 8)
    loader = BatchLoader(data, CharTokenizer(), 32, global_batch=2, rows=[0, 1], center_crop=True,
                         tokenizer_2=CharTokenizer(), buckets=buckets)  # fmt: skip
    for step in range(loader.steps_per_epoch):
        batch = loader.batch(step)
        for r in range(2):
            i = loader.example_at(step * 2 + r)
            w, h = data.load_image(i).size
            (bw, bh), (rw, rh) = buckets.size_of(i), buckets.resized_of(i)
            expected = (h, w, round((rh - bh) / 2), round((rw - bw) / 2), bh, bw)
            assert tuple(batch["time_ids"][0, r]) == expected
            assert batch["pixel_values"].shape[-2:] == (bh, bw)
            assert batch["input_ids_2"].shape == (1, 2, 8)


# --------------------------------------------------------------------------------------- training runs


def _config(tiny_path, data_dir, out_dir, **kw) -> TrainConfig:
    base = dict(
        pretrained_model_name_or_path=tiny_path, train_data_dir=data_dir, output_dir=str(out_dir), resolution=32,
        train_batch_size=1, learning_rate=3e-3, lr_warmup_steps=0, rank=4, cache_text_embeddings=True,
        report_to="none", seed=0, cache_latents=True, **BUCKET_FLAGS,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_bucketed_run_compiles_once_per_bucket_and_resumes_exactly(tiny_sd1_path, aspect_dir, tmp_path, caplog):
    import logging
    import shutil

    from flax_lora import train as T
    from tests.test_train import assert_same_adapter

    kw = dict(max_train_steps=5, checkpointing_steps=3, random_flip=True, snr_gamma=5.0)
    with caplog.at_level(logging.INFO, logger="flax_lora"):
        straight = T.main(_config(tiny_sd1_path, aspect_dir, tmp_path / "straight", **kw))
    # 6 images, 3 aspect ratios -> 3 buckets; 8 samples per step -> one step per bucket and epoch: all 3 used.
    assert straight["step"] == 5 and straight["step_shapes"] == 3
    assert "aspect-ratio buckets: 6 images in 3 buckets (24x40: 2, 32x32: 2, 40x24: 2)" in caplog.text
    assert "the train step compiled for 3 batch shape(s)" in caplog.text

    # Resume from the straight run's step-3 checkpoint: the plan (bucket and examples of each step) follows from it.
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "3", tmp_path / "resumed" / "checkpoints" / "3")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flax_lora"):
        resumed = T.main(_config(tiny_sd1_path, aspect_dir, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    assert resumed["step"] == 5 and resumed["step_shapes"] == 2  # steps 3 and 4: two buckets of the second epoch
    assert "resumed from" in caplog.text and "other aspect-ratio buckets" not in caplog.text  # the checkpoint's own
    assert_same_adapter(tmp_path / "straight", tmp_path / "resumed")
    np.testing.assert_array_equal([l for _, l in straight["loss_history"]], [l for _, l in resumed["loss_history"]])
