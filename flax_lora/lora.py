"""LoRA adapters for our Flax models: targets, initialisation, the "lora" variable collection, merging.

Design:
- The base params are never edited. A LoRA "tree" mirrors the base params, but only at the targeted modules,
  with leaves `{"down": A, "up": B}`: Linear A is (in, r) and B (r, out); a 1x1 Conv keeps Flax's HWIO layout,
  A (1, 1, in, r) and B (1, 1, r, out). `up` starts at zero, so a fresh adapter leaves outputs bit-identical.
- The models apply LoRA themselves: every `Linear`/`Conv2d` (flax_lora.models.layers) adds
  `((x @ A) * scale) @ B` when the "lora" variable collection has an entry at its path. `lora_variables`
  builds that collection from (tree, scale) pairs: several adapters on one module are concatenated along the
  rank axis, with `scale` per rank column, so any mix of adapters and scales is one traced argument (a new
  scale never recompiles). Only the LoRA tree is differentiated; the frozen base is a separate collection.
- Targets are matched on PyTorch-style module paths (`down_blocks.0.attentions.0...to_out.0`), as PEFT and
  diffusers name them, so a user's `target_modules` mean the same here as there.
- scale = alpha / rank, times a runtime multiplier (the `lora_scale` users know). `merge_lora` fuses a tree
  into the kernels (and unfuses with a negative scale) for inference without the extra matmuls.
- LoCon (kohya's conv_dim): a spatial (k x k) conv gets `down` with the base conv's geometry, A (k, k, in, r), and a
  1x1 `up`, B (1, 1, r, out); it has its own rank and alpha (`conv_rank`, `conv_alpha`). `LoraConfig` is the one
  place that says which modules are conv modules (a spatial kernel, as kohya's `is_conv2d_1x1` test) and their
  scale; `LoraConfig.tree_scale` gives `lora_variables`/`merge_lora` one number, or one per module when they differ.
- DoRA (`use_dora`, PEFT's weight-decomposed LoRA): each module's leaves add a trainable `magnitude` (out,),
  initialised to the base kernel's norm per output feature as PEFT does; the layer output is PEFT's (see
  flax_lora.models.layers). PEFT applies a DoRA adapter that shares a module with other adapters in an
  order-dependent way, so such a mix is refused by module name, never approximated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.errors import UserError
from flax_lora.models.convert import pt_module_path
from flax_lora.models.layers import LORA, dora_weight_norm

Params = dict[str, Any]
ModulePath = tuple[str, ...]

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The 3x3 convs kohya's LoRA network trains with conv_dim: ResnetBlock2D's conv1/conv2, Downsample2D's and
# Upsample2D's conv. (kohya's conv_dim also puts `rank`-sized LoRA on time_emb_proj and conv_shortcut; not here.)
UNET_CONV_TARGETS = ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_INITS = ("gaussian", "kaiming")
# One scale for a whole LoRA tree, or one per module path (a LoCon adapter whose conv scale differs).
Scale = float | jax.Array | Mapping[ModulePath, float | jax.Array]


def is_spatial(kernel_shape: Sequence[int]) -> bool:
    """Whether a kernel (or a LoRA `down`) is a k x k conv with k > 1: a LoCon module, with conv_rank/conv_alpha."""
    return len(kernel_shape) == 4 and tuple(kernel_shape[:2]) != (1, 1)


@dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha and targets of one model's adapter; alpha=None means alpha = rank (scale 1).

    Targeted k x k convs (LoCon) take conv_rank and conv_alpha (None: conv_alpha = conv_rank) instead.
    """

    rank: int = 4
    alpha: float | None = None
    target_modules: tuple[str, ...] = UNET_TARGETS
    init: str = "gaussian"
    conv_rank: int | None = None
    conv_alpha: float | None = None
    use_dora: bool = False  # PEFT's DoRA: a trainable magnitude per output feature of every targeted module

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise ValueError(f"LoRA conv_rank must be >= 1, got {self.conv_rank}")
        if self.conv_alpha is not None and self.conv_rank is None:
            raise ValueError("LoRA conv_alpha needs conv_rank (the rank of the conv LoRA modules)")
        if self.init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init {self.init!r}; expected one of {LORA_INITS}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def lora_alpha(self) -> float:
        """Alpha with the default filled in."""
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """alpha / rank: the factor on B @ A that PEFT and kohya apply."""
        return self.lora_alpha / self.rank

    @property
    def conv_lora_alpha(self) -> float:
        """The conv modules' alpha with its default (conv_rank) filled in; alpha without conv_rank."""
        if self.conv_rank is None:
            return self.lora_alpha
        return float(self.conv_rank if self.conv_alpha is None else self.conv_alpha)

    @property
    def conv_scale(self) -> float:
        """conv_alpha / conv_rank, the factor of conv (LoCon) modules; `scale` without conv_rank."""
        return self.scale if self.conv_rank is None else self.conv_lora_alpha / self.conv_rank

    def module_scale(self, shape: Sequence[int]) -> float:
        """The scale of a module, by its kernel's or LoRA `down`'s shape: conv_scale for a k x k conv."""
        return self.conv_scale if is_spatial(shape) else self.scale

    def tree_scale(self, tree: Params, multiplier: float | jax.Array = 1.0) -> Scale:
        """`lora_variables`' scale of a tree: one number, or one per module when conv and linear scales differ."""
        if self.conv_scale == self.scale:
            return self.scale * multiplier
        return {path: self.module_scale(down.shape) * multiplier for path, (down, _) in lora_modules(tree).items()}


def matches_target(pt_path: str, target_modules: Sequence[str]) -> bool:
    """PEFT's rule: a target names the whole path or its last dotted components; `re:` marks a full regex."""
    for target in target_modules:
        if target.startswith("re:"):
            if re.fullmatch(target[3:], pt_path):
                return True
        elif pt_path == target or pt_path.endswith("." + target):
            return True
    return False


def linear_modules(base_params: Params) -> dict[ModulePath, tuple[int, ...]]:
    """Every Dense or Conv module of a param tree, with its kernel shape."""
    return {k[:-1]: tuple(v.shape) for k, v in flatten_dict(base_params).items() if k[-1] == "kernel"}


def lora_shapes(kernel_shape: tuple[int, ...], rank: int, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (down, up) for a kernel: Dense (in, r), (r, out); k x k Conv (k, k, in, r), (1, 1, r, out)."""
    if len(kernel_shape) == 2:
        return (kernel_shape[0], rank), (rank, kernel_shape[1])
    if len(kernel_shape) == 4:
        return tuple(kernel_shape[:3]) + (rank,), (1, 1, rank, kernel_shape[3])
    raise ValueError(f"LoRA supports Dense and Conv layers; {where} has kernel shape {kernel_shape}")


def module_rank(config: LoraConfig, kernel_shape: tuple[int, ...], where: str) -> int:
    """The rank a targeted module gets: conv_rank for a k x k conv (which needs one), else rank."""
    if not is_spatial(kernel_shape):
        return config.rank
    if config.conv_rank is None:
        raise ValueError(
            f"{where} is a {kernel_shape[0]}x{kernel_shape[1]} conv: without conv_rank (--conv_rank) LoRA supports "
            "Dense and 1x1 Conv layers only; set conv_rank for a conv LoRA (LoCon)"
        )
    return config.conv_rank


def init_lora(rng: jax.Array, base_params: Params, config: LoraConfig) -> Params:
    """A LoRA tree for every targeted module: random `down`, zero `up` (so step 0 equals the base model)."""
    targets = {
        path: shape
        for path, shape in linear_modules(base_params).items()
        if matches_target(pt_module_path(path), config.target_modules)
    }
    if not targets:
        examples = sorted(pt_module_path(p) for p in linear_modules(base_params))[:5]
        raise ValueError(
            f"target_modules {config.target_modules} match no Dense/Conv module; module paths look like {examples}"
        )
    kernels = flatten_dict(base_params) if config.use_dora else {}
    flat = {}
    for key, (path, shape) in zip(jax.random.split(rng, len(targets)), sorted(targets.items())):
        rank = module_rank(config, shape, pt_module_path(path))
        down_shape, up_shape = lora_shapes(shape, rank, pt_module_path(path))
        fan_in = math.prod(down_shape[:-1])
        if config.init == "gaussian":  # diffusers' training scripts: N(0, 1/r)
            down = jax.random.normal(key, down_shape, jnp.float32) / rank
        else:  # PEFT's default: kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(fan_in)
            down = jax.random.uniform(key, down_shape, jnp.float32, -bound, bound)
        flat[path + ("down",)] = down
        flat[path + ("up",)] = jnp.zeros(up_shape, jnp.float32)
        if config.use_dora:  # PEFT's init: ||W + scale * B @ A|| per output feature, i.e. ||W|| while B = 0
            up = flat[path + ("up",)]
            flat[path + ("magnitude",)] = dora_weight_norm(kernels[path + ("kernel",)], down, up, config.module_scale(shape))
    return unflatten_dict(flat)


def lora_modules(tree: Params) -> dict[ModulePath, tuple[jax.Array, jax.Array]]:
    """Flatten a LoRA tree to {module path: (down, up)}."""
    flat = flatten_dict(tree)
    return {k[:-1]: (flat[k[:-1] + ("down",)], v) for k, v in flat.items() if k[-1] == "up"}


def dora_magnitudes(tree: Params) -> dict[ModulePath, jax.Array]:
    """{module path: DoRA magnitude (out,)} of a LoRA tree; empty for plain LoRA."""
    return {k[:-1]: v for k, v in flatten_dict(tree).items() if k[-1] == "magnitude"}


class DoraOverlapError(UserError):
    """A DoRA adapter and another adapter on one module, which PEFT applies in an order-dependent way."""


def lora_variables(*layers: tuple[Params, Scale]) -> Params:
    """The "lora" collection for `model.apply({"params": base, "lora": ...})` from (tree, scale) pairs.

    Modules several adapters target get their `down`/`up` concatenated along the rank axis, each rank column
    carrying its adapter's scale, which sums the adapters' updates exactly. A DoRA module keeps its `magnitude`
    and must be that adapter's alone (DoraOverlapError otherwise).
    """
    parts: dict[ModulePath, list[tuple[jax.Array, jax.Array, jax.Array]]] = {}
    for tree, scale in layers:
        for path, (down, up) in lora_modules(tree).items():
            rank = down.shape[-1]
            module_scale = scale[path] if isinstance(scale, Mapping) else scale
            parts.setdefault(path, []).append((down, up, jnp.full((rank,), module_scale, jnp.float32)))
    flat = {}
    for tree, _ in layers:
        for path, magnitude in dora_magnitudes(tree).items():
            if len(parts[path]) > 1:
                raise DoraOverlapError(
                    f"module {pt_module_path(path)} has a DoRA adapter and {len(parts[path]) - 1} other adapter(s); a "
                    "DoRA adapter must be the only one on its modules (PEFT's result depends on their order)"
                )
            flat[path + ("magnitude",)] = magnitude
    for path, entries in parts.items():
        downs, ups, scales = zip(*entries)
        flat[path + ("down",)] = downs[0] if len(downs) == 1 else jnp.concatenate([d.astype(jnp.float32) for d in downs], -1)
        flat[path + ("up",)] = ups[0] if len(ups) == 1 else jnp.concatenate([u.astype(jnp.float32) for u in ups], -2)
        flat[path + ("scale",)] = jnp.concatenate(scales)
    return unflatten_dict(flat)


def with_lora(params: Params, *layers: tuple[Params, Scale]) -> dict[str, Params]:
    """Variables for `model.apply`: the base params plus the LoRA collection of the given (tree, scale) pairs."""
    return {"params": params, LORA: lora_variables(*layers)}


def merge_lora(base_params: Params, tree: Params, scale: Scale) -> Params:
    """Fuse scale * A @ B into the base kernels (a negative scale unfuses); returns new params.

    Exact for LoCon too: a k x k `down` then a 1x1 `up` is one k x k conv with kernel A @ B (over the rank axis).
    DoRA modules become m / ||W + scale * A @ B|| * (W + scale * A @ B) per output feature, exactly the unfused
    output (the bias stays outside); a negative scale does not undo that.
    """
    flat = flatten_dict(base_params)
    magnitudes = dora_magnitudes(tree)
    for path, (down, up) in lora_modules(tree).items():
        kernel_key = path + ("kernel",)
        if kernel_key not in flat:
            raise KeyError(f"LoRA module {'/'.join(path)} has no kernel in the base params")
        kernel = flat[kernel_key]
        if down.shape[:-1] != kernel.shape[:-1] or up.shape[-1] != kernel.shape[-1]:
            raise ValueError(
                f"LoRA module {'/'.join(path)}: down {down.shape} / up {up.shape} do not fit kernel {kernel.shape}"
            )
        delta = down.reshape(-1, down.shape[-1]) @ up.reshape(-1, up.shape[-1])
        module_scale = scale[path] if isinstance(scale, Mapping) else scale
        merged = kernel.astype(jnp.float32) + module_scale * delta.reshape(kernel.shape)
        if path in magnitudes:
            merged = merged * (magnitudes[path].astype(jnp.float32) / dora_weight_norm(kernel, down, up, module_scale))
        flat[kernel_key] = merged.astype(kernel.dtype)
    return unflatten_dict(flat)


@dataclass
class LoraAdapter:
    """One adapter: a LoRA tree and a config per component ("unet", "text_encoder")."""

    params: dict[str, Params]
    configs: dict[str, LoraConfig]
    base_model: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def scope_layers(self, component: str, multiplier: float = 1.0) -> tuple[Params, Scale]:
        """(tree, scale * multiplier) for `lora_variables`; an empty tree when this adapter skips the component."""
        if component not in self.params:
            return {}, 0.0
        return self.params[component], self.configs[component].tree_scale(self.params[component], multiplier)


def weighted_layers(adapters: Sequence[tuple[LoraAdapter, float]], component: str) -> list[tuple[Params, Scale]]:
    """`lora_variables` arguments for several adapters, each with its own multiplier."""
    return [adapter.scope_layers(component, weight) for adapter, weight in adapters]


def new_adapter(
    rng: jax.Array,
    pipe_params: dict[str, Params],
    unet_config: LoraConfig,
    text_encoder_config: LoraConfig | None = None,
    base_model: str | None = None,
    text_encoder_2_config: LoraConfig | None = None,
) -> LoraAdapter:
    """A fresh adapter for a pipeline's UNet and optionally its text encoder(s) (SDXL's `text_encoder_2` too)."""
    wanted = {"unet": unet_config, "text_encoder": text_encoder_config, "text_encoder_2": text_encoder_2_config}
    configs = {component: config for component, config in wanted.items() if config is not None}
    if "text_encoder_2" in configs and "text_encoder_2" not in pipe_params:
        raise ValueError("a text_encoder_2 LoRA needs a pipeline with a second text encoder (SDXL)")
    unet_rng, text_rng = jax.random.split(rng)  # the split SD 1.x/2.x runs always used, so their adapters stay the same
    keys = {"unet": unet_rng, "text_encoder": text_rng, "text_encoder_2": jax.random.fold_in(rng, 2)}
    params = {component: init_lora(keys[component], pipe_params[component], config) for component, config in configs.items()}
    return LoraAdapter(params=params, configs=configs, base_model=base_model)
