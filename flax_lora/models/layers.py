"""The layers our Flax models are built from, with PyTorch's numerics and LoRA side branches.

Design:
- Parameter names and layouts are Flax's (`kernel` (in, out) / HWIO, `bias`, `scale`), module names are
  PyTorch's with `_N` for list members (`to_out_0`), so one mapping (flax_lora.models.convert) reads any
  PyTorch checkpoint and LoRA targets keep PyTorch's module paths.
- LoRA is part of `Linear` and `Conv2d`: when the variable collection "lora" holds `down`, `up` and `scale`
  for a module, it adds `((x @ down) * scale) @ up` (a conv keeps the base conv's geometry on `down`). The
  base weights stay a separate, frozen collection, so only the LoRA tree is differentiated and several
  adapters are one collection concatenated along the rank axis (`scale` is per rank column).
- DoRA (PEFT's `use_dora`): an entry with a `magnitude` (one per output feature) rescales the layer to
  `m / ||W + scale * down @ up|| * (W x + branch) + bias`, the norm per output feature and detached from the
  gradient as PEFT does; such an entry is one adapter's alone (flax_lora.lora refuses to concatenate it).
- Norms and softmax compute in float32 whatever the compute dtype, as PyTorch's mixed precision does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_lora import attention as attention_kernels

Dtype = Any
LORA = "lora"  # variable collection of LoRA side branches, keyed like the params
_init = nn.initializers.lecun_normal()

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str, where: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function of a config name; ValueError naming the config when unknown."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: activation {name!r} is not implemented; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...]) -> jax.Array:
    """`module.param(name, init, shape)`, without flax's check of a given param's shape on every call.

    That check traces the initializer (`jax.eval_shape`) each time a model is traced (every train step, sampler and
    loss): measured 0.7 s of the SD1.5 UNet's 5.2 s grad trace. The loaders check every weight's shape against the
    model's (flax_lora.loading), so only `init` creates params through flax.
    """
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init, shape)


def _lora_branch(module: nn.Module, x: jax.Array, down_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array | None:
    """`((x @ down) * scale) @ up` for this module's entry of the "lora" collection, or None without one."""
    if not module.has_variable(LORA, "up"):
        return None
    down = module.get_variable(LORA, "down").astype(x.dtype)
    up = module.get_variable(LORA, "up")
    scale = module.get_variable(LORA, "scale").astype(x.dtype)
    hidden = down_fn(x, down) * scale
    return hidden @ up.reshape(-1, up.shape[-1]).astype(x.dtype)


def dora_weight_norm(kernel: jax.Array, down: jax.Array, up: jax.Array, scale: jax.Array | float) -> jax.Array:
    """||W + scale * down @ up|| per output feature (PEFT's DoRA weight norm), in float32; `scale` per rank column."""
    features = kernel.shape[-1]
    # Flax kernels keep the output last (Dense (in, out), conv HWIO): the norm runs over everything else.
    delta = (down.astype(jnp.float32).reshape(-1, down.shape[-1]) * scale) @ up.astype(jnp.float32).reshape(-1, features)
    weight = kernel.astype(jnp.float32).reshape(-1, features) + delta
    return jnp.sqrt(jnp.sum(jnp.square(weight), axis=0))


def _with_lora(
    module: nn.Module, x: jax.Array, base: jax.Array, out: jax.Array, kernel: jax.Array,
    down_fn: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """`out` (the bias-free `base` plus bias) with this module's LoRA entry: plus the branch, or DoRA's rescaling."""
    delta = _lora_branch(module, x, down_fn)
    if delta is None:
        return out
    if not module.has_variable(LORA, "magnitude"):
        return out + delta
    scale = module.get_variable(LORA, "scale").astype(jnp.float32)
    norm = dora_weight_norm(kernel, module.get_variable(LORA, "down"), module.get_variable(LORA, "up"), scale)
    # PEFT detaches the norm (DoRA paper, section 4.3): the gradient reaches the magnitude and the LoRA branch only.
    factor = (module.get_variable(LORA, "magnitude").astype(jnp.float32) / jax.lax.stop_gradient(norm)).astype(out.dtype)
    # PEFT's form: the bias stays outside the rescaling, m / ||W + dW|| * (W x + dW x) + b.
    return out + (factor - 1) * base + factor * delta


class Linear(nn.Module):
    """PyTorch's nn.Linear as a Flax Dense (kernel (in, out)), plus its LoRA branch when one is given."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _param(self, "kernel", _init, (x.shape[-1], self.features))
        x = x.astype(self.dtype)
        y = base = x @ kernel.astype(self.dtype)
        if self.use_bias:
            y = y + _param(self, "bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return _with_lora(self, x, base, y, kernel, lambda h, down: h @ down)


class Conv2d(nn.Module):
    """PyTorch's nn.Conv2d on NHWC inputs (kernel HWIO, symmetric zero padding), plus its LoRA branch."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        if kernel.shape[:2] == (1, 1) and self.stride == 1 and self.padding == 0:
            return x @ kernel[0, 0]  # a 1x1 conv is a matmul over channels
        pad = (self.padding, self.padding)
        return jax.lax.conv_general_dilated(
            x, kernel, (self.stride, self.stride), (pad, pad), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = _param(self, "kernel", _init, (k, k, x.shape[-1], self.features))
        x = x.astype(self.dtype)
        y = base = self._conv(x, kernel.astype(self.dtype))
        if self.use_bias:
            y = y + _param(self, "bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return _with_lora(self, x, base, y, kernel, self._conv)


class GroupNorm(nn.Module):
    """PyTorch's nn.GroupNorm over the channel (last) axis; statistics in float32."""

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm {self.path}: {channels} channels do not split into {self.num_groups} groups")
        scale = _param(self, "scale", nn.initializers.ones, (channels,))
        bias = _param(self, "bias", nn.initializers.zeros, (channels,))
        grouped = x.astype(jnp.float32).reshape(x.shape[0], -1, self.num_groups, channels // self.num_groups)
        mean = grouped.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """PyTorch's nn.LayerNorm over the last axis; statistics in float32."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, (features,))
        bias = _param(self, "bias", nn.initializers.zeros, (features,))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D: norm-act-conv twice, the timestep embedding (when given) added in between, and a
    1x1 `conv_shortcut` when the width changes."""

    out_channels: int
    groups: int
    eps: float
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = activation(self.act_fn, f"ResnetBlock2D {self.path}")
        h = act(GroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x))
        h = Conv2d(self.out_channels, dtype=self.dtype, name="conv1")(h)
        if temb is not None:
            h = h + Linear(self.out_channels, dtype=self.dtype, name="time_emb_proj")(act(temb))[:, None, None, :]
        h = act(GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h))
        h = Conv2d(self.out_channels, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv2d(self.out_channels, kernel_size=1, padding=0, dtype=self.dtype, name="conv_shortcut")(x)
        return (x.astype(h.dtype) + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """diffusers' Downsample2D: a stride-2 3x3 `conv`; padding 0 pads one row/column at the bottom/right first."""

    features: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return Conv2d(self.features, stride=2, padding=self.padding, dtype=self.dtype, name="conv")(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of NHWC to `size`, picking source pixel floor(i * in / out) as PyTorch does."""
    rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]
    cols = (jnp.arange(size[1]) * x.shape[2]) // size[1]
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """diffusers' Upsample2D: nearest-neighbour to `size` (default twice the input), then a 3x3 `conv`."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, size or (2 * x.shape[1], 2 * x.shape[2]))
        return Conv2d(self.features, dtype=self.dtype, name="conv")(x)


def multi_head_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, heads: int, causal: bool = False, implementation: str = "auto"
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over (batch, length, heads * head_dim) arrays, split into `heads` heads."""
    batch, q_len, width = query.shape
    head_dim = width // heads

    def split(x: jax.Array) -> jax.Array:  # (B, L, H*D) -> (B, L, H, D)
        return x.reshape(batch, x.shape[1], heads, head_dim)

    out = attention_kernels.attention(split(query), split(key), split(value), head_dim**-0.5, causal, implementation)
    return out.reshape(batch, q_len, width)
