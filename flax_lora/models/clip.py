"""CLIP's text encoder (transformers' CLIPTextModel and CLIPTextModelWithProjection) in Flax.

Design:
- The math is transformers' PyTorch CLIP text model: pre-LN transformer blocks with causal self-attention,
  learned position embeddings, a final LayerNorm, pooling at the EOS token and, for SDXL's second encoder,
  a bias-free `text_projection` of the pooled state.
- Module names are PyTorch's (`text_model/encoder/layers_0/self_attn/q_proj`), so `convert.pt_to_flax` reads
  the checkpoint and LoRA targets (`q_proj`, ...) keep their PyTorch paths. Every projection is a
  `layers.Linear`, which is where LoRA branches are applied.
- The canonical PyTorch key layout is transformers 4.x's (`text_model.` prefix); `normalize_pt_key` maps
  transformers 5's `CLIPTextModel` files (saved without the prefix) onto it.
- `CLIPTextConfig.from_dict` refuses any config value that changes the math and that we do not implement;
  keys transformers' CLIP code never reads (dropout, initializers, dtype, generation settings) are ignored, as
  transformers ignores them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.traverse_util import flatten_dict

from flax_lora.models.convert import load_params
from flax_lora.models.layers import ACTIVATIONS, LayerNorm, Linear, activation, multi_head_attention

Dtype = Any
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}  # name -> has text_projection
MODEL_TYPE = "clip_text_model"
# transformers 5 saves CLIPTextModel's modules at the top level; 4.x (and every WithProjection) under text_model.
_TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")
_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "projection_dim",
    "bos_token_id",
    "eos_token_id",
)
# Before transformers PR #24773 CLIP configs said eos_token_id 2; those pool at the largest token id instead.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers `text_encoder/config.json` that the text encoder's math depends on.

    Defaults are transformers' CLIPTextConfig defaults.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int | None = 1
    with_projection: bool = False  # CLIPTextModelWithProjection (SDXL's text_encoder_2)

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str) -> CLIPTextConfig:
        """Read a transformers CLIP text config dict; ValueError naming `where` and the field when unsupported."""
        model_type = config.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{where}: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
        architectures = config.get("architectures") or ["CLIPTextModel"]
        if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
            expected = [[a] for a in ARCHITECTURES]
            raise ValueError(f"{where}: architectures is {architectures!r}, expected one of {expected}")
        # A key the file leaves out takes transformers' CLIPTextConfig default, which our defaults equal.
        values: dict[str, Any] = {
            f.name: config.get(f.name, f.default) for f in dataclasses.fields(cls) if f.name != "with_projection"
        }
        for key in _INT_FIELDS:
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int):
                # transformers allows a list of EOS ids, which its pooling does not handle either.
                raise ValueError(f"{where}: {key} is {value!r}, expected an integer")
        if not isinstance(values["layer_norm_eps"], (int, float)) or isinstance(values["layer_norm_eps"], bool):
            raise ValueError(f"{where}: layer_norm_eps is {values['layer_norm_eps']!r}, expected a number")
        values["layer_norm_eps"] = float(values["layer_norm_eps"])
        if not isinstance(values["hidden_act"], str):
            raise ValueError(f"{where}: hidden_act is {values['hidden_act']!r}, expected one of {sorted(ACTIVATIONS)}")
        activation(values["hidden_act"], f"{where}: hidden_act")
        if values["hidden_size"] % values["num_attention_heads"]:
            raise ValueError(
                f"{where}: hidden_size {values['hidden_size']} is not a multiple of "
                f"num_attention_heads {values['num_attention_heads']}"
            )
        if config.get("pruned_heads"):  # transformers would build smaller attention layers
            raise ValueError(f"{where}: pruned_heads {config['pruned_heads']!r} are not supported, expected none")
        return cls(**values, with_projection=ARCHITECTURES[architectures[0]])


@struct.dataclass
class CLIPTextOutput:
    """The text encoder's outputs, named as transformers names them."""

    last_hidden_state: jax.Array  # (B, L, hidden), after final_layer_norm
    pooler_output: jax.Array  # (B, hidden): last_hidden_state at each sequence's EOS token
    hidden_states: tuple[jax.Array, ...]  # embeddings, then each layer's output (before final_layer_norm)
    text_embeds: jax.Array | None = None  # (B, projection_dim) with a text_projection, else None


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with PyTorch's q/k/v/out projections."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = self.config.hidden_size
        q, k, v = (Linear(width, dtype=self.dtype, name=f"{n}_proj")(x) for n in ("q", "k", "v"))
        out = multi_head_attention(q, k, v, self.config.num_attention_heads, causal=True, implementation=self.attention)
        return Linear(width, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    """fc1, activation, fc2."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.config.hidden_act]
        x = act(Linear(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return Linear(self.config.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        h = LayerNorm(eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, self.attention, name="self_attn")(h)
        h = LayerNorm(eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """The stack of encoder layers; returns the input and every layer's output."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, self.attention, name=f"layers_{i}")(x)
            states.append(x)
        return tuple(states)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids have length {length}, more than max_position_embeddings "
                f"{self.config.max_position_embeddings} of the text encoder config"
            )
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return tokens + positions(jnp.arange(length)[None])


class CLIPTextTransformer(nn.Module):
    """transformers' `text_model`: embeddings, encoder, final LayerNorm and EOS pooling."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        x = CLIPTextEmbeddings(self.config, self.dtype, name="embeddings")(input_ids)
        states = CLIPEncoder(self.config, self.dtype, self.attention, name="encoder")(x)
        last = LayerNorm(self.config.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(states[-1])
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            # The first EOS, since the padding token may equal EOS; argmax returns the first maximum.
            eos = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos]
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states)


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection when `config.with_projection`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        out = CLIPTextTransformer(self.config, self.dtype, self.attention, name="text_model")(input_ids)
        if not self.config.with_projection:
            return out
        projection = Linear(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")
        return out.replace(text_embeds=projection(out.pooler_output))


def normalize_pt_key(key: str) -> str | None:
    """Canonical (transformers 4.x, `text_model.`-prefixed) PyTorch key of a CLIP text encoder checkpoint key."""
    if key.startswith(_TEXT_MODEL_CHILDREN):
        return f"text_model.{key}"
    return key


def param_shapes(model: CLIPTextModel) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat param shapes of `model`, traced with `jax.eval_shape` (nothing is initialised)."""
    ids = jnp.zeros((1, model.config.max_position_embeddings), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), ids)
    return flatten_dict(variables["params"])


def load_clip(
    weights: dict[str, np.ndarray],
    config: CLIPTextConfig,
    source: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    attention: str = "xla",
) -> tuple[CLIPTextModel, dict[str, Any]]:
    """The model of `config` and its params (`model.apply({"params": params}, ids)`) from a PyTorch state dict.

    `source` names the weights in errors (CheckpointMismatchError on a missing, extra or misshapen key).
    """
    model = CLIPTextModel(config, dtype=dtype, attention=attention)
    return model, load_params(weights, param_shapes(model), source, param_dtype, normalize_pt_key)
