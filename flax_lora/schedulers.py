"""Diffusion samplers in numpy/JAX that reproduce PyTorch diffusers' schedulers model call for model call.

Design:
- `make_sampler` reads a pipeline's scheduler config as `XScheduler.from_config(config)` does in diffusers:
  private keys and the values diffusers recorded as defaults (`_use_default_values`) are dropped, the rest
  override the target class's own defaults. An option that changes the math and is not implemented here is a
  `ValueError` naming it, never silently ignored.
- Every per-call constant (timestep, sigma, the alpha products an update needs) is precomputed in numpy with
  the operation order and float32 rounding of the PyTorch classes (torch builds betas and cumulative alphas in
  float32, sigmas come from float64 `np.interp` then float32), so the same latents give the same image. Bit for
  bit except where torch's CPU float32 sqrt is an ulp off (it is not correctly rounded; numpy's is).
- A `Sampler` is static: `step` and `scale_model_input` index its arrays with the traced loop index, so a whole
  denoising loop is one `lax.fori_loop`. Multistep history (DPM-Solver++, PLMS) is a fixed-shape state pytree.
- Only numpy and jax are imported: sampling must not need torch or diffusers at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SAMPLER_NAMES: tuple[str, ...] = ("ddim", "ddpm", "dpm++", "dpm++_karras", "euler", "euler_a", "pndm")
# "dpm++_karras" is DPM-Solver++ 2M with use_karras_sigmas forced on; it shares the "dpm++" algorithm.
_ALGORITHM = {name: name for name in SAMPLER_NAMES} | {"dpm++_karras": "dpm++"}
# PyTorch scheduler class (old Flax names drop their "Flax" prefix) -> sampler name.
_CLASS_TO_NAME = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpm++",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "PNDMScheduler": "pndm",
}

_BETAS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}
# The constructor defaults of each PyTorch class (diffusers 0.42), which a config's explicit values override.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": _BETAS_DEFAULTS
    | {
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "ddpm": _BETAS_DEFAULTS
    | {
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    },
    "dpm++": _BETAS_DEFAULTS
    | {
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
    "euler": _BETAS_DEFAULTS
    | {
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    },
    "euler_a": _BETAS_DEFAULTS
    | {
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    },
    "pndm": _BETAS_DEFAULTS
    | {
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    },
}
_SPACINGS = ("leading", "trailing", "linspace")
# Options whose other values change the math and are not implemented; values are the ones implemented.
# diffusers itself maps DPM-Solver's "deis" algorithm to dpmsolver++ and the logrho/bh1/bh2 solvers to midpoint.
_CHOICES: dict[str, dict[str, tuple]] = {
    "ddim": {"prediction_type": ("epsilon", "sample", "v_prediction"), "timestep_spacing": _SPACINGS},
    "ddpm": {
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": _SPACINGS,
        "variance_type": ("fixed_small", "fixed_small_log", "fixed_large"),
    },
    "dpm++": {
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": _SPACINGS,
        "algorithm_type": ("dpmsolver++", "deis"),
        "solver_type": ("midpoint", "logrho", "bh1", "bh2"),
        "solver_order": (1, 2),
        "final_sigmas_type": ("zero", "sigma_min"),
        # DDPM's fixed variances, carried over from a DDPM config, change nothing here (as in diffusers).
        "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    },
    "euler": {
        "prediction_type": ("epsilon", "sample", "original_sample", "v_prediction"),
        "timestep_spacing": _SPACINGS,
        "interpolation_type": ("linear",),
        "timestep_type": ("discrete",),
        "final_sigmas_type": ("zero", "sigma_min"),
    },
    "euler_a": {"prediction_type": ("epsilon", "v_prediction"), "timestep_spacing": _SPACINGS},
    "pndm": {"prediction_type": ("epsilon", "v_prediction"), "timestep_spacing": _SPACINGS},
}
# Flags that must be off. PNDMScheduler has no rescale_betas_zero_snr: diffusers drops it from a zero-SNR model's
# config, which would sample with the wrong noise schedule, so it is refused instead.
_OFF_FLAGS: dict[str, tuple[str, ...]] = {
    "ddim": ("thresholding",),
    "ddpm": ("thresholding",),
    "dpm++": (
        "thresholding",
        "euler_at_final",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_lu_lambdas",
        "use_flow_sigmas",
        "use_dynamic_shifting",
    ),
    "euler": ("use_exponential_sigmas", "use_beta_sigmas"),
    "euler_a": (),
    "pndm": ("rescale_betas_zero_snr",),
}
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _refusal(key: str, value: Any, who: str, implemented: str) -> ValueError:
    """The error for a config option we do not implement."""
    return ValueError(
        f"scheduler option {key}={value!r} (from the pipeline's scheduler_config.json) is not implemented by the "
        f"{who}; implemented: {implemented}"
    )


def sampler_name_for_config(config: dict) -> str:
    """The sampler name of a scheduler config's `_class_name` (PyTorch or old Flax names); ValueError naming the class if none."""
    class_name = config.get("_class_name")
    name = _CLASS_TO_NAME.get(str(class_name).removeprefix("Flax"))
    if name is None:
        raise ValueError(
            f"scheduler class {class_name!r} (the `_class_name` of the pipeline's scheduler_config.json) has no "
            f"sampler here; choose one of {', '.join(SAMPLER_NAMES)}"
        )
    return name


# --- Training noise schedule -----------------------------------------------------------------------------------


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 `torch.linspace(start, end, steps)` bit for bit (numpy's float32 linspace differs in the last bit)."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32])
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps)
    # torch's CPU kernel computes start + step * i (first half) and end - step * (steps - 1 - i) (second half) as
    # fused multiply-adds; a float32 times a small integer is exact in float64, so one float64 add then rounding
    # to float32 gives the fused result.
    from_start = np.float64(start32) + np.float64(step) * i
    from_end = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, from_start, from_end).astype(np.float32)


def _cumprod(x: np.ndarray) -> np.ndarray:
    """float32 cumulative product as torch computes it on CPU (accumulated in float64, rounded per element)."""
    return np.cumprod(x, dtype=np.float64).astype(np.float32)


def _cosine_betas(num_train: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the squared-cosine alpha-bar schedule (Nichol & Dhariwal 2021), in float64 then float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_train) / alpha_bar(i / num_train), max_beta) for i in range(num_train)]
    return np.array(betas, dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last cumulative alpha is exactly 0 (arXiv 2305.08891, Algorithm 1), in float32."""
    sqrt_bar = np.sqrt(_cumprod(1.0 - betas))
    first, last = sqrt_bar[0], sqrt_bar[-1]
    sqrt_bar = (sqrt_bar - last) * (first / (first - last))
    bar = sqrt_bar**2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return 1 - alphas


def _betas(cfg: dict, who: str) -> np.ndarray:
    """float32 training betas of a config, as the diffusers constructors build them."""
    num_train = int(cfg["num_train_timesteps"])
    schedule = cfg["beta_schedule"]
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
    elif schedule == "linear":
        betas = _torch_linspace(cfg["beta_start"], cfg["beta_end"], num_train)
    elif schedule == "scaled_linear":
        betas = _torch_linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, num_train) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train)
    else:
        raise _refusal("beta_schedule", schedule, who, ", ".join(_BETA_SCHEDULES))
    if cfg.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod(config: dict) -> np.ndarray:
    """float32 cumulative alphas of a scheduler config's training noise schedule (betas as diffusers computes them, zero-SNR rescale included)."""
    cfg = _BETAS_DEFAULTS | {k: v for k, v in config.items() if not k.startswith("_")}
    return _cumprod(1.0 - _betas(cfg, "training noise schedule (alphas_cumprod)"))


# --- Inference timesteps and sigmas ----------------------------------------------------------------------------


def _discrete_timesteps(spacing: str, num_train: int, steps: int, offset: int) -> np.ndarray:
    """Descending integer timesteps of DDIM/DDPM/PNDM for a spacing (Table 2 of arXiv 2305.08891)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(steps) * (num_train // steps)).round()[::-1].astype(np.int64) + offset
    # "trailing" (the only other choice make_sampler lets through)
    return np.round(np.arange(num_train, 0, -num_train / steps)).astype(np.int64) - 1


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of float64 `sigmas`, interpolated in log sigma between the float32 `log_sigmas`."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None].astype(np.float64)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    high = low + 1
    # As diffusers: the numerator is float64, the denominator a float32 difference.
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high


def _karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """float64 noise levels of Karras et al. 2022 (eq. 5), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_alphas_cumprod(cfg: dict, who: str) -> np.ndarray:
    """Cumulative alphas of the sigma-based classes: zero SNR is clamped to 2**-24 so that sigma stays finite."""
    ac = _cumprod(1.0 - _betas(cfg, who))
    if cfg.get("rescale_betas_zero_snr"):
        ac[-1] = 2.0**-24
    return ac


def _final_sigma(cfg: dict, ac: np.ndarray) -> np.float32:
    """The sigma after the last step: 0, or the schedule's smallest sigma ("sigma_min")."""
    if cfg["final_sigmas_type"] == "sigma_min":
        return np.sqrt((1 - ac[0]) / ac[0])
    return np.float32(0.0)


# --- The sampler -----------------------------------------------------------------------------------------------


# eq=False: an identity hash, so a sampler can be a static argument of jit (arrays have no hash).
@dataclass(frozen=True, eq=False)
class Sampler:
    """A sampler's per-model-call constants and its update; `i` is the (traced) model-call index."""

    name: str
    timesteps: np.ndarray  # the timestep passed to the UNet at each model call, in call order
    sigmas: np.ndarray | None  # PyTorch's `scheduler.sigmas` for euler, euler_a and dpm++; else None
    init_noise_sigma: float
    prediction_type: str
    num_inference_steps: int
    coefficients: Mapping[str, np.ndarray]  # float32 (int32 for branch selectors), one entry per model call
    clip_sample_range: float | None = None  # clip the predicted sample to +-this (DDIM/DDPM `clip_sample`)

    @property
    def num_calls(self) -> int:
        """Model calls of the loop (PNDM's Runge-Kutta warm-up calls the model more often than once per step)."""
        return len(self.timesteps)

    def _at(self, key: str, i: jax.Array) -> jax.Array:
        return jnp.asarray(self.coefficients[key])[i]

    def init_state(self, sample: jax.Array) -> Any:
        """The multistep history before the first call: a pytree whose shapes stay fixed."""
        zeros = jnp.zeros(sample.shape, jnp.float32)
        if _ALGORITHM[self.name] == "dpm++":
            return zeros  # the previous data prediction
        if self.name == "pndm":
            return {"ets": jnp.zeros((4, *sample.shape), jnp.float32), "cur_sample": zeros, "cur_model_output": zeros}
        return ()

    def scale_model_input(self, sample: jax.Array, i: jax.Array) -> jax.Array:
        """The UNet input at call i (Euler samplers divide by sqrt(sigma^2 + 1))."""
        if "input_divisor" not in self.coefficients:
            return sample
        return (sample.astype(jnp.float32) / self._at("input_divisor", i)).astype(sample.dtype)

    def step(
        self, state: Any, model_output: jax.Array, i: jax.Array, sample: jax.Array, noise: jax.Array
    ) -> tuple[jax.Array, Any]:
        """Sample after model call i and the new state; `noise` is standard normal of sample's shape (used by euler_a / ddpm only)."""
        update = _UPDATES[_ALGORITHM[self.name]]
        prev, state = update(
            self, state, model_output.astype(jnp.float32), i, sample.astype(jnp.float32), noise.astype(jnp.float32)
        )
        return prev.astype(sample.dtype), state

    def _clip(self, x0: jax.Array) -> jax.Array:
        if self.clip_sample_range is None:
            return x0
        return jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)


def _x0_and_eps(prediction_type: str, model_output, sample, sqrt_a, sqrt_b):
    """Predicted clean sample and noise from the model output, in the PyTorch classes' operation order."""
    if prediction_type == "epsilon":
        return (sample - sqrt_b * model_output) / sqrt_a, model_output
    if prediction_type == "sample":
        return model_output, (sample - sqrt_a * model_output) / sqrt_b
    # v_prediction
    return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample


def _update_ddim(s: Sampler, state, model_output, i, sample, noise):
    """Deterministic DDIM (eta = 0, as the pipelines call it)."""
    x0, eps = _x0_and_eps(s.prediction_type, model_output, sample, s._at("sqrt_a", i), s._at("sqrt_b", i))
    return s._at("sqrt_a_prev", i) * s._clip(x0) + s._at("sqrt_b_prev", i) * eps, state


def _update_ddpm(s: Sampler, state, model_output, i, sample, noise):
    """Ancestral DDPM step to the next inference timestep (posterior mean plus its standard deviation times noise)."""
    x0, _ = _x0_and_eps(s.prediction_type, model_output, sample, s._at("sqrt_a", i), s._at("sqrt_b", i))
    mean = s._at("x0_coef", i) * s._clip(x0) + s._at("sample_coef", i) * sample
    return mean + s._at("std", i) * noise, state


def _update_dpm(s: Sampler, prev_x0, model_output, i, sample, noise):
    """DPM-Solver++ multistep (data prediction, midpoint), first order where diffusers uses first order."""
    alpha, sigma = s._at("alpha", i), s._at("sigma", i)
    if s.prediction_type == "epsilon":
        x0 = (sample - sigma * model_output) / alpha
    elif s.prediction_type == "sample":
        x0 = model_output
    else:
        x0 = alpha * sample - sigma * model_output
    ratio, c0 = s._at("sigma_ratio", i), s._at("c0", i)
    first = ratio * sample - c0 * x0
    second = first - s._at("half_c0", i) * (s._at("inv_r0", i) * (x0 - prev_x0))
    return jnp.where(s._at("order", i) == 2, second, first), x0


def _euler_x0(s: Sampler, model_output, i, sample):
    """Predicted clean sample of the Euler samplers."""
    if s.prediction_type == "epsilon":
        return sample - s._at("sigma", i) * model_output
    if s.prediction_type in ("sample", "original_sample"):
        return model_output
    return model_output * s._at("v_out", i) + sample / s._at("v_skip_divisor", i)


def _update_euler(s: Sampler, state, model_output, i, sample, noise):
    """One Euler step of the probability-flow ODE in sigma (s_churn = 0, as the pipelines call it)."""
    derivative = (sample - _euler_x0(s, model_output, i, sample)) / s._at("sigma", i)
    return sample + derivative * s._at("dt", i), state


def _update_euler_a(s: Sampler, state, model_output, i, sample, noise):
    """One Euler step down to sigma_down, then fresh noise of scale sigma_up."""
    derivative = (sample - _euler_x0(s, model_output, i, sample)) / s._at("sigma", i)
    return sample + derivative * s._at("dt", i) + noise * s._at("sigma_up", i), state


# PNDM call kinds: the PLMS start (an Euler step, then its Heun correction), Adams-Bashforth of order 2-4, and
# the four calls of each Runge-Kutta warm-up step.
_PLMS_FIRST, _PLMS_SECOND, _PLMS_2, _PLMS_3, _PLMS_4, _PRK_FIRST, _PRK_MID, _PRK_LAST = range(8)


def _pndm_push(state: dict, model_output: jax.Array) -> dict:
    """The state with `model_output` appended to the last four model outputs."""
    return state | {"ets": jnp.concatenate([state["ets"][1:], model_output[None]])}


# Each branch: (model output, sample, state) -> (combined output, sample to step from, new state). Module-level
# functions, so that eager calls of lax.switch hit jax's trace cache.
def _plms_first(mo, x, st):
    return mo, x, _pndm_push(st, mo) | {"cur_sample": x}


def _plms_second(mo, x, st):
    return (mo + st["ets"][-1]) / 2, st["cur_sample"], st


def _plms_2(mo, x, st):
    st = _pndm_push(st, mo)
    e = st["ets"]
    return (3 * e[-1] - e[-2]) / 2, x, st


def _plms_3(mo, x, st):
    st = _pndm_push(st, mo)
    e = st["ets"]
    return (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12, x, st


def _plms_4(mo, x, st):
    st = _pndm_push(st, mo)
    e = st["ets"]
    return (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]), x, st


def _prk_first(mo, x, st):
    return mo, x, _pndm_push(st, mo) | {"cur_sample": x, "cur_model_output": (1 / 6) * mo}


def _prk_mid(mo, x, st):
    return mo, st["cur_sample"], st | {"cur_model_output": st["cur_model_output"] + (1 / 3) * mo}


def _prk_last(mo, x, st):
    combined = st["cur_model_output"] + (1 / 6) * mo
    return combined, st["cur_sample"], st | {"cur_model_output": jnp.zeros_like(mo)}


# In the order of the call kinds above.
_PNDM_BRANCHES = (_plms_first, _plms_second, _plms_2, _plms_3, _plms_4, _prk_first, _prk_mid, _prk_last)


def _update_pndm(s: Sampler, state, model_output, i, sample, noise):
    """PLMS (and the PRK warm-up): combine stored model outputs, then PNDM's transfer from t to t_prev."""
    combined, x, state = jax.lax.switch(s._at("kind", i), _PNDM_BRANCHES, model_output, sample, state)
    if s.prediction_type == "v_prediction":
        combined = s._at("sqrt_a", i) * combined + s._at("sqrt_b", i) * x
    prev = s._at("sample_coef", i) * x - s._at("alpha_diff", i) * combined / s._at("denominator", i)
    return prev, state


_UPDATES: dict[str, Callable] = {
    "ddim": _update_ddim,
    "ddpm": _update_ddpm,
    "dpm++": _update_dpm,
    "euler": _update_euler,
    "euler_a": _update_euler_a,
    "pndm": _update_pndm,
}


# --- Builders: set_timesteps and the per-call constants of each class ------------------------------------------


def _build_ddim(cfg: dict, steps: int, name: str) -> Sampler:
    num_train = int(cfg["num_train_timesteps"])
    ac = alphas_cumprod(cfg)
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else ac[0]
    ts = _discrete_timesteps(cfg["timestep_spacing"], num_train, steps, int(cfg["steps_offset"]))
    # diffusers steps back by num_train // steps whatever the spacing.
    prev = ts - num_train // steps
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    coefficients = {
        "sqrt_a": np.sqrt(a_t),
        "sqrt_b": np.sqrt(1 - a_t),
        "sqrt_a_prev": np.sqrt(a_prev),
        "sqrt_b_prev": np.sqrt(1 - a_prev),
    }
    return _sampler(name, cfg, steps, ts.astype(np.int32), None, 1.0, coefficients)


def _build_ddpm(cfg: dict, steps: int, name: str) -> Sampler:
    num_train = int(cfg["num_train_timesteps"])
    ac = alphas_cumprod(cfg)
    ts = _discrete_timesteps(cfg["timestep_spacing"], num_train, steps, int(cfg["steps_offset"]))
    prev = np.append(ts[1:], -1)
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], np.float32(1.0))
    b_t, b_prev = 1 - a_t, 1 - a_prev
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    variance = np.maximum(b_prev / b_t * beta_t, np.float32(1e-20))
    std = {
        "fixed_small": np.sqrt(variance),
        "fixed_small_log": np.exp(np.float32(0.5) * np.log(variance)),
        "fixed_large": np.sqrt(beta_t),
    }[cfg["variance_type"]]
    coefficients = {
        "sqrt_a": np.sqrt(a_t),
        "sqrt_b": np.sqrt(b_t),
        "x0_coef": (np.sqrt(a_prev) * beta_t) / b_t,
        "sample_coef": np.sqrt(alpha_t) * b_prev / b_t,
        "std": np.where(ts > 0, std, np.float32(0.0)),  # no noise is added when stepping from t = 0
    }
    return _sampler(name, cfg, steps, ts.astype(np.int32), None, 1.0, coefficients)


def _build_dpm(cfg: dict, steps: int, name: str) -> Sampler:
    num_train = int(cfg["num_train_timesteps"])
    ac = _sigma_alphas_cumprod(cfg, f"{name} sampler")
    train_sigmas = np.sqrt((1 - ac) / ac)
    log_sigmas = np.log(train_sigmas)
    with np.errstate(divide="ignore"):
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
    clipped = np.searchsorted(lambdas[::-1], np.float32(cfg["lambda_min_clipped"]))
    last = num_train - int(clipped)
    spacing, offset = cfg["timestep_spacing"], int(cfg["steps_offset"])
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (steps + 1)
        ts = (np.arange(steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + offset
    else:
        ts = np.arange(last, 0, -num_train / steps).round().astype(np.int64) - 1
    if cfg["use_karras_sigmas"]:
        # diffusers takes sigma_min/sigma_max from the config where the source class had them (Euler's).
        sigma_min = cfg.get("sigma_min") if cfg.get("sigma_min") is not None else float(train_sigmas[0])
        sigma_max = cfg.get("sigma_max") if cfg.get("sigma_max") is not None else float(train_sigmas[-1])
        sigmas = _karras_sigmas(sigma_min, sigma_max, steps)
        t = _sigma_to_t(sigmas, log_sigmas)
        ts = (t if cfg["beta_schedule"] == "squaredcos_cap_v2" else t.round()).astype(np.int64)
    else:
        sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(cfg, ac)]]).astype(np.float32)
    calls = len(ts)

    alpha = 1 / np.sqrt(sigmas**2 + 1)
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at a final sigma of 0
    h = lam[1:] - lam[:-1]
    c0 = alpha[1:] * (np.exp(-h) - 1)
    order = np.full(calls, 1 if cfg["solver_order"] == 1 else 2, np.int32)
    order[0] = 1
    # The last step is first order at a final sigma of 0, and for short schedules with lower_order_final.
    if cfg["final_sigmas_type"] == "zero" or (cfg["lower_order_final"] and calls < 15):
        order[-1] = 1
    inv_r0 = np.zeros(calls, np.float32)
    second = order == 2
    h0 = lam[1:-1] - lam[:-2]  # lambda_s0 - lambda_s1 for steps 1..calls-1
    # A final sigma_min equal to the last Karras sigma makes h = 0 (diffusers computes the same inf, then 0).
    with np.errstate(divide="ignore"):
        inv_r0[1:][second[1:]] = 1.0 / (h0[second[1:]] / h[1:][second[1:]])
    coefficients = {
        "alpha": alpha[:-1],
        "sigma": sigma[:-1],
        "sigma_ratio": sigma[1:] / sigma[:-1],
        "c0": c0,
        "half_c0": np.float32(0.5) * c0,
        "inv_r0": inv_r0,
        "order": order,
    }
    return _sampler(name, cfg, calls, ts.astype(np.int32), sigmas, 1.0, coefficients)


def _euler_schedule(cfg: dict, steps: int, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Timesteps, sigmas and init_noise_sigma of EulerDiscreteScheduler / EulerAncestralDiscreteScheduler."""
    num_train = int(cfg["num_train_timesteps"])
    ac = _sigma_alphas_cumprod(cfg, f"{name} sampler")
    train_sigmas = np.sqrt((1 - ac) / ac)
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, steps, dtype=np.float32)[::-1].copy()
    else:
        ts = _discrete_timesteps(spacing, num_train, steps, int(cfg["steps_offset"])).astype(np.float32)
    sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
    # Only EulerDiscreteScheduler has Karras sigmas and a final-sigma option; the ancestral class ignores both keys.
    if name == "euler" and cfg["use_karras_sigmas"]:
        sigma_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
        sigma_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
        sigmas = _karras_sigmas(sigma_min, sigma_max, steps)
        ts = _sigma_to_t(sigmas, np.log(train_sigmas)).astype(np.float32)
    final = _final_sigma(cfg, ac) if name == "euler" else np.float32(0.0)
    sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
    max_sigma = sigmas.max()
    init = max_sigma if spacing in ("linspace", "trailing") else np.sqrt(max_sigma**2 + 1)
    return ts, sigmas, float(init)


def _euler_coefficients(sigmas: np.ndarray) -> dict[str, np.ndarray]:
    """Per-call constants both Euler samplers share (input scaling, v-prediction conversion)."""
    sigma = sigmas[:-1]
    divisor = np.sqrt(sigma**2 + 1)
    return {"sigma": sigma, "input_divisor": divisor, "v_out": -sigma / divisor, "v_skip_divisor": sigma**2 + 1}


def _build_euler(cfg: dict, steps: int, name: str) -> Sampler:
    ts, sigmas, init = _euler_schedule(cfg, steps, name)
    coefficients = _euler_coefficients(sigmas) | {"dt": sigmas[1:] - sigmas[:-1]}
    return _sampler(name, cfg, steps, ts, sigmas, init, coefficients)


def _build_euler_a(cfg: dict, steps: int, name: str) -> Sampler:
    ts, sigmas, init = _euler_schedule(cfg, steps, name)
    sigma_from, sigma_to = sigmas[:-1], sigmas[1:]
    sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    sigma_down = np.sqrt(sigma_to**2 - sigma_up**2)
    coefficients = _euler_coefficients(sigmas) | {"dt": sigma_down - sigma_from, "sigma_up": sigma_up}
    return _sampler(name, cfg, steps, ts, sigmas, init, coefficients)


def _build_pndm(cfg: dict, steps: int, name: str) -> Sampler:
    num_train = int(cfg["num_train_timesteps"])
    ac = alphas_cumprod(cfg)
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else ac[0]
    ascending = _discrete_timesteps(cfg["timestep_spacing"], num_train, steps, int(cfg["steps_offset"]))[::-1]
    ratio = num_train // steps
    if cfg["skip_prk_steps"]:
        ts = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        kind = np.array([_PLMS_FIRST, _PLMS_SECOND] + [min(c, 4) for c in range(2, len(ts))])[: len(ts)]
        t_cur, t_prev = ts.copy(), ts - ratio
        if len(ts) > 1:  # the Heun correction re-evaluates the first step: from t + ratio to t
            t_cur[1], t_prev[1] = ts[1] + ratio, ts[1]
    else:
        if steps < 4:
            raise ValueError(
                f"the pndm sampler's Runge-Kutta warm-up (skip_prk_steps=False in the pipeline's "
                f"scheduler_config.json) needs num_inference_steps >= 4, got {steps}"
            )
        half = num_train // steps // 2
        prk = np.repeat(ascending[-4:], 2) + np.tile([0, half], 4)
        prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
        plms = ascending[:-3][::-1]
        ts = np.concatenate([prk, plms])
        c = np.arange(len(prk))
        prk_kind = np.where(c % 4 == 0, _PRK_FIRST, np.where(c % 4 == 3, _PRK_LAST, _PRK_MID))
        kind = np.concatenate([prk_kind, np.full(len(plms), _PLMS_4)])
        # Every call of a Runge-Kutta step transfers from the step's first timestep.
        t_cur = np.concatenate([prk[c // 4 * 4], plms])
        t_prev = np.concatenate([prk - np.where(c % 2 == 1, 0, half), plms - ratio])
    a_t = ac[t_cur]
    a_prev = np.where(t_prev >= 0, ac[np.maximum(t_prev, 0)], final)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    coefficients = {
        "kind": kind.astype(np.int32),
        "sqrt_a": np.sqrt(a_t),
        "sqrt_b": np.sqrt(b_t),
        "sample_coef": np.sqrt(a_prev / a_t),
        "alpha_diff": a_prev - a_t,
        "denominator": a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev),
    }
    return _sampler(name, cfg, steps, ts.astype(np.int32), None, 1.0, coefficients)


def _sampler(name, cfg, steps, timesteps, sigmas, init, coefficients) -> Sampler:
    clip = float(cfg["clip_sample_range"]) if cfg.get("clip_sample") and _ALGORITHM[name] in ("ddim", "ddpm") else None
    return Sampler(
        name=name,
        timesteps=timesteps,
        sigmas=sigmas,
        init_noise_sigma=init,
        prediction_type=cfg["prediction_type"],
        num_inference_steps=steps,
        coefficients={k: np.asarray(v) for k, v in coefficients.items()},
        clip_sample_range=clip,
    )


_BUILDERS: dict[str, Callable[[dict, int, str], Sampler]] = {
    "ddim": _build_ddim,
    "ddpm": _build_ddpm,
    "dpm++": _build_dpm,
    "euler": _build_euler,
    "euler_a": _build_euler_a,
    "pndm": _build_pndm,
}


def _sampler_config(config: dict, algorithm: str) -> dict:
    """The config `XScheduler.from_config(config)` sees: values the config set explicitly over the class's defaults.

    Keys another class lacks stay in (diffusers keeps them as hidden config; DPM-Solver's Karras sigmas read
    sigma_min/sigma_max from them) but only the class's own options are acted on.
    """
    recorded_defaults = set(config.get("_use_default_values", ()))
    explicit = {k: v for k, v in config.items() if not k.startswith("_") and k not in recorded_defaults}
    return _DEFAULTS[algorithm] | explicit


def _check_supported(cfg: dict, name: str, algorithm: str) -> None:
    """Refuse, by name, every option value that changes the math and is not implemented here."""
    who = f"{name} sampler"
    for key in _OFF_FLAGS[algorithm]:
        if cfg.get(key):
            raise _refusal(key, cfg[key], who, f"{key}=False")
    for key, allowed in _CHOICES[algorithm].items():
        if cfg[key] not in allowed:
            raise _refusal(key, cfg[key], who, ", ".join(map(repr, allowed)))
    if cfg.get("trained_betas") is None and cfg["beta_schedule"] not in _BETA_SCHEDULES:
        raise _refusal("beta_schedule", cfg["beta_schedule"], who, ", ".join(_BETA_SCHEDULES))


def make_sampler(config: dict, num_inference_steps: int, name: str | None = None) -> Sampler:
    """Sampler `name` (default: the config's own class) built from a pipeline's scheduler config, as `XScheduler.from_config` + `set_timesteps` in diffusers."""
    name = sampler_name_for_config(config) if name is None else name
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    algorithm = _ALGORITHM[name]
    cfg = _sampler_config(config, algorithm)
    if name == "dpm++_karras":
        cfg["use_karras_sigmas"] = True
    _check_supported(cfg, name, algorithm)
    num_train = int(cfg["num_train_timesteps"])
    if not 1 <= num_inference_steps <= num_train:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps={num_train} of the pipeline's "
            f"scheduler_config.json, got {num_inference_steps}"
        )
    return _BUILDERS[algorithm](cfg, int(num_inference_steps), name)
