"""flax_lora.attention: chunked attention equals softmax attention, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_lora.attention import chunked_attention


def reference_attention(query, key, value, scale):
    scores = jnp.einsum("bid,bjd->bij", query, key) * scale
    return jnp.einsum("bij,bjd->bid", jax.nn.softmax(scores, axis=-1), value)


@pytest.mark.parametrize(
    "queries, keys, chunk",
    # self-attention in 4 chunks; more keys than queries; 7 keys: one key chunk; 30 % 8 != 0: one query chunk
    [(64, 64, 16), (32, 48, 16), (48, 7, 16), (30, 12, 8)],
)
def test_chunked_attention_matches_softmax_attention(queries, keys, chunk):
    rng = np.random.default_rng(queries + keys)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
                      [(6, queries, 8), (6, keys, 8), (6, keys, 8), (6, queries, 8)])  # fmt: skip
    # Large logits: the log-sum-exp bookkeeping must not overflow where a naive exp would.
    q = q * 6.0

    def vjp(fn):
        out, pullback = jax.vjp(lambda a, b, c: fn(a, b, c, 0.35), q, k, v)
        return (out, *pullback(d_out))

    got = jax.jit(lambda: vjp(lambda a, b, c, s: chunked_attention(a, b, c, s, chunk)))()
    want = jax.jit(lambda: vjp(reference_attention))()
    for name, g, w in zip(("output", "d_query", "d_key", "d_value"), got, want):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-4, err_msg=name)


def test_chunked_attention_keeps_bfloat16_inputs_bfloat16_with_float32_softmax():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 32, 8)), jnp.bfloat16) for _ in range(3))
    grads = jax.grad(lambda a: chunked_attention(a, k, v, 0.35, 8).astype(jnp.float32).sum())(q)
    assert grads.dtype == jnp.bfloat16
    want = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), 0.35)
    got = chunked_attention(q, k, v, 0.35, 8)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2)
