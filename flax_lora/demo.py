"""The built-in demo: a tiny Stable Diffusion pipeline trained here, in minutes, to draw coloured shapes.

The base pipeline's VAE learns to reconstruct 32 px shapes in four colours, and its UNet learns to draw them in
red, green and yellow only. The default LoRA run then teaches it blue, which its UNet has never seen, and writes a
before/after grid (the base and the LoRA, same prompts and seeds). The pipeline is saved in diffusers' folder layout
and read back with the same loading code as a real checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flax_lora import tiny

logger = logging.getLogger("flax_lora.demo")  # also when run as __main__ (`build_in_child`)

RESOLUTION = 32
BASE_COLOURS = ("red", "green", "yellow")
NEW_COLOUR = "blue"  # what the LoRA teaches: the base UNet's training set has no blue shape
PROMPTS = tuple(f"a {NEW_COLOUR} {shape}" for shape in ("circle", "square", "triangle"))
SAMPLES_PER_PROMPT = 2  # per side of the before/after grid, drawn from seed 0 both sides
MAX_PROMPT_TOKENS = 24  # "a yellow triangle" is 17 characters, one token each, plus bos and eos
# Measured to draw recognisable shapes (see README), about 1 + 1.5 min on 2 cores.
VAE_STEPS, UNET_STEPS = 500, 400
VAE_BATCH, UNET_BATCH = 16, 32
VAE_LEARNING_RATE, UNET_LEARNING_RATE = 4e-3, 1e-2
UNCONDITIONAL_FRACTION = 0.1  # of the UNet's training captions dropped, so classifier-free guidance works
DONE_FILE = "model_index.json"

# The tiny VAE with one block fewer (32 px to 8x8 latents); its scaling factor is measured at build time.
VAE_CONFIG = {k: v for k, v in tiny.TINY_VAE_CONFIG.items() if k != "scaling_factor"} | dict(
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[8, 16, 16],
    sample_size=RESOLUTION,
)
# The tiny SD1 UNet at half its width, on the VAE's 8x8 latents: as good at drawing the shapes, at 0.6x the step.
UNET_CONFIG = tiny.tiny_unet_config("sd1") | dict(sample_size=RESOLUTION // 4, block_out_channels=[16, 32],
                                                  norm_num_groups=8)  # fmt: skip
# XLA:CPU's YNNPACK fusions slow these tiny models down: without them the build's VAE and UNet steps took 0.7x as
# long (jaxlib 0.10.2, 2 cores), though they speed up the benchmark's larger UNet. The flag is jaxlib's own, so
# only the build's own process (`build_in_child`) sets it.
BUILD_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="


def draw_shapes(count: int, colours: tuple[str, ...], seed: int) -> tuple[np.ndarray, list[str]]:
    """`count` centred shapes of random kind, colour and size: uint8 NHWC images and captions ("a red circle")."""
    from PIL import Image, ImageDraw

    from flax_lora.data import _COLORS, _SHAPES, _draw_shape

    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(count):
        colour, shape = colours[rng.integers(len(colours))], _SHAPES[rng.integers(len(_SHAPES))]
        size = int(RESOLUTION * rng.uniform(0.45, 0.75))
        x0, y0 = ((RESOLUTION - size) // 2 + rng.integers(-2, 3, size=2)).tolist()
        img = Image.new("RGB", (RESOLUTION, RESOLUTION), (255, 255, 255))
        _draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + size, y0 + size), _COLORS[colour])
        images.append(np.asarray(img))
        captions.append(f"a {colour} {shape}")
    return np.stack(images), captions


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1], as the VAE takes pixels."""
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def build_demo_dataset(out_dir: str | os.PathLike, count: int = 48, seed: int = 7) -> str:
    """The LoRA's training set: blue shapes with captions, as an image folder + metadata.jsonl; idempotent."""
    from PIL import Image

    from flax_lora.tiny import atomic_directory

    out = Path(os.path.expanduser(out_dir))
    if (out / "metadata.jsonl").is_file():
        return str(out)
    images, captions = draw_shapes(count, (NEW_COLOUR,), seed)
    with atomic_directory(out, "metadata.jsonl") as tmp:
        rows = []
        for i, (image, caption) in enumerate(zip(images, captions)):
            Image.fromarray(image).save(tmp / f"{i:04d}.png")
            rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": caption}) + "\n")
        (tmp / "metadata.jsonl").write_text("".join(rows))
    return str(out)


def _init_params(model, seed: int, *inputs) -> dict:
    """Random params whose residual branches start at zero (each block the identity), so a short run trains well."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    def start(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
        if path[-1] == "scale":
            return np.ones_like(value)
        if path[-1] == "bias" or any(name in ("conv2", "to_out_0", "proj_out") for name in path):
            return np.zeros_like(value)
        return value

    return unflatten_dict({k: start(k, v) for k, v in flatten_dict(tiny.random_params(model, seed, *inputs)).items()})


def fit(
    loss_fn: Callable, params: dict, batches: Callable[[int], tuple], steps: int, learning_rate: float, what: str,
    ema_decay: float | None = None,
) -> dict:
    """Full-parameter Adam (warm-up, cosine decay) on loss_fn(params, *batches(step), key); the EMA weights if asked."""
    import jax
    import optax

    warmup = min(50, steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps, learning_rate * 0.05)
    optimizer = optax.adam(schedule)

    @jax.jit
    def step(params, opt_state, ema, key, decay, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return params, opt_state, ema, loss

    opt_state, ema, start, losses = optimizer.init(params), params, time.time(), []
    for i in range(steps):
        # The EMA averages over the last ~100 steps (fewer early on), which smooths a short run's noisy end.
        decay = min(ema_decay or 0.0, i / (i + 10))
        params, opt_state, ema, loss = step(params, opt_state, ema, jax.random.key(i), decay, *batches(i))
        losses.append(loss)
        if (i + 1) % max(1, steps // 4) == 0:
            logger.info("demo %s: step %d/%d, loss %.4f (%.0f s)", what, i + 1, steps, float(np.mean(losses[-20:])),
                        time.time() - start)  # fmt: skip
    return ema if ema_decay else params


def train_vae(images: np.ndarray, steps: int = VAE_STEPS, seed: int = 0) -> tuple[object, dict]:
    """The VAE model and its params trained to reconstruct `images` (MSE plus a small KL term, as SD's VAE)."""
    import jax
    import jax.numpy as jnp

    from flax_lora.models import vae

    model = vae.AutoencoderKL(vae.VAEConfig.from_dict({**VAE_CONFIG, "scaling_factor": 1.0}, "demo vae"))
    pixels = to_model_range(images)
    rng = np.random.default_rng(seed)

    def loss(params, x, key):
        dist = model.apply({"params": params}, x, method=model.encode)
        y = model.apply({"params": params}, dist.sample(key), method=model.decode)
        kl = 0.5 * jnp.mean(dist.mean**2 + dist.std**2 - 1.0 - 2.0 * jnp.log(dist.std + 1e-8))
        return jnp.mean((y - x) ** 2) + 1e-4 * kl

    params = _init_params(model, seed, jnp.zeros((1, 3, RESOLUTION, RESOLUTION)))
    batch = lambda i: (jnp.asarray(pixels[rng.integers(0, len(pixels), VAE_BATCH)]),)  # noqa: E731
    params = fit(loss, params, batch, steps, VAE_LEARNING_RATE, "VAE")
    return model, jax.device_get(params)


def encode(model, params: dict, images: np.ndarray) -> np.ndarray:
    """The latent means of uint8 images (unscaled)."""
    import jax

    mode = jax.jit(lambda x: model.apply({"params": params}, x, method=model.encode).mode())
    pixels = to_model_range(images)
    return np.concatenate([np.asarray(mode(pixels[i : i + 256])) for i in range(0, len(pixels), 256)])


def train_unet(
    unet_config: dict, latents: np.ndarray, context: np.ndarray, caption_ids: np.ndarray, empty_id: int,
    steps: int = UNET_STEPS, seed: int = 0,
) -> dict:
    """A UNet's EMA params trained for epsilon prediction on scaled `latents` with SD's noise schedule.

    `context[caption_ids[i]]` is latent i's text embedding; a random 10% use `context[empty_id]` instead.
    """
    import jax
    import jax.numpy as jnp

    from flax_lora.models import unet
    from flax_lora.schedulers import alphas_cumprod
    from flax_lora.tiny import SD_SCHEDULE

    model = unet.UNet2DConditionModel(unet.UNetConfig.from_dict(unet_config, "demo unet"))
    alphas = jnp.asarray(alphas_cumprod(SD_SCHEDULE), jnp.float32)
    context = jnp.asarray(context)
    rng = np.random.default_rng(seed)

    def loss(params, x0, ids, key):
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, len(alphas))
        noise = jax.random.normal(k_noise, x0.shape)
        ids = jnp.where(jax.random.uniform(k_drop, ids.shape) < UNCONDITIONAL_FRACTION, empty_id, ids)
        a = alphas[t][:, None, None, None]
        pred = model.apply({"params": params}, jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise, t, context[ids])
        return jnp.mean((pred - noise) ** 2)

    def batch(i: int) -> tuple:
        idx = rng.integers(0, len(latents), UNET_BATCH)
        return jnp.asarray(latents[idx]), jnp.asarray(caption_ids[idx])

    sample = jnp.zeros((1, *latents.shape[1:]))
    params = _init_params(model, seed, sample, jnp.zeros((1,)), context[:1])
    return jax.device_get(fit(loss, params, batch, steps, UNET_LEARNING_RATE, "UNet", ema_decay=0.99))


def build_demo_pipeline(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Train and save the demo's base pipeline (diffusers layout) unless `out_dir` already holds it; returns the path."""
    import jax
    import jax.numpy as jnp

    from flax_lora.models import clip
    from flax_lora.tokenizer import CLIPTokenizer

    out = Path(os.path.expanduser(out_dir))
    if (out / DONE_FILE).is_file():
        return str(out)
    start = time.time()
    logger.info("building the demo pipeline in %s (once; about 3 minutes on 2 CPU cores)", out)
    vae_images, _ = draw_shapes(2048, (*BASE_COLOURS, NEW_COLOUR), seed)  # the VAE knows every colour, as SD's does
    vae_model, vae_params = train_vae(vae_images, seed=seed)
    images, captions = draw_shapes(2048, BASE_COLOURS, seed + 1)
    latents = encode(vae_model, vae_params, images)
    scaling_factor = float(1.0 / latents.std())  # unit-variance latents, as SD's 0.18215 was chosen
    text_config = {**tiny.TINY_TEXT_CONFIG, "max_position_embeddings": MAX_PROMPT_TOKENS}
    text_model = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(text_config, "demo text_encoder"))
    text_params = tiny.random_params(text_model, seed + 2, jnp.zeros((1, MAX_PROMPT_TOKENS), jnp.int32))
    scheduler = {"_class_name": "DDIMScheduler", **tiny.SD_SCHEDULE, "clip_sample": False}
    with tiny.atomic_directory(out, DONE_FILE) as tmp:
        tiny.write_tokenizer(tmp / "tokenizer", max_length=MAX_PROMPT_TOKENS)
        # The frozen random text encoder is the conditioning: the UNet learns to read its embeddings.
        tokenizer = CLIPTokenizer.from_folder(tmp / "tokenizer")
        vocabulary = sorted(set(captions)) + [""]
        context = np.asarray(text_model.apply({"params": text_params}, jnp.asarray(tokenizer(vocabulary))).last_hidden_state)
        caption_ids = np.array([vocabulary.index(c) for c in captions])
        unet_params = train_unet(UNET_CONFIG, latents * scaling_factor, context, caption_ids, len(vocabulary) - 1,
                                 seed=seed)  # fmt: skip
        configs = {"unet": UNET_CONFIG, "vae": {**VAE_CONFIG, "scaling_factor": scaling_factor},
                   "text_encoder": text_config}  # fmt: skip
        params = {"unet": unet_params, "vae": vae_params, "text_encoder": jax.device_get(text_params)}
        tiny.write_pipeline_files(tmp, "sd1", configs, params, scheduler)
    logger.info("demo pipeline built in %.0f s", time.time() - start)
    return str(out)


def build_in_child(out_dir: str | os.PathLike) -> str:
    """`build_demo_pipeline` in a fresh Python process with BUILD_XLA_FLAGS (its log shows here); returns the path.

    The child's XLA settings and its memory end with it, so the training run that follows keeps its own.
    """
    import subprocess
    import sys

    out = Path(os.path.expanduser(out_dir))
    if (out / DONE_FILE).is_file():
        return str(out)
    env = dict(os.environ)
    if _jaxlib_has_ynn_fusions():
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {BUILD_XLA_FLAGS}".strip()
    proc = subprocess.run([sys.executable, "-m", "flax_lora.demo", str(out)], env=env)
    if proc.returncode != 0 or not (out / DONE_FILE).is_file():
        raise RuntimeError(f"building the demo pipeline in {out} failed (exit status {proc.returncode}); see its log "
                           "above. Nothing was written there; the next run builds it again.")  # fmt: skip
    return str(out)


def _jaxlib_has_ynn_fusions() -> bool:
    """Whether this jaxlib knows BUILD_XLA_FLAGS (an unknown XLA flag aborts the process); measured on 0.10.2."""
    import jaxlib

    return tuple(int(p) for p in jaxlib.__version__.split(".")[:2]) >= (0, 10)


def colour_share(images: np.ndarray, colour: str) -> float:
    """Fraction of the shape pixels (not near-white) of uint8 NHWC images whose nearest demo colour is `colour`."""
    from flax_lora.data import _COLORS

    palette = np.array(list(_COLORS.values()), np.float32)
    pixels = images.reshape(-1, 3).astype(np.float32)
    shape = pixels[np.abs(pixels - 255.0).max(axis=1) > 60.0]
    if not len(shape):
        return 0.0
    nearest = np.argmin(((shape[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(nearest == list(_COLORS).index(colour)))


def save_before_after(before: list[np.ndarray], after: list[np.ndarray], out_png: str, zoom: int = 4) -> str:
    """Tile one row per prompt: the base pipeline's images (uint8 NHWC) left, the LoRA's right, enlarged `zoom` times."""
    from PIL import Image

    def row(images: np.ndarray) -> np.ndarray:
        return np.concatenate(list(images), axis=1)

    gap = np.full((before[0].shape[1], 4, 3), 255, np.uint8)
    grid = np.concatenate([np.concatenate([row(b), gap, row(a)], axis=1) for b, a in zip(before, after)], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(out_png)
    return out_png


if __name__ == "__main__":  # the child process of `build_in_child`
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)  # its INFO line on a missing TPU library is not news here
    build_demo_pipeline(sys.argv[1])
