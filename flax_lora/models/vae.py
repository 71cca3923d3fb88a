"""Stable Diffusion's VAE (diffusers' `AutoencoderKL`) in Flax, reading diffusers' PyTorch checkpoints.

Design:
- The math is diffusers' PyTorch `AutoencoderKL` (Encoder/Decoder of `DownEncoderBlock2D`/`UpDecoderBlock2D`,
  a `UNetMidBlock2D` with one single-head attention); module names are PyTorch's (`_N` for list members), so
  `flax_lora.models.convert.pt_to_flax` maps a checkpoint key by key and LoRA could target any conv by path.
- Public methods take and return PyTorch's NCHW; everything inside is NHWC, the layout XLA convolves fastest.
- `VAEConfig.from_dict` reads `vae/config.json` and refuses what we do not implement, by field name, rather
  than silently computing another model.
- Key spellings of older diffusers versions are rewritten by `normalize_pt_key`; shapes come from
  `jax.eval_shape`, so loading never materialises a random init.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.models.convert import pt_to_flax
from flax_lora.models.layers import Conv2d, Dtype, GroupNorm, Linear, activation, multi_head_attention

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers hard-codes these in the VAE's Encoder/Decoder, whatever the config says.
_EPS = 1e-6
_LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' `AutoencoderKL` config, with diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # recorded only: diffusers' hint to run this VAE in float32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str) -> VAEConfig:
        """The config of a diffusers `vae/config.json` dict; ValueError naming `where` and the field if unsupported."""
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"{where}: _class_name is {class_name!r}; only 'AutoencoderKL' is implemented")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(
                f"{where}: AutoencoderKL config fields {unknown} are not implemented; expected only {sorted(known)}"
            )
        values = {k: v for k, v in config.items() if k in known}
        # JSON lists -> tuples, so the config is hashable (a static field of a linen module).
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        out = cls(**values)
        out._validate(where)
        return out

    def _validate(self, where: str) -> None:
        for name, expected in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = list(getattr(self, name))
            bad = [t for t in types if t != expected]
            if bad:
                raise ValueError(f"{where}: {name} {types} has {bad[0]!r}; only {expected!r} is implemented")
            if len(types) != len(self.block_out_channels):
                raise ValueError(
                    f"{where}: {name} has {len(types)} entries but block_out_channels "
                    f"{list(self.block_out_channels)} has {len(self.block_out_channels)}; expected one block per entry"
                )
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                raise ValueError(f"{where}: {name} {getattr(self, name)!r} is not implemented; expected null")
        activation(self.act_fn, f"{where}: act_fn")
        bad_groups = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad_groups:
            raise ValueError(
                f"{where}: norm_num_groups {self.norm_num_groups} does not divide block_out_channels "
                f"{list(self.block_out_channels)} (e.g. {bad_groups[0]})"
            )


@flax.struct.dataclass
class LatentDistribution:
    """The VAE posterior: a diagonal Gaussian over NCHW latents."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        """Standard deviation exp(logvar / 2)."""
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """One draw mean + std * N(0, 1) in the mean's dtype."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        """The most likely latents (the mean)."""
        return self.mean


def _nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


def _nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding (output_scale_factor 1)."""

    out_channels: int
    groups: int
    act_fn: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.act_fn, "VAE config act_fn")
        h = act(GroupNorm(self.groups, _EPS, self.dtype, name="norm1")(x))
        h = Conv2d(self.out_channels, 3, 1, 1, dtype=self.dtype, name="conv1")(h)
        h = act(GroupNorm(self.groups, _EPS, self.dtype, name="norm2")(h))
        h = Conv2d(self.out_channels, 3, 1, 1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv2d(self.out_channels, 1, 1, 0, dtype=self.dtype, name="conv_shortcut")(x)
        return x.astype(self.dtype) + h


class Downsample2D(nn.Module):
    """Stride-2 conv after padding one row/column at the bottom/right (diffusers' VAE `downsample_padding=0`)."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return Conv2d(self.channels, 3, 2, 0, dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return Conv2d(self.channels, 3, 1, 1, dtype=self.dtype, name="conv")(x)


class SpatialAttention(nn.Module):
    """The mid-block's single-head self-attention over pixels, with a residual connection."""

    groups: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = GroupNorm(self.groups, _EPS, self.dtype, name="group_norm")(x).reshape(batch, height * width, channels)
        q, k, v = (Linear(channels, dtype=self.dtype, name=n)(h) for n in ("to_q", "to_k", "to_v"))
        # One head of head_dim = channels: diffusers sets attention_head_dim to the block's width.
        out = multi_head_attention(q, k, v, heads=1, implementation=self.attention)
        out = Linear(channels, dtype=self.dtype, name="to_out_0")(out)
        return out.reshape(x.shape) + x.astype(self.dtype)  # rescale_output_factor is 1 in the VAE


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D of the VAE: resnet, optional attention, resnet."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        channels = c.block_out_channels[-1]
        x = ResnetBlock2D(channels, c.norm_num_groups, c.act_fn, self.dtype, name="resnets_0")(x)
        if c.mid_block_add_attention:
            x = SpatialAttention(c.norm_num_groups, self.dtype, self.attention, name="attentions_0")(x)
        return ResnetBlock2D(channels, c.norm_num_groups, c.act_fn, self.dtype, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    """`layers_per_block` resnets, then a downsampler unless it is the last block."""

    config: VAEConfig
    out_channels: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        for i in range(c.layers_per_block):
            x = ResnetBlock2D(self.out_channels, c.norm_num_groups, c.act_fn, self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`layers_per_block + 1` resnets, then an upsampler unless it is the last block."""

    config: VAEConfig
    out_channels: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        for i in range(c.layers_per_block + 1):
            x = ResnetBlock2D(self.out_channels, c.norm_num_groups, c.act_fn, self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Pixels (NHWC) -> 2 * latent_channels moments (NHWC), before quant_conv."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = Conv2d(c.block_out_channels[0], 3, 1, 1, dtype=self.dtype, name="conv_in")(x)
        last = len(c.block_out_channels) - 1
        for i, channels in enumerate(c.block_out_channels):
            x = DownEncoderBlock2D(c, channels, i != last, self.dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(c, self.dtype, self.attention, name="mid_block")(x)
        # diffusers' Encoder/Decoder use SiLU here whatever act_fn says.
        x = jax.nn.silu(GroupNorm(c.norm_num_groups, _EPS, self.dtype, name="conv_norm_out")(x))
        return Conv2d(2 * c.latent_channels, 3, 1, 1, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """Latents (NHWC, after post_quant_conv) -> images (NHWC)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = Conv2d(c.block_out_channels[-1], 3, 1, 1, dtype=self.dtype, name="conv_in")(x)
        x = MidBlock(c, self.dtype, self.attention, name="mid_block")(x)
        widths = tuple(reversed(c.block_out_channels))
        for i, channels in enumerate(widths):
            x = UpDecoderBlock2D(c, channels, i != len(widths) - 1, self.dtype, name=f"up_blocks_{i}")(x)
        x = jax.nn.silu(GroupNorm(c.norm_num_groups, _EPS, self.dtype, name="conv_norm_out")(x))
        return Conv2d(c.out_channels, 3, 1, 1, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL: `encode` NCHW pixels in [-1, 1] to a posterior, `decode` NCHW latents to images."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # flax_lora.attention implementation of the mid-block attention

    def setup(self) -> None:
        c = self.config
        self.encoder = Encoder(c, self.dtype, self.attention)
        self.decoder = Decoder(c, self.dtype, self.attention)
        moments = 2 * c.latent_channels
        self.quant_conv = Conv2d(moments, 1, 1, 0, dtype=self.dtype) if c.use_quant_conv else None
        self.post_quant_conv = Conv2d(c.latent_channels, 1, 1, 0, dtype=self.dtype) if c.use_post_quant_conv else None

    def encode(self, pixels: jax.Array) -> LatentDistribution:
        """The posterior over latents of NCHW pixels in [-1, 1]; logvar clipped to [-30, 20] as diffusers does."""
        moments = self.encoder(_nhwc(pixels))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(_nchw(moments), 2, axis=1)
        return LatentDistribution(mean=mean, logvar=jnp.clip(logvar, *_LOGVAR_RANGE))

    def decode(self, latents: jax.Array) -> jax.Array:
        """NCHW images (about [-1, 1]) of NCHW latents as the VAE sees them (unscaled: see `unscale_latents`)."""
        z = _nhwc(latents)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return _nchw(self.decoder(z))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """Reconstruction of NCHW pixels through the posterior mean (touches every parameter, for `init`)."""
        return self.decode(self.encode(pixels).mean)

    @nn.nowrap
    def scale_latents(self, latents: jax.Array) -> jax.Array:
        """VAE latents -> the diffusion model's latents: (z - shift_factor) * scaling_factor."""
        if self.config.shift_factor is not None:
            latents = latents - self.config.shift_factor
        return latents * self.config.scaling_factor

    @nn.nowrap
    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        """The diffusion model's latents -> VAE latents: z / scaling_factor + shift_factor."""
        latents = latents / self.config.scaling_factor
        if self.config.shift_factor is not None:
            latents = latents + self.config.shift_factor
        return latents


# Attention names of diffusers' deprecated VAE AttentionBlock (checkpoints saved before diffusers 0.14).
_OLD_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalize_pt_key(key: str) -> str | None:
    """The canonical diffusers key of a VAE checkpoint key: old attention names `query`... -> `to_q`..."""
    old = _OLD_ATTENTION.match(key)
    if old:
        return f"{old[1]}.{_OLD_ATTENTION_NAMES[old[2]]}.{old[3]}"
    return key


def param_shapes(model: AutoencoderKL) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat shapes of the model's params, from `jax.eval_shape` (no parameter is materialised)."""
    side = 2 ** len(model.config.block_out_channels)  # any size the encoder can downsample works
    pixels = jax.ShapeDtypeStruct((1, model.config.in_channels, side, side), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), pixels)
    return flatten_dict(shapes["params"])


def load_vae(
    weights: dict[str, np.ndarray],
    config: VAEConfig,
    source: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    attention: str = "xla",
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Our AutoencoderKL and its params (cast to `param_dtype`) from a diffusers PyTorch state dict."""
    model = AutoencoderKL(config, dtype=dtype, attention=attention)
    flat = pt_to_flax(weights, param_shapes(model), source, normalize_pt_key)
    return model, unflatten_dict({k: jnp.asarray(v, dtype=param_dtype) for k, v in flat.items()})
