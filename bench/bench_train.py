"""LoRA training speed and memory: flax-lora against PyTorch diffusers + peft, on the same work, in one run.

Design:
- Both frameworks train the same thing: a UNet2DConditionModel of the chosen config with random weights, LoRA
  (same rank, alpha, targets to_q/to_k/to_v/to_out.0) and AdamW on the LoRA params only, from precomputed
  inputs (random VAE posterior moments and text embeddings of the right shapes), same batch and precision.
  Each step samples latents, noise and timesteps, adds noise (SD 1.5 scaled-linear schedule), runs the UNet
  forward and backward and applies one optimizer update.
- Each framework runs in its own subprocess (`--worker flax|torch`), so peak host RSS (CPU) or device memory
  (GPU) and thread pools never mix; the parent collects both results, prints a table and writes JSON.
- The flax side uses the project's own UNet (flax_lora.models.unet) and `flax_lora.train.make_train_step` (unmerged
  LoRA through the UNet's LoRA collection).
  `--lora_mode merged` (fuse A@B into the kernels inside the step) is not a mode of the project step, so it
  runs a bench-local step with the same loss; `--flax_step local` runs that local step unmerged too, to
  compare like with like.
- On CPU both workers get the same cores (`--threads`): PyTorch as intra-op threads, the flax side as one XLA
  device per core (default, the batch split between them, as the trainer does on CPU) or `--flax_cpu_devices`
  devices. `--huge_pages` (default on) sets the same glibc huge-page tunable for both.
- The flax worker runs twice by default: on an empty persistent compilation cache, then one step on the filled
  one (`--warm_first_step`), for the first step's time cold and warm.
- The flax UNet is the class `flax_lora.loading` builds (`unet_class()`: exact GELU and PyTorch's GroupNorm
  numerics), so both frameworks compute the same function.
- `--compile_only` runs nothing: it builds the project's train step from abstract shapes (`jax.eval_shape`,
  `jax.ShapeDtypeStruct` with shardings; no weights, no big allocation), compiles it for N fake CPU devices (one
  subprocess per row, the device count set before JAX starts) with and without --fsdp and --gradient_checkpointing,
  and reports XLA's per-device `memory_analysis()`. It answers "does this fit on a 16 GB / 80 GB chip?" for real
  sizes (`--config sdxl`) on any machine; XLA:GPU/TPU schedule differently, so it is an estimate (README: Benchmark).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flax_lora.cli import build_parser, check_choices
from flax_lora.config import ATTENTION_IMPLEMENTATIONS
from flax_lora.cli import flag as _f
from flax_lora.errors import UserError, check_output_folder, exit_on_user_error

# A SD 1.5 LoRA training step (forward + backward, 64x64 latents, text length 77) costs about this much.
SD15_FLOP_PER_IMAGE = 1.73e12
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Seconds on the project's 2-core CPU VM at --batch 2, rounded up from a few runs (a step's time varied several-fold
# there): (worker start-up with imports and model set-up, plus the compiling first step; each later step).
CPU_SECONDS = {
    "tiny": {"flax": (70.0, 0.05), "torch": (25.0, 3.6)},
    "small": {"flax": (90.0, 2.0), "torch": (30.0, 1.0)},
}
FRAMEWORKS = ("flax", "torch")
# --compile_only: seconds per row (worker start, trace, lower, compile; bf16), the slowest measured on the 2-core CPU
# VM: with --gradient_checkpointing (remat doubles the program); SDXL without it took 420 s.
COMPILE_SECONDS = {"tiny": 35, "small": 55, "sdxl": 1000}

_CROSS3 = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_UP3 = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

# UNet2DConditionModel kwargs (keys both the PyTorch and the Flax class understand) and input shapes.
UNET_CONFIGS: dict[str, dict] = {
    # For the smoke test: seconds per step on one CPU core.
    "tiny": dict(
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32,),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=32,
            attention_head_dim=8,
        ),
        text_len=8,
    ),
    # SD 1.5's block layout at a fraction of the width: a few minutes for both frameworks on 2 CPU cores.
    "small": dict(
        unet=dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
        ),
        text_len=77,
    ),
    # The real SD 1.5 UNet (random weights): for a GPU.
    "sd15": dict(
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=_CROSS3,
            up_block_types=_UP3,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        text_len=77,
    ),
    # The real SDXL base UNet (2.6 B params), 128x128 latents (1024 px): --compile_only (no SDXL timing workers).
    "sdxl": dict(
        unet=dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        text_len=77,
        pooled_dim=1280,  # text_embeds: the second encoder's projected pooled output; time_ids add 6 x 256
    ),
}
COMPILE_ONLY_CONFIGS = ("sdxl",)  # no timing workers: the batch needs SDXL's pooled embeddings and size ids
ON_OFF = ("off", "on")


@dataclass
class BenchConfig:
    """One benchmark run: the model, the work per step and the options tried on each side."""

    config: str = _f(
        "small",
        "UNet config: tiny (smoke test), small (CPU), sd15 (the real SD 1.5 UNet, for a GPU), sdxl (the real SDXL UNet; "
        "--compile_only).",
        tuple(UNET_CONFIGS),
    )
    steps: int = _f(20, "Timed steps.")
    warmup: int = _f(2, "Untimed steps after the first (compiling) one.")
    batch: int = _f(2, "Images per step.")
    sample_size: int = _f(0, "Latent height/width override (0 = the config's).")
    precision: str = _f("fp32", "bf16: bf16 compute with fp32 LoRA master weights, as diffusers' scripts.", ("fp32", "bf16"))
    lora_mode: str = _f("unmerged", "unmerged: the x@A@B path (the LoRA collection); merged: W + s*A@B inside the step.", ("unmerged", "merged"))
    flax_step: str = _f("project", "project: flax_lora.train.make_train_step; local: this file's step.", ("project", "local"))
    attention: str = _f(
        "auto",
        "The flax UNet's attention, as the trainer's --attention (flax_lora.attention). --compile_only builds the "
        "program for CPU devices, where no fused GPU/TPU kernel exists: there auto means xla, the upper bound "
        "(scores materialised); pass chunked for a memory-efficient kernel's figure.",
        ATTENTION_IMPLEMENTATIONS,
    )
    flax_cpu_devices: int = _f(
        0,
        "CPU only: XLA devices the flax side splits the cores into and trains data-parallel over, the --batch split "
        "between them (as the trainer does on CPU); 0 = one per core when the batch divides evenly. Project step only.",
    )
    warm_first_step: bool = _f(
        True,
        "Run the flax worker a second time (one step) on JAX's persistent compilation cache that the first run "
        "filled, as a rerun of the trainer does by default, and report that first step (and its peak memory) too.",
    )
    huge_pages: bool = _f(
        True,
        "Run both workers with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: glibc backs large host blocks with transparent "
        "huge pages, so XLA:CPU's per-step buffers do not page-fault 4 KiB at a time (flax about 8 percent faster "
        "on `small`).",
    )
    rank: int = _f(4, "LoRA rank.")
    alpha: float = _f(4.0, "LoRA alpha.")
    learning_rate: float = _f(1e-4, "AdamW learning rate.")
    threads: int = _f(0, "CPU cores both frameworks may use (0 = all this process may use).")
    device: str = _f("auto", "Where to run.", ("auto", "cpu", "gpu"))
    xla_flags: str = _f("", "Extra XLA_FLAGS for the flax worker.")
    peak_tflops: float = _f(989.0, "Accelerator peak TFLOP/s for MFU (989 = H100 dense bf16).")
    frameworks: str = _f("flax,torch", "Comma-separated frameworks to run.")
    out: str = _f("", "JSON path; default bench/results/<config>-<device>.json (--compile_only: <config>-compile.json).")
    seed: int = _f(0, "Seed of weights and inputs.")
    compile_only: bool = _f(
        False,
        "Run nothing: build the project's train step from shapes only, compile it for fake CPU devices and report "
        "XLA's memory analysis per device (arguments, outputs, temporaries, code), one row per combination of "
        "--devices, --fsdp, --gradient_checkpointing and --batch_per_device.",
    )
    devices: str = _f("1,4,8", "--compile_only: fake CPU device counts to compile for, comma-separated.")
    fsdp: str = _f("1,4", "--compile_only: the trainer's --fsdp values to try, comma-separated (each that divides the devices).")
    gradient_checkpointing: str = _f("off,on", "--compile_only: the trainer's --gradient_checkpointing off and/or on.")
    batch_per_device: str = _f("1", "--compile_only: images per device, comma-separated (the global batch is this x devices).")

    def __post_init__(self):
        check_choices(self)
        if self.steps < 1 or self.batch < 1 or self.warmup < 0 or self.sample_size < 0 or self.flax_cpu_devices < 0:
            raise ValueError("--steps and --batch must be >= 1, --warmup, --sample_size and --flax_cpu_devices >= 0")
        unknown = set(self.framework_list) - set(FRAMEWORKS)
        if unknown or not self.framework_list:
            raise ValueError(f"--frameworks {self.frameworks!r}: expected a comma-separated subset of {FRAMEWORKS}")
        cores = len(os.sched_getaffinity(0))
        if not 0 <= self.threads <= cores:
            raise ValueError(f"--threads {self.threads}: this process may use {cores} cores (0 = all)")
        if self.uses_project_step and self.flax_cpu_devices and self.batch % self.flax_cpu_devices:
            raise ValueError(f"--batch {self.batch} does not split over --flax_cpu_devices {self.flax_cpu_devices}")
        if self.config in COMPILE_ONLY_CONFIGS and not self.compile_only:
            raise ValueError(f"--config {self.config} runs with --compile_only only (its timing workers are not written)")
        if self.compile_only and self.attention in ("cudnn", "pallas"):
            raise ValueError(f"--compile_only compiles for CPU devices, where --attention {self.attention} cannot run: "
                             "use xla (the upper bound) or chunked")  # fmt: skip
        if self.compile_only:
            for name in ("devices", "fsdp", "batch_per_device"):
                values = getattr(self, name).replace(" ", "").split(",")
                if not all(v.isdigit() and int(v) > 0 for v in values):
                    raise ValueError(f"--{name} {getattr(self, name)!r}: expected comma-separated positive integers")
            if not set(_csv(self.gradient_checkpointing)) <= set(ON_OFF) or not _csv(self.gradient_checkpointing):
                raise ValueError(f"--gradient_checkpointing {self.gradient_checkpointing!r}: expected off, on or off,on")
            if not self.compile_rows():
                raise ValueError(f"no --fsdp value in {self.fsdp!r} divides a device count in {self.devices!r}")

    @property
    def framework_list(self) -> list[str]:
        return [f.strip() for f in self.frameworks.split(",") if f.strip()]

    def compile_rows(self) -> list[dict]:
        """--compile_only: one row per (devices, fsdp dividing them, remat, images per device)."""
        return [
            dict(devices=n, fsdp=f, remat=r == "on", batch_per_device=b)
            for n in map(int, _csv(self.devices)) for f in map(int, _csv(self.fsdp)) if n % f == 0
            for r in _csv(self.gradient_checkpointing) for b in map(int, _csv(self.batch_per_device))
        ]  # fmt: skip

    @property
    def uses_project_step(self) -> bool:
        """The flax side runs flax_lora.train.make_train_step (else this file's local step)."""
        return self.flax_step == "project" and self.lora_mode == "unmerged"


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def sd15_alphas_cumprod():
    """SD 1.5's training schedule (scaled_linear, 0.00085..0.012, 1000 steps) as float32 numpy."""
    import numpy as np

    # Not flax_lora.train.noise_schedule: the PyTorch worker must not import jax, or its peak RSS includes it.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


def unet_config(cfg: BenchConfig) -> dict:
    """UNet2DConditionModel kwargs of the run (the named config, with --sample_size applied)."""
    u = dict(UNET_CONFIGS[cfg.config]["unet"])
    if cfg.sample_size:
        u["sample_size"] = cfg.sample_size
    return u


def _input_shapes(cfg: BenchConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(latent shape, text embedding shape) of one batch, NCHW."""
    spec = UNET_CONFIGS[cfg.config]
    u = unet_config(cfg)
    return (cfg.batch, u["in_channels"], u["sample_size"], u["sample_size"]), (
        cfg.batch,
        spec["text_len"],
        u["cross_attention_dim"],
    )


def _limit_threads(cfg: BenchConfig) -> int:
    """Pin this process to `threads` cores (before jax/torch start their pools); return the core count."""
    cores = sorted(os.sched_getaffinity(0))
    if cfg.threads:  # at most len(cores): BenchConfig checks it
        cores = cores[: cfg.threads]
        os.sched_setaffinity(0, cores)
    return len(cores)


def cpu_device_count(cfg: BenchConfig, cores: int) -> int:
    """XLA CPU devices of the flax worker: --flax_cpu_devices, or with 0 one per core when the batch divides."""
    if cfg.flax_cpu_devices:  # divides the batch: BenchConfig checks it
        return cfg.flax_cpu_devices
    return cores if cfg.batch % cores == 0 else 1


def _current_rss_bytes() -> int:
    """Resident set size now (the peak can come from a moment that has passed, e.g. XLA compiling)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------- flax worker


def host_init(shapes, seed: int) -> dict:
    """Random weights as the Flax modules initialise them (LeCun-normal kernels, zero biases, unit norm scales),
    drawn with numpy: no compiled init program, whose compile would add to the worker's peak memory."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(x.shape) * math.prod(x.shape[:-1]) ** -0.5).astype(np.float32)
        return (np.ones if name == "scale" else np.zeros)(x.shape, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _flax_local_step(unet, optimizer, schedule, scale: float, merged: bool, compute_dtype):
    """A train step with the project step's loss, LoRA either unmerged (the LoRA collection) or merged into the kernels."""
    import jax
    import jax.numpy as jnp
    import optax

    from flax_lora.lora import merge_lora, with_lora
    from flax_lora.train import add_noise, diffusion_loss

    def loss_fn(lora, base, batch, rng):
        k_lat, k_noise, k_t = jax.random.split(rng, 3)
        mean, std = batch["latent_mean"], batch["latent_std"]
        latents = (mean + std * jax.random.normal(k_lat, mean.shape, mean.dtype)) * 0.18215
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        t = jax.random.randint(k_t, (latents.shape[0],), 0, schedule.num_train_timesteps)
        noisy, target = add_noise(schedule, latents, noise, t)
        lora_c = jax.tree.map(lambda x: x.astype(compute_dtype), lora)
        args = (noisy.astype(compute_dtype), t, batch["text_embeddings"].astype(compute_dtype))
        if merged:
            pred = unet.apply({"params": merge_lora(base, lora_c, scale)}, *args)
        else:
            pred = unet.apply(with_lora(base, (lora_c, scale)), *args)
        return diffusion_loss(pred, target, t, schedule)

    def step(state, base, batch):
        rng, step_rng = jax.random.split(state["rng"])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], base, batch, step_rng)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "rng": rng}, {"loss": loss}

    return jax.jit(step, donate_argnums=(0,))


def _host_device(jax):
    """JAX's CPU device (where setup runs), or the default device when the CPU backend is switched off."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return jax.devices()[0]


def run_flax(cfg: BenchConfig) -> dict:
    """Time LoRA training steps of the Flax UNet; returns the measurements."""
    threads = _limit_threads(cfg)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    use_project = cfg.uses_project_step
    cpu_devices = cpu_device_count(cfg, threads) if use_project else 1
    jax.config.update("jax_num_cpu_devices", cpu_devices)  # before any JAX operation; CPU backend only

    from flax_lora.loading import SDPipeline
    from flax_lora.lora import LoraConfig, UNET_TARGETS, init_lora
    from flax_lora.models.unet import UNet2DConditionModel, UNetConfig, init_shapes
    from flax_lora.models.vae import AutoencoderKL, VAEConfig
    from flax_lora.sharding import batch_sharding, make_mesh
    from flax_lora.train import NoiseSchedule, create_train_state, make_train_step

    from flax_lora.attention import check_platform

    check_platform(cfg.attention)  # a GPU or TPU kernel asked for where JAX has none: one error line
    device = jax.devices()[0]
    if cfg.device == "gpu" and device.platform not in ("gpu", "cuda", "rocm"):
        raise UserError(f"--device gpu, but JAX runs on {device.platform} (install jax[cuda12] for an NVIDIA GPU)")
    compute_dtype = jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32
    unet_cfg = UNetConfig.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in unet_config(cfg).items()})
    unet = UNet2DConditionModel(unet_cfg, dtype=compute_dtype, attention=cfg.attention)
    lora_config = LoraConfig(rank=cfg.rank, alpha=cfg.alpha, target_modules=UNET_TARGETS)
    # Build on the host, so the accelerator's peak memory holds only what training keeps there (the base in the
    # compute dtype), as on the PyTorch side, which casts before moving the UNet to the GPU.
    with jax.default_device(_host_device(jax)):
        lat_shape, emb_shape = _input_shapes(cfg)
        base = jax.tree.map(jnp.asarray, host_init(init_shapes(unet_cfg), cfg.seed))
        lora = init_lora(jax.random.PRNGKey(cfg.seed + 1), base, lora_config)
        base = jax.tree.map(lambda x: x.astype(compute_dtype), base)
    optimizer = optax.adamw(cfg.learning_rate)
    schedule = NoiseSchedule(sd15_alphas_cumprod(), "epsilon")
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed + 2), 2)
    batch = {
        "latent_mean": np.asarray(jax.random.normal(keys[0], lat_shape, jnp.float32)),
        "latent_std": np.full(lat_shape, 0.1, np.float32),
        "text_embeddings": np.asarray(jax.random.normal(keys[1], emb_shape, jnp.float32)),
    }
    if use_project:
        # On a GPU one device, like the PyTorch run; on CPU devices on the same cores as PyTorch's threads.
        mesh = make_mesh(jax.devices()[:cpu_devices] if device.platform == "cpu" else [device])
        # With cached latents and text embeddings the project step runs only the UNet and the VAE's latent scaling.
        vae = AutoencoderKL(VAEConfig.from_dict({"scaling_factor": 0.18215}, "bench"))
        pipe = SDPipeline(unet=unet, text_encoder=None, vae=vae, tokenizer=None, scheduler_config={}, params={},
                          path="", name="bench")
        step = make_train_step(
            pipe, {"unet": lora_config}, optimizer, schedule, mesh, base_params={"unet": base}, compute_dtype=compute_dtype
        )
        state = create_train_state({"unet": lora}, optimizer, cfg.seed, mesh)
        batch = jax.device_put({k: v[None] for k, v in batch.items()}, batch_sharding(mesh))  # (accum=1, B, ...)
        run = step
        compiles = step.compiled_count
    else:
        base_c = jax.device_put(base, device)
        jitted = _flax_local_step(unet, optimizer, schedule, lora_config.scale, cfg.lora_mode == "merged", compute_dtype)
        state = {"params": lora, "opt_state": optimizer.init(lora), "rng": jax.random.PRNGKey(cfg.seed)}
        state = jax.device_put(state, device)  # committed, as the step's output is: no second compile
        batch = jax.device_put(batch, device)
        run = lambda s, b: jitted(s, base_c, b)  # noqa: E731
        compiles = jitted._cache_size
    del base
    rss_setup = _peak_rss_bytes()

    t0 = time.perf_counter()
    state, metrics = run(state, batch)
    first_loss = float(jax.block_until_ready(metrics["loss"]))
    first_step_s = time.perf_counter() - t0
    rss_first = _peak_rss_bytes()
    for _ in range(cfg.warmup):
        state, metrics = run(state, batch)
    jax.block_until_ready(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        state, metrics = run(state, batch)
    last_loss = float(jax.block_until_ready(metrics["loss"]))
    elapsed = time.perf_counter() - t0

    if compiles() != 1:
        raise RuntimeError(f"the flax step compiled {compiles()} times; timings would include recompiles")
    if device.platform == "cpu":
        memory, memory_kind = _peak_rss_bytes(), "host_rss_peak"
    else:
        memory, memory_kind = int(device.memory_stats()["peak_bytes_in_use"]), "device_peak"
    return dict(
        platform="gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform,
        device_name=str(getattr(device, "device_kind", device.platform)),
        step_impl="flax_lora.train.make_train_step" if use_project else f"bench local step ({cfg.lora_mode})",
        threads=threads,
        devices=int(mesh.size) if use_project else 1,
        first_step_s=first_step_s,
        step_s=elapsed / cfg.steps,
        memory_bytes=memory,
        memory_kind=memory_kind,
        host_rss_setup_bytes=rss_setup,
        host_rss_first_step_bytes=rss_first,
        host_rss_end_bytes=_current_rss_bytes(),
        first_loss=first_loss,
        last_loss=last_loss,
        lora_params=int(sum(x.size for x in jax.tree.leaves(lora))),
        versions={"jax": jax.__version__},
    )


# ------------------------------------------------------------------------------------------ torch worker


def run_torch(cfg: BenchConfig) -> dict:
    """Time LoRA training steps of the PyTorch diffusers UNet with a peft adapter; returns the measurements."""
    threads = _limit_threads(cfg)
    import diffusers
    import peft
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.device == "gpu" and not use_cuda:
        raise UserError("--device gpu, but PyTorch sees no GPU (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if use_cuda else "cpu")
    bf16 = cfg.precision == "bf16"
    unet = UNet2DConditionModel(**unet_config(cfg))
    unet.requires_grad_(False)
    if bf16:
        unet.to(torch.bfloat16)
    unet.add_adapter(
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    unet.to(device)
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:  # fp32 master weights for the trainable LoRA params, as diffusers' scripts
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.learning_rate)
    unet.train()

    alphas = torch.from_numpy(sd15_alphas_cumprod()).to(device)
    lat_shape, emb_shape = _input_shapes(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    mean = torch.randn(lat_shape, generator=gen).to(device)
    std = torch.full(lat_shape, 0.1).to(device)
    emb = torch.randn(emb_shape, generator=gen).to(device)
    emb_in = emb.to(torch.bfloat16) if bf16 else emb

    def step() -> torch.Tensor:
        latents = (mean + std * torch.randn_like(mean)) * 0.18215
        noise = torch.randn_like(latents)
        t = torch.randint(0, len(alphas), (latents.shape[0],), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = unet(noisy.to(emb_in.dtype), t, emb_in).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    rss_setup = _peak_rss_bytes()
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first_loss = float(step())
    first_step_s = time.perf_counter() - t0
    rss_first = _peak_rss_bytes()
    for _ in range(cfg.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    last_loss = float(loss)

    if use_cuda:
        memory, memory_kind = int(torch.cuda.max_memory_allocated()), "device_peak"
    else:
        memory, memory_kind = _peak_rss_bytes(), "host_rss_peak"
    return dict(
        platform="gpu" if use_cuda else "cpu",
        device_name=torch.cuda.get_device_name() if use_cuda else "cpu",
        step_impl="diffusers UNet2DConditionModel + peft add_adapter",
        threads=threads,
        first_step_s=first_step_s,
        step_s=elapsed / cfg.steps,
        memory_bytes=memory,
        memory_kind=memory_kind,
        host_rss_setup_bytes=rss_setup,
        host_rss_first_step_bytes=rss_first,
        host_rss_end_bytes=_current_rss_bytes(),
        first_loss=first_loss,
        last_loss=last_loss,
        lora_params=int(sum(p.numel() for p in lora_params)),
        versions={"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    )


# --------------------------------------------------------------------------------- compile-only worker

MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def _abstract(tree, dtype=None):
    """jax.ShapeDtypeStruct leaves of a tree of arrays or structs, floating ones in `dtype` when given."""
    import jax
    import jax.numpy as jnp

    def leaf(x):
        cast = dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(x.shape, dtype if cast else x.dtype)

    return jax.tree.map(leaf, tree)


def run_compile(cfg: BenchConfig, row: dict) -> dict:
    """Compile the project's train step for one row from shapes only; returns XLA's memory analysis per device."""
    import jax
    import jax.numpy as jnp
    import optax

    from flax_lora.loading import SDPipeline
    from flax_lora.lora import LoraConfig, UNET_TARGETS, init_lora
    from flax_lora.models.unet import UNet2DConditionModel, UNetConfig, init_shapes
    from flax_lora.models.vae import AutoencoderKL, VAEConfig
    from flax_lora.sharding import batch_sharding, make_mesh
    from flax_lora.train import NoiseSchedule, create_train_state, make_train_step

    if jax.device_count() != row["devices"]:
        raise RuntimeError(f"expected {row['devices']} CPU devices, JAX has {jax.device_count()} (XLA_FLAGS?)")
    compute_dtype = jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32
    attention = "xla" if cfg.attention == "auto" else cfg.attention  # no fused kernel compiles for CPU devices
    spec = UNET_CONFIGS[cfg.config]
    unet_cfg = UNetConfig.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in unet_config(cfg).items()})
    unet = UNet2DConditionModel(unet_cfg, dtype=compute_dtype, attention=attention, remat=row["remat"])
    lora_config = LoraConfig(rank=cfg.rank, alpha=cfg.alpha, target_modules=UNET_TARGETS)
    # Shapes only: the base as the trainer holds it (compute dtype), LoRA and Adam state in float32.
    base = _abstract(init_shapes(unet_cfg), compute_dtype)
    lora = jax.eval_shape(lambda key: init_lora(key, base, lora_config), jax.random.key(0))
    mesh = make_mesh(fsdp=row["fsdp"])
    vae = AutoencoderKL(VAEConfig.from_dict({"scaling_factor": 0.13025 if unet_cfg.addition_embed_type else 0.18215}, "bench"))
    pipe = SDPipeline(unet=unet, text_encoder=None, vae=vae, tokenizer=None, scheduler_config={}, params={},
                      path="", name="bench")  # fmt: skip
    optimizer = optax.adamw(cfg.learning_rate)
    schedule = NoiseSchedule(sd15_alphas_cumprod(), "epsilon")
    step = make_train_step(pipe, {"unet": lora_config}, optimizer, schedule, mesh, base_params={"unet": base},
                           compute_dtype=compute_dtype)  # fmt: skip
    state = create_train_state({"unet": lora}, optimizer, cfg.seed, mesh)
    global_batch = row["batch_per_device"] * row["devices"]
    lat_shape, emb_shape = _input_shapes(dataclasses.replace(cfg, batch=global_batch))
    shapes = {"latent_mean": lat_shape, "latent_std": lat_shape, "text_embeddings": emb_shape}
    if "pooled_dim" in spec:
        shapes.update(pooled_text_embeddings=(global_batch, spec["pooled_dim"]), time_ids=(global_batch, 6))
    sharding = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((1,) + v, jnp.float32, sharding=sharding) for k, v in shapes.items()}  # accum 1

    t0 = time.perf_counter()
    lowered = step.jitted.lower(state, step.base_params, batch)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    memory = {f: int(getattr(stats, f"{f}_size_in_bytes")) for f in MEMORY_FIELDS}
    # Device buffers at the peak: inputs stay alive, donated inputs share their outputs' buffers (alias).
    memory["total"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]

    def per_device(tree) -> int:
        return int(sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(tree)))

    return dict(
        **row,
        global_batch=global_batch,
        precision=cfg.precision,
        attention=attention,
        memory_bytes=memory,
        base_bytes_per_device=per_device(step.base_params),
        state_bytes_per_device=per_device(state),
        base_params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(base))),
        lora_params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(lora))),
        lower_s=lower_s,
        compile_s=compile_s,
        cpu_cores=len(os.sched_getaffinity(0)),
        versions={"jax": jax.__version__},
    )


def run_compile_worker(cfg: BenchConfig, row: dict) -> dict:
    """One --compile_only row in a fresh subprocess with `devices` fake CPU devices (set before JAX starts)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={row['devices']}"] + cfg.xla_flags.split())
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile for real: a cache hit would skip what is measured
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", "compile", "--worker_out", str(result_path),
               "--spec", json.dumps(dataclasses.asdict(cfg)), "--row", json.dumps(row)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"compile worker {row} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result_path.read_text())


def _row_label(r: dict) -> list[str]:
    return [str(r["devices"]), str(r["fsdp"]), "on" if r["remat"] else "off", str(r["batch_per_device"])]


def format_compile_table(summary: dict) -> str:
    """A plain-text table of the --compile_only rows: XLA's memory per device in GiB."""
    cols = ["devices", "fsdp", "remat", "batch/dev", "arguments", "outputs", "aliased", "temp", "code", "total GiB",
            "base/dev", "compile s"]  # fmt: skip
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    rows = []
    for r in summary["rows"]:
        m = r["memory_bytes"]
        rows.append(_row_label(r) + [gib(m[f]) for f in MEMORY_FIELDS] + [gib(m["total"]), gib(r["base_bytes_per_device"]),
                                                                           f"{r['compile_s']:.0f}"])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda xs: "  ".join(str(x).rjust(w) for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def run_compile_bench(cfg: BenchConfig) -> tuple[dict, Path]:
    """Compile every --compile_only row in its own subprocess, write the JSON and return (summary, its path)."""
    check_output(cfg)
    rows = cfg.compile_rows()
    seconds = COMPILE_SECONDS.get(cfg.config)
    estimate = f"up to about {seconds} s each on a 2-core CPU" if seconds else "not timed on a CPU yet"
    print(f"[bench] compile-only: {len(rows)} rows of --config {cfg.config}, each compiled in a fresh process "
          f"({estimate})", file=sys.stderr, flush=True)  # fmt: skip
    summary = {"bench": dataclasses.asdict(cfg), "platform": "cpu (compile only)", "rows": []}
    out = output_path(cfg, "cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        t0 = time.perf_counter()
        summary["rows"].append(run_compile_worker(cfg, row))
        out.write_text(json.dumps(summary, indent=2))  # after every row: a real-size run takes long and may be cut
        m = summary["rows"][-1]["memory_bytes"]
        print(f"[bench] devices={row['devices']} fsdp={row['fsdp']} remat={row['remat']} batch/device="
              f"{row['batch_per_device']}: {m['total'] / 2**30:.2f} GiB per device ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    return summary, out


# ---------------------------------------------------------------------------------------------- parent


def _worker_env(cfg: BenchConfig, framework: str) -> dict:
    """Environment of a worker: the chosen platform, huge pages, and the flax worker's XLA flags."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    if cfg.huge_pages:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
    if framework == "flax":
        # One device, whatever a caller (e.g. the test suite's 8 fake CPU devices) had set.
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + cfg.xla_flags.split())
        if cfg.device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
    elif cfg.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_worker(cfg: BenchConfig, framework: str, extra_env: dict[str, str] | None = None) -> dict:
    """Run one framework's benchmark in a fresh subprocess and return its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", framework, "--worker_out", str(result_path), "--spec",
               json.dumps(dataclasses.asdict(cfg))]  # fmt: skip
        env = _worker_env(cfg, framework) | (extra_env or {})
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        last_line = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        if proc.returncode == 1 and last_line.startswith("error: "):  # a UserError in the worker: its one line
            raise UserError(f"{framework} worker: {last_line.removeprefix('error: ')}")
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"{framework} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result_path.read_text())


def summarize(cfg: BenchConfig, results: dict[str, dict]) -> dict:
    """Add throughput, MFU and the flax/torch ratios to the raw worker results."""
    platforms = {r["platform"] for r in results.values()}
    if len(platforms) > 1:
        raise RuntimeError(f"the frameworks ran on different platforms {platforms}; pass --device cpu or gpu")
    platform = platforms.pop()
    for r in results.values():
        r["steps_per_s"] = 1.0 / r["step_s"]
        r["images_per_s"] = cfg.batch / r["step_s"]
        r["mfu"] = None
        if platform == "gpu" and cfg.config == "sd15":
            r["mfu"] = r["images_per_s"] * SD15_FLOP_PER_IMAGE / (cfg.peak_tflops * 1e12)
    ratio = {}
    if "flax" in results and "torch" in results:
        f, t = results["flax"], results["torch"]
        ratio = {
            "steps_per_s": f["steps_per_s"] / t["steps_per_s"],
            "images_per_s": f["images_per_s"] / t["images_per_s"],
            "first_step_s": f["first_step_s"] / t["first_step_s"],
            "memory_bytes": f["memory_bytes"] / t["memory_bytes"],
        }
    return {"bench": dataclasses.asdict(cfg), "platform": platform, "results": results, "ratio_flax_over_torch": ratio}


def format_table(summary: dict) -> str:
    """A plain-text table: one row per framework plus the flax/torch ratio."""
    res, ratio = summary["results"], summary["ratio_flax_over_torch"]
    mem_kind = next(iter(res.values()))["memory_kind"]
    cols = ["framework", "steps/s", "images/s", "first step s", f"{mem_kind} MiB", "MFU", "loss first->last"]
    rows = []
    for name, r in res.items():
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        label = name if r.get("devices", 1) == 1 else f"{name} ({r['devices']} CPU devices)"
        first, memory = f"{r['first_step_s']:.1f}", f"{r['memory_bytes'] / 2**20:.0f}"
        if "first_step_warm_s" in r:  # cold (warm: from the persistent compilation cache)
            first += f" (warm {r['first_step_warm_s']:.1f})"
            memory += f" (warm {r['memory_bytes_warm'] / 2**20:.0f})"
        rows.append([label, f"{r['steps_per_s']:.3f}", f"{r['images_per_s']:.3f}", first, memory, mfu,
                     f"{r['first_loss']:.4f}->{r['last_loss']:.4f}"])  # fmt: skip
    if ratio:
        rows.append(["flax/torch", f"{ratio['steps_per_s']:.2f}x", f"{ratio['images_per_s']:.2f}x",
                     f"{ratio['first_step_s']:.2f}x", f"{ratio['memory_bytes']:.2f}x", "", ""])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda xs: "  ".join(str(x).rjust(w) for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def output_path(cfg: BenchConfig, platform: str) -> Path:
    """Where the JSON goes: --out, or bench/results/<config>-<platform>.json (<config>-compile.json)."""
    if cfg.out:
        return Path(cfg.out)
    return RESULTS_DIR / (f"{cfg.config}-compile.json" if cfg.compile_only else f"{cfg.config}-{platform}.json")


def check_output(cfg: BenchConfig) -> None:
    """Refuse an --out that cannot be written before any worker runs (the JSON is written at the end)."""
    out = output_path(cfg, "cpu")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name a .json file")
    check_output_folder(str(out.parent), f"--out {out}")


def estimate_seconds(cfg: BenchConfig) -> float | None:
    """A conservative wall time of the run on a 2-core CPU from CPU_SECONDS; None where nothing was measured."""
    if cfg.config not in CPU_SECONDS:
        return None
    sample_size = unet_config(cfg)["sample_size"]
    work = cfg.batch / 2 * (sample_size / UNET_CONFIGS[cfg.config]["unet"]["sample_size"]) ** 2
    cores = cfg.threads or len(os.sched_getaffinity(0))
    per_step_scale = max(work, 1.0) * max(2 / cores, 1.0)
    total = 0.0
    for framework in cfg.framework_list:
        fixed, step = CPU_SECONDS[cfg.config][framework]
        total += fixed + (cfg.warmup + cfg.steps) * step * per_step_scale
        if framework == "flax" and cfg.warm_first_step:  # the one-step rerun on the filled compilation cache
            total += fixed + step * per_step_scale
    return total


def describe_estimate(cfg: BenchConfig) -> str:
    """One line saying how long the run will take, labelled as an estimate."""
    seconds = estimate_seconds(cfg)
    if seconds is None:
        return f"[bench] no time estimate for --config {cfg.config}: not measured on a CPU (it is meant for a GPU)"
    shown = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
    return (f"[bench] estimate: about {shown} for {' and '.join(cfg.framework_list)}, {cfg.warmup + cfg.steps + 1} "
            "steps each (from step times measured on a 2-core CPU; a GPU or more cores take less)")  # fmt: skip


def run_flax_cold_and_warm(cfg: BenchConfig) -> dict:
    """The flax worker on an empty persistent compilation cache, then once more (one step) on the filled one."""
    with tempfile.TemporaryDirectory() as cache:
        # The trainer's settings (flax_lora.compile_cache): only compiles of 1 s or more are stored.
        env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
        result = run_worker(cfg, "flax", env)
        print("[bench] flax: again on the filled compilation cache (one step) ...", file=sys.stderr, flush=True)
        warm = run_worker(dataclasses.replace(cfg, steps=1, warmup=0), "flax", env)
    return result | {"first_step_warm_s": warm["first_step_s"], "memory_bytes_warm": warm["memory_bytes"]}


def run_bench(cfg: BenchConfig) -> tuple[dict, Path]:
    """Run every requested framework, write the JSON and return (summary, its path)."""
    check_output(cfg)
    print(describe_estimate(cfg), file=sys.stderr, flush=True)
    results = {}
    for framework in cfg.framework_list:
        print(f"[bench] {framework}: config={cfg.config} batch={cfg.batch} precision={cfg.precision} "
              f"lora_mode={cfg.lora_mode} steps={cfg.steps} ...", file=sys.stderr, flush=True)  # fmt: skip
        if framework == "flax" and cfg.warm_first_step:
            results[framework] = run_flax_cold_and_warm(cfg)
        else:
            results[framework] = run_worker(cfg, framework)
    summary = summarize(cfg, results)
    out = output_path(cfg, summary["platform"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    return summary, out


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig | None, argparse.Namespace]:
    """Flags generated from BenchConfig, plus the hidden worker flags."""
    parser = build_parser(BenchConfig, __doc__.splitlines()[0])
    parser.add_argument("--worker", choices=FRAMEWORKS + ("compile",), help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.spec:
        return BenchConfig(**json.loads(args.spec)), args
    try:
        return BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)}), args
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or, with the hidden --worker flag, one framework's side of it); user errors are one line."""
    cfg, args = parse_args(argv)
    if args.worker == "compile":
        Path(args.worker_out).write_text(json.dumps(run_compile(cfg, json.loads(args.row))))
        return
    if args.worker:
        result = exit_on_user_error(lambda: {"flax": run_flax, "torch": run_torch}[args.worker](cfg))
        Path(args.worker_out).write_text(json.dumps(result))
        return
    if cfg.compile_only:
        summary, out = exit_on_user_error(lambda: run_compile_bench(cfg))
        print(format_compile_table(summary))
        print(f"JSON written to {out}")
        return
    summary, out = exit_on_user_error(lambda: run_bench(cfg))
    print(format_table(summary))
    print(f"JSON written to {out}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
