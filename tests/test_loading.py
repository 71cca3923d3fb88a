"""Loading PyTorch-saved pipelines into our Flax models: numerics against PyTorch, file layouts, variants, errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from flax_lora.errors import UserError
from flax_lora.loading import PipelineError, load_pipeline, weight_files
from flax_lora.models.convert import CheckpointMismatchError, pt_to_flax
from flax_lora.tiny import build_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]


def _max_rel(ours, reference) -> float:
    """Max abs difference relative to the reference's scale."""
    reference = np.asarray(reference)
    return float(np.abs(np.asarray(ours) - reference).max() / max(np.abs(reference).max(), 1e-12))


def _compare_with_pytorch(pipe, torch_pipe) -> dict[str, float]:
    """Relative max differences of every component on the same random inputs."""
    rng = np.random.default_rng(0)
    ids = pipe.tokenizer(["a red square", "blue"])
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    timesteps = np.array([10, 700])
    diffs = {}
    with torch.no_grad():
        text_pt = torch_pipe.text_encoder(torch.from_numpy(ids).long(), output_hidden_states=True)
        dist_pt = torch_pipe.vae.encode(torch.from_numpy(image)).latent_dist
        decoded_pt = torch_pipe.vae.decode(torch.from_numpy(latents)).sample
    text = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, ids)
    diffs["text last"] = _max_rel(text.last_hidden_state, text_pt.last_hidden_state)
    diffs["text penultimate"] = _max_rel(text.hidden_states[-2], text_pt.hidden_states[-2])
    diffs["text pooled"] = _max_rel(text.pooler_output, text_pt.pooler_output)
    context_pt, context = text_pt.last_hidden_state, text.last_hidden_state
    added, added_pt = None, {}
    if pipe.text_encoder_2 is not None:
        ids_2 = pipe.tokenizer_2(["a red square", "blue"])
        with torch.no_grad():
            text2_pt = torch_pipe.text_encoder_2(torch.from_numpy(ids_2).long(), output_hidden_states=True)
        text2 = pipe.text_encoder_2.apply({"params": pipe.params["text_encoder_2"]}, ids_2)
        diffs["text_2 penultimate"] = _max_rel(text2.hidden_states[-2], text2_pt.hidden_states[-2])
        diffs["text_2 projected"] = _max_rel(text2.text_embeds, text2_pt.text_embeds)
        # SDXL conditioning: both penultimate states side by side, the pooled projection and the size ids.
        context = jnp.concatenate([text.hidden_states[-2], text2.hidden_states[-2]], axis=-1)
        context_pt = torch.cat([text_pt.hidden_states[-2], text2_pt.hidden_states[-2]], dim=-1)
        time_ids = np.array([[64, 64, 0, 0, 64, 64], [96, 80, 8, 4, 64, 64]], np.float32)
        added = {"text_embeds": text2.text_embeds, "time_ids": time_ids}
        added_pt = {"added_cond_kwargs": {"text_embeds": text2_pt.text_embeds, "time_ids": torch.from_numpy(time_ids)}}
    with torch.no_grad():
        noise_pt = torch_pipe.unet(torch.from_numpy(latents), torch.from_numpy(timesteps), context_pt, **added_pt).sample
    noise = pipe.predict_noise(pipe.params, latents, jnp.asarray(timesteps), context, added=added)
    diffs["unet"] = _max_rel(noise, noise_pt)
    dist = pipe.encode_images(pipe.params, image)
    diffs["vae mean"] = _max_rel(dist.mean, dist_pt.mean)
    diffs["vae logvar"] = _max_rel(dist.logvar, dist_pt.logvar)
    decoded = pipe.vae.apply({"params": pipe.params["vae"]}, latents, method=pipe.vae.decode)
    diffs["vae decode"] = _max_rel(decoded, decoded_pt)
    return diffs


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl", "sd1-old-layout"])
def test_flax_models_match_pytorch(kind, request):
    """fp32 parity of every component with PyTorch diffusers + transformers 5 (the old CLIP layout too)."""
    fixture = {"sd1": "tiny_sd1_path", "sd2": "tiny_sd2_path", "sdxl": "tiny_sdxl_path",
               "sd1-old-layout": "tiny_sd1_old_layout_path"}[kind]  # fmt: skip
    path = request.getfixturevalue(fixture)
    pipe = load_pipeline(path)
    torch_pipe = DiffusionPipeline.from_pretrained(path)
    diffs = _compare_with_pytorch(pipe, torch_pipe)
    print(kind, {k: f"{v:.1e}" for k, v in diffs.items()})
    for name, diff in diffs.items():
        assert diff <= 1e-5, (name, diff)
    assert pipe.vae_scale_factor == 8
    assert pipe.is_sdxl == (kind == "sdxl")
    assert pipe.scheduler_config["prediction_type"] == ("v_prediction" if kind == "sd2" else "epsilon")


def test_old_and_new_clip_layouts_load_to_the_same_params(tiny_sd1_path, tiny_sd1_old_layout_path):
    new = load_pipeline(tiny_sd1_path).params["text_encoder"]
    old = load_pipeline(tiny_sd1_old_layout_path).params["text_encoder"]
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(old)
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old)):
        np.testing.assert_array_equal(a, b)


def test_bin_and_fp16_variant_weights_load(tiny_sd1_path, tmp_path):
    """`.bin` (read without torch) gives the same params; an fp16 variant loads close, cast to fp32."""
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
    for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (reference, from_bin, from_variant))):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=2e-3, rtol=2e-3)  # fp16 storage, fp32 params
        assert c.dtype == jnp.float32

    with pytest.raises(PipelineError, match="variant='fp16'"):
        load_pipeline(tiny_sd1_path, variant="fp16")


def test_bf16_weights_and_param_dtype(tiny_sd1_path, tmp_path):
    """bf16 safetensors (which safetensors.numpy cannot read) load; param_dtype keeps them bf16."""
    folder = tmp_path / "bf16"
    shutil.copytree(tiny_sd1_path, folder)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_path, subfolder="unet").to(torch.bfloat16)
    unet.save_pretrained(folder / "unet")
    pipe = load_pipeline(str(folder), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    reference = load_pipeline(tiny_sd1_path).params["unet"]
    for a, b in zip(jax.tree_util.tree_leaves(pipe.params["unet"]), jax.tree_util.tree_leaves(reference)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), atol=1e-2, rtol=1e-2)
    out = pipe.predict_noise(pipe.params, jnp.ones((1, 4, 8, 8)), jnp.array([3]), jnp.ones((1, 16, 32)))
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())


def test_sharded_checkpoint_loads(tiny_sd1_path, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_sd1_path, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    UNet2DConditionModel.from_pretrained(tiny_sd1_path, subfolder="unet").save_pretrained(folder / "unet", max_shard_size="100KB")
    assert len(list((folder / "unet").glob("*.safetensors"))) > 1
    reference = load_pipeline(tiny_sd1_path).params["unet"]
    loaded = load_pipeline(str(folder)).params["unet"]
    for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_for_another_model_is_a_clear_error(tiny_sd1_path, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_sd1_path, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48  # the saved weights are for 32
    (other / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"attn2\.to_k\.weight' has shape \(32, 32\).*to_k/kernel of shape \(48, 32\)"):
        load_pipeline(str(other))


def test_unexpected_and_missing_keys_are_named():
    shapes = {("a", "kernel"): np.zeros((2, 3)), ("b", "bias"): np.zeros(3)}
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected keys.*'c\.weight'.*1 missing params.*b/bias"):
        pt_to_flax({"a.weight": np.zeros((3, 2)), "c.weight": np.zeros(1)}, shapes, source="x.safetensors")


def test_unimplemented_config_fields_and_classes_are_refused_by_name(tiny_sd1_path, tmp_path):
    cases = [
        ("unet", "config.json", "class_embed_type", "timestep", "class_embed_type='timestep'"),
        ("unet", "config.json", "down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "SimpleCrossAttnDownBlock2D"),
        ("unet", "config.json", "a_field_from_the_future", 1, "a_field_from_the_future"),
        ("vae", "config.json", "latents_mean", [0.1, 0.2, 0.3, 0.4], "latents_mean"),
        ("text_encoder", "config.json", "hidden_act", "relu", "relu"),
        ("model_index.json", None, "_class_name", "FluxPipeline", "FluxPipeline"),
    ]
    for component, file, key, value, message in cases:
        folder = tmp_path / f"{key}"
        shutil.copytree(tiny_sd1_path, folder)
        path = folder / component / file if file else folder / component
        config = json.loads(path.read_text())
        config[key] = value
        path.write_text(json.dumps(config))
        with pytest.raises(UserError, match=message):
            load_pipeline(str(folder))


def test_missing_folder_component_or_msgpack_only_weights_are_clear_errors(tiny_sd1_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="neither a local folder nor a reachable hub model id"):
        load_pipeline("someone/not-there")
    folder = tmp_path / "broken"
    folder.mkdir()
    with pytest.raises(PipelineError, match="no model_index.json"):
        load_pipeline(str(folder))
    flax_only = tmp_path / "flax-only"
    shutil.copytree(tiny_sd1_path, flax_only)
    (flax_only / "unet" / "diffusion_pytorch_model.safetensors").rename(flax_only / "unet" / "diffusion_flax_model.msgpack")
    with pytest.raises(PipelineError, match="Flax .msgpack weights"):
        load_pipeline(str(flax_only))


def test_hub_id_downloads_only_the_chosen_weights(tiny_sd1_path, monkeypatch):
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


def test_chunked_attention_gives_the_same_unet_output_and_lora_gradients(tiny_sd1_path):
    from flax_lora.lora import LoraConfig, new_adapter

    standard = load_pipeline(tiny_sd1_path, attention="xla")
    chunked = load_pipeline(tiny_sd1_path, attention="chunked")
    assert chunked.unet.attention == "chunked" and standard.unet.attention == "xla"
    assert load_pipeline(tiny_sd1_path).unet.attention == "auto"  # the default
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)  # 256 queries: several chunks
    text = rng.standard_normal((2, 16, 32)).astype(np.float32)
    t = jnp.array([5, 900])
    np.testing.assert_allclose(
        np.asarray(chunked.predict_noise(chunked.params, latents, t, text)),
        np.asarray(standard.predict_noise(standard.params, latents, t, text)),
        atol=1e-5,
    )
    adapter = new_adapter(jax.random.key(0), standard.params, LoraConfig(rank=2))
    tree = jax.tree_util.tree_map(lambda x: x + 0.05, adapter.params["unet"])

    def lora_grads(pipe):
        loss = lambda tree: jnp.mean(pipe.predict_noise(pipe.params, latents, t, text, ((tree, 1.0),)) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(tree)

    for a, b in zip(jax.tree_util.tree_leaves(lora_grads(chunked)), jax.tree_util.tree_leaves(lora_grads(standard))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_builtin_tiny_pipeline_is_written_without_torch_and_loads_in_diffusers(kind, tmp_path):
    """Our own writer's pipeline folder loads in PyTorch diffusers with the same outputs as ours."""
    folder = build_tiny_pipeline(tmp_path / "ours", kind=kind)
    pipe = load_pipeline(folder)
    torch_pipe = DiffusionPipeline.from_pretrained(folder)
    diffs = _compare_with_pytorch(pipe, torch_pipe)
    for name, diff in diffs.items():
        assert diff <= 1e-5, (name, diff)


def test_runtime_never_imports_torch_diffusers_or_transformers(tmp_path):
    """The library, both CLIs and a whole load + generate keep torch, diffusers and transformers out of sys.modules."""
    script = f"""
import sys, runpy
import flax_lora, flax_lora.train, flax_lora.inference, flax_lora.formats, flax_lora.data, flax_lora.loading
sys.argv = ["train_flax.py", "--help"]
for cli in ("train_flax.py", "infer_flax.py"):
    try:
        runpy.run_path({str(REPO)!r} + "/" + cli, run_name="__main__")
    except SystemExit:
        pass
from flax_lora.tiny import build_tiny_pipeline
from flax_lora.inference import FlaxLoraPipeline
pipe = FlaxLoraPipeline.from_pretrained(build_tiny_pipeline({str(tmp_path / "tiny")!r}))
images = pipe("a cat", num_inference_steps=2, scheduler="euler_a")
assert images.shape == (1, 64, 64, 3)
loaded = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print("LOADED", loaded)
assert not loaded, loaded
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout
