"""Memory-efficient attention for the Flax UNet: query chunks forward, FlashAttention-2's backward over key chunks.

diffusers' FlaxAttention materialises the (batch*heads, queries, keys) score tensor and autodiff keeps it for
the backward pass. Here the forward runs over chunks of queries and keeps only the output and each row's
log-sum-exp; the backward recomputes the probabilities chunk by chunk from those, so no score tensor outlives
its chunk. On CPU, where a chunk's scores stay in cache, this is also the fastest path measured (README,
Benchmark).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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


def memory_efficient_attention(next_fun, args, kwargs, context):
    """Interceptor computing diffusers' FlaxAttention with `chunked_attention`; other modules pass through.

    The q/k/v/out projections stay module calls, so LoRA scopes on to_q/to_k/to_v/to_out.0 still apply.
    """
    from diffusers.models.attention_flax import FlaxAttention

    module = context.module
    if context.method_name != "__call__" or not isinstance(module, FlaxAttention) or module.is_initializing():
        return next_fun(*args, **kwargs)
    hidden = args[0]
    cross = kwargs.get("context", args[1] if len(args) > 1 else None)
    cross = hidden if cross is None else cross
    query = module.reshape_heads_to_batch_dim(module.query(hidden))
    key = module.reshape_heads_to_batch_dim(module.key(cross))
    value = module.reshape_heads_to_batch_dim(module.value(cross))
    out = module.proj_attn(module.reshape_batch_dim_to_heads(chunked_attention(query, key, value, module.scale)))
    return module.dropout_layer(out, deterministic=kwargs.get("deterministic", True))

