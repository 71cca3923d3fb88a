"""Adapter files against PyTorch diffusers: Flax -> file -> PyTorch, PEFT -> file -> Flax, and bad files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.numpy import load_file, save_file

from flax_lora.formats import AdapterFormatError, load_adapter, read_adapter_base_model, save_adapter
from flax_lora.loading import load_pipeline
from flax_lora.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, LoraConfig, new_adapter

PROMPTS = ["a red square", "two blue dots"]


def _random_adapter(pipe, name):
    """An adapter with rank != alpha, extra targets, and non-zero weights everywhere."""
    adapter = new_adapter(
        jax.random.key(0),
        pipe.params,
        LoraConfig(rank=4, alpha=6, target_modules=UNET_TARGETS + ("proj_in", "proj_out", "ff.net.2")),
        LoraConfig(rank=2, alpha=5, target_modules=TEXT_ENCODER_TARGETS + ("fc1",)),
        base_model=name,
    )
    leaves, treedef = jax.tree_util.tree_flatten(adapter.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapter.params = jax.tree_util.tree_unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return adapter


def _inputs(pipe):
    rng = np.random.default_rng(0)
    ids = pipe.tokenizer(PROMPTS)
    return ids, rng.standard_normal((2, 4, 8, 8)).astype(np.float32), np.array([20, 400])


def _flax_forward(pipe, adapter, scale=1.0):
    """Text embeddings and UNet output of the Flax pipeline with an adapter."""
    ids, latents, timesteps = _inputs(pipe)
    text = pipe.encode_text(pipe.params, ids, (adapter.scope_layers("text_encoder", scale),))
    noise = pipe.predict_noise(pipe.params, latents, jnp.asarray(timesteps), text, (adapter.scope_layers("unet", scale),))
    return np.asarray(text), np.asarray(noise)


def _torch_forward(torch_pipe, pipe, scale=1.0):
    """The same with PyTorch diffusers (adapter already loaded); the scale goes through set_adapters."""
    ids, latents, timesteps = _inputs(pipe)
    if scale != 1.0:
        torch_pipe.set_adapters(torch_pipe.get_active_adapters(), adapter_weights=scale)
    with torch.no_grad():
        text = torch_pipe.text_encoder(torch.from_numpy(ids).long())[0]
        noise = torch_pipe.unet(torch.from_numpy(latents), torch.from_numpy(timesteps), text).sample
    return text.numpy(), noise.numpy()


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_flax_adapter_loads_in_pytorch_with_the_same_outputs(kind, tiny_sd1_path, tiny_sd2_path, tmp_path):
    path = tiny_sd1_path if kind == "sd1" else tiny_sd2_path
    pipe = load_pipeline(path)
    adapter = _random_adapter(pipe, path)
    flax_text, flax_noise = _flax_forward(pipe, adapter)
    _, base_noise = _flax_forward(pipe, new_adapter(jax.random.key(0), pipe.params, LoraConfig()))
    assert np.abs(flax_noise - base_noise).max() > 1e-2
    for format in ("diffusers", "kohya"):
        file = save_adapter(adapter, tmp_path / format, format=format)
        torch_pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
        torch_pipe.load_lora_weights(str(tmp_path / format), weight_name=file.rsplit("/", 1)[-1])
        torch_text, torch_noise = _torch_forward(torch_pipe, pipe)
        np.testing.assert_allclose(flax_text, torch_text, atol=1e-4, err_msg=format)
        np.testing.assert_allclose(flax_noise, torch_noise, atol=1e-4, err_msg=format)
        # Round trip Flax -> file -> Flax is exact.
        again = load_adapter(file, pipe.params)
        assert again.configs["unet"].scale == pytest.approx(1.5) and again.configs["text_encoder"].scale == 2.5
        assert read_adapter_base_model(file) == path
        for a, b in zip(jax.tree_util.tree_leaves(adapter.params), jax.tree_util.tree_leaves(again.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_diffusers_file_keeps_alpha_in_the_header(tiny_sd1_path, tmp_path):
    from safetensors import safe_open

    pipe = load_pipeline(tiny_sd1_path)
    adapter = new_adapter(jax.random.key(0), pipe.params, LoraConfig(rank=4, alpha=8), LoraConfig(rank=4, alpha=2, target_modules=TEXT_ENCODER_TARGETS))
    file = save_adapter(adapter, tmp_path)
    assert file.endswith("pytorch_lora_weights.safetensors")
    with safe_open(file, framework="np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert meta["unet.lora_alpha"] == 8 and meta["unet.r"] == 4 and meta["text_encoder.lora_alpha"] == 2
    assert any(k.startswith("unet.") and k.endswith(".to_q.lora.down.weight") for k in keys)
    assert any(k.startswith("text_encoder.") and k.endswith(".q_proj.lora_linear_layer.up.weight") for k in keys)


def test_peft_adapter_made_in_pytorch_imports_into_flax(tiny_sd1_path, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from diffusers.utils import convert_state_dict_to_diffusers

    torch.manual_seed(0)
    torch_pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_path, safety_checker=None)
    unet_config = PeftLoraConfig(r=4, lora_alpha=3, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    text_config = PeftLoraConfig(r=2, lora_alpha=7, init_lora_weights=False, target_modules=list(TEXT_ENCODER_TARGETS))
    torch_pipe.unet.add_adapter(unet_config)
    # transformers 5's own add_adapter wants peft>=0.22; peft's injection is what it calls underneath.
    inject_adapter_in_model(text_config, torch_pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(torch_pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(torch_pipe.text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    torch_text, torch_noise = _torch_forward(torch_pipe, load_pipeline(tiny_sd1_path))

    pipe = load_pipeline(tiny_sd1_path)
    adapter = load_adapter(tmp_path, pipe.params)
    assert adapter.configs["unet"].scale == pytest.approx(0.75) and adapter.configs["text_encoder"].scale == 3.5
    flax_text, flax_noise = _flax_forward(pipe, adapter)
    np.testing.assert_allclose(flax_text, torch_text, atol=1e-4)
    np.testing.assert_allclose(flax_noise, torch_noise, atol=1e-4)

    # Raw PEFT keys (lora_A/lora_B, no prefix) read the same way.
    peft_file = tmp_path / "peft" / "adapter_model.safetensors"
    peft_file.parent.mkdir()
    save_file({k: v.numpy() for k, v in get_peft_model_state_dict(torch_pipe.unet).items()}, str(peft_file))
    peft_adapter = load_adapter(peft_file, pipe.params)
    assert peft_adapter.configs["unet"].scale == 1.0  # no header: alpha = r, as diffusers assumes
    for a, b in zip(jax.tree_util.tree_leaves(peft_adapter.params["unet"]), jax.tree_util.tree_leaves(adapter.params["unet"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kohya_per_module_alpha_is_kept(tiny_sd1_path, tmp_path):
    pipe = load_pipeline(tiny_sd1_path)
    adapter = new_adapter(jax.random.key(0), pipe.params, LoraConfig(rank=4, alpha=4, target_modules=("to_q", "to_k")))
    adapter.params = jax.tree_util.tree_map(lambda x: x + 0.1, adapter.params)
    file = save_adapter(adapter, tmp_path / "k.safetensors", format="kohya")
    tensors = load_file(file)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"
    assert float(tensors[f"{name}.alpha"]) == 4.0
    tensors[f"{name}.alpha"] = np.asarray(2.0, dtype=np.float32)  # this module at half strength
    save_file(tensors, file)
    again = load_adapter(file, pipe.params)
    path = ("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_k")
    np.testing.assert_allclose(
        np.asarray(again.params["unet"][path[0]][path[1]][path[2]][path[3]][path[4]]["up"]),
        0.5 * np.asarray(adapter.params["unet"][path[0]][path[1]][path[2]][path[3]][path[4]]["up"]),
        rtol=1e-6,
    )


def test_bad_adapter_files_are_clear_errors(tiny_sd1_path, tmp_path):
    pipe = load_pipeline(tiny_sd1_path)
    adapter = new_adapter(jax.random.key(0), pipe.params, LoraConfig(rank=4))
    file = save_adapter(adapter, tmp_path / "good.safetensors")
    tensors = load_file(file)

    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        load_adapter(tmp_path / "missing.safetensors", pipe.params)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(file, "rb").read()[:-100])
    with pytest.raises(AdapterFormatError, match="truncated.safetensors is not a readable safetensors adapter"):
        load_adapter(truncated, pipe.params)

    unknown = dict(tensors)
    unknown["unet.down_blocks.7.attentions.0.to_q.lora.down.weight"] = np.zeros((4, 32), np.float32)
    save_file(unknown, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"names module 'unet\.down_blocks\.7\.attentions\.0\.to_q'.*another model"):
        load_adapter(tmp_path / "unknown.safetensors", pipe.params)

    wrong = dict(tensors)
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight"
    wrong[key] = np.zeros((4, 768), np.float32)  # an SD 1.5 cross-attention width
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"attn2\.to_k down has shape \(4, 768\) but the base model needs \(4, 32\)"):
        load_adapter(tmp_path / "wrong.safetensors", pipe.params)

    half = {k: v for k, v in tensors.items() if not k.endswith("up.weight")}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(AdapterFormatError, match="needs both down and up"):
        load_adapter(tmp_path / "half.safetensors", pipe.params)

    not_lora = {"unet.conv_in.weight": np.zeros((4, 4, 3, 3), np.float32)}
    save_file(not_lora, str(tmp_path / "not_lora.safetensors"))
    with pytest.raises(AdapterFormatError, match="is not a LoRA weight"):
        load_adapter(tmp_path / "not_lora.safetensors", pipe.params)


def test_save_never_leaves_a_partial_file(tiny_sd1_path, tmp_path):
    pipe = load_pipeline(tiny_sd1_path)
    adapter = new_adapter(jax.random.key(0), pipe.params, LoraConfig(rank=4))
    file = save_adapter(adapter, tmp_path)
    before = open(file, "rb").read()
    adapter.params["unet"] = {"bad": {"down": np.zeros((2, 2)), "up": object()}}  # fails while serialising
    with pytest.raises(Exception):
        save_adapter(adapter, tmp_path)
    assert open(file, "rb").read() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_lora_weights.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(file).st_mode & 0o777 == 0o666 & ~umask  # like any other file the user creates
