"""Adapter files PyTorch tools load: diffusers (`pytorch_lora_weights.safetensors`), PEFT and kohya/A1111.

Design:
- Export and import are pure key-and-layout mappings. Lookup tables are built from the base model's own
  modules (Flax path -> PyTorch path -> kohya name), so no name is ever parsed back by guessing where
  underscores were dots, and a key that matches no module of the base model is an error, never dropped.
- Every scaling rule a file carries is applied exactly as its writer's loader applies it: kohya's per-module
  `.alpha`; PEFT's `lora_alpha`, `use_rslora`, `rank_pattern` and `alpha_pattern` (from diffusers'
  `lora_adapter_metadata` header or PEFT's `adapter_config.json`); alpha = rank when a file says nothing, as
  newest diffusers does. Anything else that changes how weights apply (kohya/LyCORIS DoRA, LoHa, a LoRA bias, an
  unknown PEFT setting, ...) is refused with the file and the field or key, never applied approximately.
- DoRA is PEFT's: `<module>.lora_magnitude_vector` keys ((out,), a conv's (1, out, 1, 1)) and `use_dora: true` in
  the PEFT config, read and written for the diffusers and PEFT layouts. kohya/LyCORIS' `dora_scale` is another
  decomposition that diffusers' own loader drops, so kohya export of DoRA and kohya files with it are refused.
- LoCon (a k x k conv's LoRA): down (r, in, k, k) with the base conv's window, up (out, r, 1, 1), in every format
  (kohya's lora_down/lora_up with a per-module alpha; PEFT's lora_A/lora_B, their rank/alpha through
  rank_pattern/alpha_pattern). Another window is refused: our conv applies only that geometry exactly.
- Our diffusers export folds alpha/rank into `up` and writes `lora_alpha = r`: diffusers releases before the
  header existed (<= 0.33) apply scale 1, newer ones read the header, so every version applies our scale.
  The trained rank and alpha stay in the header (`flax_lora_alpha`) and come back on import.
- SDXL: components `unet`, `text_encoder`, `text_encoder_2` (kohya `lora_unet_`, `lora_te1_`, `lora_te2_`). kohya's
  SDXL trainer names UNet modules the SGM/LDM way (`input_blocks.4.1`, `middle_block.1`, `output_blocks.3.0`,
  `emb_layers.1`); those names are derived from the base UNet's own blocks (resnets, attentions, samplers per
  block), so they read for any UNet, SD 1.x included, and our kohya SDXL export writes them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import unflatten_dict

from flax_lora.errors import MissingFileError, UserError
from flax_lora.models.convert import UnreadableWeightsError, read_safetensors
from flax_lora.models.torch_pickle import load_torch_file
from flax_lora.lora import (
    LoraAdapter, LoraConfig, ModulePath, Params, dora_magnitudes, is_spatial, linear_modules, lora_modules, pt_module_path,
)

logger = logging.getLogger(__name__)

FORMATS = ("diffusers", "kohya")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"  # what PEFT's save_pretrained writes, beside its config
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # keys of a PeftModel's save_pretrained
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # PEFT's DoRA magnitude, as its state dicts and diffusers save it
METADATA_KEY = "lora_adapter_metadata"  # diffusers reads alpha from here (a JSON PEFT LoraConfig)
TRAINED_ALPHA_KEY = "flax_lora_alpha"  # our export's trained rank and alpha per component (the weights carry the scale)
BASE_MODEL_KEY = "base_model"
DIFFUSERS_PREFIX = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
KOHYA_SDXL_TEXT_ENCODER_PREFIX = "lora_te1"  # kohya's name for SDXL's first text encoder (`lora_te` is read too)
KOHYA_SDXL_MODEL_VERSION = "sdxl_base_v1-0"  # kohya sd-scripts' ss_base_model_version of SDXL LoRAs
# SGM/LDM names inside a ResBlock (kohya's SDXL UNet) -> diffusers' names.
_SGM_RESNET_NAMES = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
# SGM/LDM modules outside the input/middle/output blocks -> diffusers' names.
_SGM_TOP_NAMES = {
    "input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out", "out.2": "conv_out",
}
# Key suffixes naming the (down, up) halves in the formats we read.
_DOWN_UP_SUFFIXES = (
    (".lora.down.weight", ".lora.up.weight"),  # diffusers
    (".lora_A.weight", ".lora_B.weight"),  # PEFT
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),  # older diffusers
    (".lora_down.weight", ".lora_up.weight"),  # kohya
)


class AdapterFormatError(UserError):
    """An adapter file that does not fit the base model or is not a LoRA file at all."""


# ----------------------------------------------------------------------------------------- SGM block names


def _members(params: Params, name: str) -> int:
    """How many `name_N` children a param subtree has (resnets_0, resnets_1, ... -> 2)."""
    return sum(1 for key in params if re.fullmatch(rf"{name}_\d+", key))


def _sgm_blocks(unet: Params) -> dict[str, tuple[str, str]]:
    """diffusers block path -> (SGM/LDM block path, kind) for a UNet, counted from its own param tree.

    SGM numbers the UNet's sequential stages: `input_blocks.0` is conv_in, then one stage per down-block layer
    (`.0` its resnet, `.1` its attention) and one per downsampler; `middle_block.0/1/2` alternate resnets and
    attentions; `output_blocks` has one stage per up-block layer, the block's upsampler after its last layer.
    """
    blocks: dict[str, tuple[str, str]] = {}
    stage = 1
    for i in range(_members(unet, "down_blocks")):
        block = unet[f"down_blocks_{i}"]
        for j in range(_members(block, "resnets")):
            blocks[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{stage}.0", "resnet")
            if f"attentions_{j}" in block:
                blocks[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{stage}.1", "attention")
            stage += 1
        if "downsamplers_0" in block:
            blocks[f"down_blocks.{i}.downsamplers.0"] = (f"input_blocks.{stage}.0", "downsampler")
            stage += 1
    mid = unet.get("mid_block", {})
    for j in range(_members(mid, "resnets")):
        blocks[f"mid_block.resnets.{j}"] = (f"middle_block.{2 * j}", "resnet")
        if f"attentions_{j}" in mid:
            blocks[f"mid_block.attentions.{j}"] = (f"middle_block.{2 * j + 1}", "attention")
    stage = 0
    for i in range(_members(unet, "up_blocks")):
        block = unet[f"up_blocks_{i}"]
        layers = _members(block, "resnets")
        for j in range(layers):
            blocks[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{stage}.0", "resnet")
            inner = 1
            if f"attentions_{j}" in block:
                blocks[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{stage}.1", "attention")
                inner = 2
            if j == layers - 1 and "upsamplers_0" in block:
                blocks[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{stage}.{inner}", "upsampler")
            stage += 1
    return blocks


def sgm_module_names(unet: Params) -> dict[str, tuple[str, ...]]:
    """PyTorch (diffusers) path of each Dense/Conv module of a UNet -> its SGM/LDM names, kohya's first.

    The others are spellings converters write: diffusers' own names inside an SGM block (`input_blocks.4.0.conv1`).
    """
    blocks = _sgm_blocks(unet)
    top = {diffusers: sgm for sgm, diffusers in _SGM_TOP_NAMES.items()}
    resnet = {diffusers: sgm for sgm, diffusers in _SGM_RESNET_NAMES.items()}
    names: dict[str, tuple[str, ...]] = {}
    for path in linear_modules(unet):
        pt_path = pt_module_path(path)
        if pt_path in top:
            names[pt_path] = (top[pt_path],)
            continue
        depth = 3 if pt_path.startswith("mid_block.") else 4
        block, rest = ".".join(pt_path.split(".")[:depth]), ".".join(pt_path.split(".")[depth:])
        if block not in blocks:
            continue
        sgm_block, kind = blocks[block]
        if kind == "resnet" and rest in resnet:
            names[pt_path] = (f"{sgm_block}.{resnet[rest]}", f"{sgm_block}.{rest}")
        elif kind == "downsampler" and rest == "conv":  # SGM's Downsample calls its conv `op`
            names[pt_path] = (f"{sgm_block}.op", f"{sgm_block}.conv")
        else:
            names[pt_path] = (f"{sgm_block}.{rest}",)
    return names


def _kohya_prefixes(component: str, sdxl: bool) -> tuple[str, ...]:
    """kohya key prefixes of a component, the one kohya writes first (SDXL's first text encoder is `te1`)."""
    if component == "text_encoder" and sdxl:
        return KOHYA_SDXL_TEXT_ENCODER_PREFIX, KOHYA_PREFIX[component]
    return (KOHYA_PREFIX[component],)


# ----------------------------------------------------------------------------------------------- export


def _pt_layout(array: Any, is_conv: bool) -> np.ndarray:
    """Flax (in, r) / HWIO -> PyTorch (r, in) / OIHW."""
    array = np.asarray(array, dtype=np.float32)
    return array.transpose(3, 2, 0, 1) if is_conv else array.T


def _diffusers_suffixes(component: str, pt_paths: list[str]) -> tuple[str, str]:
    """The (down, up) key suffixes diffusers' training scripts write for a component's modules.

    They write `.lora.down` (UNet attention) and `.lora_linear_layer.down` (text encoder attention), PEFT's
    `.lora_A` for anything else; diffusers' loader picks one conversion per component from the first key, so
    a component with any other module gets PEFT keys throughout.
    """
    clip = ("q_proj", "k_proj", "v_proj", "out_proj")
    standard = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": clip, "text_encoder_2": clip}
    if all(path.endswith(standard[component]) for path in pt_paths):
        return _DOWN_UP_SUFFIXES[0] if component == "unet" else _DOWN_UP_SUFFIXES[2]
    return _DOWN_UP_SUFFIXES[1]


def _module_ranks(tree: Params) -> dict[str, int]:
    """PEFT target name -> rank, from the shapes of the LoRA tree.

    Text-encoder names drop the `text_model.` prefix: transformers 5's CLIPTextModel has no such module, and
    PEFT matches a target as a path suffix, so `encoder.layers.0.self_attn.q_proj` names the module under both
    transformers 4.x and 5.x layouts.
    """
    return {
        pt_module_path(path).removeprefix("text_model."): int(down.shape[-1]) for path, (down, _) in lora_modules(tree).items()
    }


def _peft_config(config: LoraConfig, tree: Params) -> dict[str, Any]:
    """The PEFT LoraConfig fields diffusers rebuilds the adapter from: scale 1 everywhere (`up` carries alpha/rank)."""
    ranks = _module_ranks(tree)
    # Modules whose rank differs from the config keep scale 1 through PEFT's per-module patterns.
    rank_pattern = {path: r for path, r in ranks.items() if r != config.rank}
    return {
        "r": config.rank,
        "lora_alpha": config.rank,
        "target_modules": sorted(ranks),
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "use_dora": bool(dora_magnitudes(tree)),
        "lora_bias": False,
    }


def _kohya_unet_names(adapter: LoraAdapter, base_params: dict[str, Params] | None, sdxl: bool) -> dict[str, str]:
    """PyTorch path -> the module name kohya writes: SGM names for SDXL (kohya's SDXL UNet), diffusers' otherwise."""
    paths = [pt_module_path(p) for p in lora_modules(adapter.params.get("unet", {}))]
    if not sdxl or not paths:
        return {path: path for path in paths}
    if base_params is None:
        raise ValueError(
            "a kohya SDXL file names UNet modules by SGM block (input_blocks.4.1...), which needs the base UNet's "
            "blocks: pass base_params (the pipeline's params) to save_adapter / adapter_state_dict"
        )
    sgm = sgm_module_names(base_params["unet"])
    missing = [path for path in paths if path not in sgm]
    if missing:
        raise ValueError(
            f"UNet LoRA module {missing[0]!r} ({len(missing)} in all) is not a block module of base_params['unet'], "
            "so it has no SGM name; is the adapter for another base model?"
        )
    return {path: sgm[path][0] for path in paths}


def adapter_state_dict(
    adapter: LoraAdapter, format: str = "diffusers", base_params: dict[str, Params] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and header metadata of an adapter file in the diffusers or kohya format.

    A kohya SDXL file needs `base_params` (the pipeline's params): its UNet names come from the base UNet's blocks.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown adapter format {format!r}; expected one of {FORMATS}")
    # A UNet-only SDXL adapter says nothing of the second text encoder: the base model does.
    sdxl = "text_encoder_2" in (adapter.params if base_params is None else base_params)
    kohya_unet = _kohya_unet_names(adapter, base_params, sdxl) if format == "kohya" else {}
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}
    peft_metadata: dict[str, Any] = {}
    trained: dict[str, dict[str, float]] = {}
    for component, tree in adapter.params.items():
        config = adapter.configs[component]
        modules = lora_modules(tree)
        magnitudes = dora_magnitudes(tree)
        if magnitudes and format == "kohya":
            raise UserError(
                f"the {component} adapter is DoRA, which the kohya format cannot carry (kohya/LyCORIS' dora_scale is "
                "another decomposition, and diffusers drops it): export it as 'diffusers'"
            )
        down_suffix, up_suffix = _diffusers_suffixes(component, [pt_module_path(p) for p in modules])
        for path, (down, up) in modules.items():
            is_conv = down.ndim == 4
            pt_path = pt_module_path(path)
            scale = config.module_scale(down.shape)  # conv (LoCon) modules have their own
            if format == "diffusers":
                key = f"{DIFFUSERS_PREFIX[component]}.{pt_path}"
                tensors[key + down_suffix] = _pt_layout(down, is_conv)
                tensors[key + up_suffix] = _pt_layout(up, is_conv) * np.float32(scale)
                if path in magnitudes:  # PEFT's shapes: (out,), a conv's (1, out, 1, 1)
                    magnitude = np.asarray(magnitudes[path], dtype=np.float32)
                    # transformers 5's adapter loader (diffusers' text encoder path) maps only the `.weight` spelling
                    # onto PEFT's parameter; the UNet keeps the spelling PEFT saves. PEFT itself reads both.
                    suffix = MAGNITUDE_SUFFIX if component == "unet" else MAGNITUDE_SUFFIX + ".weight"
                    tensors[key + suffix] = magnitude.reshape(1, -1, 1, 1) if is_conv else magnitude
            else:
                name = kohya_unet[pt_path] if component == "unet" else pt_path
                key = f"{_kohya_prefixes(component, sdxl)[0]}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = _pt_layout(down, is_conv)
                tensors[f"{key}.lora_up.weight"] = _pt_layout(up, is_conv)
                # kohya's per-module alpha: scale = alpha / rank of that module.
                tensors[f"{key}.alpha"] = np.asarray(scale * down.shape[-1], dtype=np.float32)
        peft_metadata.update({f"{component}.{k}": v for k, v in _peft_config(config, tree).items()})
        trained[component] = {"r": config.rank, "lora_alpha": config.lora_alpha}
        if config.conv_rank is not None:
            trained[component].update(conv_r=config.conv_rank, conv_lora_alpha=config.conv_lora_alpha)
    if format == "diffusers":
        metadata[METADATA_KEY] = json.dumps(peft_metadata, sort_keys=True)
        metadata[TRAINED_ALPHA_KEY] = json.dumps(trained, sort_keys=True)
    else:
        unet_config = adapter.configs.get("unet") or next(iter(adapter.configs.values()))
        metadata.update(
            ss_network_module="networks.lora",
            ss_network_dim=str(unet_config.rank),
            ss_network_alpha=str(unet_config.lora_alpha),
        )
        if unet_config.conv_rank is not None:  # kohya records its LoCon settings as --network_args
            args = {"conv_dim": str(unet_config.conv_rank), "conv_alpha": str(unet_config.conv_lora_alpha)}
            metadata["ss_network_args"] = json.dumps(args)
        if sdxl:  # what kohya's SDXL trainer records; UIs read it to tell SDXL LoRAs apart
            metadata["ss_base_model_version"] = KOHYA_SDXL_MODEL_VERSION
        if adapter.base_model:
            metadata["ss_sd_model_name"] = adapter.base_model
    if adapter.base_model:
        metadata[BASE_MODEL_KEY] = adapter.base_model
    return tensors, metadata


def save_adapter(
    adapter: LoraAdapter,
    path: str | os.PathLike,
    format: str = "diffusers",
    dtype: Any = np.float32,
    base_params: dict[str, Params] | None = None,
) -> str:
    """Write an adapter file atomically (a folder gets the format's usual file name); return the file path.

    kohya SDXL files need `base_params` (the pipeline's params), as `adapter_state_dict` says.
    """
    from safetensors.numpy import save_file

    target = Path(path)
    if target.suffix != ".safetensors":
        target = target / (DIFFUSERS_WEIGHT_NAME if format == "diffusers" else KOHYA_WEIGHT_NAME)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = adapter_state_dict(adapter, format, base_params)
    # C order: safetensors writes raw memory, and transposed views are not C-contiguous; 0-d alphas stay 0-d.
    tensors = {k: np.array(v, dtype=dtype, order="C") for k, v in tensors.items()}
    # Write beside the target and rename: a crash or a full disk never leaves a half-written adapter.
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        # safetensors creates files owner-only; an adapter is meant to be shared like any other output.
        umask = os.umask(0)
        os.umask(umask)
        partial.chmod(0o666 & ~umask)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return str(target)


# ----------------------------------------------------------------------------------------------- import

# Keys of adapter kinds this project does not apply, by what they are (checked before any other key rule).
_UNSUPPORTED_KEYS = (
    (re.compile(r"\.dora_scale$"), "kohya/LyCORIS DoRA (dora_scale; diffusers drops it too; PEFT's lora_magnitude_vector DoRA loads)"),
    (re.compile(r"\.hada_"), "LoHa (LyCORIS/PEFT Hadamard-product factors)"),
    (re.compile(r"\.lokr_"), "LoKr (LyCORIS/PEFT Kronecker-product factors)"),
    (re.compile(r"(^|\.)b?oft_"), "OFT/BOFT (orthogonal fine-tuning blocks)"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon with a Tucker core (lora_mid)"),
    (re.compile(r"\.diff(_b)?$"), "a full weight difference (diff/diff_b)"),
    (re.compile(r"\.(w|b)_norm$"), "a norm-layer difference (w_norm/b_norm)"),
    (re.compile(r"(lora_B|lora_up|lora\.up|lora_linear_layer\.up)\.bias$"), "a LoRA bias (PEFT lora_bias)"),
)
# PEFT LoraConfig fields that never change how saved weights apply: provenance, targeting, training-only settings.
_PEFT_INERT_FIELDS = frozenset(
    {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
        "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "init_lora_weights",
        "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
        "qalora_group_size", "runtime_config", "ensure_weight_tying", "bias",
        "use_dora",  # applied: load_adapter checks it against the lora_magnitude_vector keys, module by module
    }
)
# Initialisations that leave the base weights untouched (PiSSA, OLoRA, CorDA, LoftQ, ... rewrite them).
_PEFT_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_PEFT_DEFAULT_RANK = 8  # PEFT's LoraConfig defaults, which diffusers and PEFT use for a missing field
_PEFT_DEFAULT_ALPHA = 8


def resolve_adapter_file(path: str | os.PathLike) -> Path:
    """An adapter file, or the one adapter file in a folder (diffusers' name first, then PEFT's)."""
    target = Path(path)
    if target.is_dir():
        for name in (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME):
            if (target / name).exists():
                return target / name
        files = sorted(target.glob("*.safetensors"))
        if not files:  # older diffusers and PEFT wrote PyTorch pickles
            files = [target / n for n in ("pytorch_lora_weights.bin", "adapter_model.bin") if (target / n).exists()]
        if len(files) != 1:
            raise MissingFileError(
                f"{target} holds {len(files)} .safetensors files ({[f.name for f in files]}); name the adapter file"
            )
        return files[0]
    if not target.exists():
        raise MissingFileError(f"LoRA adapter file {target} does not exist")
    return target


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and header metadata of a safetensors (or pickle-free PyTorch .bin) adapter, with a clear error."""
    file = resolve_adapter_file(path)
    if file.suffix == ".bin":
        return load_torch_file(file), {}
    try:
        return read_safetensors(file)
    except UnreadableWeightsError as e:
        raise AdapterFormatError(f"{file} is not a readable safetensors adapter ({e})") from e


def read_adapter_base_model(path: str | os.PathLike) -> str | None:
    """The base model an adapter file records in its header, if any."""
    _, metadata = read_adapter_file(path)
    return metadata.get(BASE_MODEL_KEY) or metadata.get("ss_sd_model_name") or None


Entry = tuple[str, ModulePath, tuple[int, ...]]  # (component, Flax path, kernel shape)


def _module_tables(base_params: dict[str, Params]) -> dict[str, list[Entry]]:
    """Every name a module may have in a file -> the modules of that name (several only for SDXL's bare CLIP names)."""
    sdxl = "text_encoder_2" in base_params
    table: dict[str, list[Entry]] = {}
    for component, params in base_params.items():
        if component not in DIFFUSERS_PREFIX:
            continue
        sgm = sgm_module_names(params) if component == "unet" else {}
        for path, shape in linear_modules(params).items():
            entry = (component, path, shape)
            names = set()
            # Bare names are what PEFT writes for one model; a CLIP module has one with and one without
            # `text_model.` (transformers 4.x and 5.x layouts).
            for pt_path in _pattern_names(path):
                names |= {f"{DIFFUSERS_PREFIX[component]}.{pt_path}", pt_path}
            for kohya_path in (pt_module_path(path),) + sgm.get(pt_module_path(path), ()):
                names |= {f"{prefix}_{kohya_path.replace('.', '_')}" for prefix in _kohya_prefixes(component, sdxl)}
            for name in names:
                table.setdefault(name, []).append(entry)
    return table


def _fits(parts: dict[str, np.ndarray], kernel_shape: tuple[int, ...]) -> bool:
    """Whether a module's down/up weights have the fan-in/fan-out of this kernel (PyTorch layout: down (r, in))."""
    down, up = parts.get("down"), parts.get("up")
    return (down is None or (down.ndim >= 2 and down.shape[1] == kernel_shape[-2])) and (
        up is None or (up.ndim >= 2 and up.shape[0] == kernel_shape[-1])
    )


def _resolve_modules(found: dict[str, dict[str, np.ndarray]], table: dict[str, list[Entry]], file: Path) -> dict[str, Entry]:
    """The module each name of a file means; names two models share go to the one model all of them fit.

    Bare PEFT names (`text_model.encoder.layers.0.self_attn.q_proj`) are in both of SDXL's text encoders; a file of
    one model's adapter fits only one of them by width.
    """
    resolved = {name: table[name][0] for name in found if len(table[name]) == 1}
    shared = [name for name in found if len(table[name]) > 1]
    if not shared:
        return resolved
    components = sorted({entry[0] for name in shared for entry in table[name]})
    fitting = set(components)
    for name in shared:
        fitting &= {entry[0] for entry in table[name] if _fits(found[name], entry[2])}
    if len(fitting) != 1:
        kernels = {entry[0]: entry[2] for entry in table[shared[0]]}
        shapes = {role: tuple(array.shape) for role, array in found[shared[0]].items() if role != "alpha"}
        why = "several fit every such key by shape" if fitting else "none fits every such key by shape"
        raise AdapterFormatError(
            f"{file}: key names without a component prefix (e.g. {shared[0]!r}, weights {shapes}) name modules of "
            f"{components} (Flax kernels, (in, out): {kernels}), and {why}; is this LoRA for another model? "
            f"(Prefixed keys, e.g. `text_encoder_2.`, name the component.)"
        )
    (component,) = fitting
    for name in shared:
        resolved[name] = next(entry for entry in table[name] if entry[0] == component)
    return resolved


def _pattern_names(path: ModulePath) -> tuple[str, ...]:
    """The PyTorch names of a module under every layout PEFT may have matched it in."""
    pt_path = pt_module_path(path)
    return (pt_path, pt_path.removeprefix("text_model.")) if pt_path.startswith("text_model.") else (pt_path,)


def _split_key(key: str, file: Path) -> tuple[str, str, str]:
    """(module name, role, naming style) of a file key; role is 'down', 'up', 'alpha' or 'magnitude' (DoRA)."""
    for pattern, what in _UNSUPPORTED_KEYS:
        if pattern.search(key):
            raise AdapterFormatError(f"{file}: key {key!r} is {what}, which flax-lora does not apply (plain LoRA only)")
    for down_suffix, up_suffix in _DOWN_UP_SUFFIXES:
        style = "peft" if down_suffix == ".lora_A.weight" else "diffusers"
        if key.endswith(down_suffix):
            return key[: -len(down_suffix)], "down", style
        if key.endswith(up_suffix):
            return key[: -len(up_suffix)], "up", style
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha", "alpha"
    for suffix in (MAGNITUDE_SUFFIX, MAGNITUDE_SUFFIX + ".weight"):  # PEFT saves the first, its modules hold the second
        if key.endswith(suffix):
            return key[: -len(suffix)], "magnitude", "magnitude"
    raise AdapterFormatError(
        f"{file}: key {key!r} is not a LoRA weight (expected .lora.down/.lora_A/.lora_down/.alpha)"
    )


def _natural(text: str) -> tuple[int, int | str]:
    """Sort key putting block numbers in numeric order."""
    return (0, int(text)) if text.isdigit() else (1, text)


def _nearest_names(name: str, table: dict[str, list[Entry]]) -> str:
    """What the base model has where a module name stops matching: `after 'unet.down_blocks.0.' it has resnets, ...`."""
    parts = re.split(r"([._])", name)  # names, then the separator after each
    for count in range(len(parts) // 2, 0, -1):
        prefix = "".join(parts[: 2 * count])
        following = {re.split(r"[._]", other[len(prefix) :], maxsplit=1)[0] for other in table if other.startswith(prefix)}
        if following:
            listed = sorted(following, key=_natural)
            more = f" and {len(listed) - 12} more" if len(listed) > 12 else ""
            return f"the base model has no {prefix + parts[2 * count]!r}: after {prefix!r} it has {', '.join(listed[:12])}{more}"
    return "the base model has no module of that name"


def _unknown_module_error(
    file: Path, key: str, name: str, table: dict[str, list[Entry]], base_params: dict[str, Params]
) -> AdapterFormatError:
    """The error for a key whose module the base model lacks, with the likeliest reason."""
    if "text_encoder_2" not in base_params and name.startswith(("text_encoder_2.", "lora_te2_", "lora_te1_")):
        if name.startswith("lora_te1_"):
            what = "lora_te1_ keys are SDXL's first text encoder, in a file for two"
        else:
            what = "text_encoder_2 keys but the base model has one text encoder"
        why = f"its name is an SDXL one ({what}): the base model is not SDXL"
    else:
        why = (
            f"{_nearest_names(name, table)}; is this LoRA for another model (SD 1.x, 2.x and SDXL differ in blocks, "
            "widths and text encoders)?"
        )
    return AdapterFormatError(f"{file}: key {key!r} names module {name!r}, which the base model does not have; {why}")


def _flax_layout(array: np.ndarray, kernel_shape: tuple[int, ...], role: str, key: str, file: Path) -> np.ndarray:
    """PyTorch (r, in)/(out, r) or OIHW -> the Flax LoRA layout of this base kernel, shape- and geometry-checked."""
    array = np.asarray(array, dtype=np.float32)
    # kohya's LoCon and PEFT give a conv's LoRA `down` the base conv's window (and stride and padding) and a 1x1 `up`:
    # what our Conv2d applies. Any other window would not apply as the file's writer applies it, so it is refused.
    window = tuple(kernel_shape[:2]) if is_spatial(kernel_shape) and role == "down" else (1, 1)
    if (array.ndim == 4 and array.shape[2:] != window) or (array.ndim == 2 and window != (1, 1)):
        have = f"a {array.shape[2]}x{array.shape[3]} conv" if array.ndim == 4 else "a 2-D (Linear)"
        raise AdapterFormatError(
            f"{file}: {key} is {have} LoRA weight {tuple(array.shape)} on a module with kernel {kernel_shape}; a LoRA "
            f"{role} there must be a {window[0]}x{window[1]} conv (down: the base conv's window, up: 1x1, as kohya LoCon "
            "and PEFT write them), the only geometry flax-lora applies exactly"
        )
    if array.ndim not in (2, 4):
        raise AdapterFormatError(f"{file}: {key} has shape {array.shape}; expected a 2-D or conv LoRA weight")
    flax = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T  # now down (..., in, r) or up (..., r, out)
    fan_in, fan_out = kernel_shape[-2], kernel_shape[-1]
    want = (fan_in, flax.shape[-1]) if role == "down" else (flax.shape[-2], fan_out)
    if flax.shape[-2:] != want:
        needed = (want[1], want[0]) + (window if array.ndim == 4 else ())
        raise AdapterFormatError(
            f"{file}: {key} has shape {tuple(array.shape)} but the base model needs {needed} "
            f"(its kernel is {kernel_shape}); is this LoRA for another model?"
        )
    if len(kernel_shape) == 2:
        return flax.reshape(want)
    return flax if flax.ndim == 4 else flax.reshape((1, 1) + want)


def _json_table(text: str, where: str) -> dict[str, Any]:
    """A JSON object from a header field or config file, or an error naming it."""
    try:
        table = json.loads(text)
    except ValueError as e:
        raise AdapterFormatError(f"{where} is not valid JSON ({e})") from e
    if not isinstance(table, dict):
        raise AdapterFormatError(f"{where} is a JSON {type(table).__name__}, expected an object of PEFT fields")
    return table


def _peft_configs(file: Path, metadata: dict[str, str]) -> dict[str | None, tuple[dict[str, Any], str]]:
    """The PEFT LoraConfigs a file comes with, by component (None: one config for whichever model the keys fit)."""
    configs: dict[str | None, tuple[dict[str, Any], str]] = {}
    if METADATA_KEY in metadata:
        where = f"{file} (header {METADATA_KEY})"
        for key, value in _json_table(metadata[METADATA_KEY], where).items():
            # diffusers' pipelines prefix each field with the component; a model's save_lora_adapter does not.
            component, _, field_name = key.rpartition(".")
            configs.setdefault(component or None, ({}, f"{where}, {component or 'model'}"))[0][field_name] = value
    config_file = file.parent / PEFT_CONFIG_NAME
    if file.name.startswith("adapter_model.") and config_file.exists() and None not in configs:
        configs[None] = (_json_table(config_file.read_text(), str(config_file)), str(config_file))
    for config, where in configs.values():
        _check_peft_config(config, where)
    return configs


def _check_peft_config(config: dict[str, Any], where: str) -> None:
    """Refuse, by field, a PEFT config whose weights would apply differently than (rs)LoRA or DoRA."""
    peft_type = config.get("peft_type")
    if peft_type not in (None, "LORA"):
        raise AdapterFormatError(f"{where}: peft_type is {peft_type}; flax-lora applies plain LoRA adapters only")
    init = config.get("init_lora_weights", True)
    if init not in _PEFT_PLAIN_INITS:
        raise AdapterFormatError(
            f"{where}: init_lora_weights={init!r} changes the base weights, so the adapter only fits that changed "
            f"base; convert it to plain LoRA with PEFT (save_pretrained's path_initial_model_for_weight_conversion)"
        )
    if config.get("bias", "none") not in ("none", None):
        raise AdapterFormatError(f"{where}: bias={config['bias']!r} trains the base biases too; flax-lora reads LoRA weights only")
    for field_name, value in config.items():
        if field_name not in _PEFT_INERT_FIELDS and value not in (None, False, 0, "", [], {}):
            raise AdapterFormatError(
                f"{where}: {field_name}={value!r} is a PEFT setting flax-lora does not implement (it changes how "
                f"the adapter applies)"
            )


def _pattern_value(patterns: dict[str, Any], names: tuple[str, ...], default: Any, where: str) -> Any:
    """PEFT's rank/alpha pattern lookup: the first pattern that matches a module name at a `.` boundary."""
    for pattern, value in patterns.items():
        try:
            if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
                return value
        except re.error as e:
            raise AdapterFormatError(f"{where}: pattern {pattern!r} is not a regular expression ({e})") from e
    return default


def _peft_scale(config: dict[str, Any], names: tuple[str, ...], rank: int, module: str, where: str) -> float:
    """A module's scale as PEFT's LoraLayer.update_layer computes it: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    r = _pattern_value(config.get("rank_pattern") or {}, names, config.get("r", _PEFT_DEFAULT_RANK), where)
    alpha = _pattern_value(config.get("alpha_pattern") or {}, names, config.get("lora_alpha", _PEFT_DEFAULT_ALPHA), where)
    if r != rank:
        raise AdapterFormatError(f"{where} gives module {module!r} rank {r}, but its weights have rank {rank}")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def _trained_scales(metadata: dict[str, str], file: Path) -> dict[str, tuple[float, float | None]]:
    """(alpha / rank, conv_alpha / conv_rank or None) per component as our export records them (its weights carry them)."""
    if TRAINED_ALPHA_KEY not in metadata:
        return {}
    where = f"{file} (header {TRAINED_ALPHA_KEY})"

    def scales(v: dict[str, Any]) -> tuple[float, float | None]:
        conv = float(v["conv_lora_alpha"]) / float(v["conv_r"]) if "conv_r" in v else None
        return float(v["lora_alpha"]) / float(v["r"]), conv

    try:
        return {c: scales(v) for c, v in _json_table(metadata[TRAINED_ALPHA_KEY], where).items()}
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise AdapterFormatError(f"{where} is malformed ({type(e).__name__}: {e}); expected r and lora_alpha per component") from e


def _imported_ranks(
    entries: dict[ModulePath, tuple[np.ndarray, np.ndarray, float]], trained: tuple[float, float | None] | None
) -> dict[str, Any]:
    """LoraConfig fields of imported modules: the commonest rank and scale of the linear and of the conv (LoCon) ones.

    `trained` holds the scales our export recorded (its weights carry them); they win over the file's.
    """
    linear_scale, conv_scale = trained or (None, None)

    def rank_alpha(conv: bool, recorded: float | None) -> tuple[int, float] | tuple[None, None]:
        group = [(down.shape[-1], s) for down, _, s in entries.values() if is_spatial(down.shape) == conv]
        if not group:
            return None, None
        rank = int(Counter(r for r, _ in group).most_common(1)[0][0])
        return rank, (recorded or Counter(s for _, s in group).most_common(1)[0][0]) * rank

    conv_rank, conv_alpha = rank_alpha(True, conv_scale)
    rank, alpha = rank_alpha(False, linear_scale)
    if rank is None:  # a conv-only adapter: its rank and alpha are the conv ones
        rank, alpha = conv_rank, conv_alpha
    targets = tuple(sorted(pt_module_path(p) for p in entries))
    return dict(rank=rank, alpha=alpha, target_modules=targets, conv_rank=conv_rank, conv_alpha=conv_alpha)


def _dora_magnitude(
    parts: dict[str, np.ndarray], kernel_shape: tuple[int, ...], name: str, peft: tuple[dict[str, Any], str] | None, file: Path
) -> np.ndarray:
    """A module's DoRA magnitude (out,), checked against its kernel and against the PEFT config's use_dora."""
    if "magnitude" not in parts:
        raise AdapterFormatError(f"{peft[1]} says use_dora is true, but module {name!r} has no lora_magnitude_vector in {file}")
    if peft is not None and not peft[0].get("use_dora"):
        raise AdapterFormatError(
            f"{file}: module {name!r} has a lora_magnitude_vector (DoRA) but {peft[1]} says use_dora is false, so "
            "PEFT would not apply it; fix the header's use_dora"
        )
    array = np.asarray(parts["magnitude"], dtype=np.float32)
    features = kernel_shape[-1]
    # PEFT stores a Linear's as (out,) and a conv's as (1, out, 1, 1).
    if array.size != features or max(array.shape, default=1) != array.size:
        raise AdapterFormatError(
            f"{file}: {name} lora_magnitude_vector has shape {array.shape} but the base module has {features} output "
            f"features (its kernel is {kernel_shape}); is this DoRA adapter for another model?"
        )
    return array.reshape(features)


def load_adapter(path: str | os.PathLike, base_params: dict[str, Params]) -> LoraAdapter:
    """Read a diffusers, PEFT or kohya adapter for this base model; every key must fit a module exactly."""
    file = resolve_adapter_file(path)
    tensors, metadata = read_adapter_file(file)
    table = _module_tables(base_params)
    peft_configs = _peft_configs(file, metadata)
    found: dict[str, dict[str, np.ndarray]] = {}
    styles: dict[str, str] = {}
    bare_magnitudes: list[str] = []  # DoRA magnitudes spelled `.lora_magnitude_vector`, as PEFT saves them
    for key, value in tensors.items():
        name, role, style = _split_key(key, file)
        name = name.removeprefix(PEFT_PREFIX)
        if name not in table:
            raise _unknown_module_error(file, key, name, table, base_params)
        found.setdefault(name, {})[role] = value
        if role in ("down", "up"):
            styles[name] = style
        elif role == "magnitude" and not key.endswith(".weight"):
            bare_magnitudes.append(name)
    if not found:
        raise AdapterFormatError(f"{file} holds no LoRA weights")
    entries = _resolve_modules(found, table, file)
    unet_names = [name for name in found if entries[name][0] == "unet"]
    if {"peft", "diffusers"} <= {styles.get(name) for name in unet_names}:
        # diffusers converts a UNet's keys by the style of the first one, so the other style's modules can be lost.
        logger.warning(
            "%s: its UNet keys mix PEFT (lora_A/lora_B) and diffusers (lora.down/lora.up) names; flax-lora applies "
            "all of them, but PyTorch diffusers' load_lora_weights may apply only the modules named like the first key",
            file,
        )
    text_magnitudes = [name for name in bare_magnitudes if entries[name][0] != "unet"]
    if text_magnitudes:
        # transformers 5's adapter loader renames `.lora_magnitude_vector` to a key PEFT's DoRA layer does not have.
        logger.warning(
            "%s: its text encoder DoRA magnitudes are named `.lora_magnitude_vector` (e.g. %s); flax-lora applies them, "
            "but PyTorch diffusers' load_lora_weights with transformers 5 leaves them at their initial value (seen "
            "with transformers 5.24, peft 0.21), so its text encoder differs; flax-lora's export writes "
            "`.lora_magnitude_vector.weight`, which both load",
            file,
            text_magnitudes[0],
        )
    sgm = [name for name in unet_names if re.search(r"input_blocks|middle_block|output_blocks", name)]
    if sgm and len(sgm) < len(unet_names) and any(re.search(r"down_blocks|mid_block|up_blocks", n) for n in unet_names):
        # diffusers' kohya loader drops every SGM-named key of a file that also has diffusers block names.
        logger.warning(
            "%s: its UNet keys mix SGM (input_blocks/middle_block/output_blocks) and diffusers (down_blocks/...) block "
            "names; flax-lora applies all of them, but PyTorch diffusers' load_lora_weights drops the %d SGM-named modules",
            file,
            len(sgm),
        )

    modules: dict[str, dict[ModulePath, tuple[np.ndarray, np.ndarray, float]]] = {}
    magnitudes: dict[str, dict[ModulePath, np.ndarray]] = {}
    named: dict[tuple[str, ModulePath], str] = {}
    for name, parts in found.items():
        component, flax_path, kernel_shape = entries[name]
        # Several spellings reach one module (SGM and diffusers names, lora_te_ and lora_te1_): one of them only.
        if (component, flax_path) in named:
            raise AdapterFormatError(
                f"{file}: modules {named[component, flax_path]!r} and {name!r} are the same {component} module "
                f"{pt_module_path(flax_path)!r}; expected one LoRA per module"
            )
        named[component, flax_path] = name
        if "down" not in parts or "up" not in parts:
            raise AdapterFormatError(f"{file}: module {name!r} has {sorted(parts)} but needs both down and up weights")
        down = _flax_layout(parts["down"], kernel_shape, "down", name + " down", file)
        up = _flax_layout(parts["up"], kernel_shape, "up", name + " up", file)
        rank = down.shape[-1]
        if up.shape[-2] != rank:
            raise AdapterFormatError(f"{file}: module {name!r} has down rank {rank} but up rank {up.shape[-2]}")
        peft = peft_configs.get(component) or peft_configs.get(None)
        if "alpha" in parts:  # kohya (and old diffusers) per-module alpha
            if peft is not None:
                raise AdapterFormatError(f"{file}: module {name!r} has an .alpha key and {peft[1]} a PEFT config; expected one")
            scale = float(np.asarray(parts["alpha"]).reshape(-1)[0]) / rank
        elif peft is not None:
            scale = _peft_scale(peft[0], _pattern_names(flax_path), rank, name, peft[1])
        elif peft_configs:
            raise AdapterFormatError(f"{file}: the header has PEFT configs for {sorted(map(str, peft_configs))} but none for {component}")
        else:  # no alpha anywhere: scale 1 per module, as newest diffusers and PEFT assume
            scale = 1.0
        modules.setdefault(component, {})[flax_path] = (down, up, scale)
        if "magnitude" in parts or (peft is not None and peft[0].get("use_dora")):
            magnitudes.setdefault(component, {})[flax_path] = _dora_magnitude(parts, kernel_shape, name, peft, file)

    trained = _trained_scales(metadata, file)
    params, configs = {}, {}
    for component, entries in modules.items():
        dora = magnitudes.get(component, {})
        if dora and len(dora) < len(entries):
            plain = next(pt_module_path(p) for p in entries if p not in dora)
            raise AdapterFormatError(
                f"{file}: {component} module {pt_module_path(next(iter(dora)))!r} is DoRA (lora_magnitude_vector) but "
                f"{plain!r} has no magnitude; PEFT's use_dora holds for every module of a model"
            )
        config = LoraConfig(**_imported_ranks(entries, trained.get(component)), use_dora=bool(dora))
        flat = {path + ("magnitude",): magnitude for path, magnitude in dora.items()}
        for flax_path, (down, up, module_scale) in entries.items():
            # A module whose scale differs from the adapter's keeps its own through `up` (our export's folded
            # scale comes back out the same way).
            wanted = config.module_scale(down.shape)
            flat[flax_path + ("down",)] = down
            flat[flax_path + ("up",)] = up * (module_scale / wanted) if module_scale != wanted else up
        params[component] = unflatten_dict(flat)
        configs[component] = config
    base_model = metadata.get(BASE_MODEL_KEY) or metadata.get("ss_sd_model_name") or None
    return LoraAdapter(params=params, configs=configs, base_model=base_model, metadata=metadata)
