"""Text-to-image sampling in Flax with any number of LoRA adapters, matching PyTorch diffusers step for step.

Design:
- The sampler (flax_lora.schedulers) is built from the pipeline's own scheduler config (betas,
  prediction_type, steps_offset, timestep_spacing); a scheduler name only swaps the algorithm, as
  `XScheduler.from_config(pipe.scheduler.config)` does in diffusers, so the same init latents give the same
  image as PyTorch. Options it cannot honour are errors, not silent drift.
- The whole denoising loop is one `lax.fori_loop` inside one `jit`, compiled once per (batch, size, steps,
  scheduler). Prompts, guidance scale, LoRA weights and LoRA scales are traced arguments, so changing them
  does not recompile.
- Images are sharded over every device along the batch axis (a 1-D `Mesh`); parameters are replicated.
- Adapters apply unmerged through the models' LoRA collection (scale changes are free) or fused into the base weights
  (`fuse=True`: no per-step LoRA cost).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora.config import InferConfig, parse_infer_args

parse_args = parse_infer_args  # the parser lives with the train config; this name is kept for old imports
from flax_lora.errors import MissingFileError, UserError, check_output_folder
from flax_lora.sharding import make_mesh

if TYPE_CHECKING:
    from flax_lora.schedulers import Sampler

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ pipeline


def checked_sampler(scheduler_config: dict, steps: int, name: str | None) -> "Sampler":
    """`schedulers.make_sampler`, its refusals (an option it does not implement, a bad step count) as UserErrors."""
    from flax_lora.schedulers import make_sampler

    try:
        return make_sampler(scheduler_config, steps, name)
    except ValueError as e:  # schedulers.py imports nothing of ours; its messages name the option and the file
        raise UserError(str(e)) from e


@dataclass
class LoadedLora:
    """An adapter in a pipeline: applied unmerged at `scale`, or fused into the base weights."""

    adapter: Any  # flax_lora.lora.LoraAdapter
    scale: float
    name: str
    fused: bool = False


def _refuse_dora_overlap(loaded: LoadedLora, adapter, name: str) -> None:
    """DoraOverlapError when a DoRA adapter and another one (fused or not) change the same module."""
    from flax_lora.lora import DoraOverlapError, dora_magnitudes, lora_modules, pt_module_path

    for component, tree in adapter.params.items():
        other = loaded.adapter.params.get(component, {})
        shared = lora_modules(tree).keys() & lora_modules(other).keys()
        dora = shared & (dora_magnitudes(tree).keys() | dora_magnitudes(other).keys())
        if dora:
            raise DoraOverlapError(
                f"adapters {loaded.name} and {name} both change {component} module {pt_module_path(min(dora))} and one "
                "is DoRA, which must be alone on its modules (PEFT's result depends on their order): load one of them"
            )


class FlaxLoraPipeline:
    """Stable Diffusion 1.x/2.x/XL text-to-image in Flax with LoRA adapters; `__call__` returns images in [0, 1]."""

    def __init__(self, pipe, mesh=None):
        from jax.sharding import NamedSharding, PartitionSpec

        self.pipe = pipe
        self.mesh = mesh if mesh is not None else make_mesh()
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        # Split images over every device of the mesh, whatever its axes.
        self._batch_sharded = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names))
        self._base_params = jax.device_put(pipe.params, self._replicated)
        self.params = self._base_params  # the base weights with every fused adapter merged in
        self.loras: list[LoadedLora] = []
        self._jitted: dict[tuple, Callable] = {}
        self.trace_count = 0  # how many times the sampling loop was traced (i.e. compiled)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        revision: str | None = None,
        variant: str | None = None,
        dtype=jnp.float32,
        mesh=None,
        attention: str = "auto",
        vae: str | None = None,
    ) -> "FlaxLoraPipeline":
        """Load a diffusers pipeline (hub id or local folder) into Flax; `vae` swaps in another AutoencoderKL."""
        from flax_lora.loading import load_pipeline

        pipe = load_pipeline(name_or_path, revision=revision, variant=variant, dtype=dtype, attention=attention, vae=vae)
        return cls(pipe, mesh=mesh)

    # -- adapters

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, fuse: bool = False, name: str | None = None):
        """Add a diffusers, PEFT or kohya adapter file (or folder) at `scale`; `fuse` merges it into the weights."""
        from flax_lora.formats import load_adapter

        return self.add_lora(load_adapter(path, self.pipe.params), scale, fuse, name or os.fspath(path))

    def add_lora(self, adapter, scale: float = 1.0, fuse: bool = False, name: str = "adapter"):
        """Add an in-memory `LoraAdapter` (e.g. a trainer's current weights) at `scale`; `fuse` merges it in."""
        from flax_lora.lora import merge_lora

        for other in self.loras:
            _refuse_dora_overlap(other, adapter, name)
        lora = LoadedLora(adapter=adapter, scale=float(scale), name=name, fused=fuse)
        if fuse:
            params = dict(self.params)
            for component in adapter.params:
                params[component] = merge_lora(params[component], *adapter.scope_layers(component, scale))
            self.params = jax.device_put(params, self._replicated)
        self.loras.append(lora)
        return adapter

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change the scale of an unfused adapter (no recompilation)."""
        for lora in self.loras:
            if lora.name == name:
                if lora.fused:
                    raise UserError(f"adapter {name} is fused into the weights; load it unfused to change its scale")
                lora.scale = float(scale)
                return
        raise KeyError(f"no adapter named {name!r}; loaded: {[lora.name for lora in self.loras]}")

    def unload_loras(self) -> None:
        """Remove every adapter and restore the base weights."""
        self.loras = []
        self.params = self._base_params

    def _lora_args(self) -> dict[str, list[tuple[Any, jax.Array]]]:
        """(tree, scale) per component of the unfused adapters, as traced jit arguments."""
        layers: dict[str, list] = {c: [] for c in ("unet", "text_encoder", "text_encoder_2") if c in self.pipe.params}
        for lora in self.loras:
            if lora.fused:
                continue
            for component in layers:
                tree, scale = lora.adapter.scope_layers(component, lora.scale)
                if tree:
                    layers[component].append((tree, jax.tree.map(jnp.float32, scale)))  # one, or one per module
        return jax.device_put(layers, self._replicated)

    # -- sampling

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels the UNet was trained at."""
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    def prepare_latents(
        self, batch: int, height: int, width: int, seed: int = 0, latents: np.ndarray | None = None
    ) -> np.ndarray:
        """Unit-variance initial latents (NCHW): the given ones after a shape check, else drawn from `seed`."""
        f = self.pipe.vae_scale_factor
        channels = self.pipe.unet.config.in_channels
        shape = (batch, channels, height // f, width // f)
        if latents is None:
            return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32))
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != shape:
            raise UserError(
                f"init latents have shape {latents.shape}, expected {shape} for {batch} image(s) of "
                f"{height}x{width} px (latents are NCHW at 1/{f} of the image size)"
            )
        return latents

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int | None = None,
        seed: int = 0,
        latents: np.ndarray | None = None,
    ) -> np.ndarray:
        """Generate `num_images` per prompt (default 1, or as many as `latents` hold); float32 NHWC images in [0, 1].

        `latents` are unit-variance NCHW initial latents, as diffusers' `pipeline(latents=...)` takes them.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # SDXL without a negative prompt guides away from zero embeddings, as diffusers (force_zeros_for_empty_prompt).
        zero_uncond = negative_prompt is None and self.pipe.force_zeros_for_empty_prompt
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise UserError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if num_images is None:
            num_images = 1 if latents is None else max(1, len(latents) // len(prompts))
        if num_images < 1:
            raise UserError(f"num_images must be >= 1, got {num_images}")
        f = self.pipe.vae_scale_factor
        if latents is not None and height is None and width is None:
            height, width = np.shape(latents)[-2] * f, np.shape(latents)[-1] * f
        default_h, default_w = self.default_size()
        height, width = height or default_h, width or default_w
        if height % f or width % f or height <= 0 or width <= 0:
            raise UserError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        # Built here, outside jit, so a bad scheduler option is refused before anything compiles.
        sampler = checked_sampler(self.pipe.scheduler_config, int(num_inference_steps), scheduler)

        # diffusers' order: every prompt's images together (prompt 0 x K, prompt 1 x K, ...).
        repeat = lambda ids: {k: np.repeat(v, num_images, axis=0) for k, v in ids.items()}  # noqa: E731
        cond, uncond = repeat(self.pipe.tokenize(prompts)), repeat(self.pipe.tokenize(negatives))
        batch = cond["input_ids"].shape[0]
        init = self.prepare_latents(batch, height, width, seed, latents)
        # The batch axis is split over every device: pad it to a multiple of the device count.
        pad = -batch % self.mesh.size
        if pad:
            cond, uncond, init = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]), (cond, uncond, init))
        cond, uncond, init = jax.device_put((cond, uncond, init), self._batch_sharded)
        do_cfg = guidance_scale > 1.0  # as diffusers: guidance 1 or less runs the conditional branch only
        fn = self._sampling_fn(sampler, do_cfg, zero_uncond)
        noise_key = jax.random.key_data(jax.random.key(seed + 1))  # per-step noise of ancestral samplers
        images = fn(self.params, self._lora_args(), cond, uncond, init, jnp.float32(guidance_scale), noise_key)
        if not images.is_fully_addressable:  # several processes (e.g. a multi-host trainer): each gets every image
            from jax.experimental import multihost_utils

            images = multihost_utils.process_allgather(images, tiled=True)
        return np.asarray(images)[:batch]

    def _sampling_fn(self, sampler: "Sampler", do_cfg: bool, zero_uncond: bool = False) -> Callable:
        """The jitted text-encode / denoise / decode function for these static settings (shapes retrace)."""
        key = (sampler.name, sampler.num_inference_steps, do_cfg, zero_uncond)
        if key not in self._jitted:
            fn = lambda *args: self._generate(sampler, do_cfg, zero_uncond, *args)  # noqa: E731
            self._jitted[key] = jax.jit(fn, out_shardings=self._batch_sharded)
        return self._jitted[key]

    def _generate(self, sampler, do_cfg, zero_uncond, params, loras, cond_ids, uncond_ids, latents, guidance, noise_key):
        """Traced body: encode prompts, run the whole denoising loop in `fori_loop`, decode to images."""
        self.trace_count += 1
        pipe = self.pipe
        text_lora = {c: tuple(layers) for c, layers in loras.items() if c != "unet"}
        context, pooled = pipe.encode_prompt(params, cond_ids, text_lora)
        if do_cfg:
            if zero_uncond:
                uncond_context, uncond_pooled = jax.tree.map(jnp.zeros_like, (context, pooled))
            else:
                uncond_context, uncond_pooled = pipe.encode_prompt(params, uncond_ids, text_lora)
            context = jnp.concatenate([uncond_context, context])
            pooled = None if pooled is None else jnp.concatenate([uncond_pooled, pooled])
        added = None
        if pipe.is_sdxl:
            # diffusers' defaults: original size = target size = the image size, crop top-left (0, 0).
            height, width = (side * pipe.vae_scale_factor for side in latents.shape[2:])
            time_ids = jnp.tile(jnp.array([height, width, 0, 0, height, width], jnp.float32), (len(context), 1))
            added = {"text_embeds": pooled, "time_ids": time_ids}
        timesteps = jnp.asarray(sampler.timesteps)
        latents = latents * sampler.init_noise_sigma
        key = jax.random.wrap_key_data(noise_key)

        def body(i, carry):
            sample, state = carry
            model_input = jnp.concatenate([sample, sample]) if do_cfg else sample
            model_input = sampler.scale_model_input(model_input, i)
            noise = pipe.predict_noise(params, model_input, timesteps[i], context, tuple(loras["unet"]), added)
            noise = noise.astype(jnp.float32)  # the schedule runs in float32 whatever the compute dtype
            if do_cfg:
                uncond, text = jnp.split(noise, 2)
                noise = uncond + guidance * (text - uncond)
            step_noise = jax.random.normal(jax.random.fold_in(key, i), sample.shape, jnp.float32)
            return sampler.step(state, noise, i, sample, step_noise)

        latents, _ = jax.lax.fori_loop(0, sampler.num_calls, body, (latents, sampler.init_state(latents)))
        images = pipe.decode_latents(params, latents)
        images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return images.transpose(0, 2, 3, 1)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] float images -> uint8, rounding as diffusers' numpy_to_pil does."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------------ CLI


def output_paths(config: InferConfig, count: int) -> list[str]:
    """Where each of `count` images goes."""
    if config.output:
        if count == 1:
            return [config.output]
        stem, ext = os.path.splitext(config.output)
        return [f"{stem}-{i}{ext or '.png'}" for i in range(count)]
    folder = config.output_dir or "."
    return [os.path.join(folder, f"image-{i}.png") for i in range(count)]


def resolve_base_model(config: InferConfig) -> str:
    """The model to load: the flag, else the base model recorded in the first adapter's metadata."""
    from flax_lora.formats import read_adapter_base_model

    if config.pretrained_model_name_or_path:
        return config.pretrained_model_name_or_path
    base = read_adapter_base_model(config.lora[0])
    if not base:
        raise UserError(
            f"{config.lora[0]} records no base model in its metadata; pass --pretrained_model_name_or_path"
        )
    logger.warning("no --pretrained_model_name_or_path: using %s, the base model recorded in %s", base, config.lora[0])
    return base


def read_init_latents(path: str) -> np.ndarray:
    """The --init_latents array (a batch axis added to a single latent), or a UserError naming the file."""
    try:
        latents = np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise MissingFileError(f"--init_latents {path} does not exist") from e
    except (OSError, ValueError) as e:  # not a .npy, or an object array
        raise UserError(f"--init_latents {path} is not a .npy array of latents ({e})") from e
    return latents[None] if latents.ndim == 3 else latents


def run(config: InferConfig) -> list[str]:
    """Load the model and adapters, generate, write PNGs; return their paths."""
    from PIL import Image

    from flax_lora.attention import check_platform as check_attention_platform
    from flax_lora.compile_cache import enable_compilation_cache
    from flax_lora.formats import resolve_adapter_file
    from flax_lora.loading import COMPUTE_DTYPES

    enable_compilation_cache(config.compilation_cache_dir)
    check_attention_platform(config.attention)
    for path in config.lora:  # fail before the (slow) model load
        resolve_adapter_file(path)
    if config.output:
        if os.path.isdir(config.output):
            raise UserError(f"--output {config.output} is a folder; name a .png file, or pass the folder as --output_dir")
        check_output_folder(os.path.dirname(os.path.abspath(config.output)), f"--output {config.output}")
    else:
        check_output_folder(config.output_dir or ".", f"--output_dir {config.output_dir or '.'}")
    latents = None if config.init_latents is None else read_init_latents(config.init_latents)
    dtype = COMPUTE_DTYPES[config.mixed_precision]
    pipeline = FlaxLoraPipeline.from_pretrained(
        resolve_base_model(config), revision=config.revision, variant=config.variant, dtype=dtype,
        vae=config.pretrained_vae_model_name_or_path, attention=config.attention,
    )
    for path, scale in zip(config.lora, config.scales):
        pipeline.load_lora(path, scale=scale, fuse=config.fuse_lora)
    images = pipeline(
        config.prompt,
        negative_prompt=config.negative_prompt,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        scheduler=config.scheduler,
        height=config.height,
        width=config.width,
        num_images=config.num_images,
        seed=config.seed,
        latents=latents,
    )
    paths = output_paths(config, len(images))
    if jax.process_index() == 0:
        for path, image in zip(paths, to_uint8(images)):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            Image.fromarray(image).save(path)
    return paths
