"""Our numpy/JAX samplers against PyTorch diffusers' schedulers: timesteps, sigmas and whole sampling loops.

The loops use a deterministic fake model, `0.3 * x + 0.01 * sin(t / 100) + 0.1`, on 1x4x8x8 latents. For the
stochastic samplers (euler_a, ddpm) both sides get the same noise: the test replaces the `randn_tensor` that the
PyTorch scheduler modules call with one that returns the noise our sampler gets at that model call.
"""

import ast
import inspect
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, PNDMScheduler
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from flax_lora import schedulers
from flax_lora.schedulers import SAMPLER_NAMES, alphas_cumprod, make_sampler, sampler_name_for_config
from tests.pipelines import torch_scheduler, torch_scheduler_classes

TORCH_CLASSES = torch_scheduler_classes()
SHAPE = (1, 4, 8, 8)

# scheduler_config.json files as the hub ships them.
SD15_JSON = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD2_V_JSON = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
JSON_CONFIGS = {
    "sd15": SD15_JSON,
    "sd2_v": SD2_V_JSON,
    "linspace_offset0": SD15_JSON | {"timestep_spacing": "linspace", "steps_offset": 0},
    "trailing_zero_snr_v": SD2_V_JSON
    | {"timestep_spacing": "trailing", "steps_offset": 0, "rescale_betas_zero_snr": True},
    "karras_leading": SD15_JSON
    | {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "timestep_spacing": "leading"},
    "ddpm_clip": {
        "_class_name": "DDPMScheduler",
        "beta_schedule": "linear",
        "clip_sample": True,
        "clip_sample_range": 1.5,
        "variance_type": "fixed_small",
    },
    "cosine_sigma_min_trailing": {
        "_class_name": "DPMSolverMultistepScheduler",
        "beta_schedule": "squaredcos_cap_v2",
        "final_sigmas_type": "sigma_min",
        "lower_order_final": False,
        "timestep_spacing": "trailing",
    },
    "sample_prediction": SD15_JSON
    | {"_class_name": "DDIMScheduler", "prediction_type": "sample", "timestep_spacing": "trailing", "steps_offset": 0},
    "pndm_prk_v": SD2_V_JSON | {"_class_name": "PNDMScheduler", "skip_prk_steps": False, "set_alpha_to_one": True},
}
# Combinations diffusers has no math for; test_refuses_unsupported covers them.
REFUSED = {("pndm", "trailing_zero_snr_v"), ("pndm", "sample_prediction"), ("euler_a", "sample_prediction")}


def pipeline_config(config_id: str) -> dict:
    """`pipe.scheduler.config` of a pipeline that ships this json: diffusers adds `_use_default_values`."""
    json_config = JSON_CONFIGS[config_id]
    cls = {c.__name__: c for c in TORCH_CLASSES.values()}[json_config["_class_name"]]
    return dict(cls.from_config(json_config).config)


def fake_model_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.3 * x + 0.01 * torch.sin(t / 100) + 0.1


def fake_model_jax(x: jax.Array, t: jax.Array) -> jax.Array:
    return 0.3 * x + 0.01 * jnp.sin(t.astype(jnp.float32) / 100) + 0.1


def torch_reference(name: str, config: dict, steps: int, latents: np.ndarray, noises: np.ndarray, monkeypatch):
    """Run PyTorch diffusers' scheduler as StableDiffusionPipeline does; returns (scheduler, final sample)."""
    scheduler = torch_scheduler(name, config)
    scheduler.set_timesteps(steps)
    call = [0]

    def same_noise(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE
        return torch.from_numpy(noises[call[0]]).to(dtype)

    for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "randn_tensor", same_noise)
    x = torch.from_numpy(latents) * scheduler.init_noise_sigma
    for k, t in enumerate(scheduler.timesteps):
        call[0] = k
        model_output = fake_model_torch(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(model_output, t, x).prev_sample
    return scheduler, x.numpy()


def our_loop(sampler, latents: np.ndarray, noises: np.ndarray, jit: bool) -> np.ndarray:
    """Our sampling loop: eager Python, or one `lax.fori_loop` inside `jax.jit`."""
    timesteps = jnp.asarray(sampler.timesteps)

    def loop(latents, noises, fori_loop):
        def body(i, carry):
            x, state = carry
            model_output = fake_model_jax(sampler.scale_model_input(x, i), timesteps[i])
            return sampler.step(state, model_output, i, x, noises[i])

        x = latents * sampler.init_noise_sigma
        x, _ = fori_loop(0, sampler.num_calls, body, (x, sampler.init_state(x)))
        return x

    def python_loop(start, stop, body, carry):
        for i in range(start, stop):
            carry = body(jnp.int32(i), carry)
        return carry

    if jit:
        run = jax.jit(lambda latents, noises: loop(latents, noises, jax.lax.fori_loop))
        return np.asarray(run(jnp.asarray(latents), jnp.asarray(noises)))
    return np.asarray(loop(jnp.asarray(latents), jnp.asarray(noises), python_loop))


def draws(num_calls: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(SHAPE).astype(np.float32)
    return latents, rng.standard_normal((num_calls, *SHAPE)).astype(np.float32)


def assert_close(ours: np.ndarray, reference: np.ndarray, rtol: float = 1e-5) -> None:
    assert np.all(np.isfinite(reference)), "the reference diverged; pick another config"
    error = np.max(np.abs(ours - reference)) / np.max(np.abs(reference))
    assert error <= rtol, f"max error {error:.2e} of the final sample relative to its max, over {rtol:.0e}"


def check_against_torch(name: str, config: dict, steps: int, monkeypatch, jit: bool = False) -> None:
    sampler = make_sampler(config, steps, name)
    latents, noises = draws(sampler.num_calls)
    scheduler = torch_scheduler(name, config)
    scheduler.set_timesteps(steps)
    zero_snr = config.get("rescale_betas_zero_snr", False)
    assert_same_schedule(name, sampler, scheduler, rtol=1e-5 if zero_snr else 1e-6)
    if scheduler.timesteps[0] == scheduler.timesteps[1] and name.startswith("dpm++"):
        # Karras sigmas from a huge sigma_max (cosine or zero-SNR schedules) repeat the first timestep; diffusers'
        # step index then starts at 1 and runs past the end, so it has no loop to compare with. Ours starts at 0.
        assert name == "dpm++_karras" and (zero_snr or config["beta_schedule"] == "squaredcos_cap_v2")
        return
    _, reference = torch_reference(name, config, steps, latents, noises, monkeypatch)
    # Zero SNR starts at sigma 4096, which turns the few-ulp sigma differences (see assert_same_schedule) into
    # about 4e-5; with PyTorch's own sigmas our loop agrees to 2e-7 there too.
    assert_close(our_loop(sampler, latents, noises, jit), reference, rtol=1e-4 if zero_snr else 1e-5)


def assert_same_schedule(name: str, sampler, scheduler, rtol: float) -> None:
    """Timesteps (exact where integer), sigmas and init_noise_sigma equal the PyTorch scheduler's.

    Float ones only to `rtol`: torch's CPU float32 sqrt is not correctly rounded (1 ulp off for about a fifth
    of inputs; numpy's is), and zero-SNR rescaling and Karras' fractional timesteps carry that on.
    """
    torch_timesteps = scheduler.timesteps.numpy()
    if torch_timesteps.dtype == np.float32:
        assert sampler.timesteps.dtype == np.float32
        np.testing.assert_allclose(sampler.timesteps, torch_timesteps, rtol=rtol, atol=0)
    else:
        assert sampler.timesteps.dtype == np.int32
        np.testing.assert_array_equal(sampler.timesteps, torch_timesteps)
    if name in ("euler", "euler_a", "dpm++", "dpm++_karras"):
        np.testing.assert_allclose(sampler.sigmas, scheduler.sigmas.numpy(), rtol=rtol, atol=0)
    else:
        assert sampler.sigmas is None
    assert sampler.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma), rel=rtol, abs=0)
    assert sampler.num_inference_steps == scheduler.num_inference_steps


CASES = [(n, c) for n in SAMPLER_NAMES for c in JSON_CONFIGS if (n, c) not in REFUSED]


@pytest.mark.parametrize("steps", [8, 25])
@pytest.mark.parametrize("name,config_id", CASES)
def test_matches_pytorch(name, config_id, steps, monkeypatch):
    check_against_torch(name, pipeline_config(config_id), steps, monkeypatch)


# Options the matrix above leaves out, each on the samplers that have it.
EULER_KARRAS_RANGE = SD15_JSON | {
    "_class_name": "EulerDiscreteScheduler",
    "use_karras_sigmas": True,
    "sigma_min": 0.1,
    "sigma_max": 10.0,
    "final_sigmas_type": "sigma_min",
}
DPM_FIRST_ORDER_CLIPPED = {
    "_class_name": "DPMSolverMultistepScheduler",
    "beta_schedule": "squaredcos_cap_v2",
    "solver_order": 1,
    "lambda_min_clipped": -5.1,
    "prediction_type": "v_prediction",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}
DDPM = {"_class_name": "DDPMScheduler", "clip_sample": False, "timestep_spacing": "trailing"}
MORE_CASES = [
    ("euler", EULER_KARRAS_RANGE),
    ("dpm++", EULER_KARRAS_RANGE),  # DPM-Solver reads Euler's sigma_min/sigma_max, as diffusers does
    ("dpm++", DPM_FIRST_ORDER_CLIPPED),
    ("dpm++", DPM_FIRST_ORDER_CLIPPED | {"solver_order": 2, "timestep_spacing": "linspace"}),
    ("ddpm", DDPM | {"variance_type": "fixed_small_log"}),
    ("ddpm", DDPM | {"variance_type": "fixed_large", "prediction_type": "v_prediction"}),
    ("ddim", SD15_JSON | {"_class_name": "DDIMScheduler", "set_alpha_to_one": True, "clip_sample": True,
                          "clip_sample_range": 0.5, "timestep_spacing": "linspace"}),
    ("pndm", SD15_JSON | {"skip_prk_steps": False, "timestep_spacing": "trailing", "steps_offset": 0}),
]


@pytest.mark.parametrize("steps", [8, 25])
@pytest.mark.parametrize("name,config", MORE_CASES)
def test_more_options_match_pytorch(name, config, steps, monkeypatch):
    check_against_torch(name, config, steps, monkeypatch)


@pytest.mark.parametrize(
    "name,config_id", [(n, "sd15") for n in SAMPLER_NAMES] + [("pndm", "pndm_prk_v"), ("dpm++", "karras_leading")]
)
def test_jitted_fori_loop_matches_pytorch(name, config_id, monkeypatch):
    check_against_torch(name, pipeline_config(config_id), 8, monkeypatch, jit=True)


def test_raw_json_and_pipeline_config_agree():
    # A raw scheduler_config.json lacks the keys diffusers filled with defaults; `pipe.scheduler.config` lists
    # them in `_use_default_values`. Either way Euler keeps its own "linspace" spacing, not PNDM's "leading".
    from_json = make_sampler(SD15_JSON, 8, "euler")
    from_pipeline = make_sampler(pipeline_config("sd15"), 8, "euler")
    np.testing.assert_array_equal(from_json.timesteps, from_pipeline.timesteps)
    assert from_json.timesteps[0] == 999.0
    np.testing.assert_array_equal(from_json.sigmas, from_pipeline.sigmas)


def test_default_sampler_is_the_config_class():
    sampler = make_sampler(pipeline_config("sd15"), 8)
    assert sampler.name == "pndm" and sampler.num_calls == 9  # PLMS calls the model once more than steps


@pytest.mark.parametrize(
    "class_name,expected",
    [
        ("PNDMScheduler", "pndm"),
        ("FlaxPNDMScheduler", "pndm"),
        ("DDIMScheduler", "ddim"),
        ("FlaxDDIMScheduler", "ddim"),
        ("DDPMScheduler", "ddpm"),
        ("DPMSolverMultistepScheduler", "dpm++"),
        ("FlaxDPMSolverMultistepScheduler", "dpm++"),
        ("EulerDiscreteScheduler", "euler"),
        ("EulerAncestralDiscreteScheduler", "euler_a"),
    ],
)
def test_sampler_name_for_config(class_name, expected):
    assert sampler_name_for_config({"_class_name": class_name}) == expected


def test_unknown_class_and_name_are_refused():
    with pytest.raises(ValueError, match="LMSDiscreteScheduler"):
        sampler_name_for_config({"_class_name": "LMSDiscreteScheduler"})
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        make_sampler(SD15_JSON, 8, "heun")
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler(SD15_JSON, 0, "ddim")


@pytest.mark.parametrize(
    "name,option,value",
    [
        ("ddim", "thresholding", True),
        ("ddpm", "thresholding", True),
        ("ddpm", "variance_type", "learned"),
        ("ddpm", "variance_type", "learned_range"),
        ("ddim", "beta_schedule", "sigmoid"),
        ("euler", "timestep_spacing", "uniform"),
        ("dpm++", "algorithm_type", "sde-dpmsolver++"),
        ("dpm++", "algorithm_type", "dpmsolver"),
        ("dpm++", "solver_type", "heun"),
        ("dpm++", "solver_order", 3),
        ("dpm++", "use_lu_lambdas", True),
        ("dpm++", "use_exponential_sigmas", True),
        ("dpm++_karras", "use_beta_sigmas", True),
        ("dpm++", "euler_at_final", True),
        ("dpm++", "thresholding", True),
        ("dpm++", "variance_type", "learned_range"),
        ("dpm++", "prediction_type", "flow_prediction"),
        ("euler", "use_exponential_sigmas", True),
        ("euler", "use_beta_sigmas", True),
        ("euler", "interpolation_type", "log_linear"),
        ("euler", "timestep_type", "continuous"),
        ("euler_a", "prediction_type", "sample"),
        ("pndm", "prediction_type", "sample"),
        ("pndm", "rescale_betas_zero_snr", True),
    ],
)
def test_refuses_unsupported(name, option, value):
    config = SD15_JSON | {option: value}
    refusal = re.escape(f"is not implemented by the {name} sampler")
    message = re.escape(f"{option}={value!r}") + ".*scheduler_config.json.*" + refusal
    with pytest.raises(ValueError, match=message):
        make_sampler(config, 8, name)


def test_pndm_refuses_zero_snr_that_diffusers_would_drop():
    # PNDMScheduler has no rescale_betas_zero_snr: from_config drops it and samples a zero-SNR model with the
    # wrong schedule. We refuse instead of matching that.
    assert "rescale_betas_zero_snr" not in inspect.signature(PNDMScheduler.__init__).parameters
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        make_sampler(pipeline_config("trailing_zero_snr_v"), 8, "pndm")


def test_options_of_other_classes_are_ignored_as_in_diffusers():
    # Karras sigmas and clipping are options of other classes: DDIM and Euler ancestral ignore them as diffusers does.
    config = pipeline_config("karras_leading") | {"clip_sample": True}
    for name in ("ddim", "euler_a"):
        ours = make_sampler(config, 8, name)
        reference = TORCH_CLASSES[name].from_config(config)
        reference.set_timesteps(8)
        np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())
    assert make_sampler(config, 8, "euler_a").sigmas.max() < 20  # not Karras' sigma_max of the full schedule


def test_defaults_are_diffusers_constructor_defaults():
    # The cross-class rule needs every class's own defaults; a new diffusers option shows up here.
    for name, cls in TORCH_CLASSES.items():
        parameters = inspect.signature(cls.__init__).parameters
        expected = {k: p.default for k, p in parameters.items() if k != "self"}
        assert schedulers._DEFAULTS[schedulers._ALGORITHM[name]] == expected, name


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True},
        {"beta_schedule": "linear", "rescale_betas_zero_snr": True, "num_train_timesteps": 777},
        {"trained_betas": np.linspace(1e-4, 0.03, 500).tolist(), "num_train_timesteps": 500},
    ],
)
def test_alphas_cumprod_matches_ddpm_scheduler(kwargs):
    expected = DDPMScheduler(**kwargs).alphas_cumprod.numpy()
    ours = alphas_cumprod({"_class_name": "DDPMScheduler", **kwargs})
    assert ours.dtype == np.float32
    if kwargs.get("rescale_betas_zero_snr"):
        # Through torch's inexact float32 sqrt (see assert_same_schedule), amplified where the rescale subtracts.
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=0)
        assert ours[-1] == expected[-1] == 0.0
    else:
        np.testing.assert_array_equal(ours, expected)


def test_alphas_cumprod_refuses_unknown_schedule():
    with pytest.raises(ValueError, match="beta_schedule='laplace'"):
        alphas_cumprod({"beta_schedule": "laplace"})


def test_module_imports_only_numpy_jax_and_stdlib():
    tree = ast.parse(Path(schedulers.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "dataclasses", "math", "typing", "numpy", "jax"}, imported


def test_state_shapes_are_fixed_and_schedule_math_is_float32():
    # bfloat16 latents and model outputs: the update runs in float32 and hands back the sample's dtype.
    for name in SAMPLER_NAMES:
        sampler = make_sampler(pipeline_config("sd15"), 8, name)
        x = jnp.ones(SHAPE, jnp.bfloat16)
        state = sampler.init_state(x)
        shapes = jax.tree.map(lambda a: (a.shape, a.dtype), state)
        for i in range(3):
            x, state = sampler.step(state, x * 0.5, jnp.int32(i), x, jnp.zeros(SHAPE, jnp.bfloat16))
            assert x.dtype == jnp.bfloat16 and x.shape == SHAPE
            assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == shapes
        assert math.isfinite(float(x.astype(jnp.float32).sum()))
