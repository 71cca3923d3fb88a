"""The built-in demo: `python train_flax.py` with no flags trains the demo pipeline once, then a LoRA that teaches it blue."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flax_lora import demo
from flax_lora.inference import FlaxLoraPipeline, to_uint8

ROOT = Path(__file__).resolve().parent.parent
# Bounds set below what the build measured (README, "Try it without downloads"), so a change that breaks the demo
# fails while run-to-run float differences do not.
MIN_VAE_PSNR_DB = 20.0
# How much commoner each base colour must be in its own prompt's samples than in any other prompt's.
MIN_OWN_COLOUR_RATIO = {"red": 4.0, "green": 4.0, "yellow": 1.5}


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory) -> dict:
    """The README's quick start as a user runs it, with HOME in a temporary folder (so the demo is built fresh)."""
    home = tmp_path_factory.mktemp("home")
    # As a user runs it: without the suite's 8 fake devices, so the trainer splits the CPU itself (batch 4 in all).
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    env = {**os.environ, "HOME": str(home), "XLA_FLAGS": xla_flags}
    cmd = [sys.executable, str(ROOT / "train_flax.py")]
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"pipeline": home / ".cache" / "flax_lora" / "demo-sd1", "run": home / "tiny-lora-output" / "run-1",
            "stderr": proc.stderr}  # fmt: skip


def grid_halves(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The before/after grid split back into (base, LoRA) images, each (prompts x samples, H, W, 3), at 1x."""
    grid = np.asarray(Image.open(path).convert("RGB"))[::4, ::4]
    side, n = demo.RESOLUTION, demo.SAMPLES_PER_PROMPT
    gap = 4  # white pixels between the halves, at 1x
    assert grid.shape == (side * len(demo.PROMPTS), side * 2 * n + gap, 3)

    def tiles(x0: int) -> np.ndarray:
        return np.stack([grid[r * side : (r + 1) * side, x0 + i * side : x0 + (i + 1) * side]
                         for r in range(len(demo.PROMPTS)) for i in range(n)])  # fmt: skip

    return tiles(0), tiles(side * n + gap)


def test_quick_start_writes_the_demo_outputs(quick_start):
    run = quick_start["run"]
    for name in ("pytorch_lora_weights.safetensors", "loss.png", "before_after.png", "README.md"):
        assert (run / name).is_file(), name
    assert (quick_start["pipeline"] / "model_index.json").is_file()
    assert "demo pipeline built in" in quick_start["stderr"]


def test_demo_vae_reconstructs_demo_images(quick_start):
    pipe = FlaxLoraPipeline.from_pretrained(str(quick_start["pipeline"])).pipe
    images, _ = demo.draw_shapes(32, (*demo.BASE_COLOURS, demo.NEW_COLOUR), seed=123)  # not the training draw
    latents = demo.encode(pipe.vae, pipe.params["vae"], images)
    decoded = np.asarray(pipe.vae.apply({"params": pipe.params["vae"]}, latents, method=pipe.vae.decode))
    error = (np.clip(decoded, -1, 1) - demo.to_model_range(images)) / 2
    psnr = 10 * np.log10(1.0 / np.mean(error**2))
    assert psnr > MIN_VAE_PSNR_DB


def test_demo_base_draws_the_shapes_world(quick_start):
    pipe = FlaxLoraPipeline.from_pretrained(str(quick_start["pipeline"]))
    world, _ = demo.draw_shapes(256, demo.BASE_COLOURS, seed=5)
    noise = np.random.default_rng(0).integers(0, 256, (8, demo.RESOLUTION, demo.RESOLUTION, 3)).astype(np.uint8)

    def distance_to_world(images: np.ndarray) -> float:
        """Mean over the images of the RMS pixel distance to the nearest demo image."""
        d = ((images[:, None].astype(np.float32) - world[None].astype(np.float32)) ** 2).mean(axis=(2, 3, 4))
        return float(np.sqrt(d.min(axis=1)).mean())

    samples = {c: to_uint8(pipe(f"a {c} circle", num_inference_steps=25, guidance_scale=5.0, num_images=8))
               for c in demo.BASE_COLOURS}  # fmt: skip
    for images in samples.values():  # measured 0.31-0.50 of noise's distance
        assert distance_to_world(images) < 0.75 * distance_to_world(noise)
    # The prompt's colour shows: each colour is commoner in its own prompt's samples than in any other's (measured
    # 61% red vs at most 0.2%, 43% green vs 1%, yellow 100% vs 37% of the shape pixels, by nearest demo colour).
    for colour, min_ratio in MIN_OWN_COLOUR_RATIO.items():
        own = demo.colour_share(samples[colour], colour)
        others = max(demo.colour_share(samples[asked], colour) for asked in demo.BASE_COLOURS if asked != colour)
        assert own > min_ratio * others, (colour, own, others)


def test_demo_lora_teaches_the_new_colour(quick_start):
    base, lora = grid_halves(quick_start["run"] / "before_after.png")
    base_blue, lora_blue = demo.colour_share(base, demo.NEW_COLOUR), demo.colour_share(lora, demo.NEW_COLOUR)
    assert lora_blue > 0.6 and lora_blue > base_blue + 0.3, (base_blue, lora_blue)
    assert f"{demo.NEW_COLOUR} share of the shapes' pixels" in quick_start["stderr"]


def test_demo_dataset_is_blue_shapes_with_captions(tmp_path):
    folder = Path(demo.build_demo_dataset(tmp_path / "data", count=6))
    rows = (folder / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 6 and all('"text": "a blue ' in row for row in rows)
    images = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])
    assert images.shape == (6, demo.RESOLUTION, demo.RESOLUTION, 3)
    assert demo.colour_share(images, demo.NEW_COLOUR) > 0.95
