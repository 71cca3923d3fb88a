"""DreamBooth with prior preservation, as diffusers' train_dreambooth_lora.py: the class images and the batches that
pair instance and class examples.

Design:
- Missing class images are sampled once, before training, by flax_lora.inference's pipeline on the base model the run
  loaded, with the defaults diffusers' script samples with (the pipeline's own scheduler, 50 steps, guidance 7.5, the
  model's image size). Image k of --num_class_images is the file class-0000k.png, sampled from initial latents drawn
  from (--seed, k): a rerun samples only the missing numbers, and gets the same images. Each file is written under a
  temporary name and renamed, so a killed run leaves whole images only. Process 0 decides what is missing and writes;
  every process takes part in sampling (the batch is split over all devices).
- A step's batch is the instance examples followed by as many class examples, as diffusers' collate_fn concatenates
  them, laid out so that every device holds as many of each (its instance rows, then its class rows). Each half comes
  from its own flax_lora.data.BatchLoader, a position-based stream, so the pairing is deterministic and resumes at any
  step; a `prior` array (1.0 on class rows) tells `train.diffusion_loss` which half is which.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from flax_lora.data import CaptionedImages, image_files, load_prompt_folder
from flax_lora.devices import global_batch_size

logger = logging.getLogger(__name__)

# What diffusers' script samples class images with: its pipeline's call defaults.
CLASS_SAMPLING_STEPS = 50
CLASS_GUIDANCE_SCALE = 7.5
_PREFIX, _TMP = "class-", ".tmp"


def class_image_name(number: int) -> str:
    """The file name of sampled class image `number`."""
    return f"{_PREFIX}{number:05d}.png"


def missing_class_images(folder: str, num_class_images: int) -> list[int]:
    """Numbers of the class images to sample: as many as the folder's images fall short of `num_class_images`, the
    lowest numbers whose file does not exist (the user's own images count towards the total too)."""
    present = image_files(folder) if os.path.isdir(folder) else []
    short = num_class_images - len(present)
    if short <= 0:
        return []
    free = (k for k in itertools.count() if not os.path.exists(os.path.join(folder, class_image_name(k))))
    return list(itertools.islice(free, short))


def class_latents(shape: tuple[int, ...], numbers: list[int], seed: int) -> np.ndarray:
    """Unit-variance initial latents of the given class images, each drawn from (seed, its number) alone."""
    return np.stack([np.random.default_rng([seed, 6, k]).standard_normal(shape, dtype=np.float32) for k in numbers])


def _write_image(path: str, image: np.ndarray) -> None:
    """Write a PNG under a temporary name, then rename it: a killed run never leaves a partial image."""
    from PIL import Image

    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{_TMP}")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def sample_class_images(
    pipe, mesh, prompt: str, folder: str, numbers: list[int], per_call: int, seed: int
) -> list[str]:
    """Sample the numbered class images with `prompt` on `pipe`'s weights, `per_call` images per call split over the
    mesh; process 0 writes each one as it is done. Returns the paths written (on process 0)."""
    from tqdm.auto import tqdm

    from flax_lora.inference import FlaxLoraPipeline, to_uint8

    is_main = jax.process_index() == 0
    pipeline = FlaxLoraPipeline(pipe, mesh=mesh)
    height, width = pipeline.default_size()
    f = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, height // f, width // f)
    logger.info(
        "sampling %d class images of %r into %s for prior preservation (%d steps, guidance %g, %dx%d px, %d per call; "
        "the first call compiles the sampler); a rerun samples only the missing ones", len(numbers), prompt, folder,
        CLASS_SAMPLING_STEPS, CLASS_GUIDANCE_SCALE, width, height, per_call,
    )
    written = []
    with tqdm(total=len(numbers), desc="class images", disable=not is_main, dynamic_ncols=True) as bar:
        for start in range(0, len(numbers), per_call):
            chunk = numbers[start : start + per_call]
            # Always a full call (the last one padded): one compile for the whole pass.
            latents = class_latents(shape, chunk + chunk[-1:] * (per_call - len(chunk)), seed)
            images = pipeline(
                prompt, num_inference_steps=CLASS_SAMPLING_STEPS, guidance_scale=CLASS_GUIDANCE_SCALE,
                num_images=per_call, latents=latents, seed=seed,
            )
            if is_main:
                for k, image in zip(chunk, to_uint8(images)):
                    written.append(os.path.join(folder, class_image_name(k)))
                    _write_image(written[-1], image)
            bar.update(len(chunk))
    return written


def prepare_class_images(config, pipe, mesh, cpu_split: int = 0) -> CaptionedImages:
    """--class_data_dir's first --num_class_images images, captioned --class_prompt, after sampling the missing ones
    on the loaded base pipeline (--sample_batch_size per device and call, as `devices.global_batch_size` counts)."""
    folder = os.path.abspath(os.path.expanduser(config.class_data_dir))
    numbers = []
    if jax.process_index() == 0:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # a killed run's unfinished file
            if name.startswith(f".{_PREFIX}") and name.endswith(_TMP):
                os.remove(os.path.join(folder, name))
        numbers = missing_class_images(folder, config.num_class_images)
    if jax.process_count() > 1:  # process 0 counted; the others sample the same numbers
        from jax.experimental import multihost_utils

        padded = np.full(config.num_class_images, -1, np.int32)
        padded[: len(numbers)] = numbers
        numbers = [int(k) for k in multihost_utils.broadcast_one_to_all(padded) if k >= 0]
    if numbers:
        per_call = global_batch_size(config.sample_batch_size, jax.device_count(), cpu_split)
        seed = 0 if config.seed is None else config.seed
        sample_class_images(pipe, mesh, config.class_prompt, folder, numbers, per_call, seed)
        gc.collect()  # the sampler's jitted closures hold its replicated weights in a reference cycle: free them now
    else:
        logger.info("%s holds the %d class images for prior preservation", folder, config.num_class_images)
    if jax.process_count() > 1:  # every file is written before anyone reads the folder
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("flax_lora.dreambooth class images")
    return load_prompt_folder(folder, config.class_prompt, "--class_data_dir", config.num_class_images)


# ---------------------------------------------------------------------------------------------- batches


def split_rows(rows: list[int], global_batch: int, devices: int) -> tuple[list[int], list[int], np.ndarray]:
    """Where this process's rows of a prior-preservation batch (instance + class, `global_batch` rows in all) come from.

    Device d holds rows [d*c, (d+1)*c), c = global_batch / devices: its first c/2 are instance rows, the rest class
    rows, numbered within their half. Returns (instance rows, class rows, order): `order` picks, for each of `rows`,
    its example from the instance rows' examples followed by the class rows' ones."""
    if global_batch % (2 * devices):
        raise ValueError(f"a prior-preservation batch of {global_batch} rows does not split evenly over {devices} "
                         "devices")  # fmt: skip
    chunk = global_batch // devices
    half = chunk // 2
    instance, prior, source = [], [], []
    for r in rows:
        device, offset = divmod(r, chunk)
        if offset < half:
            source.append(("instance", len(instance)))
            instance.append(device * half + offset)
        else:
            source.append(("prior", len(prior)))
            prior.append(device * half + offset - half)
    order = np.array([i if kind == "instance" else len(instance) + i for kind, i in source], np.int64)
    return instance, prior, order


@dataclass
class PriorPreservationLoader:
    """The batches of a prior-preservation run: the instance loader's rows and the class loader's, in `order`, with
    `prior` (1.0 on class rows); the interface train.py reads of a BatchLoader."""

    instance: Any  # flax_lora.data.BatchLoader of the instance images
    prior: Any  # flax_lora.data.BatchLoader of the class images
    order: np.ndarray

    @property
    def num_examples(self) -> int:
        return self.instance.num_examples + self.prior.num_examples

    @property
    def steps_per_epoch(self) -> int:
        """Steps until the larger set was seen once, as diffusers' DreamBooth epoch (max of the two counts)."""
        return max(self.instance.steps_per_epoch, self.prior.steps_per_epoch)

    @property
    def bad_images(self) -> set[str]:
        """The unreadable images of both sets, by name."""
        return {loader.data.names[i] for loader in (self.instance, self.prior) for i in loader.bad_images}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of optimizer step `step`, arrays shaped (accum, len(rows), ...)."""
        a, b = self.instance.batch(step), self.prior.batch(step)
        if set(a) != set(b):
            raise ValueError(f"instance and class batches differ in their arrays: {sorted(a)} vs {sorted(b)}")
        out = {k: np.concatenate([a[k], b[k]], axis=1)[:, self.order] for k in a}
        prior = (self.order >= len(self.instance.rows)).astype(np.float32)
        out["prior"] = np.repeat(prior[None], self.instance.accum, axis=0)
        return out

    def close(self) -> None:
        """Stop both loaders' worker threads."""
        self.instance.close()
        self.prior.close()


def add_class_examples(loader, val_loader, class_data: CaptionedImages, rows: list[int], caches: dict):
    """(train loader, val loader) of a prior-preservation run from the instance-only ones setup built.

    `rows`: this process's rows of the doubled global batch; `caches`: the class images' `train.example_caches`. The
    class loader takes the instance loader's settings, its own seed, and no caption dropout (a class example is the
    base model's own output for --class_prompt). The held-out instance examples (--validation_split) are read in
    batches of the doubled size, as the step's mesh expects."""
    global_batch = 2 * loader.global_batch
    instance_rows, class_rows, order = split_rows(rows, global_batch, jax.device_count())
    loader.close()  # replaced below; its worker threads would otherwise stay
    instance = dataclasses.replace(loader, rows=instance_rows, _pool=None)
    class_seed = int(np.random.SeedSequence([loader.seed, 5]).generate_state(1)[0])
    prior = dataclasses.replace(
        loader, data=class_data, rows=class_rows, seed=class_seed, valid=caches.get("valid"),
        latent_cache=caches.get("latent_cache"), time_ids_cache=caches.get("time_ids_cache"),
        text_cache=caches.get("text_cache"), caption_dropout_rate=0.0, bad_images=set(), _perms={}, _pool=None,
    )  # fmt: skip
    logger.info(
        "prior preservation: %d instance and %d class images; each step %d instance + %d class examples",
        instance.num_examples, prior.num_examples, loader.global_batch, loader.global_batch,
    )
    if val_loader is not None:
        val_loader.close()
        val_loader = dataclasses.replace(val_loader, global_batch=global_batch, rows=list(rows), _pool=None)
    return PriorPreservationLoader(instance, prior, order), val_loader
