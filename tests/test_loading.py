"""Loading PyTorch-saved pipelines into Flax: numerics against PyTorch, file formats, variants, errors."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from flax_lora.loading import load_pipeline, pt_to_flax_params, weight_files
from flax_lora.tiny import build_tiny_pipeline


def _flax_outputs(pipe, ids, latents, timesteps, image):
    """Text embeddings, UNet prediction and VAE encode/decode of a Flax pipeline."""
    text = np.asarray(pipe.text_encoder(ids, params=pipe.params["text_encoder"])[0])
    noise = pipe.unet.apply({"params": pipe.params["unet"]}, latents, timesteps, text).sample
    dist = pipe.vae.apply({"params": pipe.params["vae"]}, image, method=pipe.vae.encode).latent_dist
    decoded = pipe.vae.apply({"params": pipe.params["vae"]}, latents, method=pipe.vae.decode).sample
    return text, np.asarray(noise), np.asarray(dist.mean).transpose(0, 3, 1, 2), np.asarray(decoded)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_flax_pipeline_matches_pytorch(kind, tiny_sd1_path, tiny_sd2_path):
    path = tiny_sd1_path if kind == "sd1" else tiny_sd2_path
    pipe = load_pipeline(path)
    torch_pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    rng = np.random.default_rng(0)
    ids = pipe.tokenizer(["a red square", "blue"], padding="max_length", return_tensors="np").input_ids
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    timesteps = np.array([10, 700])
    with torch.no_grad():
        text_pt = torch_pipe.text_encoder(torch.from_numpy(ids))[0]
        noise_pt = torch_pipe.unet(torch.from_numpy(latents), torch.from_numpy(timesteps), text_pt).sample
        mean_pt = torch_pipe.vae.encode(torch.from_numpy(image)).latent_dist.mean
        decoded_pt = torch_pipe.vae.decode(torch.from_numpy(latents)).sample
    text, noise, mean, decoded = _flax_outputs(pipe, ids, latents, jnp.asarray(timesteps), image)
    np.testing.assert_allclose(text, text_pt.numpy(), atol=1e-5)
    np.testing.assert_allclose(noise, noise_pt.numpy(), atol=1e-5)
    np.testing.assert_allclose(mean, mean_pt.numpy(), atol=1e-5)
    np.testing.assert_allclose(decoded, decoded_pt.numpy(), atol=1e-4)
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler_config["prediction_type"] == ("v_prediction" if kind == "sd2" else "epsilon")


def test_bin_variant_and_msgpack_weights_load_identically(tiny_sd1_path, tmp_path):
    reference = load_pipeline(tiny_sd1_path).params["unet"]
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_path, subfolder="unet")

    bin_dir = tmp_path / "bin"
    shutil.copytree(tiny_sd1_path, bin_dir)
    (bin_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(bin_dir / "unet", safe_serialization=False)
    assert weight_files(sorted(f"unet/{p.name}" for p in (bin_dir / "unet").iterdir()), "unet", None) == [
        "unet/diffusion_pytorch_model.bin"
    ]

    variant_dir = tmp_path / "variant"
    shutil.copytree(tiny_sd1_path, variant_dir)
    for component in ("unet", "vae", "text_encoder"):
        for weights in (variant_dir / component).glob("*.safetensors"):
            weights.rename(weights.with_suffix(".fp16.safetensors"))
    unet.half().save_pretrained(variant_dir / "unet", variant="fp16")

    from_bin = load_pipeline(str(bin_dir)).params["unet"]
    from_variant = load_pipeline(str(variant_dir), variant="fp16").params["unet"]
    for a, b, c in zip(*(jax_leaves(t) for t in (reference, from_bin, from_variant))):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=2e-3, rtol=2e-3)  # fp16 storage, fp32 params
        assert c.dtype == jnp.float32

    with pytest.raises(FileNotFoundError, match="variant='fp16'"):
        load_pipeline(tiny_sd1_path, variant="fp16")


def jax_leaves(tree):
    """Leaves of a param tree in a fixed order."""
    return jax.tree_util.tree_leaves(tree)


def test_flax_msgpack_weights_load(tiny_sd1_path, tmp_path):
    from flax.serialization import to_bytes

    reference = load_pipeline(tiny_sd1_path).params
    folder = tmp_path / "msgpack"
    shutil.copytree(tiny_sd1_path, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_flax_model.msgpack").write_bytes(to_bytes(reference["unet"]))
    loaded = load_pipeline(str(folder)).params["unet"]
    for a, b in zip(jax_leaves(reference["unet"]), jax_leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_for_another_model_is_a_clear_error(tiny_sd1_path, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_sd1_path, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48  # the saved weights are for 32
    (other / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"attn2\.to_k\.weight' has shape \(32, 32\).*to_k/kernel of shape \(48, 32\)"):
        load_pipeline(str(other))


def test_unexpected_and_missing_keys_are_named():
    shapes = {("a", "kernel"): np.zeros((2, 3)), ("b", "bias"): np.zeros(3)}
    with pytest.raises(ValueError, match=r"1 unexpected keys.*'c\.weight'.*1 missing params.*b/bias"):
        pt_to_flax_params({"a.weight": np.zeros((3, 2)), "c.weight": np.zeros(1)}, shapes, source="x.safetensors")


def test_missing_folder_or_component_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="neither a local folder nor a reachable hub model id"):
        load_pipeline(str(tmp_path / "nope"))
    folder = tmp_path / "broken"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(str(folder))


def test_build_tiny_pipeline_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny pipeline kind 'sdxl'"):
        build_tiny_pipeline(tmp_path / "x", kind="sdxl")


def test_sharded_checkpoint_loads(tiny_sd1_path, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_sd1_path, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    UNet2DConditionModel.from_pretrained(tiny_sd1_path, subfolder="unet").save_pretrained(folder / "unet", max_shard_size="1MB")
    assert len(list((folder / "unet").glob("*.safetensors"))) > 1
    reference = load_pipeline(tiny_sd1_path).params["unet"]
    for a, b in zip(jax_leaves(reference), jax_leaves(load_pipeline(str(folder)).params["unet"])):
        np.testing.assert_array_equal(a, b)


def test_hub_id_downloads_only_the_chosen_weights(tiny_sd1_path, tmp_path, monkeypatch):
    import huggingface_hub

    repo_files = [str(p.relative_to(tiny_sd1_path)) for p in sorted(Path(tiny_sd1_path).rglob("*")) if p.is_file()]
    repo_files += ["unet/diffusion_pytorch_model.bin", "unet/diffusion_flax_model.msgpack", "safety_checker/model.safetensors"]
    requests = {}

    def list_repo_files(repo_id, revision=None):
        requests["listed"] = (repo_id, revision)
        return repo_files

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        requests["allow_patterns"] = allow_patterns
        return tiny_sd1_path

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pipe = load_pipeline("someone/tiny-sd", revision="v1")
    assert requests["listed"] == ("someone/tiny-sd", "v1")
    patterns = requests["allow_patterns"]
    assert "unet/diffusion_pytorch_model.safetensors" in patterns and "text_encoder/model.safetensors" in patterns
    assert not any(p.endswith((".bin", ".msgpack")) or p.startswith("safety_checker") for p in patterns)
    assert pipe.name == "someone/tiny-sd" and pipe.path == tiny_sd1_path


def test_memory_efficient_attention_gives_the_same_unet_output(tiny_sd1_path):
    standard = load_pipeline(tiny_sd1_path)
    chunked = load_pipeline(tiny_sd1_path, memory_efficient_attention=True)
    assert chunked.unet.use_memory_efficient_attention and not standard.unet.use_memory_efficient_attention
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)  # 256 queries: several chunks of 64
    text = rng.standard_normal((2, 16, 32)).astype(np.float32)

    def run(pipe):
        return np.asarray(pipe.unet.apply({"params": pipe.params["unet"]}, latents, jnp.array([5, 900]), text).sample)

    np.testing.assert_allclose(run(chunked), run(standard), atol=1e-5)

    # Gradients through the chunked, rematerialised attention equal the standard ones, LoRA included.
    from flax_lora.lora import LoraConfig, lora_scope, new_adapter

    adapter = new_adapter(jax.random.key(0), standard.params, LoraConfig(rank=2))
    adapter.params = jax.tree_util.tree_map(lambda x: x + 0.05, adapter.params)

    def lora_grads(pipe):
        def loss(tree):
            with lora_scope((tree, 1.0)):
                out = pipe.unet.apply({"params": pipe.params["unet"]}, latents, jnp.array([5, 900]), text).sample
            return jnp.mean(out**2)

        return jax.jit(jax.grad(loss))(adapter.params["unet"])

    for a, b in zip(jax_leaves(lora_grads(chunked)), jax_leaves(lora_grads(standard))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_atomic_directory_publishes_only_a_finished_folder(tmp_path):
    from flax_lora.tiny import atomic_directory

    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out", "done.txt") as folder:
            (folder / "done.txt").write_text("half")
            raise RuntimeError("crash while building")
    assert list(tmp_path.iterdir()) == []  # no half-built folder, no temporary left behind
    with atomic_directory(tmp_path / "out", "done.txt") as folder:
        (folder / "done.txt").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "done.txt").read_text() == "whole"
