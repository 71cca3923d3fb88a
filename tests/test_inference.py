"""Inference: Flax samplers and images match PyTorch diffusers; sharding, compile-once, CLI and errors."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.formats import AdapterFormatError, save_adapter
from flax_lora.inference import FlaxLoraPipeline, parse_args, run, to_uint8
from flax_lora.sharding import make_mesh
from flax_lora.lora import TEXT_ENCODER_TARGETS, LoraConfig, new_adapter
from tests.pipelines import torch_scheduler

PROMPT = "a photo of a cat"
STEPS = 8
ONE_LEVEL = 1 / 255  # one 8-bit intensity step


def _pt_pipeline(path: str, scheduler: str):
    """The tiny pipeline in PyTorch diffusers with the given scheduler algorithm."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = torch_scheduler(scheduler, pipe.scheduler.config)
    return pipe


def _pt_images(pipe, latents: np.ndarray, scale: float | None = None, steps: int = STEPS) -> np.ndarray:
    """PyTorch images for PROMPT from the given init latents (one per latent)."""
    kwargs = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
    with torch.no_grad():
        return pipe(
            PROMPT,
            num_inference_steps=steps,
            num_images_per_prompt=len(latents),
            latents=torch.from_numpy(latents),
            output_type="np",
            **kwargs,
        ).images


def _random_adapter(pipe: FlaxLoraPipeline, base_model: str | None = None, std: float = 0.05):
    """An adapter on UNet and text encoder with non-zero random `up` weights (alpha != rank)."""
    adapter = new_adapter(
        jax.random.key(0),
        pipe.pipe.params,
        LoraConfig(rank=4, alpha=8),
        LoraConfig(rank=2, alpha=2, target_modules=TEXT_ENCODER_TARGETS),
        base_model=base_model,
        text_encoder_2_config=(
            LoraConfig(rank=3, alpha=1, target_modules=TEXT_ENCODER_TARGETS) if pipe.pipe.text_encoder_2 else None
        ),
    )
    rng = np.random.default_rng(1)
    for component, tree in adapter.params.items():
        flat = flatten_dict(tree)
        for key, value in flat.items():
            if key[-1] == "up":
                flat[key] = jnp.asarray(rng.normal(0.0, std, value.shape).astype(np.float32))
        adapter.params[component] = unflatten_dict(flat)
    return adapter


@pytest.fixture(scope="module")
def sd1(tiny_sd1_path):
    """The tiny SD1 pipeline in Flax (sharded over the 8 test devices)."""
    return FlaxLoraPipeline.from_pretrained(tiny_sd1_path)


@pytest.fixture(scope="module")
def adapter_files(sd1, tiny_sd1_path, tmp_path_factory):
    """The same random adapter saved in the diffusers and the kohya format."""
    adapter = _random_adapter(sd1, base_model=tiny_sd1_path)
    folder = tmp_path_factory.mktemp("adapters")
    return {fmt: save_adapter(adapter, folder / f"{fmt}.safetensors", format=fmt) for fmt in ("diffusers", "kohya")}


@pytest.fixture(scope="module")
def init_latents():
    """Unit-variance init latents for two 64x64 images."""
    return np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ parity


def test_flax_images_match_pytorch_diffusers_with_lora(sd1, tiny_sd1_path, adapter_files, init_latents):
    """Same latents, prompt, DDIM, 8 steps: Flax and PyTorch (load_lora_weights) images within 1/255."""
    sd1.unload_loras()
    base = sd1(PROMPT, num_inference_steps=STEPS, scheduler="ddim", latents=init_latents)
    pt_base = _pt_images(_pt_pipeline(tiny_sd1_path, "ddim"), init_latents)
    assert np.abs(base - pt_base).mean() < ONE_LEVEL

    results = {}
    for fmt, file in adapter_files.items():
        pt = _pt_pipeline(tiny_sd1_path, "ddim")  # a fresh one: unload_lora_weights leaves state behind
        pt.load_lora_weights(os.path.dirname(file), weight_name=os.path.basename(file))
        sd1.unload_loras()
        sd1.load_lora(file, name=fmt)
        for scale in (1.0, 0.5):
            sd1.set_lora_scale(fmt, scale)
            flax_img = sd1(PROMPT, num_inference_steps=STEPS, scheduler="ddim", latents=init_latents)
            pt_img = _pt_images(pt, init_latents, scale)
            results[fmt, scale] = flax_img
            if len(results) == 1:
                traces = sd1.trace_count  # compiled once, with the first adapter
            diff = np.abs(flax_img - pt_img).mean()
            print(f"{fmt} scale {scale}: mean |flax - pytorch| = {diff:.2e}")
            assert diff < ONE_LEVEL, (fmt, scale, diff)
        sd1.unload_loras()
        sd1.load_lora(file, scale=0.5, fuse=True)
        fused = sd1(PROMPT, num_inference_steps=STEPS, scheduler="ddim", latents=init_latents)
        assert np.abs(fused - results[fmt, 0.5]).mean() < ONE_LEVEL / 4

    # The comparison is not vacuous: the adapter and its scale change the image far beyond the tolerance.
    assert np.abs(results["diffusers", 1.0] - base).mean() > 10 * ONE_LEVEL
    assert np.abs(results["diffusers", 1.0] - results["diffusers", 0.5]).mean() > 3 * ONE_LEVEL
    # Adapter weights and scales are traced arguments: other files, formats, scales or fusing never recompile.
    assert sd1.trace_count == traces
    sd1.unload_loras()


def test_peft_written_adapter_gives_pytorchs_image(sd1, tiny_sd1_path, init_latents, tmp_path):
    """A file PEFT + diffusers wrote (rsLoRA, rank and alpha patterns, text encoder too): PyTorch's image within 1/255.

    DPM++: with DDIM's x0 clipping, guidance 7.5 on this random model amplifies float rounding about 100x per step
    (1e-7 per step, 6e-4 after 8 steps, measured), which would hide a real difference of that size.
    """
    from tests.test_formats import TEXT_PEFT, UNET_PEFT, save_peft_lora, torch_peft_pipeline

    # Attention targets only: every diffusers loader reads such a UNet whole (README: Adapter files).
    unet_peft = dict(UNET_PEFT, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    save_peft_lora(*torch_peft_pipeline(tiny_sd1_path, unet_peft, TEXT_PEFT), tmp_path)
    pt = _pt_pipeline(tiny_sd1_path, "dpm++")
    pt.load_lora_weights(str(tmp_path))
    sd1.unload_loras()
    base = sd1(PROMPT, num_inference_steps=STEPS, scheduler="dpm++", latents=init_latents)
    sd1.load_lora(tmp_path)
    flax_img = sd1(PROMPT, num_inference_steps=STEPS, scheduler="dpm++", latents=init_latents)
    sd1.unload_loras()
    diff = np.abs(flax_img - _pt_images(pt, init_latents)).mean()
    print(f"PEFT-written adapter: mean |flax - pytorch| = {diff:.2e}")
    assert diff < ONE_LEVEL
    assert np.abs(flax_img - base).mean() > 10 * ONE_LEVEL


def test_v_prediction_pipeline_with_dpm_matches_pytorch(tiny_sd2_path, tmp_path, init_latents):
    """SD2-style model (linear projections, v_prediction) with DPM-Solver++ and a LoRA matches PyTorch."""
    pipe = FlaxLoraPipeline.from_pretrained(tiny_sd2_path)
    file = save_adapter(_random_adapter(pipe), tmp_path / "sd2.safetensors", format="kohya")
    pipe.load_lora(file, scale=0.8)
    flax_img = pipe(PROMPT, num_inference_steps=STEPS, scheduler="dpm++", latents=init_latents)
    pt = _pt_pipeline(tiny_sd2_path, "dpm++")
    pt.load_lora_weights(str(tmp_path), weight_name="sd2.safetensors")
    assert pt.scheduler.config.prediction_type == "v_prediction"
    diff = np.abs(flax_img - _pt_images(pt, init_latents, 0.8)).mean()
    print(f"sd2 dpm++ kohya scale 0.8: mean |flax - pytorch| = {diff:.2e}")
    assert diff < ONE_LEVEL


@pytest.mark.parametrize("name", ["dpm++", "dpm++_karras", "euler", "pndm"])
def test_each_deterministic_sampler_gives_pytorchs_image(sd1, tiny_sd1_path, init_latents, name):
    """A whole generation with each sampler equals PyTorch's for the same init latents.

    Without a LoRA: an adapter only changes the UNet's output, which every sampler consumes alike, and LoRA images
    are compared with PyTorch's under DDIM and DPM-Solver++ above (each with-LoRA run here was one more compile)."""
    steps = 5
    sd1.unload_loras()
    image = sd1(PROMPT, num_inference_steps=steps, scheduler=name, latents=init_latents)
    diff = np.abs(image - _pt_images(_pt_pipeline(tiny_sd1_path, name), init_latents, steps=steps)).mean()
    print(f"{name}: mean |flax - pytorch| = {diff:.2e}")
    assert diff < ONE_LEVEL


def test_stochastic_samplers_are_seeded(sd1):
    """euler_a and ddpm draw fresh noise per step from the seed: same seed, same image; another seed differs."""
    sd1.unload_loras()
    for name in ("euler_a", "ddpm"):
        first = sd1(PROMPT, num_inference_steps=3, scheduler=name, seed=3)
        again = sd1(PROMPT, num_inference_steps=3, scheduler=name, seed=3)
        other = sd1(PROMPT, num_inference_steps=3, scheduler=name, seed=4)
        np.testing.assert_array_equal(first, again)
        assert np.abs(first - other).mean() > ONE_LEVEL


# ------------------------------------------------------------------------------------------------ sharding


def test_sharded_batch_compiles_once_per_shape(sd1):
    """Images split over 8 devices equal a 1-device run; seeds, guidance and prompts reuse the compiled loop."""
    sd1.unload_loras()
    kwargs = dict(num_inference_steps=4, scheduler="euler", num_images=3)  # 3 does not divide 8 devices
    images = sd1(PROMPT, seed=0, **kwargs)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert np.abs(images[0] - images[1]).mean() > ONE_LEVEL  # different latents per image
    traces = sd1.trace_count
    sd1(PROMPT, seed=1, guidance_scale=3.0, negative_prompt="blurry", **kwargs)
    sd1("another prompt", seed=2, **kwargs)
    assert sd1.trace_count == traces
    wide = sd1(PROMPT, height=48, width=80, **kwargs)
    assert wide.shape == (3, 48, 80, 3) and sd1.trace_count == traces + 1

    single = FlaxLoraPipeline(sd1.pipe, mesh=make_mesh(jax.devices()[:1]))
    np.testing.assert_allclose(single(PROMPT, seed=0, **kwargs), images, atol=1e-5)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_image_equal_to_api(sd1, tiny_sd1_path, adapter_files, init_latents, tmp_path):
    """infer_flax.py with two adapters and --init_latents writes what the Python API returns."""
    from PIL import Image

    latents_file = tmp_path / "latents.npy"
    np.save(latents_file, init_latents)
    out = tmp_path / "out.png"
    argv = [
        "--pretrained_model_name_or_path", tiny_sd1_path,
        "--lora", adapter_files["diffusers"], "--lora", adapter_files["kohya"],
        "--lora_scale", "0.3", "--lora_scale", "0.2",
        "--prompt", PROMPT, "--num_inference_steps", str(STEPS), "--scheduler", "ddim",
        "--num_images", "2", "--init_latents", str(latents_file), "--output", str(out),
    ]  # fmt: skip
    paths = run(parse_args(argv))
    assert paths == [str(tmp_path / "out-0.png"), str(tmp_path / "out-1.png")]

    sd1.unload_loras()
    sd1.load_lora(adapter_files["diffusers"], scale=0.3)
    sd1.load_lora(adapter_files["kohya"], scale=0.2)
    expected = to_uint8(sd1(PROMPT, num_inference_steps=STEPS, scheduler="ddim", latents=init_latents))
    sd1.unload_loras()
    for path, image in zip(paths, expected):
        written = np.asarray(Image.open(path))
        assert written.shape == (64, 64, 3)
        assert np.abs(written.astype(int) - image).max() <= 1


def test_cli_takes_base_model_from_adapter_metadata(adapter_files, tmp_path, caplog):
    """Without --pretrained_model_name_or_path the base model recorded in the adapter is used, and said so."""
    out = tmp_path / "image.png"
    argv = ["--lora", adapter_files["kohya"], "--prompt", PROMPT, "--num_inference_steps", "2",
            "--guidance_scale", "1.0", "--output_dir", str(tmp_path)]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        paths = run(parse_args(argv))
    assert paths == [str(tmp_path / "image-0.png")] and os.path.exists(paths[0]) and not out.exists()
    assert "base model recorded in" in caplog.text


# ------------------------------------------------------------------------------------------------ errors


def test_missing_adapter_file_is_a_clear_error(sd1, tmp_path):
    """A missing adapter file names the path, in the API and in the CLI before any model is loaded."""
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        sd1.load_lora(missing)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        run(parse_args(["--pretrained_model_name_or_path", "/does/not/matter", "--lora", missing, "--prompt", "x"]))


def test_adapter_for_another_architecture_is_a_clear_error(sd1, adapter_files, tmp_path):
    """An adapter made for a bigger text encoder (SD 1.5's 768-wide cross-attention) or for SDXL's extra blocks."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(adapter_files["diffusers"])
    key = next(k for k in tensors if "attn2.to_k.lora.down" in k)
    wrong_shape = {**tensors, key: np.zeros((4, 768), np.float32)}
    save_file(wrong_shape, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"sd15\.safetensors.*(768|shape)"):
        sd1.load_lora(tmp_path / "sd15.safetensors")

    sdxl_key = "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q.lora.down.weight"
    save_file({**tensors, sdxl_key: np.zeros((4, 1280), np.float32)}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"sdxl\.safetensors.*down_blocks\.2"):
        sd1.load_lora(tmp_path / "sdxl.safetensors")
    assert not sd1.loras


def test_sizes_not_divisible_by_8_are_clear_errors(sd1, capsys):
    """Height/width must be multiples of 8 (the VAE factor): the CLI and the API say so."""
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "m", "--prompt", "x", "--height", "100"])
    assert "--height must be a positive multiple of 8" in capsys.readouterr().err
    with pytest.raises(ValueError, match="multiples of 8, got 64x60"):
        sd1(PROMPT, height=64, width=60)
    with pytest.raises(ValueError, match=r"init latents have shape \(1, 4, 8, 8\), expected \(2, 4, 8, 8\)"):
        sd1(PROMPT, num_images=2, latents=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "m", "--prompt", "x", "--lora", "a", "--lora", "b",
                    "--lora_scale", "1", "--lora_scale", "2", "--lora_scale", "3"])  # fmt: skip
    assert "3 --lora_scale values for 2 --lora files" in capsys.readouterr().err


def test_cli_reports_a_missing_adapter_as_a_message(tiny_sd1_path, tmp_path):
    """A user error ends the CLI with the message (exit status 1), not a traceback."""
    import infer_flax

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(SystemExit, match=r"error: LoRA adapter .*missing\.safetensors does not exist"):
        infer_flax.main(["--pretrained_model_name_or_path", tiny_sd1_path, "--lora", str(missing), "--prompt", "x"])


def test_bad_init_latents_and_scheduler_options_are_user_errors(tmp_path):
    """What the CLI prints as one `error: ...` line: a missing or non-array --init_latents, an unsupported option."""
    from flax_lora.errors import MissingFileError, UserError
    from flax_lora.inference import checked_sampler, read_init_latents

    with pytest.raises(MissingFileError, match="none.npy does not exist"):
        read_init_latents(str(tmp_path / "none.npy"))
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="objects.npy is not a .npy array of latents"):
        read_init_latents(str(objects))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((4, 8, 8), np.float32))
    assert read_init_latents(str(single)).shape == (1, 4, 8, 8)
    with pytest.raises(UserError, match="thresholding=True"):
        checked_sampler({"_class_name": "DDIMScheduler", "thresholding": True}, 4, "ddim")
