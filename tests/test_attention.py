"""flax_lora.attention: every implementation against XLA's softmax attention (values and gradients), the `auto`
decision table, and lowering of the GPU (cuDNN) and TPU (Pallas) kernels for their platforms without the device."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from flax_lora import attention as attn
from flax_lora.attention import AttentionShape, chunked_attention, choose
from flax_lora.errors import UserError


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


def _heads_inputs(queries: int, keys: int, heads: int, head_dim: int, seed: int = 0):
    """(batch, length, heads, head_dim) query, key, value and output cotangent."""
    rng = np.random.default_rng(seed)
    shapes = [(2, queries, heads, head_dim), (2, keys, heads, head_dim), (2, keys, heads, head_dim)]
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
    return q * 3.0, k, v, jnp.asarray(rng.standard_normal(shapes[0]), jnp.float32)


def _output_and_grads(implementation: str, q, k, v, d_out):
    def run(a, b, c):
        return attn.attention(a, b, c, q.shape[-1] ** -0.5, implementation=implementation)

    out, pullback = jax.vjp(run, q, k, v)
    return (out, *pullback(d_out))


@pytest.mark.parametrize(
    "implementation, queries, keys, head_dim",
    [
        ("chunked", 64, 64, 8),
        ("chunked", 64, 77, 40),  # cross-attention on 77 text tokens, SD 1.5's head dim
        ("pallas", 256, 256, 64),  # two 128-token blocks each way
        ("pallas", 64, 77, 40),  # lengths 128 does not divide: padded, the padded keys masked
        ("pallas", 128, 128, 160),  # a head dim the kernel does not take: zero-padded to 256
    ],
)
def test_each_implementation_matches_xla_values_and_gradients(implementation, queries, keys, head_dim):
    q, k, v, d_out = _heads_inputs(queries, keys, 2, head_dim, seed=queries + keys)
    want = _output_and_grads("xla", q, k, v, d_out)
    want_ref = reference_attention(
        attn._merge_heads(q), attn._merge_heads(k), attn._merge_heads(v), head_dim**-0.5
    )  # the xla path itself against the plain formula
    np.testing.assert_allclose(attn._merge_heads(want[0]), want_ref, atol=2e-5, rtol=1e-4)
    if implementation == "pallas":  # the TPU kernel, run by Pallas' TPU interpreter on CPU
        with pltpu.force_tpu_interpret_mode():
            got = _output_and_grads(implementation, q, k, v, d_out)
    else:
        got = jax.jit(lambda *a: _output_and_grads(implementation, *a))(q, k, v, d_out)
    for name, g, w in zip(("output", "d_query", "d_key", "d_value"), got, want):
        assert g.shape == w.shape and np.all(np.isfinite(g)), name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=1e-4, err_msg=name)


SD15 = [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (256, 256, 160), (64, 64, 160)]  # 512 px self/cross


@pytest.mark.parametrize(
    "platform, dtype, capability, sizes, expected",
    [
        ("cpu", "float32", None, SD15, ["chunked"] * 5),
        ("cpu", "bfloat16", None, SD15, ["chunked"] * 5),
        ("gpu", "bfloat16", "9.0", SD15, ["cudnn"] * 5),  # H100: head dim up to 256
        ("gpu", "float16", "8.0", SD15, ["cudnn", "cudnn", "cudnn", "xla", "xla"]),  # A100: 160 > 128
        ("gpu", "float32", "9.0", SD15, ["xla"] * 5),  # cuDNN's flash attention takes no fp32
        ("gpu", "bfloat16", "9.0", [(4096, 4096, 4), (1024, 77, 20)], ["xla", "xla"]),  # head dims not multiples of 8
        ("tpu", "bfloat16", None, SD15, ["pallas", "xla", "pallas", "xla", "xla"]),  # long, 128-divisible only
        ("rocm", "bfloat16", None, SD15, ["xla"] * 5),  # AMD GPUs: no cuDNN
        ("tpu", "float32", None, [(1024, 1024, 64), (1000, 1000, 64), (1024, 1024, 160)], ["pallas", "xla", "xla"]),
    ],
)
def test_auto_picks_the_platforms_kernel_where_it_applies(platform, dtype, capability, sizes, expected):
    shapes = [AttentionShape(q, k, d, dtype) for q, k, d in sizes]
    assert [choose("auto", platform, s, capability) for s in shapes] == expected
    # memory_efficient falls back to ours instead of the score-materialising xla
    fallback = ["chunked" if e == "xla" else e for e in expected]
    assert [choose("memory_efficient", platform, s, capability) for s in shapes] == fallback
    for kernel in ("xla", "chunked", "pallas"):  # an explicit kernel is taken as asked
        assert {choose(kernel, platform, s, capability) for s in shapes} == {kernel}


def test_an_explicit_cudnn_that_cannot_run_is_refused_by_name():
    with pytest.raises(UserError, match="--attention cudnn: cuDNN flash attention needs bf16 or fp16, not float32"):
        choose("cudnn", "gpu", AttentionShape(4096, 4096, 64, "float32"), "9.0")
    with pytest.raises(UserError, match="at most 128 before Hopper .*, not 160"):
        choose("cudnn", "gpu", AttentionShape(256, 256, 160, "bfloat16"), "8.6")
    assert choose("cudnn", "gpu", AttentionShape(256, 256, 160, "bfloat16"), "9.0") == "cudnn"
    with pytest.raises(UserError, match="--attention 'flash': expected one of auto, memory_efficient"):
        choose("flash", "cpu", AttentionShape(8, 8, 8, "float32"))
    # This process runs on CPU: the CLIs refuse the GPU and TPU kernels before loading anything.
    for kernel, needs in (("cudnn", "GPUs"), ("pallas", "TPUs")):
        with pytest.raises(UserError, match=f"--attention {kernel} runs on {needs} only; this run is on cpu"):
            attn.check_platform(kernel)
    for fine in ("auto", "memory_efficient", "xla", "chunked"):
        attn.check_platform(fine)


def test_the_choice_is_logged_once_per_attention_size(caplog):
    q, k, v, _ = _heads_inputs(40, 24, 2, 8, seed=5)
    attn._logged.clear()
    with caplog.at_level(logging.INFO, logger="flax_lora.attention"):
        for _ in range(3):
            attn.attention(q, k, v, 0.3)
        attn.attention(q, q, q, 0.3)
    lines = [r.getMessage() for r in caplog.records if r.name == "flax_lora.attention"]
    assert lines == [
        "attention auto on cpu: 40 queries x 24 keys, head dim 8, float32 -> chunked",
        "attention auto on cpu: 40 queries x 40 keys, head dim 8, float32 -> chunked",
    ]


def test_config_names_and_the_xformers_flag():
    from flax_lora.config import ATTENTION_IMPLEMENTATIONS, TrainConfig

    assert ATTENTION_IMPLEMENTATIONS == attn.IMPLEMENTATIONS
    assert TrainConfig().unet_attention == "auto"
    assert TrainConfig(enable_xformers_memory_efficient_attention=True).unet_attention == "memory_efficient"
    assert TrainConfig(enable_xformers_memory_efficient_attention=True, attention="cudnn").unet_attention == "cudnn"
    with pytest.raises(ValueError, match="--enable_xformers_memory_efficient_attention asks for memory-efficient"):
        TrainConfig(enable_xformers_memory_efficient_attention=True, attention="xla")


def _custom_call_targets(exported) -> str:
    return exported.mlir_module()


@pytest.fixture
def cudnn_lowering(monkeypatch):
    """Let JAX lower cuDNN attention on a machine without CUDA: its only host-side check is cuDNN's version."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    # cuDNN's kernels promise no serialisation compatibility; these exports are only lowered, never stored.
    return [export.DisabledSafetyCheck.custom_call(t) for t in ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")]


@pytest.mark.parametrize("queries, keys, head_dim", [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 64)])
def test_cudnn_attention_and_its_gradient_lower_for_cuda(cudnn_lowering, queries, keys, head_dim):
    q = jax.ShapeDtypeStruct((2, queries, 8, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, keys, 8, head_dim), jnp.bfloat16)

    def loss(a, b, c):
        return attn.attention(a, b, c, head_dim**-0.5, implementation="cudnn").astype(jnp.float32).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    module = export.export(step, platforms=["cuda"], disabled_checks=cudnn_lowering)(q, k, k).mlir_module()
    assert "__cudnn$fmhaSoftmax(" in module and "__cudnn$fmhaSoftmaxBackward(" in module


def test_pallas_attention_and_its_gradient_lower_for_tpu():
    q = jax.ShapeDtypeStruct((2, 4096, 8, 64), jnp.bfloat16)

    def loss(a, b, c):
        return attn.attention(a, b, c, 0.125, implementation="pallas").astype(jnp.float32).sum()

    module = export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(q, q, q)
    text = module.mlir_module()
    # forward, dK/dV and dQ kernels: three Mosaic custom calls
    assert text.count("tpu_custom_call") >= 3, text[:2000]
