"""SDXL adapter files against PyTorch: three components, kohya's SGM block names, and SD 1.x/SDXL mix-ups refused.

kohya-style files are built here by renaming PEFT weights with SDXL's fixed block arithmetic (3 stages per block of
2 layers), independently of the mapping flax_lora.formats derives from the base UNet's params.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.numpy import load_file, save_file

from flax_lora.formats import AdapterFormatError, adapter_state_dict, load_adapter, save_adapter
from flax_lora.loading import load_pipeline
from flax_lora.lora import (
    LORA, TEXT_ENCODER_TARGETS, UNET_TARGETS, LoraConfig, lora_modules, lora_variables, new_adapter, pt_module_path,
)
from tests.test_formats import (
    PROMPTS,
    TEXT_PEFT,
    UNET_PEFT,
    _assert_same_deltas,
    _flax_deltas,
    _lora_warnings,
    _torch_deltas,
    save_peft_lora,
    torch_peft_pipeline,
)

# Attention, feed-forward and the Linear/1x1 pieces of resnets: every kind of block kohya names differently.
UNET_SDXL_TARGETS = UNET_TARGETS + ("proj_in", "ff.net.2", "time_emb_proj", "conv_shortcut")
UNET_SDXL_PEFT = {
    **UNET_PEFT,
    "target_modules": list(UNET_SDXL_TARGETS),
    "alpha_pattern": {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 9},
}
KOHYA_ALPHAS = {"unet": 3.0, "text_encoder": 1.5, "text_encoder_2": 4.0}
TEXT_2_PEFT = dict(
    r=3, lora_alpha=5, init_lora_weights=False, target_modules=list(TEXT_ENCODER_TARGETS) + ["fc2"],
    rank_pattern={"layers.1.self_attn.k_proj": 2}, alpha_pattern={"q_proj": 2},
)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path):
    return load_pipeline(tiny_sdxl_path)


@pytest.fixture(scope="module")
def sd1(tiny_sd1_path):
    return load_pipeline(tiny_sd1_path)


def _sdxl_adapter(pipe, unet_only=False):
    """An SDXL adapter on all three components (or UNet attention only), rank != alpha everywhere, non-zero weights."""
    adapter = new_adapter(
        jax.random.key(0),
        pipe.params,
        LoraConfig(rank=4, alpha=6, target_modules=UNET_TARGETS if unet_only else UNET_SDXL_TARGETS),
        None if unet_only else LoraConfig(rank=2, alpha=5, target_modules=TEXT_ENCODER_TARGETS + ("fc1",)),
        base_model=pipe.path,
        text_encoder_2_config=None if unet_only else LoraConfig(rank=3, alpha=1.5, target_modules=TEXT_ENCODER_TARGETS),
    )
    leaves, treedef = jax.tree_util.tree_flatten(adapter.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapter.params = jax.tree_util.tree_unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return adapter


def _inputs(pipe):
    """Token ids of both tokenizers, latents, timesteps, a context, and SDXL's added conditioning."""
    rng = np.random.default_rng(0)
    width = pipe.unet.config.cross_attention_dim[0]
    return dict(
        ids=pipe.tokenizer(PROMPTS),
        ids_2=pipe.tokenizer_2(PROMPTS),
        latents=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        timesteps=np.array([20, 400]),
        context=rng.standard_normal((2, 7, width)).astype(np.float32),
        text_embeds=rng.standard_normal((2, 48)).astype(np.float32),
        time_ids=np.array([[64, 64, 0, 0, 64, 64], [48, 64, 8, 0, 64, 64]], np.float32),
    )


def _flax_outputs(pipe, adapter) -> dict[str, np.ndarray]:
    """Both text encoders' states (and projection) and the UNet's output, each with its component's LoRA."""
    x = _inputs(pipe)

    def encoder(component, ids):
        model = pipe.text_encoder if component == "text_encoder" else pipe.text_encoder_2
        return model.apply({"params": pipe.params[component], LORA: lora_variables(adapter.scope_layers(component))}, ids)

    text, text_2 = encoder("text_encoder", x["ids"]), encoder("text_encoder_2", x["ids_2"])
    added = {"text_embeds": jnp.asarray(x["text_embeds"]), "time_ids": jnp.asarray(x["time_ids"])}
    noise = pipe.predict_noise(
        pipe.params, x["latents"], jnp.asarray(x["timesteps"]), x["context"], (adapter.scope_layers("unet"),), added=added
    )
    return {
        "text_encoder": np.asarray(text.last_hidden_state),
        "text_encoder_2": np.asarray(text_2.last_hidden_state),
        "text_encoder_2.text_embeds": np.asarray(text_2.text_embeds),
        "unet": np.asarray(noise),
    }


def _torch_outputs(torch_pipe, pipe) -> dict[str, np.ndarray]:
    """The same with a PyTorch SDXL pipeline (adapter already loaded)."""
    x = _inputs(pipe)
    with torch.no_grad():
        text = torch_pipe.text_encoder(torch.from_numpy(x["ids"]).long())
        text_2 = torch_pipe.text_encoder_2(torch.from_numpy(x["ids_2"]).long())
        added = {"text_embeds": torch.from_numpy(x["text_embeds"]), "time_ids": torch.from_numpy(x["time_ids"])}
        noise = torch_pipe.unet(
            torch.from_numpy(x["latents"]), torch.from_numpy(x["timesteps"]), torch.from_numpy(x["context"]),
            added_cond_kwargs=added,
        ).sample
    return {
        "text_encoder": text.last_hidden_state.numpy(),
        "text_encoder_2": text_2.last_hidden_state.numpy(),
        "text_encoder_2.text_embeds": text_2.text_embeds.numpy(),
        "unet": noise.numpy(),
    }


def _assert_same_outputs(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], what: str) -> None:
    for name, value in ours.items():
        print(f"{what}, {name}: max |ours - PyTorch's| = {np.abs(value - theirs[name]).max():.1e}")  # shown with -s
        np.testing.assert_allclose(value, theirs[name], atol=1e-4, err_msg=f"{what}: {name}")


def _kohya_sgm_name(path: str, layers: int = 2) -> str:
    """kohya's SGM/LDM name of a diffusers UNet module: `layers + 1` stages per block, input stage 0 is conv_in."""
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        side, block, part, layer, rest = match.groups()
        stage = (layers + 1) * int(block) + int(layer) + (side == "down")
        head = f"{'input' if side == 'down' else 'output'}_blocks.{stage}.{int(part == 'attentions')}"
    else:
        part, layer, rest = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path).groups()
        head = f"middle_block.{2 * int(layer) + (part == 'attentions')}"
    rest = {"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}.get(rest, rest)
    return f"lora_unet_{head}.{rest}".replace(".", "_")


def _torch_to_kohya(torch_pipe, sgm: bool, vary_alpha: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A kohya file of a PyTorch pipeline's PEFT weights, and the deltas kohya's rule (alpha / rank per module) gives.

    kohya writes one alpha (network_alpha) for every module; `vary_alpha` gives each module its own, as merged or
    resized files have.
    """
    from peft.utils import get_peft_model_state_dict

    tensors, deltas = {}, {}
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    for component, prefix in prefixes.items():
        state = {k: v.numpy() for k, v in get_peft_model_state_dict(getattr(torch_pipe, component)).items()}
        for i, key in enumerate(sorted(k for k in state if k.endswith(".lora_A.weight"))):
            path = key.removesuffix(".lora_A.weight")
            down, up = state[key], state[f"{path}.lora_B.weight"]
            if component == "unet":
                name = _kohya_sgm_name(path) if sgm else f"lora_unet_{path.replace('.', '_')}"
            else:  # kohya trains transformers 4.x CLIPs: every text-encoder module is under text_model
                name = f"{prefix}_{('text_model.' + path.removeprefix('text_model.')).replace('.', '_')}"
            alpha = down.shape[0] * (0.5 + 0.75 * (i % 3)) if vary_alpha else KOHYA_ALPHAS[component]
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
            tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
            delta = (alpha / down.shape[0]) * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
            deltas[f"{component}.{path.removeprefix('text_model.')}"] = delta.reshape(delta.shape + down.shape[2:])
    return tensors, deltas


def _header(file) -> dict[str, str]:
    with open(file, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]


# ----------------------------------------------------------------------------------------------- export


def test_sdxl_adapter_loads_in_pytorch_with_the_same_outputs(sdxl, tiny_sdxl_path, tmp_path):
    adapter = _sdxl_adapter(sdxl)
    ours = _flax_outputs(sdxl, adapter)
    for format in ("diffusers", "kohya"):
        file = save_adapter(adapter, tmp_path / format, format=format, base_params=sdxl.params)
        tensors = load_file(file)
        if format == "kohya":  # kohya's SDXL names: SGM blocks, resnet pieces by their SGM names, te1/te2
            for key in (
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha",
                "lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight",
                "lora_unet_input_blocks_4_0_skip_connection.lora_up.weight",
                "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k.alpha",
                "lora_unet_output_blocks_3_1_proj_in.lora_down.weight",
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha",
                "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight",
            ):
                assert key in tensors, key
            assert not any(re.search("down_blocks|mid_block|up_blocks|lora_te_", k) for k in tensors)
            assert _header(file)["ss_base_model_version"] == "sdxl_base_v1-0"
        else:
            assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
            peft = json.loads(_header(file)["lora_adapter_metadata"])
            assert peft["text_encoder_2.r"] == peft["text_encoder_2.lora_alpha"] == 3  # `up` carries alpha / rank

        torch_pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
        base = _torch_outputs(torch_pipe, sdxl)
        assert all(np.abs(ours[c] - base[c]).max() > 1e-3 for c in ("unet", "text_encoder", "text_encoder_2"))  # it matters
        with _lora_warnings() as complaints:
            torch_pipe.load_lora_weights(str(tmp_path / format), weight_name=file.rsplit("/", 1)[-1])
        assert complaints == [], format
        models = dict(unet=torch_pipe.unet, text_encoder=torch_pipe.text_encoder, text_encoder_2=torch_pipe.text_encoder_2)
        _assert_same_deltas(_flax_deltas(adapter), _torch_deltas(**models))
        _assert_same_outputs(ours, _torch_outputs(torch_pipe, sdxl), f"our {format} file in diffusers")

        again = load_adapter(file, sdxl.params)  # Flax -> file -> Flax keeps ranks, alphas and weights
        assert {c: (again.configs[c].rank, again.configs[c].lora_alpha) for c in again.configs} == {
            "unet": (4, 6), "text_encoder": (2, 5), "text_encoder_2": (3, 1.5)
        }
        for a, b in zip(jax.tree_util.tree_leaves(adapter.params), jax.tree_util.tree_leaves(again.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_kohya_sdxl_export_needs_the_base_unet_blocks(sdxl):
    adapter = _sdxl_adapter(sdxl, unet_only=True)
    # A UNet-only adapter does not say it is SDXL; the base params do, and give the SGM stage numbers.
    tensors, _ = adapter_state_dict(adapter, "kohya", base_params=sdxl.params)
    assert any(k.startswith("lora_unet_output_blocks_") for k in tensors)
    with pytest.raises(ValueError, match="pass base_params"):
        adapter_state_dict(_sdxl_adapter(sdxl), "kohya")


# ----------------------------------------------------------------------------------------------- import


def test_sdxl_files_diffusers_and_peft_write_import_exactly(sdxl, tiny_sdxl_path, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import CLIPTextModelWithProjection

    torch_pipe, unet_config, text_config, text_2_config = torch_peft_pipeline(
        tiny_sdxl_path, UNET_SDXL_PEFT, TEXT_PEFT, text_2_peft=TEXT_2_PEFT
    )
    save_peft_lora(torch_pipe, unet_config, text_config, tmp_path / "diffusers", text_2_config)
    theirs = _torch_deltas(unet=torch_pipe.unet, text_encoder=torch_pipe.text_encoder, text_encoder_2=torch_pipe.text_encoder_2)
    adapter = load_adapter(tmp_path / "diffusers", sdxl.params)
    _assert_same_deltas(_flax_deltas(adapter), theirs)
    _assert_same_outputs(_flax_outputs(sdxl, adapter), _torch_outputs(torch_pipe, sdxl), "diffusers' save_lora_weights")

    # diffusers' header has a PEFT config per component, text_encoder_2 too; ours has the same layout.
    header = json.loads(_header(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")["lora_adapter_metadata"])
    ours = json.loads(_header(save_adapter(adapter, tmp_path / "ours"))["lora_adapter_metadata"])
    assert {k.split(".")[0] for k in ours} == {k.split(".")[0] for k in header} == {"unet", "text_encoder", "text_encoder_2"}
    assert set(ours) <= set(header)

    # PEFT's save_pretrained of one model: bare keys that fit both CLIPs by name, and text_encoder_2 alone by width.
    torch.manual_seed(1)
    text_2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl_path, subfolder="text_encoder_2")
    text_2 = get_peft_model(text_2, PeftLoraConfig(**TEXT_2_PEFT))
    text_2.save_pretrained(tmp_path / "peft-text-2")
    keys = load_file(str(tmp_path / "peft-text-2" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.text_model.") for k in keys)
    text_adapter = load_adapter(tmp_path / "peft-text-2", sdxl.params)
    assert list(text_adapter.params) == ["text_encoder_2"]
    _assert_same_deltas(_flax_deltas(text_adapter), _torch_deltas(text_encoder_2=text_2))
    unet = get_peft_model(UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet"), PeftLoraConfig(**UNET_SDXL_PEFT))
    unet.save_pretrained(tmp_path / "peft-unet")
    _assert_same_deltas(_flax_deltas(load_adapter(tmp_path / "peft-unet", sdxl.params)), _torch_deltas(unet=unet))


def test_kohya_sdxl_files_with_sgm_or_diffusers_names_import_exactly(sdxl, tiny_sdxl_path, tmp_path):
    torch_pipe, *_ = torch_peft_pipeline(tiny_sdxl_path, UNET_SDXL_PEFT, TEXT_PEFT, text_2_peft=TEXT_2_PEFT)
    tensors, deltas = _torch_to_kohya(torch_pipe, sgm=True, vary_alpha=False)
    assert "lora_unet_output_blocks_3_0_emb_layers_1.alpha" in tensors  # up_blocks.1.resnets.0.time_emb_proj
    save_file(tensors, str(tmp_path / "sgm.safetensors"), {"ss_network_module": "networks.lora"})
    adapter = load_adapter(tmp_path / "sgm.safetensors", sdxl.params)
    _assert_same_deltas(_flax_deltas(adapter), deltas)

    # Newest diffusers reads the same file (it converts SGM names and kohya's alphas) to the same outputs.
    kohya_pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    with _lora_warnings() as complaints:
        kohya_pipe.load_lora_weights(str(tmp_path), weight_name="sgm.safetensors")
    assert complaints == []
    _assert_same_outputs(_flax_outputs(sdxl, adapter), _torch_outputs(kohya_pipe, sdxl), "kohya SGM file")

    # An alpha per module (diffusers 0.42 ignores those of attention and text-encoder modules, warning
    # "alpha_pattern keys did not match"), and converters' diffusers block names with `lora_te_` for the first encoder.
    for sgm in (True, False):
        tensors, deltas = _torch_to_kohya(torch_pipe, sgm=sgm, vary_alpha=True)
        if not sgm:
            tensors = {k.replace("lora_te1_", "lora_te_"): v for k, v in tensors.items()}
        save_file(tensors, str(tmp_path / f"alphas-{sgm}.safetensors"))
        _assert_same_deltas(_flax_deltas(load_adapter(tmp_path / f"alphas-{sgm}.safetensors", sdxl.params)), deltas)


def test_sd1_kohya_files_with_ldm_block_names_import(sd1, tmp_path):
    """SD 1.x files some tools write with LDM names map through the same block arithmetic (1 layer per block here)."""
    adapter = new_adapter(
        jax.random.key(0), sd1.params, LoraConfig(rank=4, alpha=2, target_modules=UNET_SDXL_TARGETS + ("proj_out",))
    )
    adapter.params = jax.tree_util.tree_map(lambda x: x + 0.1, adapter.params)
    tensors, _ = adapter_state_dict(adapter, "kohya")
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.alpha" in tensors  # SD 1.x exports keep diffusers' names
    names = {p: _kohya_sgm_name(p, layers=1) for p in map(pt_module_path, lora_modules(adapter.params["unet"]))}
    renamed = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        path = next(p for p in names if f"lora_unet_{p.replace('.', '_')}" == name)
        renamed[f"{names[path]}.{suffix}"] = np.ascontiguousarray(value)  # safetensors writes raw memory
    assert "lora_unet_output_blocks_2_1_proj_out.lora_up.weight" in renamed  # up_blocks.1.attentions.0
    save_file(renamed, str(tmp_path / "ldm.safetensors"))
    _assert_same_deltas(_flax_deltas(load_adapter(tmp_path / "ldm.safetensors", sd1.params)), _flax_deltas(adapter))


# ----------------------------------------------------------------------------------------------- refusals


def _cross_file(case: str, sd1, sdxl, tmp_path):
    """A file for one model family, and the base params of the other it is refused on."""
    if case.startswith("sd1"):
        text_config = LoraConfig(rank=4, target_modules=TEXT_ENCODER_TARGETS)
        sd1_adapter = new_adapter(jax.random.key(0), sd1.params, LoraConfig(rank=4), text_config)
        return save_adapter(sd1_adapter, tmp_path, format=case.split("_")[1]), sdxl.params
    if case == "bare_clip_too_wide":  # a PEFT CLIP file of another width: neither SDXL encoder fits
        tensors = {"base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 64), np.float32)}
        tensors["base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = np.zeros((64, 4), np.float32)
        save_file(tensors, str(tmp_path / "clip.safetensors"))
        return tmp_path / "clip.safetensors", sdxl.params
    if case == "one_module_twice":  # kohya's SGM name and a converter's diffusers name of the same module
        tensors = {}
        for name in ("lora_unet_input_blocks_4_1_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in"):
            tensors |= {f"{name}.lora_down.weight": np.ones((4, 64), np.float32), f"{name}.lora_up.weight": np.ones((64, 4), np.float32)}
        save_file(tensors, str(tmp_path / "twice.safetensors"))
        return tmp_path / "twice.safetensors", sdxl.params
    format = case.split("_")[1]
    adapter = _sdxl_adapter(sdxl, unet_only=case.endswith("unet"))
    return save_adapter(adapter, tmp_path, format=format, base_params=sdxl.params), sd1.params


@pytest.mark.parametrize(
    "case, message",
    [
        # The first key that does not fit is named (keys are sorted: text encoders first, as the file holds them).
        (
            "sd1_diffusers",
            r"'unet\.down_blocks\.0\.attentions\.0\..*the base model has no 'unet\.down_blocks\.0\.attentions': "
            r"after 'unet\.down_blocks\.0\.' it has downsamplers, resnets",
        ),
        (
            "sd1_kohya",
            r"the base model has no 'lora_unet_down_blocks_0_attentions': after 'lora_unet_down_blocks_0_' it has "
            r"downsamplers, resnets",
        ),
        ("sdxl_diffusers", r"text_encoder_2 keys but the base model has one text encoder\): the base model is not SDXL"),
        ("sdxl_kohya", r"'lora_te1_.*lora_te1_ keys are SDXL's first text encoder.*the base model is not SDXL"),
        ("sdxl_kohya_unet", r"the base model has no 'lora_unet_input_blocks_4': after 'lora_unet_input_blocks_' it has 0, 1, 2, 3;"),
        (
            "sdxl_diffusers_unet",
            r"the base model has no 'unet\.down_blocks\.1\.attentions': after 'unet\.down_blocks\.1\.' it has resnets",
        ),
        ("bare_clip_too_wide", r"name modules of \['text_encoder', 'text_encoder_2'\].*none fits every such key by shape"),
        ("one_module_twice", r"'lora_unet_down_blocks_1_attentions_0_proj_in' and 'lora_unet_input_blocks_4_1_proj_in' are the same"),
    ],
)
def test_sd1_and_sdxl_adapters_are_refused_on_each_other(case, message, sd1, sdxl, tmp_path):
    file, base_params = _cross_file(case, sd1, sdxl, tmp_path)
    with pytest.raises(AdapterFormatError, match=message) as error:
        load_adapter(file, base_params)
    assert str(tmp_path) in str(error.value)


def test_widths_that_differ_are_refused_by_key_and_shape(sd1, sdxl, tmp_path):
    """Names both families share (SD 1.x and SDXL text encoders, mid-block attention) fail on their widths."""
    target = r"re:mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k"  # a module SD 1.x has too
    adapter = new_adapter(jax.random.key(0), sdxl.params, LoraConfig(rank=4, target_modules=(target,)))
    file = save_adapter(adapter, tmp_path)
    message = r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k down has shape \(4, 80\) but the base model needs \(4, 32\)"
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(file, sd1.params)
    text_2 = new_adapter(jax.random.key(0), sdxl.params, LoraConfig(), text_encoder_2_config=LoraConfig(target_modules=("q_proj",)))
    tensors = load_file(save_adapter(text_2, tmp_path / "te2"))
    tensors = {k.replace("text_encoder_2.", "text_encoder.", 1): v for k, v in tensors.items()}
    save_file({k: v for k, v in tensors.items() if k.startswith("text_encoder.")}, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"q_proj down has shape \(4, 48\) but the base model needs \(4, 32\)"):
        load_adapter(tmp_path / "renamed.safetensors", sdxl.params)
