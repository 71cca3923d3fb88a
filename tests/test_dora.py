"""DoRA (PEFT's use_dora): the layer math and its gradients against PEFT, training, diffusers/PEFT files both ways
(UNet outputs and whole images against PyTorch diffusers), fusing, and the refusals."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

from flax_lora.errors import UserError
from flax_lora.formats import AdapterFormatError, load_adapter, save_adapter
from flax_lora.inference import FlaxLoraPipeline
from flax_lora.lora import (
    LORA, TEXT_ENCODER_TARGETS, DoraOverlapError, LoraConfig, dora_magnitudes, lora_variables, merge_lora, new_adapter,
)
from flax_lora.models.layers import Conv2d, Linear
from tests.test_formats import _flax_forward, _inputs, _lora_warnings, _torch_forward
from tests.test_inference import ONE_LEVEL, PROMPT, _pt_images, _pt_pipeline

UNET_DORA = ("to_q", "to_k", "to_v", "to_out.0", "proj_in")  # proj_in: the SD1 UNet's 1x1 convs
STEPS = 6


@pytest.fixture(scope="module")
def sd1(tiny_sd1_path):
    """The tiny SD1 pipeline in Flax (sharded over the 8 test devices)."""
    return FlaxLoraPipeline.from_pretrained(tiny_sd1_path)


@pytest.fixture(scope="module")
def init_latents():
    return np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)


def _dora_adapter(pipe, base_model=None):
    """A DoRA adapter on UNet (attention + 1x1 convs) and text encoder, with random `up` and moved magnitudes."""
    adapter = new_adapter(
        jax.random.key(0), pipe.params, LoraConfig(rank=4, alpha=8, target_modules=UNET_DORA, use_dora=True),
        LoraConfig(rank=2, alpha=3, target_modules=TEXT_ENCODER_TARGETS, use_dora=True), base_model=base_model,
    )
    rng = np.random.default_rng(1)
    for component, tree in adapter.params.items():
        flat = flatten_dict(tree)
        for key, value in flat.items():
            if key[-1] == "up":
                flat[key] = jnp.asarray(rng.normal(0.0, 0.1, value.shape).astype(np.float32))
            elif key[-1] == "magnitude":
                flat[key] = value * jnp.asarray(1 + 0.3 * rng.standard_normal(value.shape).astype(np.float32))
        adapter.params[component] = unflatten_dict(flat)
    return adapter


def _peft_dora_pipeline(path):
    """A PyTorch pipeline with random PEFT DoRA adapters (B and magnitudes random) on UNet and text encoder."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    unet_config = PeftLoraConfig(r=4, lora_alpha=6, use_dora=True, init_lora_weights=False, target_modules=list(UNET_DORA))
    text_config = PeftLoraConfig(
        r=2, lora_alpha=5, use_dora=True, init_lora_weights=False, target_modules=list(TEXT_ENCODER_TARGETS),
        rank_pattern={"layers.0.self_attn.q_proj": 3},
    )
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.3 * torch.randn_like(param))
    return pipe, unet_config, text_config


# ------------------------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_dora_layer_output_gradients_and_merge_equal_peft(kind):
    """Output, gradients (norm detached) and the fused kernel of one layer with bias equal PEFT's DoRA layer."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    size, pad = (3, 1) if kind == "conv3x3" else (1, 0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5) if kind == "linear" else torch.nn.Conv2d(6, 5, size, padding=pad))
    peft_config = PeftLoraConfig(r=3, lora_alpha=6, use_dora=True, init_lora_weights=False, target_modules=["0"])
    inject_adapter_in_model(peft_config, model)
    layer = model[0]
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():  # PEFT initialised it to ||W + scale * B @ A||: move it so the factor is not 1
        magnitude.mul_(1 + 0.3 * torch.randn_like(magnitude))
    x = torch.randn(2, 4, 4, 6)
    out = model(x) if kind == "linear" else model(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out.square().sum().backward()

    def flax(t):  # PyTorch (out, in) / OIHW -> Flax (in, out) / HWIO
        t = t.detach().numpy()
        return t.T if t.ndim == 2 else t.transpose(2, 3, 1, 0)

    params = {"kernel": flax(layer.base_layer.weight), "bias": layer.base_layer.bias.detach().numpy()}
    tree = {"down": flax(layer.lora_A["default"].weight), "up": flax(layer.lora_B["default"].weight),
            "magnitude": magnitude.detach().numpy().reshape(-1)}  # fmt: skip
    flax_layer = Linear(5) if kind == "linear" else Conv2d(5, kernel_size=size, padding=pad)

    def apply(tree, params=params):
        return flax_layer.apply({"params": params, LORA: lora_variables(({"m": tree}, 2.0))["m"]}, jnp.asarray(x.numpy()))

    np.testing.assert_allclose(apply(tree), out.detach().numpy(), atol=2e-6)
    grads = jax.grad(lambda t: jnp.sum(apply(t) ** 2))(tree)
    torch_grads = {"down": flax(layer.lora_A["default"].weight.grad), "up": flax(layer.lora_B["default"].weight.grad),
                   "magnitude": magnitude.grad.numpy().reshape(-1)}  # fmt: skip
    for name, grad in torch_grads.items():
        np.testing.assert_allclose(grads[name], grad, rtol=1e-5, atol=1e-4 * np.abs(grad).max(), err_msg=name)
    merged = merge_lora({"m": params}, {"m": tree}, 2.0)["m"]
    np.testing.assert_allclose(flax_layer.apply({"params": merged}, jnp.asarray(x.numpy())), out.detach().numpy(), atol=2e-6)


def test_fresh_dora_adapter_equals_the_base_model_and_plain_lora_is_unchanged(sd1):
    """Magnitudes start at the kernels' norms per output feature, so step 0 is the base model; no DoRA, no magnitude."""
    pipe = sd1.pipe
    adapter = new_adapter(jax.random.key(0), pipe.params, LoraConfig(rank=4, target_modules=UNET_DORA, use_dora=True))
    plain = new_adapter(jax.random.key(0), pipe.params, LoraConfig(rank=4, target_modules=UNET_DORA))
    assert not dora_magnitudes(plain.params["unet"])
    flat = flatten_dict(pipe.params["unet"])
    for path, magnitude in dora_magnitudes(adapter.params["unet"]).items():
        kernel = np.asarray(flat[path + ("kernel",)])
        np.testing.assert_allclose(magnitude, np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), axis=0), rtol=1e-6)
    _, base = _flax_forward(pipe, plain)
    _, fresh = _flax_forward(pipe, adapter)
    np.testing.assert_allclose(fresh, base, atol=1e-5)


# ------------------------------------------------------------------------------------------------ training


def test_training_with_use_dora_lowers_the_loss_trains_magnitudes_and_loads_in_pytorch(tiny_sd1_path, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from flax_lora import train as T
    from flax_lora.data import build_tiny_dataset
    from flax_lora.loading import load_pipeline
    from tests.test_train import _config, _eval_batch, _jax_eval_loss, _torch_eval_loss

    data = build_tiny_dataset(tmp_path / "data", num_images=2, resolution=64)
    flags = dict(max_train_steps=16, checkpointing_steps=8, use_dora=True, learning_rate=1e-2, train_text_encoder=True,
                 cache_text_embeddings=False)  # fmt: skip
    result = T.main(_config(tiny_sd1_path, data, tmp_path / "run", **flags))
    assert result["step"] == 16
    pipe = load_pipeline(tiny_sd1_path)
    adapter = load_adapter(result["adapter"], pipe.params)
    assert adapter.configs["unet"].use_dora and adapter.configs["text_encoder"].use_dora
    flat = flatten_dict(pipe.params["unet"])
    moved = [
        float(np.abs(np.asarray(m) - np.linalg.norm(np.asarray(flat[p + ("kernel",)]).reshape(-1, m.shape[0]), axis=0)).max())
        for p, m in dora_magnitudes(adapter.params["unet"]).items()
    ]
    assert min(moved) > 1e-4, moved  # every magnitude was trained
    assert dora_magnitudes(adapter.params["text_encoder"])

    batch = _eval_batch(pipe, data)
    base_loss, lora_loss = _jax_eval_loss(pipe, None, *batch), _jax_eval_loss(pipe, adapter, *batch)
    assert lora_loss < 0.95 * base_loss, (base_loss, lora_loss)
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd1_path, safety_checker=None)
    sd.scheduler = DDPMScheduler.from_config(sd.scheduler.config)
    with _lora_warnings() as complaints:
        sd.load_lora_weights(os.path.dirname(result["adapter"]), weight_name=os.path.basename(result["adapter"]))
    assert complaints == []
    assert any("lora_magnitude_vector" in n for n, _ in sd.unet.named_parameters())
    np.testing.assert_allclose(_torch_eval_loss(sd, *batch), lora_loss, rtol=2e-3)

    # Resuming from the step-8 checkpoint (magnitudes and their Adam moments in it) ends where the straight run did.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "8", resumed / "checkpoints" / "8")
    again = T.main(_config(tiny_sd1_path, data, resumed, resume_from_checkpoint="latest", **flags))
    a, b = load_file(result["adapter"]), load_file(again["adapter"])
    assert a.keys() == b.keys() and any(k.endswith("lora_magnitude_vector") for k in a)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)


# ------------------------------------------------------------------------------------------------ files


def test_our_dora_export_loads_in_diffusers_with_the_same_outputs_and_images(sd1, tiny_sd1_path, init_latents, tmp_path):
    """Flax -> diffusers file -> load_lora_weights: magnitudes and use_dora applied; UNet, text and images match."""
    adapter = _dora_adapter(sd1.pipe, tiny_sd1_path)
    file = save_adapter(adapter, tmp_path)
    tensors = load_file(file)
    conv_key = "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector"
    assert tensors[conv_key].shape == (1, 32, 1, 1)  # PEFT's conv layout
    assert tensors["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"].ndim == 1
    pt = _pt_pipeline(tiny_sd1_path, "dpm++")
    with _lora_warnings() as complaints:
        pt.load_lora_weights(str(tmp_path))
    assert complaints == []
    magnitudes = [n for model in (pt.unet, pt.text_encoder) for n, _ in model.named_parameters() if "lora_magnitude" in n]
    assert len(magnitudes) == sum(len(dora_magnitudes(t)) for t in adapter.params.values())

    for scale in (1.0, 0.5):  # the multiplier reaches the weight norm too, as PEFT's scaling does
        flax_text, flax_noise = _flax_forward(sd1.pipe, adapter, scale)
        torch_text, torch_noise = _torch_forward(pt, sd1.pipe, scale)
        np.testing.assert_allclose(flax_text, torch_text, atol=1e-4)
        np.testing.assert_allclose(flax_noise, torch_noise, atol=1e-4)
    pt.set_adapters(pt.get_active_adapters(), adapter_weights=1.0)

    sd1.unload_loras()
    base = sd1(PROMPT, num_inference_steps=STEPS, scheduler="dpm++", latents=init_latents)
    sd1.load_lora(file)
    flax_img = sd1(PROMPT, num_inference_steps=STEPS, scheduler="dpm++", latents=init_latents)
    pt_img = _pt_images(pt, init_latents, steps=STEPS)
    diff = np.abs(flax_img - pt_img).mean()
    print(f"our DoRA export: mean |flax - pytorch| = {diff:.2e}")
    assert diff < ONE_LEVEL and np.abs(flax_img - base).mean() > 10 * ONE_LEVEL
    sd1.unload_loras()
    sd1.load_lora(file, fuse=True)  # fused DoRA is the same layer output
    fused = sd1(PROMPT, num_inference_steps=STEPS, scheduler="dpm++", latents=init_latents)
    assert np.abs(fused - flax_img).mean() < ONE_LEVEL / 4
    sd1.unload_loras()

    again = load_adapter(file, sd1.pipe.params)  # round trip: the folded scale comes back out, magnitudes exact
    assert again.configs["unet"].use_dora and again.configs["unet"].scale == 2.0
    for a, b in zip(jax.tree_util.tree_leaves(adapter.params), jax.tree_util.tree_leaves(again.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_peft_dora_files_import_exactly_with_pytorchs_outputs_and_images(sd1, tiny_sd1_path, init_latents, tmp_path, caplog):
    """diffusers' save_lora_weights of PEFT DoRA adapters, PEFT's save_pretrained, and a bare state dict -> ours."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    from tests.test_formats import save_peft_lora

    pt, unet_config, text_config = _peft_dora_pipeline(tiny_sd1_path)
    save_peft_lora(pt, unet_config, text_config, tmp_path / "diffusers")
    torch_text, torch_noise = _torch_forward(pt, sd1.pipe)  # PEFT's layers in memory: the truth
    adapter = load_adapter(tmp_path / "diffusers", sd1.pipe.params)
    assert adapter.configs["unet"].use_dora and adapter.configs["text_encoder"].use_dora
    # diffusers writes text encoder magnitudes in the spelling transformers 5's loader drops: we say so.
    assert "text encoder DoRA magnitudes are named `.lora_magnitude_vector`" in caplog.text
    flax_text, flax_noise = _flax_forward(sd1.pipe, adapter)
    np.testing.assert_allclose(flax_text, torch_text, atol=1e-4)
    np.testing.assert_allclose(flax_noise, torch_noise, atol=1e-4)

    # A UNet DoRA file diffusers wrote, in PyTorch's StableDiffusionPipeline and in ours: the same images. PEFT
    # keys throughout: with proj_in, converted keys mix lora.down and lora_A, and diffusers then drops some.
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "unet", unet_lora_layers=get_peft_model_state_dict(pt.unet), unet_lora_adapter_metadata=unet_config.to_dict()
    )
    pt = _pt_pipeline(tiny_sd1_path, "dpm++")
    with _lora_warnings() as complaints:
        pt.load_lora_weights(str(tmp_path / "unet"))
    assert [c for c in complaints if "No LoRA keys associated to CLIPTextModel" not in c] == []  # a UNet-only file
    sd1.unload_loras()
    sd1.load_lora(tmp_path / "unet")
    flax_img = sd1(PROMPT, num_inference_steps=STEPS, scheduler="dpm++", latents=init_latents)
    sd1.unload_loras()
    base = sd1(PROMPT, num_inference_steps=STEPS, scheduler="dpm++", latents=init_latents)
    diff = np.abs(flax_img - _pt_images(pt, init_latents, steps=STEPS)).mean()
    print(f"PEFT-written DoRA adapter: mean |flax - pytorch| = {diff:.2e}")
    assert diff < ONE_LEVEL and np.abs(flax_img - base).mean() > 10 * ONE_LEVEL

    # PEFT's own save_pretrained folder, and its state dict with no config (diffusers infers use_dora from the keys).
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(1)
    model = get_peft_model(UNet2DConditionModel.from_pretrained(tiny_sd1_path, subfolder="unet"), unet_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.2)
    model.save_pretrained(tmp_path / "peft")
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.numpy() for k, v in get_peft_model_state_dict(model).items()}, str(bare))
    ids, latents, timesteps = _inputs(sd1.pipe)
    with torch.no_grad():
        text = CLIPTextModel.from_pretrained(tiny_sd1_path, subfolder="text_encoder")(torch.from_numpy(ids).long())[0]
        expected = model(torch.from_numpy(latents), torch.from_numpy(timesteps), text).sample.numpy()
    peft_folder = load_adapter(tmp_path / "peft", sd1.pipe.params)
    assert list(peft_folder.params) == ["unet"] and peft_folder.configs["unet"].use_dora
    _, noise = _flax_forward(sd1.pipe, peft_folder)
    np.testing.assert_allclose(noise, expected, atol=1e-4)
    # No config: DoRA from the keys, scale 1 (alpha = r) as diffusers and PEFT assume; the magnitudes as saved.
    bare_adapter = load_adapter(bare, sd1.pipe.params)
    assert bare_adapter.configs["unet"].use_dora and bare_adapter.configs["unet"].scale == 1.0
    for path, magnitude in dora_magnitudes(peft_folder.params["unet"]).items():
        np.testing.assert_array_equal(dora_magnitudes(bare_adapter.params["unet"])[path], magnitude)


# ------------------------------------------------------------------------------------------------ refusals


def test_dora_refusals_name_the_thing(sd1, tiny_sd1_path, tmp_path):
    from flax_lora.config import TrainConfig

    adapter = _dora_adapter(sd1.pipe)
    with pytest.raises(UserError, match="is DoRA, which the kohya format cannot carry"):
        save_adapter(adapter, tmp_path / "k.safetensors", format="kohya")
    with pytest.raises(ValueError, match="--use_dora: the kohya format cannot carry"):
        TrainConfig(use_dora=True, export_formats="diffusers,kohya")

    # A DoRA adapter and another on one module: PEFT's result depends on their order, so never mixed.
    plain = new_adapter(jax.random.key(3), sd1.pipe.params, LoraConfig(rank=2, target_modules=("to_q",)))
    with pytest.raises(DoraOverlapError, match=r"module .*to_q has a DoRA adapter and 1 other"):
        lora_variables(adapter.scope_layers("unet"), plain.scope_layers("unet"))
    sd1.unload_loras()
    sd1.add_lora(plain, name="plain", fuse=True)
    with pytest.raises(DoraOverlapError, match=r"adapters plain and dora both change unet module .*to_q and one is DoRA"):
        sd1.add_lora(adapter, name="dora")
    sd1.unload_loras()
    other = new_adapter(jax.random.key(3), sd1.pipe.params, LoraConfig(rank=2, target_modules=("ff.net.2",)))
    sd1.add_lora(adapter, name="dora")
    sd1.add_lora(other, name="elsewhere")  # adapters on other modules combine freely
    sd1.unload_loras()

    # Files whose DoRA says one thing in the header and another in the keys.
    file = save_adapter(adapter, tmp_path / "d.safetensors")
    tensors = load_file(file)
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    peft = json.loads(header["lora_adapter_metadata"])
    save_file(tensors, str(tmp_path / "false.safetensors"), {**header, "lora_adapter_metadata": json.dumps({**peft, "unet.use_dora": False})})
    with pytest.raises(AdapterFormatError, match=r"false.safetensors: module .* has a lora_magnitude_vector .* use_dora is false"):
        load_adapter(tmp_path / "false.safetensors", sd1.pipe.params)
    dropped = {k: v for k, v in tensors.items() if not (k.startswith("unet.") and k.endswith("to_q.lora_magnitude_vector"))}
    save_file(dropped, str(tmp_path / "missing.safetensors"), header)
    with pytest.raises(AdapterFormatError, match=r"use_dora is true, but module .*to_q' has no lora_magnitude_vector"):
        load_adapter(tmp_path / "missing.safetensors", sd1.pipe.params)
    save_file(dropped, str(tmp_path / "mixed.safetensors"))  # no header: DoRA from the keys, but not on every module
    with pytest.raises(AdapterFormatError, match=r"mixed.safetensors: unet module .* is DoRA .* has no magnitude"):
        load_adapter(tmp_path / "mixed.safetensors", sd1.pipe.params)
    bad = dict(tensors, **{"unet.mid_block.attentions.0.proj_in.lora_magnitude_vector": np.ones((1, 7, 1, 1), np.float32)})
    save_file(bad, str(tmp_path / "shape.safetensors"), header)
    with pytest.raises(AdapterFormatError, match=r"proj_in lora_magnitude_vector has shape \(1, 7, 1, 1\) but the base module has 64"):
        load_adapter(tmp_path / "shape.safetensors", sd1.pipe.params)
