"""Adapter files PyTorch tools load: diffusers (`pytorch_lora_weights.safetensors`), PEFT and kohya/A1111.

Export and import are pure key-and-layout mappings. Lookup tables are built from the base model's own
modules (Flax path -> PyTorch path -> kohya name), so no name is ever parsed back by guessing where
underscores were dots, and a key that matches no module of the base model is an error, never dropped.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import unflatten_dict

from flax_lora.errors import MissingFileError, UserError
from flax_lora.models.convert import UnreadableWeightsError, read_safetensors
from flax_lora.lora import LoraAdapter, LoraConfig, ModulePath, Params, linear_modules, lora_modules, pt_module_path

FORMATS = ("diffusers", "kohya")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers reads alpha from here (a JSON PEFT LoraConfig)
BASE_MODEL_KEY = "base_model"
DIFFUSERS_PREFIX = {"unet": "unet", "text_encoder": "text_encoder"}
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te"}
# Key suffixes naming the (down, up) halves in the formats we read.
_DOWN_UP_SUFFIXES = (
    (".lora.down.weight", ".lora.up.weight"),  # diffusers
    (".lora_A.weight", ".lora_B.weight"),  # PEFT
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),  # older diffusers
    (".lora_down.weight", ".lora_up.weight"),  # kohya
)


class AdapterFormatError(UserError):
    """An adapter file that does not fit the base model or is not a LoRA file at all."""


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
    standard = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}
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
    """The PEFT LoraConfig fields diffusers rebuilds the adapter from (rank and alpha kept per module)."""
    ranks = _module_ranks(tree)
    # Modules whose rank differs from the config keep scale alpha/rank through PEFT's per-module patterns.
    rank_pattern = {path: r for path, r in ranks.items() if r != config.rank}
    return {
        "r": config.rank,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {path: config.scale * r for path, r in rank_pattern.items()},
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "use_dora": False,
        "lora_bias": False,
    }


def adapter_state_dict(adapter: LoraAdapter, format: str = "diffusers") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and header metadata of an adapter file in the diffusers or kohya format."""
    if format not in FORMATS:
        raise ValueError(f"unknown adapter format {format!r}; expected one of {FORMATS}")
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}
    peft_metadata: dict[str, Any] = {}
    for component, tree in adapter.params.items():
        config = adapter.configs[component]
        modules = lora_modules(tree)
        down_suffix, up_suffix = _diffusers_suffixes(component, [pt_module_path(p) for p in modules])
        for path, (down, up) in modules.items():
            is_conv = down.ndim == 4
            pt_path = pt_module_path(path)
            if format == "diffusers":
                key = f"{DIFFUSERS_PREFIX[component]}.{pt_path}"
                tensors[key + down_suffix] = _pt_layout(down, is_conv)
                tensors[key + up_suffix] = _pt_layout(up, is_conv)
            else:
                key = f"{KOHYA_PREFIX[component]}_{pt_path.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = _pt_layout(down, is_conv)
                tensors[f"{key}.lora_up.weight"] = _pt_layout(up, is_conv)
                # kohya's per-module alpha: scale = alpha / rank of that module.
                tensors[f"{key}.alpha"] = np.asarray(config.scale * down.shape[-1], dtype=np.float32)
        peft_metadata.update({f"{component}.{k}": v for k, v in _peft_config(config, tree).items()})
    if format == "diffusers":
        metadata[METADATA_KEY] = json.dumps(peft_metadata, sort_keys=True)
    else:
        unet_config = adapter.configs.get("unet") or next(iter(adapter.configs.values()))
        metadata.update(
            ss_network_module="networks.lora",
            ss_network_dim=str(unet_config.rank),
            ss_network_alpha=str(unet_config.lora_alpha),
        )
        if adapter.base_model:
            metadata["ss_sd_model_name"] = adapter.base_model
    if adapter.base_model:
        metadata[BASE_MODEL_KEY] = adapter.base_model
    return tensors, metadata


def save_adapter(
    adapter: LoraAdapter, path: str | os.PathLike, format: str = "diffusers", dtype: Any = np.float32
) -> str:
    """Write an adapter file atomically (a folder gets the format's usual file name); return the file path."""
    from safetensors.numpy import save_file

    target = Path(path)
    if target.suffix != ".safetensors":
        target = target / (DIFFUSERS_WEIGHT_NAME if format == "diffusers" else KOHYA_WEIGHT_NAME)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = adapter_state_dict(adapter, format)
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


def resolve_adapter_file(path: str | os.PathLike) -> Path:
    """An adapter file, or the one adapter file in a folder (diffusers' name first)."""
    target = Path(path)
    if target.is_dir():
        files = sorted(target.glob("*.safetensors"))
        preferred = target / DIFFUSERS_WEIGHT_NAME
        if preferred.exists():
            return preferred
        if len(files) != 1:
            raise MissingFileError(
                f"{target} holds {len(files)} .safetensors files ({[f.name for f in files]}); name the adapter file"
            )
        return files[0]
    if not target.exists():
        raise MissingFileError(f"LoRA adapter file {target} does not exist")
    return target


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and header metadata of a safetensors adapter, with a clear error for a broken file."""
    file = resolve_adapter_file(path)
    try:
        return read_safetensors(file)
    except UnreadableWeightsError as e:
        raise AdapterFormatError(f"{file} is not a readable safetensors adapter ({e})") from e


def read_adapter_base_model(path: str | os.PathLike) -> str | None:
    """The base model an adapter file records in its header, if any."""
    _, metadata = read_adapter_file(path)
    return metadata.get(BASE_MODEL_KEY) or metadata.get("ss_sd_model_name") or None


def _module_tables(base_params: dict[str, Params]) -> dict[str, tuple[str, ModulePath, tuple[int, ...]]]:
    """Every name a module may have in a file -> (component, Flax path, kernel shape)."""
    table = {}
    for component, params in base_params.items():
        if component not in DIFFUSERS_PREFIX:
            continue
        for path, shape in linear_modules(params).items():
            pt_path = pt_module_path(path)
            entry = (component, path, shape)
            table[f"{DIFFUSERS_PREFIX[component]}.{pt_path}"] = entry
            if pt_path.startswith("text_model."):  # diffusers under transformers 5 writes CLIP paths without it
                table[f"{DIFFUSERS_PREFIX[component]}.{pt_path.removeprefix('text_model.')}"] = entry
            table[f"{KOHYA_PREFIX[component]}_{pt_path.replace('.', '_')}"] = entry
            if component == "unet":  # raw PEFT state dicts of a UNet carry no prefix
                table[pt_path] = entry
    return table


def _split_key(key: str) -> tuple[str, str]:
    """(module name, role) of a file key; role is 'down', 'up' or 'alpha'."""
    for down_suffix, up_suffix in _DOWN_UP_SUFFIXES:
        if key.endswith(down_suffix):
            return key[: -len(down_suffix)], "down"
        if key.endswith(up_suffix):
            return key[: -len(up_suffix)], "up"
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    raise AdapterFormatError(f"key {key!r} is not a LoRA weight (expected .lora.down/.lora_A/.lora_down/.alpha)")


def _flax_layout(array: np.ndarray, kernel_shape: tuple[int, ...], role: str, key: str, file: Path) -> np.ndarray:
    """PyTorch (r, in)/(out, r) or OIHW -> the Flax LoRA layout of this base kernel, shape-checked."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 4:
        if array.shape[2:] != (1, 1):
            raise AdapterFormatError(
                f"{file}: {key} is a {array.shape[2]}x{array.shape[3]} conv LoRA; only Dense and 1x1 Conv are supported"
            )
        array = array[:, :, 0, 0]
    if array.ndim != 2:
        raise AdapterFormatError(f"{file}: {key} has shape {array.shape}; expected a 2-D or 1x1 conv LoRA weight")
    array = array.T  # now down (in, r) or up (r, out)
    fan_in, fan_out = kernel_shape[-2], kernel_shape[-1]
    want = (fan_in, array.shape[1]) if role == "down" else (array.shape[0], fan_out)
    if array.shape != want:
        raise AdapterFormatError(
            f"{file}: {key} has shape {tuple(array.T.shape)} but the base model needs {(want[1], want[0])} "
            f"(its kernel is {kernel_shape}); is this LoRA for another model?"
        )
    if len(kernel_shape) == 4:
        array = array.reshape((1, 1) + array.shape)
    return array


def _component_alpha(metadata: dict[str, str], component: str) -> float | None:
    """A component's alpha from diffusers' PEFT metadata header, if the file has one."""
    if METADATA_KEY not in metadata:
        return None
    peft = json.loads(metadata[METADATA_KEY])
    alpha = peft.get(f"{component}.lora_alpha")
    return None if alpha is None else float(alpha)


def load_adapter(path: str | os.PathLike, base_params: dict[str, Params]) -> LoraAdapter:
    """Read a diffusers, PEFT or kohya adapter for this base model; every key must fit a module exactly."""
    file = resolve_adapter_file(path)
    tensors, metadata = read_adapter_file(file)
    table = _module_tables(base_params)
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name, role = _split_key(key)
        if name not in table:
            raise AdapterFormatError(
                f"{file}: key {key!r} names module {name!r}, which the base model does not have; "
                f"is this LoRA for another model (e.g. SDXL vs SD 1.x/2.x)?"
            )
        found.setdefault(name, {})[role] = value
    if not found:
        raise AdapterFormatError(f"{file} holds no LoRA weights")

    modules: dict[str, dict[ModulePath, tuple[np.ndarray, np.ndarray, float]]] = {}
    for name, parts in found.items():
        component, flax_path, kernel_shape = table[name]
        if "down" not in parts or "up" not in parts:
            raise AdapterFormatError(f"{file}: module {name!r} has {sorted(parts)} but needs both down and up weights")
        down = _flax_layout(parts["down"], kernel_shape, "down", name + " down", file)
        up = _flax_layout(parts["up"], kernel_shape, "up", name + " up", file)
        rank = down.shape[-1]
        if up.shape[-2] != rank:
            raise AdapterFormatError(f"{file}: module {name!r} has down rank {rank} but up rank {up.shape[-2]}")
        alpha = float(np.asarray(parts["alpha"]).reshape(-1)[0]) if "alpha" in parts else _component_alpha(metadata, component)
        modules.setdefault(component, {})[flax_path] = (down, up, rank if alpha is None else alpha)

    params, configs = {}, {}
    for component, entries in modules.items():
        rank = Counter(down.shape[-1] for down, _, _ in entries.values()).most_common(1)[0][0]
        scale = Counter(alpha / down.shape[-1] for down, _, alpha in entries.values()).most_common(1)[0][0]
        config = LoraConfig(
            rank=int(rank),
            alpha=scale * rank,
            target_modules=tuple(sorted(pt_module_path(p) for p in entries)),
        )
        flat = {}
        for flax_path, (down, up, alpha) in entries.items():
            # A module whose alpha/rank differs from the adapter's scale keeps its own through `up`.
            flat[flax_path + ("down",)] = down
            flat[flax_path + ("up",)] = up * ((alpha / down.shape[-1]) / config.scale)
        params[component] = unflatten_dict(flat)
        configs[component] = config
    base_model = metadata.get(BASE_MODEL_KEY) or metadata.get("ss_sd_model_name") or None
    return LoraAdapter(params=params, configs=configs, base_model=base_model, metadata=metadata)

