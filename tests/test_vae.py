"""Our Flax AutoencoderKL against PyTorch diffusers' on tiny random VAEs saved with save_pretrained."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.numpy import load_file

from flax_lora.models.convert import CheckpointMismatchError
from flax_lora.models.vae import AutoencoderKL, LatentDistribution, VAEConfig, load_vae, normalize_pt_key

TOLERANCE = 1e-5  # max abs difference relative to the output's largest magnitude, in float32
PIXELS = (2, 3, 32, 48)  # non-square, so a swapped H/W shows

CONFIGS = {
    # The tiny pipeline's VAE: four blocks, three downsamplings.
    "sd": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1),
    # SD3/Flux-style: shift factor, no quant convs; two resnets per encoder block.
    "shifted": dict(
        block_out_channels=(8, 16),
        layers_per_block=2,
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    # No mid-block attention; GELU resnets (the Encoder/Decoder output activation stays SiLU).
    "no_attention": dict(block_out_channels=(8, 16), layers_per_block=1, mid_block_add_attention=False, act_fn="gelu"),
}


def _save_torch_vae(folder, seed: int = 0, **overrides) -> TorchAutoencoderKL:
    """A random tiny PyTorch AutoencoderKL saved in folder (safetensors), norms perturbed so scale/bias matter."""
    n = len(overrides["block_out_channels"])
    kwargs = dict(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=32,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    vae = TorchAutoencoderKL(**kwargs).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    vae.save_pretrained(folder, safe_serialization=True)
    return vae


def _read(folder) -> tuple[dict[str, np.ndarray], VAEConfig, str]:
    source = str(folder / "diffusion_pytorch_model.safetensors")
    config = VAEConfig.from_dict(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    return load_file(source), config, source


def _inputs(config: VAEConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in [-1, 1] and latents of the matching latent size."""
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, PIXELS).astype(np.float32)
    f = 2 ** (len(config.block_out_channels) - 1)  # one downsampling per block but the last
    latent_shape = (PIXELS[0], config.latent_channels, PIXELS[2] // f, PIXELS[3] // f)
    latents = rng.standard_normal(latent_shape).astype(np.float32)
    return pixels, latents


def _run(model, params, pixels, latents) -> tuple[LatentDistribution, jax.Array]:
    """The posterior of pixels and the decoded latents, each through one jitted apply."""
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
    return encode(params, pixels), decode(params, latents)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """(name, PyTorch VAE, folder) of each tiny config."""
    folder = tmp_path_factory.mktemp(f"vae-{request.param}")
    return request.param, _save_torch_vae(folder, **CONFIGS[request.param]), folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A two-block VAE saved to a folder and loaded, with its float32 outputs (each compile costs seconds)."""
    folder = tmp_path_factory.mktemp("vae-small")
    _save_torch_vae(folder, seed=1, block_out_channels=(8, 16))
    weights, config, source = _read(folder)
    model, params = load_vae(weights, config, source)
    pixels, latents = _inputs(config)
    dist, images = _run(model, params, pixels, latents)
    return dict(
        weights=weights,
        config=config,
        source=source,
        params=params,
        pixels=pixels,
        latents=latents,
        dist=dist,
        images=images,
    )


def _relative_error(ours, reference) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


def test_matches_pytorch(saved):
    name, torch_vae, folder = saved
    weights, config, source = _read(folder)
    model, params = load_vae(weights, config, source, jnp.float32, jnp.float32)
    pixels, latents = _inputs(config)
    with torch.no_grad():
        posterior = torch_vae.encode(torch.from_numpy(pixels)).latent_dist
        decoded = torch_vae.decode(torch.from_numpy(latents)).sample.numpy()
    dist, images = _run(model, params, pixels, latents)
    assert isinstance(dist, LatentDistribution)
    assert dist.mean.shape == posterior.mean.shape and images.shape == decoded.shape
    errors = {
        "mean": _relative_error(dist.mean, posterior.mean.numpy()),
        "logvar": _relative_error(dist.logvar, posterior.logvar.numpy()),
        "std": _relative_error(dist.std, posterior.std.numpy()),
        "decode": _relative_error(images, decoded),
    }
    print(f"{name}: max abs diff / max |ref|: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOLERANCE, errors


def test_old_attention_key_names_load_identically(small):
    weights, config, source, params = small["weights"], small["config"], small["source"], small["params"]
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in weights.items():
        for new, legacy in renames.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{legacy}.")
                value = value[:, :, None, None] if value.ndim == 2 else value  # saved as 1x1 conv weights
        old[key] = value
    assert any(".proj_attn.weight" in k for k in old) and old["encoder.mid_block.attentions.0.query.weight"].ndim == 4
    _, old_params = load_vae(old, config, source)
    jax.tree.map(np.testing.assert_array_equal, old_params, params)


def test_normalize_pt_key():
    assert normalize_pt_key("decoder.mid_block.attentions.0.proj_attn.bias") == (
        "decoder.mid_block.attentions.0.to_out.0.bias"
    )
    assert normalize_pt_key("encoder.mid_block.attentions.0.key.weight") == "encoder.mid_block.attentions.0.to_k.weight"
    assert normalize_pt_key("encoder.conv_in.weight") == "encoder.conv_in.weight"


def test_checkpoint_mismatch_names_the_key(small):
    weights, config, source = small["weights"], small["config"], small["source"]
    key = "decoder.up_blocks.1.resnets.0.conv1.weight"
    wrong_shape = {**weights, key: weights[key][:, :-1]}
    with pytest.raises(CheckpointMismatchError, match=rf"{re.escape(source)}: weight {re.escape(repr(key))} has shape"):
        load_vae(wrong_shape, config, source)
    extra = {**weights, "decoder.conv_extra.weight": np.zeros((3,), np.float32)}
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected keys .*decoder\.conv_extra\.weight"):
        load_vae(extra, config, source)
    missing = {k: v for k, v in weights.items() if k != "quant_conv.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"1 missing params .*'quant_conv/bias'"):
        load_vae(missing, config, source)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"_class_name": "VQModel"}, r"_class_name is 'VQModel'"),
        (
            {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
            r"down_block_types .* has 'AttnDownEncoderBlock2D'; only 'DownEncoderBlock2D'",
        ),
        ({"up_block_types": ["UpDecoderBlock2D"]}, r"up_block_types has 1 entries but block_out_channels"),
        ({"latents_mean": [0.1] * 4}, r"latents_mean \(0\.1, 0\.1, 0\.1, 0\.1\) is not implemented"),
        ({"norm_type": "spatial"}, r"fields \['norm_type'\] are not implemented"),
        ({"act_fn": "mish"}, r"act_fn: activation 'mish' is not implemented"),
        ({"norm_num_groups": 3}, r"norm_num_groups 3 does not divide"),
    ],
)
def test_unsupported_config_is_refused_by_name(overrides, message):
    config = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.0",
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 8,
        "latents_mean": None,
        **overrides,
    }
    with pytest.raises(ValueError, match=rf"^vae/config\.json: .*{message}"):
        VAEConfig.from_dict(config, "vae/config.json")


def test_sampling_chunked_attention_and_latent_scaling(small):
    config, params, latents, dist, images = (small[k] for k in ("config", "params", "latents", "dist", "images"))
    sample = jax.jit(lambda d, k: d.sample(k))(dist, jax.random.key(0))
    assert sample.shape == dist.mean.shape and not np.allclose(sample, dist.mean)
    noise = jax.random.normal(jax.random.key(0), dist.mean.shape)
    np.testing.assert_allclose(sample, dist.mean + dist.std * noise, rtol=1e-6, atol=1e-6)
    chunked = AutoencoderKL(config, attention="chunked")
    chunked_images = jax.jit(lambda p, z: chunked.apply({"params": p}, z, method=chunked.decode))(params, latents)
    np.testing.assert_allclose(chunked_images, images, atol=1e-5)
    model, shifted = AutoencoderKL(config), AutoencoderKL(dataclasses.replace(config, shift_factor=0.5))
    z = jnp.asarray(latents)
    np.testing.assert_allclose(model.scale_latents(z), z * config.scaling_factor, rtol=1e-6)
    np.testing.assert_allclose(shifted.scale_latents(z), (z - 0.5) * config.scaling_factor, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(shifted.unscale_latents)(shifted.scale_latents(z)), z, atol=1e-6)


def test_bf16_compute_is_close(small):
    model, params = load_vae(small["weights"], small["config"], small["source"], jnp.bfloat16, jnp.bfloat16)
    dist, images = _run(model, params, small["pixels"], small["latents"])
    assert dist.mean.dtype == jnp.bfloat16 and images.dtype == jnp.bfloat16
    errors = (_relative_error(dist.mean, small["dist"].mean), _relative_error(images, small["images"]))
    print(f"bf16 vs fp32: mean {errors[0]:.1e}, decode {errors[1]:.1e}")
    assert max(errors) < 5e-2
