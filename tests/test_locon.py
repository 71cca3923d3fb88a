"""LoCon (LoRA on the UNet's 3x3 convs): config and init, exact merge, training, export to and import from PyTorch.

"Same output" means the UNet's prediction of the tiny SD1 pipeline, ours with the adapter against PyTorch diffusers
with the file loaded by `load_lora_weights` (or PEFT's adapter injected), at the parity tests' tolerance.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from flax_lora.config import TrainConfig
from flax_lora.formats import AdapterFormatError, load_adapter, save_adapter
from flax_lora.loading import load_pipeline
from flax_lora.lora import (
    UNET_CONV_TARGETS, UNET_TARGETS, LoraConfig, init_lora, is_spatial, lora_modules, merge_lora, new_adapter,
    pt_module_path,
)
from tests.test_formats import _lora_warnings, _torch_deltas

CONFIG = LoraConfig(rank=4, alpha=6, target_modules=UNET_TARGETS + UNET_CONV_TARGETS, conv_rank=2, conv_alpha=1)
CONV_MODULES = {  # the tiny SD1 UNet's 3x3 convs kohya's conv_dim trains
    *(f"{block}.resnets.{i}.conv{n}" for block, count in (("down_blocks.0", 1), ("down_blocks.1", 1), ("mid_block", 2),
                                                          ("up_blocks.0", 2), ("up_blocks.1", 2))
      for i in range(count) for n in (1, 2)),
    "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
}  # fmt: skip


@pytest.fixture(scope="module")
def sd1(tiny_sd1_path):
    return load_pipeline(tiny_sd1_path)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    return latents, np.array([20, 400]), rng.standard_normal((2, 7, 32)).astype(np.float32)


def _randomized(adapter, std=0.2):
    """The adapter with non-zero random weights everywhere (up starts at zero)."""
    for component, tree in adapter.params.items():
        flat = flatten_dict(tree)
        keys = jax.random.split(jax.random.key(7), len(flat))
        adapter.params[component] = unflatten_dict(
            {k: std * jax.random.normal(key, v.shape) for key, (k, v) in zip(keys, sorted(flat.items()))}
        )
    return adapter


@pytest.fixture(scope="module")
def locon(sd1):
    return _randomized(new_adapter(jax.random.key(0), sd1.params, CONFIG, base_model="tiny"))


@pytest.fixture(scope="module")
def unet(sd1, inputs):
    """The Flax UNet's output on `inputs` with LoRA layers (and other UNet params when given): one jitted function,
    so each LoRA tree structure compiles once."""
    latents, t, context = (jnp.asarray(x) for x in inputs)
    forward = jax.jit(lambda params, layers: sd1.predict_noise({"unet": params}, latents, t, context, layers))
    return lambda layers=(), unet_params=None: np.asarray(forward(unet_params or sd1.params["unet"], tuple(layers)))


def _torch_unet(model, inputs):
    latents, t, context = (torch.from_numpy(x) for x in inputs)
    with torch.no_grad():
        return model(latents, t, context).sample.numpy()


def _flax_deltas(adapter) -> dict[str, np.ndarray]:
    """Each module's scale * (B @ A) in PyTorch's layout (OIHW for convs), keyed `unet.<module>`."""
    config, deltas = adapter.configs["unet"], {}
    for path, (down, up) in lora_modules(adapter.params["unet"]).items():
        down, up = np.asarray(down, np.float64), np.asarray(up, np.float64)
        delta = (down.reshape(-1, down.shape[-1]) @ up.reshape(-1, up.shape[-1])).reshape(down.shape[:-1] + up.shape[-1:])
        delta = config.module_scale(down.shape) * delta
        deltas[f"unet.{pt_module_path(path)}"] = delta.transpose(3, 2, 0, 1) if delta.ndim == 4 else delta.T
    return deltas


def _assert_same_deltas(ours, theirs):
    assert sorted(ours) == sorted(theirs)
    for name, delta in ours.items():
        np.testing.assert_allclose(delta, theirs[name], rtol=1e-5, atol=1e-7, err_msg=name)


# -------------------------------------------------------------------------------------------- config, merge


def test_conv_modules_get_the_conv_geometry_rank_and_scale(sd1, unet):
    tree = init_lora(jax.random.key(0), sd1.params["unet"], CONFIG)
    modules = {pt_module_path(p): (down.shape, up.shape) for p, (down, up) in lora_modules(tree).items()}
    assert {name for name, (down, _) in modules.items() if is_spatial(down)} == CONV_MODULES
    assert modules["down_blocks.0.downsamplers.0.conv"] == ((3, 3, 32, 2), (1, 1, 2, 32))
    assert modules["up_blocks.0.resnets.0.conv1"] == ((3, 3, 128, 2), (1, 1, 2, 64))
    assert modules["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"] == ((64, 4), (4, 64))
    # Conv modules scale by conv_alpha / conv_rank, the others by alpha / rank.
    assert (CONFIG.scale, CONFIG.conv_scale) == (1.5, 0.5)
    config = LoraConfig(rank=4, alpha=8, target_modules=CONFIG.target_modules, conv_rank=2)
    scales = config.tree_scale(tree, 0.5)
    assert {scales[p] for p in lora_modules(tree) if pt_module_path(p) in CONV_MODULES} == {0.5}  # conv_alpha = conv_rank
    assert {scales[p] for p in lora_modules(tree) if pt_module_path(p) not in CONV_MODULES} == {1.0}
    assert LoraConfig(rank=4, alpha=8).tree_scale(tree) == 2.0  # one number when nothing differs, as before LoCon
    # A fresh LoCon adapter adds exact zeros (up starts at zero); under jit XLA may schedule the base convs beside
    # the LoRA ones differently, hence float rounding rather than bit-equality.
    adapter = new_adapter(jax.random.key(1), sd1.params, config)
    np.testing.assert_allclose(unet(), unet((adapter.scope_layers("unet"),)), atol=2e-6)

    with pytest.raises(ValueError, match=r"conv1 is a 3x3 conv: without conv_rank \(--conv_rank\)"):
        init_lora(jax.random.key(0), sd1.params["unet"], LoraConfig(target_modules=("conv1",)))
    with pytest.raises(ValueError, match="conv_alpha needs conv_rank"):
        LoraConfig(conv_alpha=2)
    # The flags: --conv_dim is kohya's name for --conv_rank; unset means no conv LoRA.
    assert TrainConfig(conv_dim=8).conv_rank == 8 and TrainConfig().conv_rank is None
    with pytest.raises(ValueError, match="--conv_dim 8 and --conv_rank 4 name one rank"):
        TrainConfig(conv_dim=8, conv_rank=4)
    with pytest.raises(ValueError, match="--conv_alpha needs --conv_rank"):
        TrainConfig(conv_alpha=2)
    with pytest.raises(ValueError, match="--conv_rank must be >= 1"):
        TrainConfig(conv_rank=0)


def test_merged_locon_equals_unmerged_and_unmerge_restores(sd1, locon, unet):
    tree, scale = locon.scope_layers("unet", 0.7)
    base, unmerged = unet(), unet(((tree, scale),))
    assert np.abs(unmerged - base).max() > 1e-2
    merged = merge_lora(sd1.params["unet"], tree, scale)
    np.testing.assert_allclose(unet(unet_params=merged), unmerged, atol=1e-5)
    restored = merge_lora(merged, *locon.scope_layers("unet", -0.7))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(sd1.params["unet"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# ----------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_locon_export_loads_in_diffusers_with_the_same_unet_output(format, sd1, locon, unet, inputs, tiny_sd1_path,
                                                                   tmp_path):
    file = save_adapter(locon, tmp_path, format=format)
    torch_pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_path, safety_checker=None)
    with _lora_warnings() as complaints:
        torch_pipe.load_lora_weights(str(tmp_path), weight_name=file.rsplit("/", 1)[-1])
    # Every conv and attention module applied, no key left over (a UNet-only file: nothing for CLIP, as it says).
    assert [c for c in complaints if "CLIPTextModel" not in c] == []
    _assert_same_deltas(_flax_deltas(locon), _torch_deltas(unet=torch_pipe.unet))
    ours = unet((locon.scope_layers("unet"),))
    assert np.abs(ours - unet()).max() > 1e-2
    np.testing.assert_allclose(ours, _torch_unet(torch_pipe.unet, inputs), atol=1e-4)

    with safe_open(file, framework="np") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if format == "kohya":  # kohya's layout: OIHW down/up, a per-module alpha, the LoCon settings in ss_network_args
        name = "lora_unet_down_blocks_0_downsamplers_0_conv"
        assert tensors[f"{name}.lora_down.weight"].shape == (2, 32, 3, 3)
        assert tensors[f"{name}.lora_up.weight"].shape == (32, 2, 1, 1) and float(tensors[f"{name}.alpha"]) == 1.0
        assert float(tensors["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 6.0
        assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    else:  # PEFT's: lora_A/lora_B, the conv modules' rank (alpha = r: our export folds the scale in) by pattern
        peft = json.loads(meta["lora_adapter_metadata"])
        assert tensors["unet.up_blocks.1.resnets.1.conv2.lora_A.weight"].shape == (2, 32, 3, 3)
        conv2 = "up_blocks.1.resnets.1.conv2"
        assert peft["unet.rank_pattern"][conv2] == 2 == peft["unet.alpha_pattern"][conv2]
        assert peft["unet.r"] == 4 and set(CONV_MODULES) <= set(peft["unet.target_modules"])
    # And back: the same weights, rank, alpha, conv_rank and conv_alpha.
    again = load_adapter(file, sd1.params)
    config = again.configs["unet"]
    assert (config.rank, config.lora_alpha, config.conv_rank, config.conv_lora_alpha) == (4, 6, 2, 1)
    for a, b in zip(jax.tree.leaves(locon.params), jax.tree.leaves(again.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_infer_flax_with_a_locon_file_gives_pytorchs_image_and_fuses_exactly(sd1, locon, tiny_sd1_path, tmp_path):
    """infer_flax.py with our kohya LoCon file against diffusers' pipeline with it (same latents, DDIM, no guidance)."""
    import infer_flax
    from PIL import Image

    from flax_lora.inference import FlaxLoraPipeline
    from tests.test_inference import ONE_LEVEL, PROMPT, _pt_pipeline

    file = save_adapter(locon, tmp_path / "locon.safetensors", format="kohya")
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    argv = ["--pretrained_model_name_or_path", tiny_sd1_path, "--lora", file, "--prompt", PROMPT, "--scheduler", "ddim",
            "--num_inference_steps", "3", "--guidance_scale", "1", "--init_latents", str(tmp_path / "latents.npy"),
            "--output", str(tmp_path / "out.png")]  # fmt: skip
    assert infer_flax.main(argv) == 0
    ours = np.asarray(Image.open(tmp_path / "out.png")).astype(np.float32) / 255

    def torch_image(pipe):
        with torch.no_grad():
            out = pipe(PROMPT, num_inference_steps=3, guidance_scale=1.0, latents=torch.from_numpy(latents), output_type="np")
        return out.images[0]

    pt = _pt_pipeline(tiny_sd1_path, "ddim")
    base = torch_image(pt)
    pt.load_lora_weights(str(tmp_path), weight_name="locon.safetensors")
    theirs = torch_image(pt)
    assert np.abs(ours - theirs).mean() < ONE_LEVEL and np.abs(theirs - base).mean() > 10 * ONE_LEVEL

    # --fuse_lora merges each module at its own scale (conv modules at conv_alpha / conv_rank).
    pipeline = FlaxLoraPipeline(sd1)
    pipeline.add_lora(locon, scale=0.5, fuse=True)
    expected = merge_lora(sd1.params["unet"], *locon.scope_layers("unet", 0.5))
    for a, b in zip(jax.tree.leaves(pipeline.params["unet"]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    kernel = ("down_blocks_0", "resnets_0", "conv1", "kernel")
    fused, base_kernel = flatten_dict(pipeline.params["unet"])[kernel], flatten_dict(sd1.params["unet"])[kernel]
    assert np.abs(np.asarray(fused) - np.asarray(base_kernel)).max() > 1e-3


def test_sdxl_locon_exports_with_kohyas_sgm_names_and_loads_in_diffusers(tiny_sdxl_path, tmp_path):
    """kohya's SDXL trainer names the convs the SGM way (in_layers.2, out_layers.3, op, output_blocks.N.2.conv);
    diffusers must apply each module's weights as ours (the SD1 tests above compare UNet outputs too)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = load_pipeline(tiny_sdxl_path)
    adapter = _randomized(new_adapter(jax.random.key(0), pipe.params, CONFIG))
    for format in ("kohya", "diffusers"):
        file = save_adapter(adapter, tmp_path / format, format=format, base_params=pipe.params)
        if format == "kohya":
            names = {k.split(".")[0] for k in load_file(file)}
            assert {"lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_middle_block_2_out_layers_3",
                    "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv"} <= names  # fmt: skip
        torch_pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
        with _lora_warnings() as complaints:
            torch_pipe.load_lora_weights(str(tmp_path / format), weight_name=file.rsplit("/", 1)[-1])
        assert [c for c in complaints if "CLIPTextModel" not in c] == [], format
        _assert_same_deltas(_flax_deltas(adapter), _torch_deltas(unet=torch_pipe.unet))
        again = load_adapter(file, pipe.params)
        assert (again.configs["unet"].conv_rank, again.configs["unet"].conv_scale) == (2, 0.5)


# ----------------------------------------------------------------------------------------------- import


def _kohya_locon(pipe, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0) -> dict[str, np.ndarray]:
    """What kohya's LoRANetwork with conv_dim saves for the tiny SD1 UNet: every Linear and Conv2d of its
    Transformer2DModel, ResnetBlock2D, Downsample2D and Upsample2D modules, named by diffusers path (kohya's SD1 UNet
    keeps diffusers' names); rank/alpha for Linear and 1x1 convs, conv_dim/conv_alpha for 3x3 convs."""
    rng = np.random.default_rng(3)
    tensors = {}
    for path, kernel in sorted(flatten_dict(pipe.params["unet"]).items()):
        name = pt_module_path(path[:-1])
        if path[-1] != "kernel" or not any(part in name for part in (".attentions.", ".resnets.", "samplers.")):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        r, a = (conv_rank, conv_alpha) if is_spatial(kernel.shape) else (rank, alpha)
        fan_in, out = kernel.shape[-2:]
        window = kernel.shape[:2] if kernel.ndim == 4 else ()
        tensors[f"{key}.lora_down.weight"] = rng.normal(0, 0.3, (r, fan_in) + window).astype(np.float32)
        tensors[f"{key}.lora_up.weight"] = rng.normal(0, 0.3, (out, r) + ((1, 1) if window else ())).astype(np.float32)
        tensors[f"{key}.alpha"] = np.asarray(a, np.float32)
    return tensors


def test_kohya_locon_file_imports_with_pytorchs_output(sd1, unet, inputs, tiny_sd1_path, tmp_path):
    tensors = _kohya_locon(sd1)
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight" in tensors  # kohya's Linear/1x1 ones too
    assert tensors["lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight"].shape == (2, 64, 3, 3)
    file = tmp_path / "locon.safetensors"
    save_file(tensors, str(file), {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                                   "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1"})})  # fmt: skip
    adapter = load_adapter(file, sd1.params)
    config = adapter.configs["unet"]
    assert (config.rank, config.scale, config.conv_rank, config.conv_scale) == (4, 0.5, 2, 0.5)
    assert len(lora_modules(adapter.params["unet"])) == len(tensors) // 3

    torch_pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_path, safety_checker=None)
    with _lora_warnings() as complaints:
        torch_pipe.load_lora_weights(str(tmp_path), weight_name=file.name)
    assert [c for c in complaints if "CLIPTextModel" not in c] == []  # (a UNet-only file: nothing for CLIP)
    _assert_same_deltas(_flax_deltas(adapter), _torch_deltas(unet=torch_pipe.unet))
    ours = unet((adapter.scope_layers("unet"),))
    np.testing.assert_allclose(ours, _torch_unet(torch_pipe.unet, inputs), atol=1e-4)


def test_peft_conv_lora_imports_with_pytorchs_output(sd1, unet, inputs, tiny_sd1_path, tmp_path):
    """diffusers' save_lora_weights of PEFT's conv LoRA (per-module ranks and alphas by pattern), and a bare state dict."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    model = UNet2DConditionModel.from_pretrained(tiny_sd1_path, subfolder="unet")
    config = PeftLoraConfig(
        r=4, lora_alpha=6, init_lora_weights=False, rank_pattern={"conv1": 2, "downsamplers.0.conv": 3},
        alpha_pattern={"conv2": 5, "up_blocks.0.upsamplers.0.conv": 1},
        target_modules=["to_q", "to_v", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"],
    )  # fmt: skip
    model.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict())
    torch_out = _torch_unet(model, inputs)

    adapter = load_adapter(tmp_path, sd1.params)
    modules = {pt_module_path(p): down.shape for p, (down, _) in lora_modules(adapter.params["unet"]).items()}
    assert modules["down_blocks.0.resnets.0.conv1"] == (3, 3, 32, 2)
    assert modules["up_blocks.0.resnets.0.conv_shortcut"] == (1, 1, 128, 4)
    _assert_same_deltas(_flax_deltas(adapter), _torch_deltas(unet=model))
    np.testing.assert_allclose(unet((adapter.scope_layers("unet"),)), torch_out, atol=1e-4)

    # No config at all: scale 1 per module, as diffusers and PEFT assume.
    bare = tmp_path / "bare" / "adapter.safetensors"
    bare.parent.mkdir()
    save_file({k: v.numpy() for k, v in get_peft_model_state_dict(model).items()}, str(bare))
    plain = load_adapter(bare, sd1.params)
    assert plain.configs["unet"].scale == plain.configs["unet"].conv_scale == 1.0


# ----------------------------------------------------------------------------------------------- refusals


CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"


@pytest.mark.parametrize(
    "key, shape, message",
    [
        (f"{CONV1}.lora_down.weight", (4, 32, 1, 1),
         r"conv1 down is a 1x1 conv LoRA weight \(4, 32, 1, 1\) on a module with kernel \(3, 3, 32, 32\); a LoRA down "
         r"there must be a 3x3 conv"),
        (f"{CONV1}.lora_down.weight", (4, 32), r"conv1 down is a 2-D \(Linear\) LoRA weight"),
        (f"{CONV1}.lora_up.weight", (32, 4, 3, 3), r"conv1 up is a 3x3 conv LoRA weight.*must be a 1x1 conv"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", (4, 32, 3, 3),
         r"proj_in down is a 3x3 conv.*must be a 1x1 conv"),
        (f"{CONV1}.lora_mid.weight", (4, 4, 3, 3), r"is LoCon with a Tucker core \(lora_mid\)"),
        (f"{CONV1}.hada_w1_a", (32, 4), r"is LoHa"),
    ],
)  # fmt: skip
def test_conv_adapters_we_cannot_apply_exactly_are_refused_by_name(key, shape, message, sd1, tmp_path):
    """LoCon files whose kernel geometry differs from the base conv's, LyCORIS' Tucker LoCon and LoHa on a conv."""
    tensors = {k: v for k, v in _kohya_locon(sd1).items() if "down_blocks_0_resnets_0_conv1." in k or "proj_in." in k}
    tensors[key] = np.zeros(shape, np.float32)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdapterFormatError, match=message) as error:
        load_adapter(tmp_path / "bad.safetensors", sd1.params)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------- training


def test_training_with_conv_rank_lowers_the_loss_trains_conv_modules_and_resumes(sd1, tiny_sd1_path, tmp_path):
    """--conv_dim (kohya's name of --conv_rank) and --conv_alpha through the trainer: LoCon leaves train, both files
    carry them, the loss drops; a checkpoint resumes, and resuming with another --conv_rank is refused."""
    from flax_lora import train as T
    from flax_lora.data import build_tiny_dataset
    from flax_lora.errors import UserError
    from tests.test_train import _config

    data = build_tiny_dataset(tmp_path / "data", num_images=2, resolution=64)
    out = tmp_path / "run"
    kw = dict(conv_dim=2, conv_alpha=1.0, learning_rate=1e-2, checkpointing_steps=20, export_formats="diffusers,kohya")
    result = T.main(_config(tiny_sd1_path, data, out, max_train_steps=20, **kw))
    assert json.loads((out / "train_config.json").read_text())["conv_rank"] == 2

    adapter = load_adapter(out / "pytorch_lora_weights.safetensors", sd1.params)
    config = adapter.configs["unet"]
    assert (config.rank, config.conv_rank, config.conv_scale) == (4, 2, 0.5)
    modules = lora_modules(adapter.params["unet"])
    conv = {pt_module_path(p): up for p, (down, up) in modules.items() if is_spatial(down.shape)}
    assert set(conv) == CONV_MODULES and all(np.abs(np.asarray(up)).max() > 0 for up in conv.values())  # trained
    kohya = load_adapter(out / "lora_kohya.safetensors", sd1.params)
    for a, b in zip(jax.tree.leaves(adapter.params), jax.tree.leaves(kohya.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
    losses = [loss for _, loss in result["loss_history"]]
    assert len(losses) == 20 and np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses  # same seed: same losses

    resume = dict(kw, max_train_steps=21, resume_from_checkpoint="latest")
    with pytest.raises(UserError, match=r"checkpoints/20 does not fit this run.*--conv_rank"):
        T.main(_config(tiny_sd1_path, data, out, **{**resume, "conv_dim": 3}))
    resumed = T.main(_config(tiny_sd1_path, data, out, **resume))
    assert resumed["step"] == 21 and [s for s, _ in resumed["loss_history"]][-1] == 21
