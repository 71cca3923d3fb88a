"""Text-to-image sampling in Flax with any number of LoRA adapters, matching PyTorch diffusers step for step.

Design:
- The scheduler is built from the pipeline's own scheduler config (betas, prediction_type, steps_offset,
  timestep_spacing); a scheduler name only swaps the algorithm, as `XScheduler.from_config(pipe.scheduler.config)`
  does in diffusers. diffusers' Flax schedulers lag their PyTorch twins in a few places (which timestep spacings
  they honour, DPM-Solver's last step); `make_sampler` fixes those so that the same init latents give the same
  image as PyTorch. Options Flax cannot honour are errors, not silent drift.
- The whole denoising loop is one `lax.fori_loop` inside one `jit`, compiled once per (batch, size, steps,
  scheduler). Prompts, guidance scale, LoRA weights and LoRA scales are traced arguments, so changing them
  does not recompile.
- Images are sharded over every device along the batch axis (a 1-D `Mesh`); parameters are replicated.
- Adapters apply unmerged through `lora_scope` (scale changes are free) or fused into the base weights
  (`fuse=True`: no per-step LoRA cost).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

SCHEDULER_NAMES = ("ddim", "dpm++", "euler", "pndm")
# PyTorch or Flax scheduler class of a pipeline config -> the algorithm we run for it.
_CLASS_TO_NAME = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "DPMSolverMultistepScheduler": "dpm++",
    "EulerDiscreteScheduler": "euler",
}
# Options of the PyTorch schedulers that change the math and that the Flax ones do not implement, with the
# value that means "off".
_UNSUPPORTED_OPTIONS = {
    "rescale_betas_zero_snr": False,
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "euler_at_final": False,
    "variance_type": None,
}


def scheduler_name_for_config(config: dict) -> str:
    """The algorithm name (ddim, dpm++, euler, pndm) of a pipeline's scheduler config."""
    cls = str(config.get("_class_name", "")).removeprefix("Flax")
    if cls not in _CLASS_TO_NAME:
        raise ValueError(
            f"scheduler {config.get('_class_name')!r} of the pipeline has no Flax sampler here; pass "
            f"--scheduler with one of {', '.join(SCHEDULER_NAMES)}"
        )
    return _CLASS_TO_NAME[cls]


def _flax_class(name: str):
    """diffusers' Flax scheduler class for an algorithm name."""
    from diffusers import (
        FlaxDDIMScheduler,
        FlaxDPMSolverMultistepScheduler,
        FlaxEulerDiscreteScheduler,
        FlaxPNDMScheduler,
    )

    classes = {
        "ddim": FlaxDDIMScheduler,
        "dpm++": FlaxDPMSolverMultistepScheduler,
        "euler": FlaxEulerDiscreteScheduler,
        "pndm": FlaxPNDMScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULER_NAMES)}")
    return classes[name]


def _effective_config(flax_cls, pipeline_config: dict) -> dict:
    """The config a scheduler class gets from `from_config`: the pipeline's explicitly set values, else its defaults.

    diffusers records which values were defaults (`_use_default_values`); those are not carried over to another
    scheduler class, so e.g. Euler built from an SD 1.5 PNDM config keeps Euler's own "linspace" spacing.
    """
    defaults = set(pipeline_config.get("_use_default_values", ()))
    return {k: v for k, v in pipeline_config.items() if not k.startswith("_") and k not in defaults}


def _spaced_timesteps(spacing: str, num_train: int, steps: int, offset: int, integer: bool) -> np.ndarray:
    """Descending inference timesteps for a spacing, with PyTorch diffusers' rounding (Table 2, arXiv 2305.08891)."""
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, steps)[::-1]
        ts = ts.round() if integer else ts
    elif spacing == "leading":
        ts = (np.arange(steps) * (num_train // steps)).round()[::-1] + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train, 0, -num_train / steps)) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported; expected linspace, leading or trailing")
    return np.ascontiguousarray(ts)


@dataclass
class Sampler:
    """A Flax scheduler with its prepared state, corrected to follow PyTorch diffusers."""

    name: str
    scheduler: Any
    state: Any
    num_inference_steps: int

    @property
    def timesteps(self) -> jnp.ndarray:
        """The timesteps the model is called at, in order (PNDM with PRK steps calls it more than once per step)."""
        return self.state.timesteps

    @property
    def init_noise_sigma(self) -> jnp.ndarray:
        """Factor applied to unit-variance initial latents."""
        return self.state.init_noise_sigma

    def scale_model_input(self, state, sample, t):
        """The scheduler's input scaling (Euler divides by sqrt(sigma^2 + 1))."""
        return self.scheduler.scale_model_input(state, sample, t)

    def step(self, state, model_output, t, sample, i):
        """One update of `sample` given the model output at loop index `i`; returns (sample, state)."""
        prev, new_state = self.scheduler.step(state, model_output, t, sample, return_dict=False)
        if self.name == "dpm++" and self.scheduler.config.get("final_sigmas_type", "zero") == "zero":
            # PyTorch's DPM-Solver++ ends at sigma = 0, i.e. its last step returns the data prediction; the Flax
            # port ends at timestep 0 instead. The data prediction is the newest converted model output.
            prev = jnp.where(i == self.num_inference_steps - 1, new_state.model_outputs[-1], prev)
        return prev, new_state


def make_sampler(
    pipeline_config: dict, num_inference_steps: int, shape: tuple[int, ...], name: str | None = None
) -> Sampler:
    """Build the sampler `name` (default: the pipeline's own) from the pipeline's scheduler config."""
    import diffusers.utils.logging as dlog

    name = name or scheduler_name_for_config(pipeline_config)
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    cls = _flax_class(name)
    pt_defaults = _pytorch_defaults(name)
    config = {**pt_defaults, **_effective_config(cls, pipeline_config)}
    for key, off in _UNSUPPORTED_OPTIONS.items():
        if key in config and config[key] != off:
            raise ValueError(
                f"scheduler option {key}={config[key]!r} (from the pipeline's scheduler_config.json) is not "
                f"implemented by the Flax {name} sampler; choose another --scheduler"
            )
    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()  # the Flax classes warn about their deprecation on every construction
    try:
        # Flax Euler rejects "trailing"; its timesteps are replaced below anyway.
        flax_config = {**config, "timestep_spacing": "linspace"} if name == "euler" else config
        scheduler = cls.from_config(flax_config)
    finally:
        dlog.set_verbosity(verbosity)
    state = scheduler.create_state()
    state = scheduler.set_timesteps(state, num_inference_steps, shape)
    state = _fix_timesteps(name, scheduler, state, config, num_inference_steps)
    return Sampler(name=name, scheduler=scheduler, state=state, num_inference_steps=num_inference_steps)


def _pytorch_defaults(name: str) -> dict:
    """Defaults of the PyTorch scheduler class where they differ from the Flax class (timestep spacing)."""
    # Flax DDIM and PNDM have no timestep_spacing option and behave as "leading", PyTorch's default for both.
    return {"ddim": {"timestep_spacing": "leading"}, "pndm": {"timestep_spacing": "leading"}}.get(name, {})


def _fix_timesteps(name: str, scheduler, state, config: dict, steps: int):
    """Replace timesteps the Flax scheduler computes differently from PyTorch (spacing, steps_offset)."""
    num_train = scheduler.config.num_train_timesteps
    spacing = config.get("timestep_spacing", "linspace")
    offset = int(config.get("steps_offset", 0))
    if name == "ddim":
        ts = _spaced_timesteps(spacing, num_train, steps, offset, integer=True)
        return state.replace(timesteps=jnp.asarray(ts.astype(np.int32)))
    if name == "euler":
        ts = _spaced_timesteps(spacing, num_train, steps, offset, integer=False).astype(np.float32)
        ac = np.asarray(state.common.alphas_cumprod, dtype=np.float64)
        sigmas = np.interp(ts, np.arange(len(ac)), ((1 - ac) / ac) ** 0.5)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        max_sigma = float(sigmas.max())
        init = max_sigma if spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
        return state.replace(
            timesteps=jnp.asarray(ts), sigmas=jnp.asarray(sigmas), init_noise_sigma=jnp.float32(init)
        )
    if name == "pndm":
        base = _spaced_timesteps(spacing, num_train, steps, offset, integer=True)[::-1].astype(np.int32)
        if scheduler.config.skip_prk_steps:
            # PLMS warm-up calls the model twice at the second-to-last timestep.
            prk = np.array([], np.int32)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            half = num_train // steps // 2
            prk = np.repeat(base[-4:], 2) + np.tile(np.array([0, half], np.int32), 4)
            prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
            plms = base[:-3][::-1]
        timesteps = np.concatenate([prk, plms]).astype(np.int32)
        return state.replace(
            timesteps=jnp.asarray(timesteps), prk_timesteps=jnp.asarray(prk), plms_timesteps=jnp.asarray(plms)
        )
    return state  # dpm++: the Flax port already follows PyTorch's spacings
