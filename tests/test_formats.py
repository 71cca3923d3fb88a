"""Adapter files against PyTorch: Flax -> file -> diffusers; files diffusers, PEFT and kohya write -> Flax; refusals.

"Same effective weights" means scale * B @ A per module, ours against what PEFT's LoRA layers apply in PyTorch.
"""

import contextlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.numpy import load_file, save_file

from flax_lora.formats import AdapterFormatError, load_adapter, read_adapter_base_model, save_adapter
from flax_lora.loading import load_pipeline
from flax_lora.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, LoraConfig, lora_modules, new_adapter, pt_module_path

PROMPTS = ["a red square", "two blue dots"]
# PEFT configs with every scaling rule PEFT has: rsLoRA, per-module ranks and alphas (suffix and full-path patterns).
UNET_PEFT = dict(
    r=4, lora_alpha=3, use_rslora=True, init_lora_weights=False,
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
    rank_pattern={"attn2.to_k": 2}, alpha_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 9},
)
TEXT_PEFT = dict(
    r=2, lora_alpha=7, init_lora_weights=False, target_modules=list(TEXT_ENCODER_TARGETS) + ["fc1"],
    rank_pattern={"layers.0.self_attn.q_proj": 3}, alpha_pattern={"out_proj": 1.5},
)


@pytest.fixture(scope="module")
def sd1(tiny_sd1_path):
    return load_pipeline(tiny_sd1_path)


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


def _flax_deltas(adapter) -> dict[str, np.ndarray]:
    """scale * B @ A per module in PyTorch's layout, keyed `component.module` (CLIP names without `text_model.`)."""
    deltas = {}
    for component, tree in adapter.params.items():
        for path, (down, up) in lora_modules(tree).items():
            down, up = np.asarray(down), np.asarray(up)
            delta = adapter.configs[component].scale * (down.reshape(-1, down.shape[-1]) @ up.reshape(-1, up.shape[-1])).T
            deltas[f"{component}.{pt_module_path(path).removeprefix('text_model.')}"] = delta.reshape(
                delta.shape + (1, 1) if down.ndim == 4 else delta.shape
            )
    return deltas


def _torch_deltas(**models: torch.nn.Module) -> dict[str, np.ndarray]:
    """What PEFT's LoRA layers add to each weight (scaling * B @ A), keyed like `_flax_deltas`."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for component, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                (adapter_name,) = module.active_adapters
                name = name.removeprefix("base_model.model.").removeprefix("text_model.")
                deltas[f"{component}.{name}"] = module.get_delta_weight(adapter_name).detach().numpy()
    return deltas


def _assert_same_deltas(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, delta in ours.items():
        np.testing.assert_allclose(delta, theirs[name], rtol=1e-5, atol=1e-7, err_msg=name)


@contextlib.contextmanager
def _lora_warnings():
    """Collect what diffusers, PEFT and transformers warn about LoRA keys and modules while loading."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:  # diffusers' loggers do not propagate to the root, so caplog would miss them
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(str(w.message) for w in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    records[:] = [r for r in records if re.search(r"lora|adapter|target|unexpected|missing", r, re.IGNORECASE)]


def torch_peft_pipeline(path, unet_peft=UNET_PEFT, text_peft=TEXT_PEFT, text_2_peft=None):
    """A PyTorch pipeline with random PEFT adapters of these configs on its UNet and text encoder.

    With `text_2_peft` it is an SDXL pipeline with a third adapter on text_encoder_2, whose config comes back last.
    """
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    if text_2_peft is None:
        torch_pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    else:
        torch_pipe = StableDiffusionXLPipeline.from_pretrained(path)
    unet_config, text_config = PeftLoraConfig(**unet_peft), PeftLoraConfig(**text_peft)
    torch_pipe.unet.add_adapter(unet_config)
    # transformers 5's own add_adapter wants peft>=0.22; peft's injection is what it calls underneath.
    inject_adapter_in_model(text_config, torch_pipe.text_encoder)
    if text_2_peft is None:
        return torch_pipe, unet_config, text_config
    text_2_config = PeftLoraConfig(**text_2_peft)
    inject_adapter_in_model(text_2_config, torch_pipe.text_encoder_2)
    return torch_pipe, unet_config, text_config, text_2_config


def save_peft_lora(torch_pipe, unet_config, text_config, folder, text_2_config=None) -> None:
    """What diffusers' training scripts save for PEFT adapters: save_lora_weights with every config in the header."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(model):
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))

    kwargs = dict(
        unet_lora_layers=layers(torch_pipe.unet),
        text_encoder_lora_layers=layers(torch_pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    if text_2_config is None:
        StableDiffusionPipeline.save_lora_weights(folder, **kwargs)
    else:
        StableDiffusionXLPipeline.save_lora_weights(
            folder,
            **kwargs,
            text_encoder_2_lora_layers=layers(torch_pipe.text_encoder_2),
            text_encoder_2_lora_adapter_metadata=text_2_config.to_dict(),
        )


# ----------------------------------------------------------------------------------------------- export


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
        with _lora_warnings() as complaints:
            torch_pipe.load_lora_weights(str(tmp_path / format), weight_name=file.rsplit("/", 1)[-1])
        assert complaints == [], format  # no unmatched module or key, text encoder included
        _assert_same_deltas(_flax_deltas(adapter), _torch_deltas(unet=torch_pipe.unet, text_encoder=torch_pipe.text_encoder))
        torch_text, torch_noise = _torch_forward(torch_pipe, pipe)
        np.testing.assert_allclose(flax_text, torch_text, atol=1e-4, err_msg=format)
        np.testing.assert_allclose(flax_noise, torch_noise, atol=1e-4, err_msg=format)
        # Round trip Flax -> file -> Flax keeps rank, alpha and weights (the diffusers file's folded scale comes out).
        again = load_adapter(file, pipe.params)
        assert again.configs["unet"].scale == pytest.approx(1.5) and again.configs["text_encoder"].scale == 2.5
        assert again.configs["unet"].lora_alpha == pytest.approx(6) and again.configs["text_encoder"].rank == 2
        assert read_adapter_base_model(file) == path
        for a, b in zip(jax.tree_util.tree_leaves(adapter.params), jax.tree_util.tree_leaves(again.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_diffusers_file_header_applies_our_scale_in_every_diffusers(sd1, tmp_path):
    from safetensors import safe_open

    adapter = new_adapter(
        jax.random.key(0), sd1.params, LoraConfig(rank=4, alpha=8), LoraConfig(rank=4, alpha=2, target_modules=TEXT_ENCODER_TARGETS)
    )
    adapter.params = jax.tree_util.tree_map(lambda x: x + 0.1, adapter.params)
    file = save_adapter(adapter, tmp_path)
    assert file.endswith("pytorch_lora_weights.safetensors")
    with safe_open(file, framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    peft = json.loads(meta["lora_adapter_metadata"])
    # diffusers <= 0.33 ignores the header and applies scale 1: the weights carry alpha/rank, the header says 1.
    assert peft["unet.lora_alpha"] == peft["unet.r"] == 4 and peft["text_encoder.lora_alpha"] == 4
    assert json.loads(meta["flax_lora_alpha"]) == {"unet": {"r": 4, "lora_alpha": 8}, "text_encoder": {"r": 4, "lora_alpha": 2}}
    assert not any(t.startswith("text_model.") for t in peft["text_encoder.target_modules"])  # both CLIP layouts
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight"
    up = adapter.params["unet"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["up"]
    np.testing.assert_allclose(tensors[key], 2.0 * np.asarray(up).T, rtol=1e-6)
    assert any(k.startswith("text_encoder.") and k.endswith(".q_proj.lora_linear_layer.up.weight") for k in tensors)


# ----------------------------------------------------------------------------------------------- import


def test_diffusers_file_with_rslora_and_patterns_imports_exactly(tiny_sd1_path, sd1, tmp_path, caplog):
    torch_pipe, unet_config, text_config = torch_peft_pipeline(tiny_sd1_path)
    save_peft_lora(torch_pipe, unet_config, text_config, tmp_path)
    torch_deltas = _torch_deltas(unet=torch_pipe.unet, text_encoder=torch_pipe.text_encoder)
    torch_text, torch_noise = _torch_forward(torch_pipe, sd1)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(file))
    assert any(k.startswith("text_encoder.encoder.layers.") for k in tensors)  # transformers 5 names

    adapter = load_adapter(tmp_path, sd1.params)
    assert adapter.configs["unet"].scale == pytest.approx(3 / 2)  # rsLoRA: alpha / sqrt(r)
    # diffusers wrote proj_in with PEFT names beside .lora.down attention keys: we apply both, and say diffusers may not.
    assert "mix PEFT (lora_A/lora_B) and diffusers (lora.down/lora.up) names" in caplog.text
    _assert_same_deltas(_flax_deltas(adapter), torch_deltas)
    flax_text, flax_noise = _flax_forward(sd1, adapter)
    np.testing.assert_allclose(flax_text, torch_text, atol=1e-4)
    np.testing.assert_allclose(flax_noise, torch_noise, atol=1e-4)

    # The same file as transformers 4.x pipelines wrote it (`text_encoder.text_model.` keys) reads the same.
    old = tmp_path / "old" / "pytorch_lora_weights.safetensors"
    old.parent.mkdir()
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    save_file({k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in tensors.items()}, str(old), header)
    _assert_same_deltas(_flax_deltas(load_adapter(old, sd1.params)), torch_deltas)


def test_peft_files_of_one_model_import_exactly(tiny_sd1_path, sd1, tmp_path):
    """PEFT's save_pretrained folders (UNet and CLIP, safetensors and .bin), diffusers' save_lora_adapter, bare state dicts."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = get_peft_model(UNet2DConditionModel.from_pretrained(tiny_sd1_path, subfolder="unet"), PeftLoraConfig(**UNET_PEFT))
    unet.save_pretrained(tmp_path / "peft-unet")
    text_encoder = get_peft_model(CLIPTextModel.from_pretrained(tiny_sd1_path, subfolder="text_encoder"), PeftLoraConfig(**TEXT_PEFT))
    text_encoder.save_pretrained(tmp_path / "peft-text", safe_serialization=False)
    assert (tmp_path / "peft-text" / "adapter_model.bin").exists()
    keys = load_file(str(tmp_path / "peft-unet" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in keys)

    unet_adapter = load_adapter(tmp_path / "peft-unet", sd1.params)
    text_adapter = load_adapter(tmp_path / "peft-text", sd1.params)
    assert list(unet_adapter.params) == ["unet"] and list(text_adapter.params) == ["text_encoder"]
    _assert_same_deltas(_flax_deltas(unet_adapter), _torch_deltas(unet=unet))
    _assert_same_deltas(_flax_deltas(text_adapter), _torch_deltas(text_encoder=text_encoder))

    # diffusers' model-level save_lora_adapter: bare keys, an unprefixed PEFT header.
    torch.manual_seed(1)
    model = UNet2DConditionModel.from_pretrained(tiny_sd1_path, subfolder="unet")
    model.add_adapter(PeftLoraConfig(**UNET_PEFT))
    model.save_lora_adapter(tmp_path / "model")
    _assert_same_deltas(_flax_deltas(load_adapter(tmp_path / "model", sd1.params)), _torch_deltas(unet=model))

    # A bare state dict with no config at all: scale 1 per module, as diffusers and PEFT assume.
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.numpy() for k, v in get_peft_model_state_dict(model).items()}, str(bare))
    adapter = load_adapter(bare, sd1.params)
    assert {adapter.configs["unet"].scale} == {1.0}
    assert adapter.configs["unet"].rank == 4 and any(len(m) for m in [adapter.params["unet"]])


def test_kohya_per_module_alpha_is_kept(sd1, tmp_path):
    adapter = new_adapter(jax.random.key(0), sd1.params, LoraConfig(rank=4, alpha=4, target_modules=("to_q", "to_k")))
    adapter.params = jax.tree_util.tree_map(lambda x: x + 0.1, adapter.params)
    file = save_adapter(adapter, tmp_path / "k.safetensors", format="kohya")
    tensors = load_file(file)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"
    assert float(tensors[f"{name}.alpha"]) == 4.0
    tensors[f"{name}.alpha"] = np.asarray(2.0, dtype=np.float32)  # this module at half strength
    save_file(tensors, file)
    again = load_adapter(file, sd1.params)
    path = ("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_k")
    np.testing.assert_allclose(
        np.asarray(again.params["unet"][path[0]][path[1]][path[2]][path[3]][path[4]]["up"]),
        0.5 * np.asarray(adapter.params["unet"][path[0]][path[1]][path[2]][path[3]][path[4]]["up"]),
        rtol=1e-6,
    )


# ----------------------------------------------------------------------------------------------- refusals


def _peft_folder(tmp_path: Path, tiny_sd1_path: str, config) -> Path:
    """What PEFT's save_pretrained writes for this config on the tiny UNet."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(UNet2DConditionModel.from_pretrained(tiny_sd1_path, subfolder="unet"), config)
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def _model_file(tmp_path: Path, tiny_sd1_path: str, config) -> Path:
    """What diffusers' save_lora_adapter writes for this PEFT config on the tiny UNet."""
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_pretrained(tiny_sd1_path, subfolder="unet")
    model.add_adapter(config)
    model.save_lora_adapter(tmp_path / "model")
    return tmp_path / "model" / "pytorch_lora_weights.safetensors"


def _edited_config(folder: Path, **fields) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return folder


def _without_header(file: Path) -> Path:
    bare = file.with_name("bare.safetensors")
    save_file(load_file(str(file)), str(bare))
    return bare


def _refused_files(tmp_path: Path, tiny_sd1_path: str, case: str) -> Path:
    """A file each refusal case is about, written by PEFT/diffusers where they write it, else by hand."""
    from peft import LoHaConfig, LoKrConfig
    from peft import LoraConfig as PeftLoraConfig

    lora = dict(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    if case == "lora_bias":
        return _model_file(tmp_path, tiny_sd1_path, PeftLoraConfig(**lora, lora_bias=True))
    if case == "loha":
        return _peft_folder(tmp_path, tiny_sd1_path, LoHaConfig(r=4, target_modules=["to_q"]))
    if case == "lokr_keys":
        folder = _peft_folder(tmp_path, tiny_sd1_path, LoKrConfig(r=4, target_modules=["to_q"]))
        return _without_header(folder / "adapter_model.safetensors")
    if case == "pissa":
        return _edited_config(_peft_folder(tmp_path, tiny_sd1_path, PeftLoraConfig(**lora)), init_lora_weights="pissa")
    if case == "unknown_setting":
        folder = _peft_folder(tmp_path, tiny_sd1_path, PeftLoraConfig(**lora))
        return _edited_config(folder, alora_invocation_tokens=[5, 6])
    if case == "bias_all":
        return _edited_config(_peft_folder(tmp_path, tiny_sd1_path, PeftLoraConfig(**lora)), bias="all")
    if case == "rank_mismatch":
        return _edited_config(_peft_folder(tmp_path, tiny_sd1_path, PeftLoraConfig(**lora)), r=8)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    if case == "locon":  # a conv LoRA whose down is not the base 3x3 conv's window (tests/test_locon.py: the rest)
        tensors = {f"{name}.lora_down.weight": np.zeros((4, 32, 1, 1), np.float32), f"{name}.lora_up.weight": np.zeros((32, 4, 1, 1), np.float32)}
    else:  # LyCORIS DoRA: kohya keys plus a dora_scale
        tensors = {f"{name}.lora_down.weight": np.zeros((4, 32 * 9), np.float32), f"{name}.dora_scale": np.ones((1, 32 * 9), np.float32)}
    save_file(tensors, str(tmp_path / "lycoris.safetensors"))
    return tmp_path / "lycoris.safetensors"


@pytest.mark.parametrize(
    "case, message",
    [
        ("lycoris_dora", r"dora_scale' is kohya/LyCORIS DoRA"),  # PEFT's DoRA loads: tests/test_dora.py
        ("lora_bias", r"lora_bias=True is a PEFT setting flax-lora does not implement"),
        ("loha", r"adapter_config.json: peft_type is LOHA"),
        ("lokr_keys", r"lokr_w1.* is LoKr"),
        ("pissa", r"init_lora_weights='pissa' changes the base weights"),
        ("unknown_setting", r"alora_invocation_tokens=\[5, 6\] is a PEFT setting flax-lora does not implement"),
        ("bias_all", r"bias='all' trains the base biases too"),
        ("rank_mismatch", r"adapter_config.json gives module '.*' rank 8, but its weights have rank 4"),
        ("locon", r"conv1 down is a 1x1 conv LoRA weight .* must be a 3x3 conv"),
    ],
)
def test_adapters_we_cannot_apply_exactly_are_refused_by_file_and_field(case, message, tiny_sd1_path, sd1, tmp_path):
    path = _refused_files(tmp_path, tiny_sd1_path, case)
    with pytest.raises(AdapterFormatError, match=message) as error:
        load_adapter(path, sd1.params)
    assert str(tmp_path) in str(error.value)  # the file is named


def test_bad_adapter_files_are_clear_errors(sd1, tmp_path):
    adapter = new_adapter(jax.random.key(0), sd1.params, LoraConfig(rank=4))
    file = save_adapter(adapter, tmp_path / "good.safetensors")
    tensors = load_file(file)

    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        load_adapter(tmp_path / "missing.safetensors", sd1.params)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(file, "rb").read()[:-100])
    with pytest.raises(AdapterFormatError, match="truncated.safetensors is not a readable safetensors adapter"):
        load_adapter(truncated, sd1.params)

    unknown = dict(tensors)
    unknown["unet.down_blocks.7.attentions.0.to_q.lora.down.weight"] = np.zeros((4, 32), np.float32)
    save_file(unknown, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"names module 'unet\.down_blocks\.7\.attentions\.0\.to_q'.*another model"):
        load_adapter(tmp_path / "unknown.safetensors", sd1.params)

    sdxl = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 32), np.float32)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"lora_te2_.*is an SDXL one.*the base model is not SDXL"):
        load_adapter(tmp_path / "sdxl.safetensors", sd1.params)

    wrong = dict(tensors)
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight"
    wrong[key] = np.zeros((4, 768), np.float32)  # an SD 1.5 cross-attention width
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"attn2\.to_k down has shape \(4, 768\) but the base model needs \(4, 32\)"):
        load_adapter(tmp_path / "wrong.safetensors", sd1.params)

    half = {k: v for k, v in tensors.items() if not k.endswith("up.weight")}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(AdapterFormatError, match="needs both down and up"):
        load_adapter(tmp_path / "half.safetensors", sd1.params)

    not_lora = {"unet.conv_in.weight": np.zeros((4, 4, 3, 3), np.float32)}
    save_file(not_lora, str(tmp_path / "not_lora.safetensors"))
    with pytest.raises(AdapterFormatError, match="is not a LoRA weight"):
        load_adapter(tmp_path / "not_lora.safetensors", sd1.params)

    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    save_file(tensors, str(tmp_path / "bad_header.safetensors"), {**header, "lora_adapter_metadata": "{not json"})
    with pytest.raises(AdapterFormatError, match=r"bad_header.safetensors \(header lora_adapter_metadata\) is not valid JSON"):
        load_adapter(tmp_path / "bad_header.safetensors", sd1.params)


def test_save_never_leaves_a_partial_file(sd1, tmp_path):
    adapter = new_adapter(jax.random.key(0), sd1.params, LoraConfig(rank=4))
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


def test_readme_adapter_table_names_only_tests_that_exist():
    """Every row of README's adapter-file table names the tests that cover it, and those tests exist."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("<!-- adapter-table -->")[1]
    rows = [line for line in table.splitlines() if line.startswith("|") and not line.startswith("|-")][1:]
    assert len(rows) >= 8
    sources = {p.name: p.read_text() for p in Path(__file__).parent.glob("test_*.py")}
    for row in rows:
        named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row)
        assert named, f"README adapter table row names no test: {row}"
        for module, test in named:
            assert f"def {test}(" in sources.get(module, ""), f"{module}::{test} (README adapter table) does not exist"
