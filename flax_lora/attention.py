"""Attention kernels of the models: XLA's plain softmax attention and our memory-efficient chunked one.

`attention(..., implementation=)` is the one entry point the model code calls. "xla" materialises the
(batch*heads, queries, keys) score tensor and autodiff keeps it for the backward pass. "chunked" runs the
forward over chunks of queries and keeps only the output and each row's log-sum-exp; the backward
(FlashAttention-2's, over chunks of keys) recomputes the probabilities from those, so no score tensor outlives
its chunk. On CPU, where a chunk's scores stay in cache, "chunked" is also the fastest path measured (README,
Benchmark).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "chunked")
# Queries (forward) and keys (backward) per chunk. Measured on CPU, one core, on the benchmark's `small` UNet's
# 1024-token self-attention: 32 beat 16, 64 and 128.
ATTENTION_CHUNK = 32


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """(batch, length, ...) -> (length // chunk, batch, chunk, ...): the scan axis first."""
    return x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x: jax.Array) -> jax.Array:
    """Inverse of `_chunks`."""
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _forward_chunk(query: jax.Array, key: jax.Array, value: jax.Array, scale: float):
    """Attention output of one query chunk and the log-sum-exp of its score rows."""
    scores = jnp.einsum("bid,bjd->bij", query * scale, key, preferred_element_type=jnp.float32)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bij,bjd->bid", weights, value, preferred_element_type=jnp.float32) / total
    return out.astype(query.dtype), (row_max + jnp.log(total))[..., 0]


def _attention_forward(query, key, value, scale, chunk):
    """Output over chunks of queries, and what the backward pass needs: no score tensor."""
    out, logsumexp = jax.lax.map(lambda q: _forward_chunk(q, key, value, scale), _chunks(query, chunk))
    out, logsumexp = _unchunk(out), _unchunk(logsumexp)
    return out, (query, key, value, out, logsumexp)


def _attention_backward(scale, chunk, residuals, d_out):
    """FlashAttention-2's backward, over chunks of keys: probabilities recomputed from the saved log-sum-exp."""
    query, key, value, out, logsumexp = residuals
    # Row terms of the softmax gradient: sum_j P * dP equals sum_e dO * O.
    d_rows = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    key_chunk = chunk if key.shape[1] % chunk == 0 else key.shape[1]

    def step(d_query, key_value):
        k, v = key_value
        # (keys, queries) layout, so that dK and dV contract the minor axis of their operands (XLA:CPU runs that
        # 3x faster than contracting the major axis).
        scores_t = jnp.einsum("bjd,bid->bji", k, query * scale, preferred_element_type=jnp.float32)
        probs_t = jnp.exp(scores_t - logsumexp[:, None, :])
        d_probs_t = jnp.einsum("bjd,bid->bji", v, d_out, preferred_element_type=jnp.float32)
        d_scores_t = probs_t * (d_probs_t - d_rows[:, None, :])
        d_value = jnp.einsum("bji,bid->bjd", probs_t, d_out, preferred_element_type=jnp.float32)
        d_key = jnp.einsum("bji,bid->bjd", d_scores_t, query, preferred_element_type=jnp.float32) * scale
        # dQ needs the (queries, keys) layout: transposed in memory; the barrier keeps XLA from folding the
        # transpose back into the dot as a major-axis contraction.
        d_scores = jax.lax.optimization_barrier(d_scores_t.swapaxes(1, 2))
        d_query = d_query + jnp.einsum("bij,bjd->bid", d_scores, k, preferred_element_type=jnp.float32) * scale
        return d_query, (d_key, d_value)

    d_query, (d_key, d_value) = jax.lax.scan(
        step, jnp.zeros(query.shape, jnp.float32), (_chunks(key, key_chunk), _chunks(value, key_chunk))
    )
    return d_query.astype(query.dtype), _unchunk(d_key).astype(key.dtype), _unchunk(d_value).astype(value.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_attention(query, key, value, scale, chunk):
    return _attention_forward(query, key, value, scale, chunk)[0]


_chunked_attention.defvjp(_attention_forward, _attention_backward)


def chunked_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, scale: float, chunk: int = ATTENTION_CHUNK
) -> jax.Array:
    """softmax(scale * query key^T) value over (batch*heads, length, head_dim) arrays, `chunk` rows at a time.

    A length that `chunk` does not divide is one chunk (still no score tensor kept for the backward pass).
    """
    if query.shape[1] % chunk:
        chunk = query.shape[1]
    return _chunked_attention(query, key, value, float(scale), chunk)


def xla_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float, causal: bool = False) -> jax.Array:
    """Reference softmax attention over (batch*heads, length, head_dim); scores and softmax in float32."""
    scores = jnp.einsum("bid,bjd->bij", query, key, preferred_element_type=jnp.float32) * scale
    if causal:
        allowed = jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    return jnp.einsum("bij,bjd->bid", probs, value, preferred_element_type=jnp.float32).astype(query.dtype)


def attention(
    query: jax.Array, key: jax.Array, value: jax.Array, scale: float, causal: bool = False, implementation: str = "xla"
) -> jax.Array:
    """softmax(scale * q k^T) v over (batch*heads, length, head_dim) with the chosen implementation."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    if implementation == "chunked" and not causal:  # causal masks (the text encoder's 77 tokens) stay on xla
        return chunked_attention(query, key, value, scale)
    return xla_attention(query, key, value, scale, causal)
