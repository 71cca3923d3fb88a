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
from flax.traverse_util import flatten_dict

from flax_lora.models.convert import load_params
from flax_lora.models.layers import (
    Conv2d,
    Downsample2D,
    Dtype,
    GroupNorm,
    Linear,
    ResnetBlock2D,
    Upsample2D,
    activation,
    multi_head_attention,
)

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


def _resnet(config: VAEConfig, channels: int, dtype: Dtype, name: str) -> ResnetBlock2D:
    """The VAE's resnet: no timestep embedding, epsilon 1e-6, the config's activation."""
    return ResnetBlock2D(channels, config.norm_num_groups, _EPS, config.act_fn, dtype=dtype, name=name)


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
        x = _resnet(c, channels, self.dtype, "resnets_0")(x)
        if c.mid_block_add_attention:
            x = SpatialAttention(c.norm_num_groups, self.dtype, self.attention, name="attentions_0")(x)
        return _resnet(c, channels, self.dtype, "resnets_1")(x)


class ResnetStack(nn.Module):
    """diffusers' DownEncoderBlock2D / UpDecoderBlock2D: resnets, then a downsampler or upsampler when given."""

    config: VAEConfig
    out_channels: int
    num_layers: int
    resample: str | None  # "down", "up" or None (the last block)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        for i in range(self.num_layers):
            x = _resnet(c, self.out_channels, self.dtype, f"resnets_{i}")(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
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
            resample = "down" if i != last else None
            x = ResnetStack(c, channels, c.layers_per_block, resample, self.dtype, name=f"down_blocks_{i}")(x)
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
            resample = "up" if i != len(widths) - 1 else None
            x = ResnetStack(c, channels, c.layers_per_block + 1, resample, self.dtype, name=f"up_blocks_{i}")(x)
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
    return model, load_params(weights, param_shapes(model), source, param_dtype, normalize_pt_key)
