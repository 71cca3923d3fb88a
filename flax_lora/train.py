"""LoRA training of Stable Diffusion: noise schedule, loss, optimizer, the sharded train step and the loop.

Design:
- Only the LoRA tree is a training parameter: `TrainState` holds the LoRA params, their optax state, the
  step and the RNG key; the frozen base params are a separate argument of the step.
- One `jax.jit` step over the ("data", "fsdp") `Mesh` of flax_lora.sharding: the batch is sharded over every device
  of every process, the frozen base is replicated or, with --fsdp, sharded (FSDP), LoRA params and optimizer state
  are replicated; gradient accumulation is a `lax.scan` over
  micro-batches inside the step, so one call is one optimizer update.
- On a CPU host a fresh single-process run splits the CPU into XLA devices, up to one per core (XLA:CPU runs a
  device's step mostly on one thread); --train_batch_size is then the whole batch, so it trains what one device would.
- A batch holds either pixels + token ids (the step runs VAE and text encoder) or cached VAE posterior
  moments + text embeddings (the step only runs the UNet): `make_train_step` serves both and benchmarks.
  SDXL batches add `input_ids_2` (or `pooled_text_embeddings` when cached) and each example's `time_ids`
  (original size, crop top-left, target size), and the text conditioning is `SDPipeline.encode_prompt`'s.
- Validation images come from `flax_lora.inference`'s pipeline on the step's base params and mesh; the
  current LoRA weights are traced arguments of its sampler, so it compiles once for the whole run.
- Data position = step (see flax_lora.data), so an orbax checkpoint of TrainState plus the step
  resumes exactly; SIGTERM saves one and exits. --use_ema's average is the last link of the optax chain
  (`ema_of_params`), so it is jitted, replicated, checkpointed and restored as optimizer state.
- `main` reads as its phases: `setup` (pipeline, data, step, checkpointer, loggers into one `Run`), `restore`,
  `train_loop`, `write_outputs`; step metrics pass through one `MetricsBuffer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_lora.attention import check_platform as check_attention_platform
from flax_lora.compile_cache import enable_compilation_cache
from flax_lora.config import BUILTIN_RUN_DEFAULTS, DEFAULT_DEMO_DATA, DEFAULT_DEMO_MODEL, TrainConfig
from flax_lora.devices import global_batch_size, init_devices, log_cpu_split, usable_cores
from flax_lora.errors import ExistingOutputError, MissingFileError, UserError, check_output_folder
from flax_lora.host_memory import release_freed_heap
from flax_lora.trackers import Writers, open_writers, report_targets
from flax_lora.sharding import DATA_AXIS, batch_sharding, make_mesh, param_shardings, place, remat_compiler_options

logger = logging.getLogger("flax_lora.train")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # pipeline components a LoRA may train besides the UNet


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------- noise schedule


@dataclass(frozen=True)
class NoiseSchedule:
    """DDPM forward process: cumulative alphas per timestep and the model's prediction target."""

    alphas_cumprod: np.ndarray
    prediction_type: str = "epsilon"

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)


def noise_schedule(scheduler_config: dict, prediction_type: str | None = None) -> NoiseSchedule:
    """Build the training noise schedule from a diffusers scheduler config (any DDPM-family scheduler)."""
    from flax_lora.schedulers import alphas_cumprod

    target = prediction_type or scheduler_config.get("prediction_type", "epsilon")
    if target not in ("epsilon", "v_prediction"):
        raise UserError(f"prediction_type must be 'epsilon' or 'v_prediction', got {target!r}")
    try:
        cumulative = alphas_cumprod(scheduler_config)
    except ValueError as e:  # e.g. a beta_schedule the samplers do not implement; the message names it
        raise UserError(f"cannot train with this model's noise schedule: {e}") from e
    return NoiseSchedule(np.asarray(cumulative, np.float32), target)


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Noisy sample x_t and the training target (noise, or velocity for v_prediction)."""
    a = jnp.asarray(schedule.alphas_cumprod)[t]
    sa, s1a = _bcast(jnp.sqrt(a), x0), _bcast(jnp.sqrt(1.0 - a), x0)
    x_t = sa * x0 + s1a * noise
    target = noise if schedule.prediction_type == "epsilon" else sa * noise - s1a * x0
    return x_t, target


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps t."""
    a = jnp.asarray(schedule.alphas_cumprod)[t]
    return a / (1.0 - a)


def diffusion_loss(
    pred: jax.Array, target: jax.Array, t: jax.Array, schedule: NoiseSchedule, snr_gamma: float | None = None,
    prior: jax.Array | None = None, prior_loss_weight: float = 1.0,
) -> jax.Array:
    """MSE between prediction and target, optionally min-SNR-gamma weighted per sample (Hang et al. 2023).

    `prior` (1.0 marks a DreamBooth class example): mean of the instance examples + prior_loss_weight x plain mean of
    the class examples, as diffusers' DreamBooth scripts (their SDXL one SNR-weights only the instance examples)."""
    per_sample = jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2, axis=tuple(range(1, pred.ndim)))
    weighted = per_sample
    if snr_gamma is not None:
        s = snr(schedule, t)
        weight = jnp.minimum(s, snr_gamma)
        weight = weight / s if schedule.prediction_type == "epsilon" else weight / (s + 1.0)
        weighted = per_sample * weight
    if prior is None:
        return weighted.mean()
    prior = prior.astype(jnp.float32)
    instance = 1.0 - prior
    instance_loss = (weighted * instance).sum() / jnp.maximum(instance.sum(), 1.0)
    return instance_loss + prior_loss_weight * (per_sample * prior).sum() / jnp.maximum(prior.sum(), 1.0)


# -------------------------------------------------------------------------------------------- optimizer


def lr_schedule(
    name: str, learning_rate: float, warmup_steps: int, total_steps: int, num_cycles: int = 1, power: float = 1.0
) -> optax.Schedule:
    """Learning rate per optimizer step with the semantics of diffusers' `get_scheduler`."""
    w, T = max(0, warmup_steps), max(1, total_steps)

    def warm(step):
        return jnp.where(step < w, step / max(1, w), 1.0)

    def progress(step):
        return jnp.clip((step - w) / max(1, T - w), 0.0, 1.0)

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        if name == "constant":
            factor = jnp.ones_like(step)
        elif name == "constant_with_warmup":
            factor = warm(step)
        elif name == "linear":
            factor = jnp.where(step < w, warm(step), jnp.maximum(0.0, (T - step) / max(1, T - w)))
        elif name == "cosine":
            p = (step - w) / max(1, T - w)  # unclipped, as diffusers: past the end the cosine rises again
            factor = jnp.where(step < w, warm(step), jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * p))))
        elif name == "cosine_with_restarts":
            p = progress(step)
            restart = 0.5 * (1.0 + jnp.cos(jnp.pi * ((num_cycles * p) % 1.0)))
            factor = jnp.where(step < w, warm(step), jnp.where(p >= 1.0, 0.0, restart))
        elif name == "polynomial":
            lr_end = 1e-7
            decayed = (learning_rate - lr_end) * (1.0 - progress(step)) ** power + lr_end
            factor = jnp.where(step < w, warm(step), decayed / learning_rate)
        else:
            raise ValueError(f"unknown lr_scheduler {name!r}")
        return learning_rate * factor

    return fn


class EmaState(NamedTuple):
    """Optimizer state of `ema_of_params`: updates applied so far and the averaged weights."""

    count: jax.Array
    ema: Any


def ema_of_params(max_decay: float) -> optax.GradientTransformation:
    """Last link of an optax chain: track an EMA of the params the final updates produce; updates pass unchanged.

    The decay warms up as diffusers' EMAModel: 0 at the first update (the EMA starts at those weights), then
    min(max_decay, (1 + n) / (10 + n)) at the update after n earlier ones. Living in the optimizer state, the EMA
    is jitted, replicated, checkpointed and restored with it.
    """

    def init(params):
        return EmaState(count=jnp.zeros((), jnp.int32), ema=jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("ema_of_params needs the params: call optimizer.update(grads, state, params)")
        n = state.count.astype(jnp.float32)
        decay = jnp.where(n > 0, jnp.minimum(max_decay, (1.0 + n) / (10.0 + n)), 0.0)
        new_params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p), state.ema, new_params)
        return updates, EmaState(count=state.count + 1, ema=ema)

    return optax.GradientTransformation(init, update)


def ema_weights(state: TrainState) -> dict | None:
    """The EMA of the LoRA weights held in the optimizer state (--use_ema), else None."""
    found = [s for s in (state.opt_state if isinstance(state.opt_state, tuple) else ()) if isinstance(s, EmaState)]
    return found[0].ema if found else None


def exported_weights(state: TrainState) -> dict:
    """The LoRA weights that validation and the adapter files use: the EMA with --use_ema, else the trained ones."""
    ema = ema_weights(state)
    return state.params if ema is None else ema


def make_optimizer(config: TrainConfig, total_steps: int, learning_rate: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """--optimizer after global-norm clipping, with the configured learning-rate schedule (and the EMA, last)."""
    schedule = lr_schedule(
        config.lr_scheduler, learning_rate, config.lr_warmup_steps, total_steps, config.lr_num_cycles, config.lr_power
    )
    betas = dict(b1=config.adam_beta1, b2=config.adam_beta2)
    if config.optimizer == "adamw":
        opt = optax.adamw(schedule, **betas, eps=config.adam_epsilon, weight_decay=config.adam_weight_decay)
    elif config.optimizer == "prodigy":  # the lr multiplies its estimated step size: 1.0, as Prodigy's users pass
        opt = optax.contrib.prodigy(
            schedule, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
            weight_decay=config.adam_weight_decay,
        )
    elif config.optimizer == "lion":
        opt = optax.lion(schedule, **betas, weight_decay=config.adam_weight_decay)
    elif config.optimizer == "adafactor":
        # Not scaled by each weight's RMS: LoRA's `up` starts at zero, and kohya recommends scale_parameter=False.
        opt = optax.adafactor(
            schedule, multiply_by_parameter_scale=False, weight_decay_rate=config.adam_weight_decay or None
        )
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    parts = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm > 0 else []
    parts.append(opt)
    if config.use_ema:
        parts.append(ema_of_params(config.ema_decay))
    return optax.chain(*parts), schedule


# ------------------------------------------------------------------------------------------ train state


@struct.dataclass
class TrainState:
    """Everything that changes during training: LoRA params, their optimizer state, step and RNG key."""

    step: jax.Array
    params: dict  # {"unet": lora tree, optional "text_encoder": lora tree}
    opt_state: Any
    rng: jax.Array  # raw uint32 key, so orbax stores it as a plain array


def create_train_state(lora_params: dict, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh) -> TrainState:
    """Fresh state for LoRA params (optimizer state covers the LoRA tree only), replicated over the mesh.

    Abstract LoRA params (jax.ShapeDtypeStruct) give an abstract state, to compile a step from shapes alone.
    """

    def fresh(params):
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed)
        )

    # Replicated: LoRA weights and Adam moments are small (flax_lora.sharding). Placed as the step returns the
    # state, so the second call finds the same input shardings and does not recompile.
    replicated = NamedSharding(mesh, P())
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(lora_params)):
        abstract = jax.eval_shape(fresh, lora_params)
        return place(abstract, jax.tree.map(lambda _: replicated, abstract))
    # One buffer per leaf: optimizer states that start as the params (Prodigy's x0, the EMA) would otherwise share
    # theirs, and the step, which donates its state, would free one buffer twice.
    return jax.device_put(jax.tree.map(jnp.copy, fresh(lora_params)), replicated)


# ------------------------------------------------------------------------------------------- the step


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def lora_layers(lora: dict, adapter_configs: dict, component: str) -> tuple:
    """The (tree, scale) pair of a component for the models' LoRA collection; empty when it is not trained.

    The scale comes from the shapes alone (LoraConfig.tree_scale: conv modules may have their own), so it is a
    constant of the trace.
    """
    if component not in lora:
        return ()
    return ((lora[component], adapter_configs[component].tree_scale(lora[component])),)


class TrainStep:
    """A jitted train step bound to frozen base params: `step(state, batch) -> (state, metrics)`."""

    def __init__(self, jitted: Callable, base_params: dict, mesh: Mesh, loss_jitted: Callable | None = None):
        self.jitted = jitted
        self.base_params = base_params
        self.mesh = mesh
        self.loss_jitted = loss_jitted

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        compiled = self.jitted._cache_size()
        if not compiled:  # the set-up's freed heap goes back before the compile's peak (flax_lora.host_memory)
            release_freed_heap()
        out = self.jitted(state, self.base_params, batch)
        if self.jitted._cache_size() != compiled:  # this call compiled: its transient heap goes back too
            release_freed_heap()
        return out

    def loss(self, params: dict, batch: dict, rng: jax.Array) -> jax.Array:
        """The step's loss of LoRA params on a batch's first micro-batch (noise, timesteps from rng); no update."""
        return self.loss_jitted(params, self.base_params, batch, rng)

    def compiled_count(self) -> int:
        """How many times the step was traced/compiled (1 after any number of same-shaped calls)."""
        return self.jitted._cache_size()


def make_train_step(
    pipe,
    adapter_configs: dict,
    optimizer: optax.GradientTransformation,
    schedule: NoiseSchedule,
    mesh: Mesh,
    *,
    base_params: dict | None = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    compute_dtype=jnp.float32,
    lr_fn: optax.Schedule | None = None,
    prior_loss_weight: float = 1.0,
) -> TrainStep:
    """Jit one optimizer update over the mesh; batch = pixels+ids or cached latents+text embeddings, (accum, B, ...).

    A batch with `prior` (DreamBooth's prior preservation) weighs its class examples by `prior_loss_weight`."""
    train_te = any(c in adapter_configs for c in TEXT_ENCODERS)
    replicated = NamedSharding(mesh, P())
    base = base_params if base_params is not None else pipe.params
    base_sharding = param_shardings(mesh, base)  # replicated unless the mesh has an "fsdp" axis of size > 1
    base = place(base, base_sharding, compute_dtype)  # abstract params (jax.ShapeDtypeStruct) stay abstract

    def micro_loss(lora, base, micro, rng):
        k_lat, k_noise, k_off, k_t = jax.random.split(rng, 4)
        if "latent_mean" in micro:
            mean, std = micro["latent_mean"], micro["latent_std"]
            latents = mean + std * jax.random.normal(k_lat, mean.shape, mean.dtype)
        else:
            latents = pipe.encode_images(base, micro["pixel_values"].astype(compute_dtype)).sample(k_lat)
        latents = jax.lax.stop_gradient(pipe.vae.scale_latents(latents.astype(jnp.float32)))
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        if noise_offset:
            noise = noise + noise_offset * jax.random.normal(k_off, latents.shape[:2] + (1, 1), jnp.float32)
        t = jax.random.randint(k_t, (latents.shape[0],), 0, schedule.num_train_timesteps)
        noisy, target = add_noise(schedule, latents, noise, t)
        lora_c = _cast(lora, compute_dtype)
        if "text_embeddings" in micro:
            context, pooled = micro["text_embeddings"], micro.get("pooled_text_embeddings")
        else:
            ids = {k: micro[k] for k in ("input_ids", "input_ids_2") if k in micro}
            text_lora = {c: lora_layers(lora_c, adapter_configs, c) for c in TEXT_ENCODERS}
            context, pooled = pipe.encode_prompt(base, ids, text_lora)
            if not train_te:
                context, pooled = jax.lax.stop_gradient((context, pooled))
        added = None
        if pipe.is_sdxl:
            # Size ids stay float32 (diffusers casts them to the weight dtype, where bf16 rounds e.g. 1023 to 1024).
            added = {"text_embeds": pooled.astype(compute_dtype), "time_ids": micro["time_ids"].astype(jnp.float32)}
        unet_lora = lora_layers(lora_c, adapter_configs, "unet")
        pred = pipe.predict_noise(base, noisy.astype(compute_dtype), t, context.astype(compute_dtype), unet_lora, added)
        return diffusion_loss(pred, target, t, schedule, snr_gamma, micro.get("prior"), prior_loss_weight)

    grad_fn = jax.value_and_grad(micro_loss)

    def step(state: TrainState, base: dict, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        accum = jax.tree.leaves(batch)[0].shape[0]
        keys = jax.random.split(step_rng, accum)

        def body(carry, xs):
            micro, key = xs
            loss, grads = grad_fn(state.params, base, micro, key)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        if accum == 1:  # no accumulation: skip the scan and its zero-filled carry
            loss, grads = grad_fn(state.params, base, jax.tree.map(lambda x: x[0], batch), keys[0])
        else:
            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zeros, (batch, keys))
            loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if lr_fn is not None:
            metrics["lr"] = lr_fn(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    jitted = jax.jit(
        step,
        in_shardings=(replicated, base_sharding, batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
        compiler_options=remat_compiler_options(mesh) if getattr(pipe.unet, "remat", False) else None,
    )
    # Compiled at its first call only (--validation_split).
    loss_jitted = jax.jit(
        lambda lora, base, batch, rng: micro_loss(lora, base, jax.tree.map(lambda x: x[0], batch), rng),
        in_shardings=(replicated, base_sharding, batch_sharding(mesh), replicated),
        out_shardings=replicated,
    )
    return TrainStep(jitted, base, mesh, loss_jitted)


# ------------------------------------------------------------------------------------ host <-> devices


def process_rows(mesh: Mesh, global_batch: int) -> list[int]:
    """Global batch rows that live on this process's devices (the rows this process must load)."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((1, global_batch))
    rows = set()
    for idx in index_map.values():
        rows.update(range(*idx[1].indices(global_batch)))
    return sorted(rows)


def put_batch(local: dict[str, np.ndarray], mesh: Mesh, global_batch: int, rows: list[int]) -> dict[str, jax.Array]:
    """Assemble global sharded arrays from this process's rows (shaped (accum, len(rows), ...))."""
    sharding = batch_sharding(mesh)
    where = {r: i for i, r in enumerate(rows)}
    out = {}
    for key, arr in local.items():
        shape = (arr.shape[0], global_batch) + arr.shape[2:]
        pieces = []
        for device, idx in sharding.addressable_devices_indices_map(shape).items():
            sel = [where[r] for r in range(*idx[1].indices(global_batch))]
            pieces.append(jax.device_put(arr[:, sel], device))
        out[key] = jax.make_array_from_single_device_arrays(shape, sharding, pieces)
    return out


def to_host(tree):
    """Numpy copy of a replicated (possibly multi-process) pytree."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x), tree)


# ---------------------------------------------------------------------------------------------- caching


def _local_map(fn: Callable, inputs, batch: int, extra=()):
    """Run a jitted fn over a pytree of inputs (same leading size) in fixed-size chunks on this process's devices;
    returns its outputs' pytree as numpy."""
    local = jax.local_devices()
    mesh = make_mesh(local)
    batch = max(batch, len(local)) // len(local) * len(local)
    sharded = NamedSharding(mesh, P(DATA_AXIS))
    extra = jax.device_put(extra, NamedSharding(mesh, P()))
    jitted = jax.jit(fn, in_shardings=(NamedSharding(mesh, P()), sharded))
    total = len(jax.tree.leaves(inputs)[0])
    outs = []
    for start in range(0, total, batch):
        chunk = jax.tree.map(lambda x: x[start : start + batch], inputs)
        pad = batch - min(batch, total - start)
        if pad:  # fixed shapes: one compile for the whole pass
            chunk = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]), chunk)
        # Explicit device_put: in multi-process runs jit refuses numpy inputs with non-replicated shardings.
        out = jitted(extra, jax.device_put(chunk, sharded))
        outs.append(jax.tree.map(lambda x: np.asarray(x)[: batch - pad], out))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def cache_latents(
    pipe, data, config: TrainConfig, batch: int, dtype=jnp.float32, buckets=None
) -> tuple[np.ndarray | list, np.ndarray, np.ndarray]:
    """Encode every readable image once: (moments (n, flips, 2, C, h, w), SDXL size ids (n, flips, 6), valid indices).

    Bad images are dropped. With `buckets` (flax_lora.buckets.Buckets) each image is cropped to its bucket, and the
    moments are a list with one (flips, 2, C, h, w) array per example in its bucket's shape (None: dropped)."""
    from flax_lora.data import SKIP_HINT, BadImageError, crop_image, crop_to_bucket, mirrored_size_ids

    images, size_ids, valid = [], [], []
    for i in range(len(data)):
        if buckets is not None and buckets.of[i] < 0:  # its header could not be read: skipped (and logged) already
            continue
        try:
            img = data.load_image(i)
        except BadImageError as e:
            if not config.skip_bad_images:
                raise BadImageError(f"{e} ({SKIP_HINT})") from e
            logger.warning("skipping %s", e)
            continue
        # The crop is drawn once per image here: a cached run cannot re-crop every epoch.
        rng = np.random.default_rng([config.seed or 0, 2, i])
        interpolation, resized_w = config.image_interpolation_mode, None
        if buckets is None:
            pixels, ids = crop_image(img, config.resolution, config.center_crop, False, rng, interpolation)
        else:
            bucket, resized = buckets.size_of(i), buckets.resized_of(i)
            pixels, ids = crop_to_bucket(img, bucket, resized, config.center_crop, False, rng, interpolation)
            resized_w = resized[0]
        images.append(pixels)
        size_ids.append([ids, mirrored_size_ids(ids, resized_w)] if config.random_flip else [ids])
        valid.append(i)
    if not valid:
        raise UserError(f"no readable training images in {data.source}")

    def encode(vae_params, x):
        dist = pipe.encode_images({"vae": vae_params}, x.astype(dtype))
        return jnp.stack([dist.mean, dist.std], axis=1).astype(jnp.float32)  # (N, 2, C, h, w)

    flips = 2 if config.random_flip else 1
    vae = _cast(pipe.params["vae"], dtype)
    groups: dict[tuple, list[int]] = {}  # one encoder compile per image shape: a single one without buckets
    for k, pixels in enumerate(images):
        groups.setdefault(pixels.shape, []).append(k)
    per_example = [None] * len(valid)
    for members in groups.values():
        pixels = np.stack([images[k] for k in members])
        if config.random_flip:
            pixels = np.concatenate([pixels, pixels[..., ::-1]])
        moments = _local_map(encode, pixels, batch, vae)
        moments = moments.reshape(flips, len(members), *moments.shape[1:])
        for j, k in enumerate(members):
            per_example[k] = moments[:, j]
    ids_table = np.zeros((len(data), flips, 6), np.float32)
    ids_table[valid] = np.asarray(size_ids, np.float32)
    if buckets is not None:
        table = [None] * len(data)
        for k, i in enumerate(valid):
            table[i] = per_example[k]
        return table, ids_table, np.asarray(valid)
    # Index by example id; rows of bad images stay zero and are never sampled (not in `valid`).
    table = np.zeros((len(data),) + per_example[0].shape, np.float32)
    table[valid] = np.stack(per_example)
    return table, ids_table, np.asarray(valid)


def example_caches(pipe, data, config: TrainConfig, batch: int, dtype=jnp.float32) -> dict:
    """BatchLoader arguments giving another image set (DreamBooth's class images) the run's caches: `latent_cache`,
    `time_ids_cache` and the readable examples (`valid`) with --cache_latents, `text_cache` with text caching."""
    caches = {}
    if config.cache_latents:
        logger.info("caching VAE latents of %d images of %s...", len(data), data.source)
        latents, time_ids, valid = cache_latents(pipe, data, config, batch, dtype)
        caches.update(latent_cache=latents, time_ids_cache=time_ids, valid=valid)
    if config.cache_text_embeddings:
        caches["text_cache"] = cache_text(pipe, data, batch, dtype)
    return caches


def cache_text(pipe, data, batch: int, dtype=jnp.float32) -> dict[str, np.ndarray]:
    """The UNet's text conditioning for each example's first caption: `text_embeddings` (n, L, D), and for SDXL
    `pooled_text_embeddings` (n, P)."""
    return encode_captions(pipe, [data.captions(i)[0] for i in range(len(data))], batch, dtype)


def encode_captions(pipe, captions: list[str], batch: int, dtype=jnp.float32) -> dict[str, np.ndarray]:
    """`cache_text`'s arrays for a list of captions."""

    def encode(params, ids):
        context, pooled = pipe.encode_prompt(params, ids)
        out = {"text_embeddings": context.astype(jnp.float32)}
        if pooled is not None:
            out["pooled_text_embeddings"] = pooled.astype(jnp.float32)
        return out

    ids = pipe.tokenize(captions)
    encoders = {c: _cast(pipe.params[c], dtype) for c in ("text_encoder", "text_encoder_2") if c in pipe.params}
    return _local_map(encode, ids, batch, encoders)


def split_examples(indices: np.ndarray, fraction: float | None, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training, held-out) example indices for --validation_split, drawn from the seed; None held out without it."""
    if fraction is None:
        return indices, None
    if len(indices) < 2:
        raise UserError(f"--validation_split {fraction} needs at least 2 training examples, got {len(indices)}")
    held = min(max(1, round(fraction * len(indices))), len(indices) - 1)  # at least one example on each side
    order = np.random.default_rng([seed, 4]).permutation(len(indices))
    return np.sort(indices[order[held:]]), np.sort(indices[order[:held]])


def validation_loss(run: Run, state: TrainState) -> float:
    """Mean loss of the held-out examples with the exported weights; the same noise and timesteps every time."""
    loader, key = run.val_loader, jax.random.PRNGKey(run.seed + 3)
    params = exported_weights(state)
    batches = loader.steps_per_epoch  # the last one wraps around to the first examples (of its bucket)
    losses = []
    for i in range(batches):
        batch = put_batch(loader.batch(i), run.mesh, run.global_batch, run.rows)
        losses.append(run.train_step.loss(params, batch, jax.random.fold_in(key, i)))
    return float(np.mean([to_host(x) for x in losses]))


def log_validation_loss(run: Run, state: TrainState, step: int) -> None:
    """Compute val/loss, keep it in the run's history and log it."""
    loss = validation_loss(run, state)
    run.val_history.append((step, loss))
    logger.info("val/loss %.5f at step %d", loss, step)
    if run.writer is not None:
        run.writer.add_scalar("val/loss", loss, step)


# ------------------------------------------------------------------------------------------- sampling


def make_validation_pipeline(pipe, train_step: TrainStep, prediction_type: str, steps: int, shape: tuple[int, ...]):
    """inference.py's pipeline on the step's base params and mesh, and the scheduler name to sample with."""
    from flax_lora.inference import FlaxLoraPipeline
    from flax_lora.schedulers import make_sampler, sampler_name_for_config

    # Sample with the target the LoRA learns (--prediction_type may override the pipeline's).
    scheduler_config = {**pipe.scheduler_config, "prediction_type": prediction_type}
    try:
        name = sampler_name_for_config(scheduler_config)
    except ValueError:
        logger.warning("validation samples with DDIM: %s has no Flax sampler", scheduler_config.get("_class_name"))
        name = "ddim"
    try:  # fail before training rather than at the first validation
        make_sampler(scheduler_config, steps, name)
    except ValueError as e:
        raise UserError(
            f"cannot sample validation images with this model's scheduler: {e} (the trainer has no --scheduler "
            "flag; train without --validation_prompt)"
        ) from e
    base = dataclasses.replace(pipe, params=train_step.base_params, scheduler_config=scheduler_config)
    return FlaxLoraPipeline(base, mesh=train_step.mesh), name


# --------------------------------------------------------------------------------------- checkpointing


class Checkpointer:
    """Orbax checkpoints of TrainState + JSON metadata under OUTPUT_DIR/checkpoints/<step>; written atomically."""

    def __init__(self, directory: str, max_to_keep: int | None = None):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False),
            item_names=("state", "meta"),
        )

    def save(self, state: TrainState, meta: dict) -> str:
        """Save a checkpoint for state.step (all processes must call it); returns its folder."""
        step = int(to_host(state.step))
        self.manager.save(
            step,
            args=self.ocp.args.Composite(state=self.ocp.args.StandardSave(state), meta=self.ocp.args.JsonSave(meta)),
            force=True,
        )
        self.manager.wait_until_finished()
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
        """Restore state (with the shardings of `abstract_state`) and metadata of a step."""
        restored = self.manager.restore(
            step,
            args=self.ocp.args.Composite(
                state=self.ocp.args.StandardRestore(abstract_state), meta=self.ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.meta

    def close(self) -> None:
        self.manager.close()


def checkpoint_steps(directory: str) -> list[int]:
    """Steps of the checkpoints in a folder, oldest first, from the folder names (orbax's temporary ones are not)."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n) for n in names if n.isdigit())


def resolve_resume(resume: str, output_dir: str) -> tuple[str, int | None]:
    """(checkpoints folder, step) for --resume_from_checkpoint 'latest' or a checkpoint folder path."""
    if resume == "latest":
        return os.path.join(output_dir, "checkpoints"), None
    path = os.path.abspath(os.path.expanduser(resume.rstrip("/")))
    name = os.path.basename(path)
    expected = "expected a checkpoint folder like OUTPUT_DIR/checkpoints/500, or 'latest'"
    if not os.path.isdir(path):
        raise MissingFileError(f"--resume_from_checkpoint {resume} does not exist; {expected}")
    if not name.isdigit():
        raise UserError(f"--resume_from_checkpoint {resume} is not a checkpoint folder; {expected}")
    return os.path.dirname(path), int(name)


# ---------------------------------------------------------------------------------------------- logging


def save_loss_plot(history: list[tuple[int, float]], path: str, val_history: list[tuple[int, float]] = ()) -> None:
    """Write a PNG of the loss per step with a moving average, and the validation loss when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps, losses = np.asarray(history, np.float64).T
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    k = max(1, len(losses) // 20)
    if k > 1:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    if len(val_history):
        val_steps, val_losses = np.asarray(val_history, np.float64).T
        ax.plot(val_steps, val_losses, "o-", lw=1.5, ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so a preempted run saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if jax.process_count() == 1:  # multi-process runs use JAX's own preemption notifier
            try:
                self._old = signal.signal(signal.SIGTERM, self._handler)
            except ValueError:  # not the main thread
                self._old = None
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def check(self, step: int) -> bool:
        """True once a preemption was signalled (all processes agree on the step in multi-process runs)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service not enabled
                return False
        return self.requested


# ------------------------------------------------------------------------------------------------ main


def apply_builtin_defaults(config: TrainConfig) -> TrainConfig:
    """With no model flag: build the demo pipeline (and its blue shapes, with no data flag) and point at them.

    The demo's default output folder is a parent: each run gets the next free `run-N` in it, so the quick start
    can be run again without resuming or overwriting anything.
    """
    from flax_lora.demo import build_demo_dataset, build_in_child

    builtin_data = config.dataset_name is None and config.train_data_dir is None and config.instance_data_dir is None
    # Process 0 builds the shared files; the others wait, so no two writers race on one cache folder.
    run_number = 0
    if jax.process_index() == 0:
        build_in_child(DEFAULT_DEMO_MODEL)
        if builtin_data:
            build_demo_dataset(DEFAULT_DEMO_DATA)
        run_number = next_run_number(config.output_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        run_number = int(multihost_utils.broadcast_one_to_all(np.int32(run_number)))  # also waits for the build
    changes = {"pretrained_model_name_or_path": os.path.expanduser(DEFAULT_DEMO_MODEL)}
    if builtin_data:
        changes["train_data_dir"] = DEFAULT_DEMO_DATA
    if config.output_dir == BUILTIN_RUN_DEFAULTS["output_dir"]:
        # A resumed demo continues the newest run; a new one starts the next.
        resumed = config.resume_from_checkpoint and run_number > 1
        changes["output_dir"] = os.path.join(config.output_dir, f"run-{run_number - 1 if resumed else run_number}")
    return dataclasses.replace(config, **changes)


def next_run_number(parent: str) -> int:
    """1 + the highest N of the `run-N` folders in `parent` (1 when there are none)."""
    names = os.listdir(parent) if os.path.isdir(parent) else []
    return max((int(m.group(1)) for name in names if (m := re.fullmatch(r"run-(\d+)", name))), default=0) + 1


@dataclass
class Run:
    """What `setup` builds for one training run; the phases after it (restore, loop, outputs) read it."""

    config: TrainConfig
    pipe: Any  # flax_lora.loading.SDPipeline
    loader: Any  # flax_lora.data.BatchLoader
    lora_configs: dict  # component -> flax_lora.lora.LoraConfig
    train_step: TrainStep
    mesh: Mesh
    rows: list[int]
    output_dir: str
    seed: int
    global_batch: int
    per_step: int  # samples per optimizer step (global batch x accumulation)
    steps_per_epoch: int
    total_steps: int
    learning_rate: float
    checkpointer: Checkpointer
    resume_step: int | None  # None: the latest checkpoint (with --resume_from_checkpoint)
    writer: Writers | None = None  # the metric loggers (--report_to) on process 0
    validation: tuple | None = None  # (FlaxLoraPipeline, sampler name) when validation images are asked for
    val_loader: Any = None  # BatchLoader of the held-out examples (--validation_split)
    val_history: list = dataclasses.field(default_factory=list)  # (step, val/loss), restored with the checkpoint
    uploader: Any = None  # flax_lora.hub.CheckpointUploader on process 0 with --push_to_hub

    @property
    def is_main(self) -> bool:
        """Process 0 writes the outputs."""
        return jax.process_index() == 0


class MetricsBuffer:
    """Step metrics, read one step late so the device keeps running, then logged once: loss history, progress
    bar, TensorBoard. A non-finite loss stops the run here, before anything is saved.

    The bar says "compiling" until the first step is done; its ETA comes from the mean time of the steps after it
    (side work in `paused()`, checkpoints and validation, is not counted).
    """

    def __init__(self, run: Run, history: list[tuple[int, float]], bar: Any):
        self.run = run
        self.history = history
        self.bar = bar
        self.pending: tuple[int, dict] | None = None  # (step, metrics) of the last dispatched step
        self.t_last = time.perf_counter()
        self.compiled = False
        self.timed_steps, self.timed_s = 0, 0.0

    def push(self, step: int, metrics: dict) -> None:
        """Hold the metrics of a step just dispatched; log the previous step's (ready by now)."""
        previous, self.pending = self.pending, (step, metrics)
        if previous is not None:
            self._log(*previous)

    def flush(self) -> None:
        """Log the held metrics (before a checkpoint, a validation or the end)."""
        if self.pending is not None:
            self._log(*self.pending)
            self.pending = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Around side work between steps: log what is held first, and leave the time it takes out of the rate."""
        self.flush()
        try:
            yield
        finally:
            self.t_last = time.perf_counter()

    def _log(self, step: int, metrics: dict) -> None:
        m = {k: float(v) for k, v in to_host(metrics).items()}
        if not math.isfinite(m["loss"]):
            raise NonFiniteLossError(
                f"loss is {m['loss']} at step {step}; stopping without saving. The last good checkpoint in "
                f"{self.run.checkpointer.directory} is intact (resume with --resume_from_checkpoint latest); try a "
                "lower --learning_rate, --max_grad_norm, or bf16 instead of fp16."
            )
        now = time.perf_counter()
        elapsed, self.t_last = now - self.t_last, now
        self.history.append((step, m["loss"]))
        ips = None
        if self.compiled:
            self.timed_steps, self.timed_s = self.timed_steps + 1, self.timed_s + elapsed
            ips = self.run.per_step / max(elapsed, 1e-9)
        else:  # the first step of a run compiles: its time says nothing about the rest
            self.compiled = True
            self.bar.set_description_str("training", refresh=False)
        postfix = f"loss {m['loss']:.4f}"
        if self.timed_steps:
            step_s = self.timed_s / self.timed_steps
            eta = self.bar.format_interval((self.run.total_steps - step) * step_s)
            postfix += f", {self.run.per_step / step_s:.1f} img/s, {step_s:.2f} s/step, ETA {eta}"
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(1)
        if self.run.writer is not None:
            for k, v in m.items():
                self.run.writer.add_scalar(f"train/{k}", v, step)
            if ips is not None:
                self.run.writer.add_scalar("train/images_per_sec", ips, step)


def setup(config: TrainConfig, cpu_split: int = 0) -> tuple[Run, TrainState]:
    """Check the inputs, load the data and pipeline, build the mesh, loader, LoRA state, jitted step, checkpointer and
    loggers. Cheap checks come first, and the output folder is created only once everything loaded.

    `cpu_split`: the CPU devices `init_devices` chose itself; on a CPU host --train_batch_size is then the whole batch.
    """
    from flax_lora.data import BatchLoader, load_training_data, training_buckets
    from flax_lora.loading import COMPUTE_DTYPES, load_pipeline
    from flax_lora.lora import TEXT_ENCODER_TARGETS, UNET_CONV_TARGETS, UNET_TARGETS, LoraConfig, new_adapter

    is_main = jax.process_index() == 0
    seed = 0 if config.seed is None else config.seed
    output_dir = output_folder(config)
    check_output_folder(output_dir, f"--output_dir {config.output_dir}")
    ckpt_dir, resume_step = os.path.join(output_dir, "checkpoints"), None
    if config.resume_from_checkpoint:
        ckpt_dir, resume_step = resolve_resume(config.resume_from_checkpoint, output_dir)
    elif saved := checkpoint_steps(ckpt_dir):  # refused now, not after the slow loading
        raise ExistingOutputError(
            f"{ckpt_dir} already holds checkpoints (latest step {saved[-1]}); pass --resume_from_checkpoint latest "
            "to continue that run, or choose another --output_dir"
        )
    if jax.default_backend() != "cpu":
        cpu_split = 0  # the run trains on the accelerators; the split CPU backend goes unused
    if cpu_split % config.fsdp:
        raise UserError(
            f"--fsdp {config.fsdp} needs a multiple of {config.fsdp} CPU devices that divides --train_batch_size "
            f"{config.train_batch_size}, at most one per core ({usable_cores()}); change --train_batch_size, or pass "
            "--num_cpu_devices N (then the global batch is --train_batch_size x N)"
        )
    mesh = make_mesh(fsdp=config.fsdp)  # a --fsdp that does not divide the devices fails before any loading
    check_attention_platform(config.unet_attention)
    data = load_training_data(config)  # before the model: a data mistake is reported in a second, not after the load
    buckets = training_buckets(data, config) if config.enable_bucket else None

    compute_dtype = COMPUTE_DTYPES[config.mixed_precision]
    if config.mixed_precision == "fp16":
        logger.warning("fp16 trains without loss scaling here; prefer --mixed_precision bf16 where the hardware has it")
    logger.info("loading %s", config.pretrained_model_name_or_path)
    pipe = load_pipeline(
        config.pretrained_model_name_or_path,
        config.revision,
        config.variant,
        dtype=compute_dtype,
        param_dtype=compute_dtype,
        attention=config.unet_attention,
        vae=config.pretrained_vae_model_name_or_path,
    )
    if config.gradient_checkpointing:  # sampling ignores remat (no backward pass), so validation may share it
        pipe = dataclasses.replace(pipe, unet=pipe.unet.clone(remat=True))
    schedule = noise_schedule(pipe.scheduler_config, config.prediction_type)

    global_batch = global_batch_size(config.train_batch_size, jax.device_count(), cpu_split)
    if cpu_split:
        log_cpu_split(global_batch, cpu_split, config.fsdp, sum(x.nbytes for x in jax.tree.leaves(pipe.params)))
    accum = config.gradient_accumulation_steps
    rows = process_rows(mesh, global_batch)

    latent_cache = time_ids_cache = text_cache = valid = None
    local_batch = global_batch // jax.device_count() * jax.local_device_count()  # this process's rows of a batch
    if config.cache_latents:
        logger.info("caching VAE latents of %d images (the first batch compiles the encoder)...", len(data))
        latent_cache, time_ids_cache, valid = cache_latents(pipe, data, config, local_batch, compute_dtype, buckets)
    empty_text = None
    if config.cache_text_embeddings:
        logger.info("caching text embeddings of %d captions...", len(data))
        text_cache = cache_text(pipe, data, local_batch, compute_dtype)
        if config.caption_dropout_rate > 0:  # what a dropped caption trains on
            empty_text = {k: v[0] for k, v in encode_captions(pipe, [""], local_batch, compute_dtype).items()}
    if valid is None and buckets is not None:  # an image whose header cannot be read has no bucket
        valid = np.flatnonzero(buckets.of >= 0)
    valid, held_out = split_examples(np.arange(len(data)) if valid is None else valid, config.validation_split, seed)
    common = dict(
        center_crop=config.center_crop, random_flip=config.random_flip, skip_bad_images=config.skip_bad_images,
        interpolation=config.image_interpolation_mode, latent_cache=latent_cache, text_cache=text_cache, tokenizer_2=pipe.tokenizer_2, time_ids_cache=time_ids_cache,
        buckets=buckets,
    )
    loader = BatchLoader(
        data, pipe.tokenizer, config.resolution, global_batch, rows, accum=accum, seed=seed, valid=valid,
        num_workers=config.dataloader_num_workers, caption_dropout_rate=config.caption_dropout_rate,
        empty_text=empty_text, **common,
    )
    val_loader = None
    if held_out is not None:
        logger.info("holding out %d of %d examples for val/loss", len(held_out), len(held_out) + len(valid))
        val_loader = BatchLoader(
            data, pipe.tokenizer, config.resolution, global_batch, rows, seed=seed, valid=held_out, **common
        )
    if config.with_prior_preservation:  # diffusers' DreamBooth batch: the instance examples, then as many class ones
        from flax_lora.dreambooth import add_class_examples, prepare_class_images

        class_data = prepare_class_images(config, pipe, mesh, cpu_split)  # samples the missing ones first
        global_batch, rows = 2 * global_batch, process_rows(mesh, 2 * global_batch)
        class_caches = example_caches(pipe, class_data, config, local_batch, compute_dtype)
        loader, val_loader = add_class_examples(loader, val_loader, class_data, rows, class_caches)
    per_step = global_batch * accum
    if buckets is not None:
        logger.info("%s", buckets.summary(loader.valid))
    steps_per_epoch = loader.steps_per_epoch
    total_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    instance_batch = global_batch // 2 if config.with_prior_preservation else global_batch  # as diffusers' --scale_lr
    learning_rate = config.learning_rate * (accum * instance_batch if config.scale_lr else 1)

    unet_targets = UNET_TARGETS + (UNET_CONV_TARGETS if config.conv_rank is not None else ())
    unet_config = LoraConfig(config.rank, config.lora_alpha, unet_targets, conv_rank=config.conv_rank,
                             conv_alpha=config.conv_alpha, use_dora=config.use_dora)  # fmt: skip
    lora_configs = {"unet": unet_config}
    if config.train_text_encoder:  # both of SDXL's encoders, as diffusers' SDXL script
        for component in TEXT_ENCODERS:
            if component in pipe.params:
                lora_configs[component] = LoraConfig(
                    config.rank, config.lora_alpha, TEXT_ENCODER_TARGETS, use_dora=config.use_dora
                )
    adapter = new_adapter(
        jax.random.PRNGKey(seed + 1), pipe.params, lora_configs["unet"], lora_configs.get("text_encoder"),
        base_model=pipe.name, text_encoder_2_config=lora_configs.get("text_encoder_2"),
    )
    lora_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(adapter.params))
    optimizer, lr_fn = make_optimizer(config, total_steps, learning_rate)
    state = create_train_state(lora_params, optimizer, seed, mesh)
    train_step = make_train_step(
        pipe, lora_configs, optimizer, schedule, mesh, snr_gamma=config.snr_gamma, noise_offset=config.noise_offset,
        compute_dtype=compute_dtype, lr_fn=lr_fn, prior_loss_weight=config.prior_loss_weight,
    )

    validation = None
    if config.validation_prompt and config.num_validation_images > 0:
        side = config.resolution // pipe.vae_scale_factor
        shape = (config.num_validation_images, pipe.unet.config.in_channels, side, side)
        validation = make_validation_pipeline(pipe, train_step, schedule.prediction_type, config.num_inference_steps, shape)

    # Every input is checked by now: from here on the run writes.
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
    writer = open_writers(config, output_dir) if is_main else None
    uploader = None
    if config.push_to_hub and is_main:
        from flax_lora.hub import CheckpointUploader, repo_name

        uploader = CheckpointUploader(repo_name(config.hub_model_id, output_dir), config.hub_token, config.hub_private_repo)
    run = Run(
        config=config, pipe=pipe, loader=loader, lora_configs=lora_configs, train_step=train_step, mesh=mesh,
        rows=rows, output_dir=output_dir, seed=seed, global_batch=global_batch, per_step=per_step,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, learning_rate=learning_rate,
        checkpointer=Checkpointer(ckpt_dir, config.checkpoints_total_limit), resume_step=resume_step,
        writer=writer, validation=validation, val_loader=val_loader, uploader=uploader,
    )
    return run, state


def restore(run: Run, state: TrainState) -> tuple[TrainState, list[tuple[int, float]]]:
    """The state and loss history to start from: a checkpoint when resuming, else the fresh state."""
    config, checkpointer = run.config, run.checkpointer
    if not config.resume_from_checkpoint:  # setup refused a folder that holds checkpoints
        return state, []
    latest = checkpointer.latest_step()
    step = run.resume_step if run.resume_step is not None else latest
    if step is None:
        logger.info("no checkpoint in %s; starting a new run", checkpointer.directory)
        return state, []
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    try:
        state, meta = checkpointer.restore(step, abstract)
    except ValueError as e:  # orbax: the stored tree or a shape differs from this run's LoRA state
        raise UserError(
            f"checkpoint {os.path.join(checkpointer.directory, str(step))} does not fit this run: it was written with "
            "other LoRA or optimizer settings (--rank, --conv_rank, --use_dora, --train_text_encoder, --optimizer, "
            f"--use_ema); resume with the flags of the run that wrote it ({str(e).splitlines()[0][:200]})"
        ) from e
    if meta.get("samples_per_step") != run.per_step or meta.get("seed") != run.seed:
        logger.warning(
            "checkpoint was written with %s samples/step and seed %s; this run has %d and %d, so the data order "
            "differs from an uninterrupted run", meta.get("samples_per_step"), meta.get("seed"), run.per_step, run.seed,
        )
    if meta.get("buckets") != bucket_summary(run):
        logger.warning(
            "checkpoint was written with other aspect-ratio buckets (%s; this run: %s), so the data order differs from "
            "an uninterrupted run", meta.get("buckets") or "none", bucket_summary(run) or "none",
        )
    logger.info("resumed from %s at step %d", os.path.join(checkpointer.directory, str(step)), step)
    run.val_history[:] = [tuple(h) for h in meta.get("val_loss_history", [])]
    return state, [tuple(h) for h in meta.get("loss_history", [])]


def save_checkpoint(run: Run, state: TrainState, history: list[tuple[int, float]]) -> str:
    """Checkpoint the state with the data position and loss history (every process calls it); returns its folder."""
    step = int(to_host(state.step))
    meta = {
        "samples_per_step": run.per_step, "seed": run.seed, "num_examples": run.loader.num_examples, "step": step,
        "data_position": step * run.per_step, "bad_images": len(run.loader.bad_images), "loss_history": history,
        "val_loss_history": run.val_history, "buckets": bucket_summary(run),
    }
    return run.checkpointer.save(state, meta)


def bucket_summary(run: Run) -> str | None:
    """The aspect-ratio buckets of the training examples in one line (None without --enable_bucket): a resumed run
    with other buckets reads its steps in another order."""
    buckets = getattr(run.loader, "buckets", None)
    return None if buckets is None else buckets.summary(run.loader.valid)


def validate(run: Run, state: TrainState, step: int, final: bool = False) -> list[str]:
    """Sample validation images with the current LoRA weights (the EMA with --use_ema); process 0 writes them.

    Returns their paths."""
    if run.validation is None:
        return []
    from PIL import Image

    from flax_lora.inference import to_uint8

    config = run.config
    pipeline, scheduler = run.validation
    logger.info(
        "generating %d validation images at step %d%s...", config.num_validation_images, step,
        "" if pipeline.trace_count else " (the first call compiles the sampler)",
    )
    pipeline.unload_loras()  # the adapter is the current weights; same shapes, so no recompilation
    pipeline.add_lora(current_adapter(run, state), name="training")
    images = to_uint8(pipeline(
        config.validation_prompt, num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale, scheduler=scheduler, height=config.resolution,
        width=config.resolution, num_images=config.num_validation_images, seed=run.seed + 2,
    ))
    paths = []
    if run.is_main:
        folder = os.path.join(run.output_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        for i, img in enumerate(images):
            paths.append(os.path.join(folder, f"{'final' if final else f'step{step:06d}'}_{i}.png"))
            Image.fromarray(img).save(paths[-1])
        if run.writer is not None:
            run.writer.add_images("validation" + ("/final" if final else ""), images, step, dataformats="NHWC")
    return paths


def write_before_after(run: Run, state: TrainState) -> str | None:
    """The demo's before/after grid: each demo prompt sampled by the base and by base + LoRA, same seeds; its path."""
    from flax_lora.demo import NEW_COLOUR, PROMPTS, SAMPLES_PER_PROMPT, colour_share, save_before_after
    from flax_lora.inference import to_uint8

    config = run.config
    pipeline, scheduler = run.validation

    def sample_prompts() -> list[np.ndarray]:
        return [to_uint8(pipeline(
            prompt, num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
            scheduler=scheduler, height=config.resolution, width=config.resolution, num_images=SAMPLES_PER_PROMPT,
            seed=0,
        )) for prompt in PROMPTS]  # fmt: skip

    logger.info("sampling the before/after grid (base vs LoRA) for: %s", "; ".join(PROMPTS))
    pipeline.unload_loras()
    before = sample_prompts()
    pipeline.add_lora(current_adapter(run, state), name="training")
    after = sample_prompts()
    if not run.is_main:
        return None
    logger.info("%s share of the shapes' pixels: base %.0f%%, with the LoRA %.0f%%", NEW_COLOUR,
                100 * colour_share(np.stack(before), NEW_COLOUR), 100 * colour_share(np.stack(after), NEW_COLOUR))
    return save_before_after(before, after, os.path.join(run.output_dir, "before_after.png"))


def train_loop(run: Run, state: TrainState, history: list[tuple[int, float]]) -> tuple[TrainState, int, bool]:
    """Run the steps left; checkpoints and validation at their intervals, a checkpoint on SIGTERM.

    Returns (state, step of the last checkpoint written, preempted).
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    config, loader = run.config, run.loader
    start_step = int(to_host(state.step))
    logger.info(
        "training: %d examples, %d devices (%d processes), global batch %d x %d accumulation, %d steps (%d epochs), "
        "lr %g", loader.num_examples, jax.device_count(), jax.process_count(), run.global_batch,
        config.gradient_accumulation_steps, run.total_steps, math.ceil(run.total_steps / run.steps_per_epoch),
        run.learning_rate,
    )
    # The ETA is ours (MetricsBuffer): tqdm's own rate would count the compile step.
    bar = tqdm(
        total=run.total_steps, initial=start_step, disable=not run.is_main, desc="compiling the train step",
        dynamic_ncols=True, bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}{postfix}",
    )
    metrics_buffer = MetricsBuffer(run, history, bar)
    last_saved, preempted = start_step, False
    with _Preemption() as preemption, logging_redirect_tqdm(tqdm_class=tqdm):  # log lines go above the bar
        try:
            for step in range(start_step, run.total_steps):
                batch = put_batch(loader.batch(step), run.mesh, run.global_batch, run.rows)
                state, metrics = run.train_step(state, batch)
                done = step + 1
                metrics_buffer.push(done, metrics)
                due = done % run.steps_per_epoch == 0 and (done // run.steps_per_epoch) % config.validation_epochs == 0
                if run.val_loader is not None and (due or done == run.total_steps):  # before the checkpoint keeps it
                    with metrics_buffer.paused():
                        log_validation_loss(run, state, done)
                stop = preemption.check(done)
                if done % config.checkpointing_steps == 0 or stop:
                    with metrics_buffer.paused():
                        logger.info("saved checkpoint %s", save_checkpoint(run, state, history))
                        if run.uploader is not None and not stop:  # the adapter of this step, to checkpoint-N/
                            adapter = current_adapter(run, state)
                            run.uploader.submit(done, lambda folder: save_adapters(run, adapter, folder))
                    last_saved = done
                    if stop:
                        preempted = True
                        logger.warning("preempted (SIGTERM): saved step %d; resume with --resume_from_checkpoint latest", done)
                        break
                if due and done != run.total_steps:
                    with metrics_buffer.paused():
                        validate(run, state, done)
            metrics_buffer.flush()
            # A new batch shape (an aspect-ratio bucket) compiles the step again; nothing else should.
            logger.info("the train step compiled for %d batch shape(s)", run.train_step.compiled_count())
        finally:
            bar.close()
            loader.close()
    return state, last_saved, preempted


def current_adapter(run: Run, state: TrainState):
    """The adapter as it would be exported now (the EMA weights with --use_ema), on the host."""
    from flax_lora.lora import LoraAdapter

    return LoraAdapter(params=to_host(exported_weights(state)), configs=run.lora_configs, base_model=run.pipe.name)


def save_adapters(run: Run, adapter, folder: str) -> list[str]:
    """Write the adapter in every --export_formats format into `folder`; returns the paths."""
    from flax_lora.formats import save_adapter

    return [save_adapter(adapter, folder, format=f, base_params=run.pipe.params) for f in run.config.export_format_list]


def write_outputs(run: Run, state: TrainState, history: list[tuple[int, float]]) -> dict:
    """Final validation images, the adapter file, the loss plot and the run's config (process 0 writes)."""
    if run.loader.bad_images:
        logger.warning("%d unreadable images were skipped", len(run.loader.bad_images))
    final_step = int(to_host(state.step))
    samples = validate(run, state, final_step, final=True)  # every process takes part in sampling
    outputs = {}
    if run.is_main:
        adapter_paths = save_adapters(run, current_adapter(run, state), run.output_dir)
        loss_plot = os.path.join(run.output_dir, "loss.png")
        save_loss_plot(history, loss_plot, run.val_history)
        with open(os.path.join(run.output_dir, "train_config.json"), "w") as f:
            json.dump(run.config.public_dict(), f, indent=1)
        card = write_card(run, final_step, adapter_paths, samples)
        logger.info("wrote %s", ", ".join(adapter_paths + [card]))
        outputs = {"adapter": adapter_paths[0], "adapters": adapter_paths, "samples": samples, "loss_plot": loss_plot,
                   "model_card": card}  # fmt: skip
    return outputs


def write_card(run: Run, final_step: int, adapter_paths: list[str], samples: list[str]) -> str:
    """The output folder's README.md model card (with the final validation images); returns its path."""
    from flax_lora.errors import is_hub_id
    from flax_lora.hub import repo_name
    from flax_lora.model_card import CardInfo, write_model_card

    config = run.config
    unet_config = run.lora_configs["unet"]
    if config.dataset_name and is_hub_id(config.dataset_name):
        dataset = f"the [{config.dataset_name}](https://huggingface.co/datasets/{config.dataset_name}) dataset"
    elif config.dataset_name:
        dataset = f"the dataset `{config.dataset_name}`"
    else:
        dataset = f"the images of `{config.train_data_dir or config.instance_data_dir}`"
    title = repo_name(config.hub_model_id, run.output_dir) if config.push_to_hub else os.path.basename(run.output_dir)
    info = CardInfo(
        title=title, base_model=run.pipe.name, dataset=dataset, steps=final_step, rank=unet_config.rank,
        alpha=unet_config.alpha if unet_config.alpha is not None else unet_config.rank,
        learning_rate=run.learning_rate, resolution=config.resolution, validation_prompt=config.validation_prompt,
        sdxl=run.pipe.text_encoder_2 is not None, instance_prompt=config.instance_prompt,
        class_prompt=config.class_prompt if config.with_prior_preservation else None,
        train_text_encoder=config.train_text_encoder, conv_rank=unet_config.conv_rank,
        conv_alpha=unet_config.conv_lora_alpha if unet_config.conv_rank is not None else None,
        use_dora=unet_config.use_dora,
    )
    return write_model_card(run.output_dir, info, adapter_paths, samples)


def output_folder(config: TrainConfig) -> str:
    """--output_dir as an absolute path."""
    return os.path.abspath(os.path.expanduser(config.output_dir))


@contextlib.contextmanager
def removed_if_unwritten(output_dir: str, logging_dir: str) -> Iterator[None]:
    """Around a run's set-up: when it fails, delete the folders it created for its outputs if it wrote nothing there but logs."""
    top, parent = None, output_dir
    while not os.path.exists(parent):  # the highest folder this run creates
        top, parent = parent, os.path.dirname(parent)
    try:
        yield
    except BaseException:
        logs = os.path.join(output_dir, logging_dir) + os.sep
        if top is not None and jax.process_index() == 0 and os.path.isdir(top):
            written = any(files and not (root + os.sep).startswith(logs) for root, _, files in os.walk(top))
            if not written:  # e.g. the first image failed: no checkpoint, sample or adapter to keep
                shutil.rmtree(top, ignore_errors=True)
        raise


def main(config: TrainConfig) -> dict:
    """Train a LoRA adapter as configured; returns a summary (paths, final step, losses)."""
    cpu_split = init_devices(config)
    enable_compilation_cache(config.compilation_cache_dir)
    is_main = jax.process_index() == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "matplotlib"):  # orbax logs every file rename at INFO through absl
        logging.getLogger(noisy).setLevel(logging.WARNING)
    demo = config.uses_builtin_defaults
    if demo:
        config = apply_builtin_defaults(config)
    for note in config.ignored_flag_notes():  # never drop a diffusers flag silently
        logger.info("%s", note)
    if is_main:  # process 0 logs and uploads: its missing wandb or hub token fails now, not after the model loaded
        report_targets(config)
        if config.push_to_hub:
            from flax_lora.hub import check_token

            check_token(config.hub_token)

    # Only the set-up may remove what it created: a run that has started training keeps its logs whatever happens.
    with removed_if_unwritten(output_folder(config), config.logging_dir):
        run, state = setup(config, cpu_split)
    try:
        state, history = restore(run, state)
        state, last_saved, preempted = train_loop(run, state, history)
        final_step = int(to_host(state.step))
        if not preempted and final_step != last_saved:
            save_checkpoint(run, state, history)
        run.checkpointer.close()
        result = {"output_dir": run.output_dir, "step": final_step, "loss_history": history,
                  "preempted": preempted, "bad_images": len(run.loader.bad_images),
                  "val_loss_history": run.val_history, "step_shapes": run.train_step.compiled_count()}  # fmt: skip
        if not preempted:
            result.update(write_outputs(run, state, history))
            if demo and run.validation is not None:
                result["before_after"] = write_before_after(run, state)
    finally:
        if run.writer is not None:
            run.writer.close()
    if run.uploader is not None:  # the checkpoint uploads under way finish first (a failed one was a warning)
        run.uploader.wait()
    if config.push_to_hub and run.is_main and not preempted:  # last: every file is written and the logs are flushed
        from flax_lora.hub import push_to_hub, repo_name

        repo_id = repo_name(config.hub_model_id, run.output_dir)
        result["hub_url"] = push_to_hub(run.output_dir, repo_id, config.hub_token, config.hub_private_repo)
        logger.info("uploaded %s to %s", run.output_dir, result["hub_url"])
    return result
