"""Attention kernels of the models, one entry point (`attention`) and a per-platform choice (`choose`).

Implementations, over (batch, length, heads, head_dim) arrays:
- "xla": softmax attention as plain XLA ops, the reference. It materialises the (batch*heads, queries, keys)
  scores and autodiff keeps them for the backward pass.
- "chunked": ours. The forward runs over chunks of queries and keeps only the output and each row's
  log-sum-exp; the backward (FlashAttention-2's, over chunks of keys) recomputes the probabilities, so no score
  tensor outlives its chunk. On CPU, where a chunk's scores stay in cache, it is also the fastest path measured
  (README, Benchmark). Any platform.
- "cudnn": cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`): NVIDIA GPUs,
  bf16/fp16, head dim a multiple of 8 and at most 128 (256 from Hopper on).
- "pallas": the TPU Pallas flash-attention kernel (`jax.experimental.pallas.ops.tpu.flash_attention`), blocks of
  128 tokens; other lengths and head dims are padded (see `pallas_attention`), which "auto" avoids.
- "auto" (the default): the fused kernel of the platform where it applies, else "chunked" on CPU and "xla" on
  GPU/TPU. "memory_efficient" (what `--enable_xformers_memory_efficient_attention` asks for): the fused kernel
  where it applies, else "chunked", so that no score tensor is kept anywhere.
Causal attention (CLIP's 77 tokens) always runs "xla": its sequences are short.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from flax_lora.errors import UserError

logger = logging.getLogger(__name__)

KERNELS = ("xla", "chunked", "cudnn", "pallas")
IMPLEMENTATIONS = ("auto", "memory_efficient", *KERNELS)
# Queries (forward) and keys (backward) per chunk. Measured on CPU, one core, on the benchmark's `small` UNet's
# 1024-token self-attention: 32 beat 16, 64 and 128.
ATTENTION_CHUNK = 32
# "auto" on TPU: the Pallas kernel from this many queries on (SD's 64x64 and 32x32 latents at 512 px). The score
# tensor grows with the square of the length, so long sequences are where a flash kernel saves the most; the
# threshold is a choice, not a measurement (nothing here ran on a TPU).
PALLAS_MIN_QUERIES = 1024
PALLAS_BLOCK = 128
_FUSED_KERNEL = {"gpu": "cudnn", "tpu": "pallas"}


@dataclass(frozen=True)
class AttentionShape:
    """What the choice of kernel depends on: one attention call's sizes and dtype."""

    queries: int
    keys: int
    head_dim: int
    dtype: str  # jnp.dtype name, e.g. "bfloat16"


def cudnn_unsupported(shape: AttentionShape, gpu_capability: str | None) -> str | None:
    """Why cuDNN's flash attention cannot run this shape (None: it can); the rules JAX's cuDNN lowering checks."""
    if shape.dtype not in ("bfloat16", "float16"):
        return f"cuDNN flash attention needs bf16 or fp16, not {shape.dtype}"
    hopper = gpu_capability is not None and tuple(map(int, gpu_capability.split("."))) >= (9, 0)
    limit = 256 if hopper else 128
    if shape.head_dim % 8 or shape.head_dim > limit:
        where = "from Hopper (compute capability 9.0) on" if hopper else "before Hopper (compute capability 9.0)"
        return f"cuDNN needs a head dim that is a multiple of 8 and at most {limit} {where}, not {shape.head_dim}"
    return None


def pallas_unsupported(shape: AttentionShape) -> str | None:
    """Why "auto" does not pick the TPU Pallas kernel for this shape (None: it does)."""
    if shape.queries < PALLAS_MIN_QUERIES:
        return f"{shape.queries} queries: the Pallas kernel is used from {PALLAS_MIN_QUERIES} on"
    if shape.queries % PALLAS_BLOCK or shape.keys % PALLAS_BLOCK:
        return f"{shape.queries} queries and {shape.keys} keys: not both multiples of the {PALLAS_BLOCK}-token block"
    if shape.head_dim > PALLAS_BLOCK and shape.head_dim % PALLAS_BLOCK:
        return f"head dim {shape.head_dim}: above {PALLAS_BLOCK} the kernel takes multiples of {PALLAS_BLOCK} only"
    return None


def choose(requested: str, platform: str, shape: AttentionShape, gpu_capability: str | None = None) -> str:
    """The kernel that `requested` (one of IMPLEMENTATIONS) runs for this shape on this platform ("cpu", "gpu", "tpu")."""
    if requested not in IMPLEMENTATIONS:
        raise UserError(f"--attention {requested!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    if requested == "cudnn" and (reason := cudnn_unsupported(shape, gpu_capability)):
        raise UserError(f"--attention cudnn: {reason}; --attention auto falls back where cuDNN does not apply")
    if requested in KERNELS:
        return requested
    fused = _FUSED_KERNEL.get(platform)
    if fused == "cudnn" and cudnn_unsupported(shape, gpu_capability) is None:
        return "cudnn"
    if fused == "pallas" and pallas_unsupported(shape) is None:
        return "pallas"
    return "chunked" if requested == "memory_efficient" or platform == "cpu" else "xla"


def _platform() -> tuple[str, str | None]:
    """The default backend's platform and, on a GPU, its compute capability."""
    platform = jax.default_backend()
    if platform != "gpu":
        return platform, None
    device = jax.local_devices()[0]
    if "rocm" in getattr(device.client, "platform_version", "").lower():  # AMD GPUs: no cuDNN, so no fused kernel
        return "rocm", None
    return platform, getattr(device, "compute_capability", None)


_logged: set[tuple] = set()


def _log_choice(requested: str, platform: str, shape: AttentionShape, kernel: str) -> None:
    """Log once per process which kernel each attention size runs (several calls share a size)."""
    if (key := (requested, platform, shape)) in _logged:
        return
    _logged.add(key)
    logger.info(
        "attention %s on %s: %d queries x %d keys, head dim %d, %s -> %s",
        requested, platform, shape.queries, shape.keys, shape.head_dim, shape.dtype, kernel,
    )  # fmt: skip


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


def _merge_heads(x: jax.Array) -> jax.Array:
    """(batch, length, heads, head_dim) -> (batch*heads, length, head_dim): the layout of xla and chunked."""
    batch, length, heads, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch * heads, length, head_dim)


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
    """Inverse of `_merge_heads`."""
    return x.reshape(x.shape[0] // heads, heads, *x.shape[1:]).transpose(0, 2, 1, 3)


def _round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least n."""
    return -(-n // multiple) * multiple


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad `axis` of `x` up to `size`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float) -> jax.Array:
    """cuDNN's fused flash attention over (batch, length, heads, head_dim): NVIDIA GPUs only.

    JAX's cuDNN lowering takes only even lengths in training (77 text tokens are not): an odd length gets one
    padded token, which the sequence lengths mask out (keys) or which is sliced off (queries).
    """
    batch, queries, keys = query.shape[0], query.shape[1], key.shape[1]
    q_len, k_len = _round_up(queries, 2), _round_up(keys, 2)
    lengths = {}
    if (q_len, k_len) != (queries, keys):
        query, key, value = _pad_axis(query, 1, q_len), _pad_axis(key, 1, k_len), _pad_axis(value, 1, k_len)
        lengths = dict(
            query_seq_lengths=jnp.full((batch,), queries, jnp.int32),
            key_value_seq_lengths=jnp.full((batch,), keys, jnp.int32),
        )
    out = jax.nn.dot_product_attention(query, key, value, scale=scale, implementation="cudnn", **lengths)
    return out[:, :queries]


def pallas_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float) -> jax.Array:
    """The TPU Pallas flash-attention kernel over (batch, length, heads, head_dim); on CPU only in interpret mode.

    The kernel takes lengths in 128-token blocks and head dims up to 128 or in multiples of 128: other sizes
    are zero-padded. Padded keys are masked out (segment ids), padded queries and head dims are sliced off.
    """
    # Imported here: only a TPU run (or a test in interpret mode) needs Pallas' TPU kernels.
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    batch, queries, _, head_dim = query.shape
    keys = key.shape[1]
    q_len, k_len = _round_up(queries, PALLAS_BLOCK), _round_up(keys, PALLAS_BLOCK)
    dim = head_dim if head_dim <= PALLAS_BLOCK else _round_up(head_dim, PALLAS_BLOCK)
    # the kernel's (batch, heads, length, head_dim); zeros in the padded head dims leave the scores unchanged
    q, k, v = (_pad_axis(_pad_axis(x, 1, n), 3, dim).transpose(0, 2, 1, 3)
               for x, n in ((query, q_len), (key, k_len), (value, k_len)))  # fmt: skip
    segments = None
    if k_len != keys:
        real_keys = (jnp.arange(k_len) < keys).astype(jnp.int32)
        segments = tpu_flash.SegmentIds(q=jnp.ones((batch, q_len), jnp.int32), kv=jnp.tile(real_keys, (batch, 1)))
    b = PALLAS_BLOCK
    blocks = tpu_flash.BlockSizes(
        block_q=b, block_k_major=b, block_k=b, block_b=1, block_q_major_dkv=b, block_k_major_dkv=b, block_k_dkv=b,
        block_q_dkv=b, block_k_major_dq=b, block_k_dq=b, block_q_dq=b,
    )  # fmt: skip
    out = tpu_flash.flash_attention(q, k, v, segment_ids=segments, sm_scale=float(scale), block_sizes=blocks)
    return out.transpose(0, 2, 1, 3)[:, :queries, :, :head_dim]


def attention(
    query: jax.Array, key: jax.Array, value: jax.Array, scale: float, causal: bool = False, implementation: str = "auto"
) -> jax.Array:
    """softmax(scale * q k^T) v over (batch, length, heads, head_dim) arrays with the chosen implementation."""
    heads = query.shape[2]
    if causal:  # causal masks (the text encoders' 77 tokens) stay on xla
        out = xla_attention(_merge_heads(query), _merge_heads(key), _merge_heads(value), scale, causal=True)
        return _split_heads(out, heads)
    shape = AttentionShape(query.shape[1], key.shape[1], query.shape[3], jnp.dtype(query.dtype).name)
    platform, capability = _platform()
    kernel = choose(implementation, platform, shape, capability)
    _log_choice(implementation, platform, shape, kernel)
    if kernel == "cudnn":
        return cudnn_attention(query, key, value, scale)
    if kernel == "pallas":
        return pallas_attention(query, key, value, scale)
    run = chunked_attention if kernel == "chunked" else xla_attention
    return _split_heads(run(_merge_heads(query), _merge_heads(key), _merge_heads(value), scale), heads)


def check_platform(requested: str) -> None:
    """Refuse a kernel that cannot run on this process's default backend (cudnn off GPUs, pallas off TPUs)."""
    needs = {kernel: platform for platform, kernel in _FUSED_KERNEL.items()}.get(requested)
    if needs is not None and (platform := _platform()[0]) != needs:  # an AMD (ROCm) GPU has no cuDNN either
        raise UserError(
            f"--attention {requested} runs on {needs.upper()}s only; this run is on {platform}: use --attention auto"
        )
