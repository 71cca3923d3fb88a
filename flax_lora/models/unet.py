"""The Stable Diffusion UNet (diffusers' `UNet2DConditionModel`: SD 1.x, SD 2.x, SDXL) in Flax.

Design:
- Built from the pipeline's `unet/config.json` (`UNetConfig.from_dict`). Every config field is either
  implemented or must hold the value that means "off"; anything else is an error naming the field, never
  ignored. Block types outside the four SD ones are refused the same way.
- Module names are PyTorch's (`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k`), so checkpoints
  map one to one (flax_lora.models.convert) and LoRA targets keep PyTorch's paths.
- Inputs and outputs are NCHW like PyTorch; inside, activations are NHWC (XLA's preferred conv layout).
- Every Linear/Conv carries its LoRA branch (flax_lora.models.layers), so the UNet itself applies adapters.
- `remat=True` (the trainer's --gradient_checkpointing) recomputes each resnet and each transformer layer in the
  backward pass instead of keeping their activations; params and outputs are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from flax_lora.models.convert import load_params

from flax_lora.models.layers import (
    Conv2d,
    Downsample2D,
    Dtype,
    GroupNorm,
    LayerNorm,
    Linear,
    ResnetBlock2D,
    Upsample2D,
    multi_head_attention,
)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)
# Fields whose only implemented value is the one that switches a feature off (diffusers' defaults).
_OFF_VALUES: dict[str, Any] = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "dual_cross_attention": False,
    "num_attention_heads": None,
    "mid_block_only_cross_attention": None,
    "dropout": 0.0,
    "act_fn": "silu",
}
# Fields that change nothing we compute: recorded by diffusers, or (upcast_attention) always on here, since
# attention scores and softmax are computed in float32 whatever the compute dtype.
_NO_EFFECT = frozenset({"sample_size", "upcast_attention", "addition_embed_type_num_heads"})


def _per_block(value: Any, count: int, field: str, where: str) -> tuple:
    """A config value given once or per block, as a tuple of `count` entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{where}: {field} has {len(value)} entries for {count} blocks")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return (value,) * count


def _per_layer(value: int | tuple, count: int) -> tuple[int, ...]:
    """Transformer depth per layer of a block: one value for all layers, or one per layer."""
    if isinstance(value, tuple):
        if len(value) != count:
            raise ValueError(f"transformer_layers_per_block {value} has {len(value)} entries for {count} layers")
        return value
    return (int(value),) * count


@dataclass(frozen=True)
class UNetConfig:
    """The fields of a `UNet2DConditionModel` config that shape the network, normalised per block."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: str | None
    layers_per_block: tuple[int, ...]
    heads: tuple[int, ...]  # per down block; diffusers calls this `attention_head_dim`
    cross_attention_dim: tuple[int, ...]
    transformer_layers: tuple[tuple[int, ...], ...]  # per down block, per layer
    up_transformer_layers: tuple[tuple[int, ...], ...]  # per up block, per layer
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    time_embedding_dim: int | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    sample_size: int | None = None

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding the resnets receive."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def downsampling_factor(self) -> int:
        """How much smaller the lowest resolution is than the input."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict, where: str = "unet/config.json") -> "UNetConfig":
        """Read diffusers' config; a field or block type we do not implement is an error naming it."""
        defaults = dict(
            in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            downsample_padding=1, mid_block_scale_factor=1.0, norm_num_groups=32, norm_eps=1e-5,
            cross_attention_dim=1280, transformer_layers_per_block=1, reverse_transformer_layers_per_block=None,
            attention_head_dim=8, use_linear_projection=False, addition_embed_type=None, addition_time_embed_dim=None,
            time_embedding_dim=None, conv_in_kernel=3, conv_out_kernel=3, projection_class_embeddings_input_dim=None,
        )
        known = set(defaults) | set(_OFF_VALUES) | _NO_EFFECT
        values = dict(defaults)
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key not in known:
                raise ValueError(f"{where}: UNet config field {key!r} ({value!r}) is not implemented")
            if key in _OFF_VALUES and value != _OFF_VALUES[key]:
                raise ValueError(
                    f"{where}: {key}={value!r} is not implemented by flax_lora's UNet (only {_OFF_VALUES[key]!r})"
                )
            values[key] = value
        cls_name = config.get("_class_name", "UNet2DConditionModel")
        if cls_name != "UNet2DConditionModel":
            raise ValueError(f"{where}: model class {cls_name!r} is not implemented; expected UNet2DConditionModel")

        down, up = tuple(values["down_block_types"]), tuple(values["up_block_types"])
        for kind, types, allowed in (("down", down, DOWN_BLOCKS), ("up", up, UP_BLOCKS)):
            for block in types:
                if block not in allowed:
                    raise ValueError(f"{where}: {kind} block type {block!r} is not implemented; expected one of {allowed}")
        mid = values["mid_block_type"]
        if mid is not None and mid not in MID_BLOCKS:
            raise ValueError(f"{where}: mid_block_type {mid!r} is not implemented; expected one of {MID_BLOCKS} or null")
        n = len(down)
        if len(up) != n or len(values["block_out_channels"]) != n:
            raise ValueError(
                f"{where}: {n} down blocks, {len(up)} up blocks and {len(values['block_out_channels'])} "
                "block_out_channels must match"
            )
        if any(_per_block(values["only_cross_attention"], n, "only_cross_attention", where)):
            raise ValueError(f"{where}: only_cross_attention=True is not implemented")
        addition = values["addition_embed_type"]
        if addition not in (None, "text_time"):
            raise ValueError(f"{where}: addition_embed_type {addition!r} is not implemented (only null or 'text_time')")
        if addition == "text_time" and not (
            values["addition_time_embed_dim"] and values["projection_class_embeddings_input_dim"]
        ):
            raise ValueError(
                f"{where}: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        for field in ("conv_in_kernel", "conv_out_kernel"):
            if values[field] % 2 == 0:
                raise ValueError(f"{where}: {field}={values[field]} must be odd")
        if values["norm_num_groups"] is None:
            raise ValueError(f"{where}: norm_num_groups=None (no output norm) is not implemented")

        layers = tuple(int(v) for v in _per_block(values["layers_per_block"], n, "layers_per_block", where))
        transformer = _per_block(values["transformer_layers_per_block"], n, "transformer_layers_per_block", where)
        down_transformer = tuple(_per_layer(t, layers[i]) for i, t in enumerate(transformer))
        reverse = values["reverse_transformer_layers_per_block"]
        if reverse is None:
            if any(isinstance(t, tuple) for t in transformer):
                raise ValueError(
                    f"{where}: per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block"
                )
            reverse = tuple(reversed(transformer))
        reverse = _per_block(reverse, n, "reverse_transformer_layers_per_block", where)
        up_transformer = tuple(_per_layer(t, layers[n - 1 - i] + 1) for i, t in enumerate(reverse))
        return cls(
            in_channels=int(values["in_channels"]),
            out_channels=int(values["out_channels"]),
            block_out_channels=tuple(int(c) for c in values["block_out_channels"]),
            down_block_types=down,
            up_block_types=up,
            mid_block_type=mid,
            layers_per_block=layers,
            heads=tuple(int(h) for h in _per_block(values["attention_head_dim"], n, "attention_head_dim", where)),
            cross_attention_dim=tuple(
                int(d) for d in _per_block(values["cross_attention_dim"], n, "cross_attention_dim", where)
            ),
            transformer_layers=down_transformer,
            up_transformer_layers=up_transformer,
            use_linear_projection=bool(values["use_linear_projection"]),
            norm_num_groups=int(values["norm_num_groups"]),
            norm_eps=float(values["norm_eps"]),
            flip_sin_to_cos=bool(values["flip_sin_to_cos"]),
            freq_shift=float(values["freq_shift"]),
            downsample_padding=int(values["downsample_padding"]),
            mid_block_scale_factor=float(values["mid_block_scale_factor"]),
            center_input_sample=bool(values["center_input_sample"]),
            conv_in_kernel=int(values["conv_in_kernel"]),
            conv_out_kernel=int(values["conv_out_kernel"]),
            time_embedding_dim=values["time_embedding_dim"],
            addition_embed_type=addition,
            addition_time_embed_dim=values["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=values["projection_class_embeddings_input_dim"],
            sample_size=config.get("sample_size"),
        )


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding of (fractional) timesteps, float32 (N, dim), as diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.silu(Linear(self.features, dtype=self.dtype, name="linear_1")(x))
        return Linear(self.features, dtype=self.dtype, name="linear_2")(x)


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v and a biased output projection (`to_out.0`)."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        inner = self.heads * self.head_dim
        q = Linear(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = Linear(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = Linear(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        out = multi_head_attention(q, k, v, self.heads, implementation=self.attention)
        return Linear(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """proj to twice the width, split, hidden * GELU(gate) (exact GELU, as PyTorch)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(Linear(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU (`net.0`) then Linear (`net.2`); `net.1` is PyTorch's dropout."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(4 * x.shape[-1], self.dtype, name="net_0")(x)
        return Linear(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-LayerNorm with a residual."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        attn = dict(heads=self.heads, head_dim=self.head_dim, dtype=self.dtype, attention=self.attention)
        x = Attention(**attn, name="attn1")(LayerNorm(dtype=self.dtype, name="norm1")(x)) + x
        x = Attention(**attn, name="attn2")(LayerNorm(dtype=self.dtype, name="norm2")(x), context) + x
        return FeedForward(self.dtype, name="ff")(LayerNorm(dtype=self.dtype, name="norm3")(x)) + x


# Gradient checkpointing per layer, as diffusers does it: each resnet and each transformer layer keeps only its inputs
# for the backward pass and recomputes the rest there. Nearly all the UNet's FLOPs are inside these layers, so any
# granularity recomputes about one forward pass; per layer holds the least at once while one layer's backward runs
# (remat of a whole block would hold all its layers' activations then: ten transformer layers in SDXL's third block).
RematResnetBlock2D = nn.remat(ResnetBlock2D)
RematTransformerBlock = nn.remat(BasicTransformerBlock)


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or Linear for SD 2.x/SDXL), transformer blocks, proj_out, residual."""

    heads: int
    head_dim: int
    depth: int
    groups: int
    use_linear_projection: bool
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        h = GroupNorm(self.groups, 1e-6, self.dtype, name="norm")(x)
        if self.use_linear_projection:
            h = Linear(inner, dtype=self.dtype, name="proj_in")(h.reshape(batch, height * width, channels))
        else:
            h = Conv2d(inner, kernel_size=1, padding=0, dtype=self.dtype, name="proj_in")(h)
            h = h.reshape(batch, height * width, inner)
        layer = RematTransformerBlock if self.remat else BasicTransformerBlock
        for i in range(self.depth):
            block = layer(self.heads, self.head_dim, self.dtype, self.attention, name=f"transformer_blocks_{i}")
            h = block(h, context)
        if self.use_linear_projection:
            h = Linear(channels, dtype=self.dtype, name="proj_out")(h).reshape(batch, height, width, channels)
        else:
            h = Conv2d(channels, kernel_size=1, padding=0, dtype=self.dtype, name="proj_out")(
                h.reshape(batch, height, width, inner)
            )
        return h + x


class UNetBlock(nn.Module):
    """One down, mid or up block: resnets, optional transformers after each, optional down/upsampler."""

    kind: str  # "down", "mid" or "up"
    out_channels: int
    num_layers: int
    transformer_layers: tuple[int, ...] | None  # None: no attention
    heads: int
    config: UNetConfig
    add_sampler: bool
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    remat: bool = False

    def _transformer(self, i: int) -> Transformer2DModel:
        return Transformer2DModel(
            heads=self.heads,
            head_dim=self.out_channels // self.heads,
            depth=self.transformer_layers[i],
            groups=self.config.norm_num_groups,
            use_linear_projection=self.config.use_linear_projection,
            dtype=self.dtype,
            attention=self.attention,
            remat=self.remat,
            name=f"attentions_{i}",
        )

    def _resnet(self, i: int, scale: float = 1.0) -> ResnetBlock2D:
        c = self.config
        return (RematResnetBlock2D if self.remat else ResnetBlock2D)(
            self.out_channels, c.norm_num_groups, c.norm_eps, output_scale_factor=scale, dtype=self.dtype,
            name=f"resnets_{i}",
        )

    @nn.compact
    def __call__(self, x, temb, context, skips=(), upsample_size=None):
        """Down: (x, skip outputs); mid: x; up: x, consuming `skips` (the matching down outputs, last first)."""
        if self.kind == "mid":
            x = self._resnet(0, self.config.mid_block_scale_factor)(x, temb)
            for i in range(self.num_layers):
                x = self._transformer(i)(x, context)
                x = self._resnet(i + 1, self.config.mid_block_scale_factor)(x, temb)
            return x
        outputs = []
        skips = list(skips)
        for i in range(self.num_layers):
            if self.kind == "up":
                x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self._resnet(i)(x, temb)
            if self.transformer_layers is not None:
                x = self._transformer(i)(x, context)
            outputs.append(x)
        if self.kind == "down":
            if self.add_sampler:
                pad = self.config.downsample_padding
                x = Downsample2D(self.out_channels, pad, self.dtype, name="downsamplers_0")(x)
                outputs.append(x)
            return x, tuple(outputs)
        if self.add_sampler:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class UNet2DConditionModel(nn.Module):
    """`unet(sample NCHW, timesteps (B,) or scalar, encoder_hidden_states (B, L, D), added_cond) -> NCHW`.

    SDXL (`addition_embed_type: "text_time"`) needs `added_cond={"text_embeds": (B, P), "time_ids": (B, 6)}`.
    `remat=True` trades about one more forward pass for the activations of every resnet and transformer layer.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        added_cond: dict[str, jax.Array] | None = None,
    ) -> jax.Array:
        c = self.config
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t_emb = timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        emb = TimestepEmbedding(c.time_embed_dim, self.dtype, name="time_embedding")(t_emb.astype(self.dtype))
        if c.addition_embed_type == "text_time":
            if added_cond is None or not {"text_embeds", "time_ids"} <= set(added_cond):
                raise ValueError("this UNet (SDXL, addition_embed_type 'text_time') needs added_cond text_embeds and time_ids")
            time_ids = added_cond["time_ids"]
            time_embeds = timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            extra = jnp.concatenate([added_cond["text_embeds"].astype(jnp.float32), time_embeds.reshape(batch, -1)], axis=-1)
            emb = emb + TimestepEmbedding(c.time_embed_dim, self.dtype, name="add_embedding")(extra.astype(self.dtype))
        context = encoder_hidden_states.astype(self.dtype)

        x = sample.transpose(0, 2, 3, 1).astype(self.dtype)
        if c.center_input_sample:
            x = 2 * x - 1.0
        k = c.conv_in_kernel
        x = Conv2d(c.block_out_channels[0], kernel_size=k, padding=(k - 1) // 2, dtype=self.dtype, name="conv_in")(x)
        skips = [x]
        n = len(c.block_out_channels)
        common = dict(config=c, dtype=self.dtype, attention=self.attention, remat=self.remat)
        for i, block_type in enumerate(c.down_block_types):
            block = UNetBlock(
                kind="down",
                out_channels=c.block_out_channels[i],
                num_layers=c.layers_per_block[i],
                transformer_layers=c.transformer_layers[i] if block_type.startswith("CrossAttn") else None,
                heads=c.heads[i],
                add_sampler=i < n - 1,
                name=f"down_blocks_{i}",
                **common,
            )
            x, outputs = block(x, emb, context)
            skips.extend(outputs)
        if c.mid_block_type is not None:
            x = UNetBlock(
                kind="mid",
                out_channels=c.block_out_channels[-1],
                num_layers=1,
                transformer_layers=(c.transformer_layers[-1][0],),  # diffusers: the last block's first entry
                heads=c.heads[-1],
                add_sampler=False,
                name="mid_block",
                **common,
            )(x, emb, context)
        for i, block_type in enumerate(c.up_block_types):
            j = n - 1 - i  # the down block this up block mirrors
            layers = c.layers_per_block[j] + 1
            block_skips, skips = skips[-layers:], skips[:-layers]
            upsample_size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
            x = UNetBlock(
                kind="up",
                out_channels=c.block_out_channels[j],
                num_layers=layers,
                transformer_layers=c.up_transformer_layers[i] if block_type.startswith("CrossAttn") else None,
                heads=c.heads[j],
                add_sampler=i < n - 1,
                name=f"up_blocks_{i}",
                **common,
            )(x, emb, context, block_skips, upsample_size)
        x = jax.nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, self.dtype, name="conv_norm_out")(x))
        k = c.conv_out_kernel
        x = Conv2d(c.out_channels, kernel_size=k, padding=(k - 1) // 2, dtype=self.dtype, name="conv_out")(x)
        return x.transpose(0, 3, 1, 2)


def init_shapes(config: UNetConfig, dtype: Dtype = jnp.float32) -> dict:
    """Parameter shapes of a UNet, without computing any parameter."""
    model = UNet2DConditionModel(config, dtype)
    side = 2 * config.downsampling_factor
    sample = jnp.zeros((1, config.in_channels, side, side))
    context = jnp.zeros((1, 1, config.cross_attention_dim[0]))
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": jnp.zeros((1, pooled)), "time_ids": jnp.zeros((1, 6))}
    return jax.eval_shape(lambda key: model.init(key, sample, jnp.zeros((1,)), context, added), jax.random.key(0))["params"]


def load_unet(
    weights: dict[str, np.ndarray],
    config: UNetConfig,
    source: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    attention: str = "auto",
) -> tuple[UNet2DConditionModel, dict]:
    """Our UNet and its params (cast to `param_dtype`) from a diffusers PyTorch state dict."""
    model = UNet2DConditionModel(config, dtype, attention)
    return model, load_params(weights, flatten_dict(init_shapes(config)), source, param_dtype)
