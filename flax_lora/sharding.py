"""The device mesh every part of the project shares, and where arrays live on it.

Design:
- One mesh over all devices of all processes, axes ("data", "fsdp"). Batches are split over both axes, so every
  device trains on its own rows whatever N is.
- FSDP for the frozen base (`--fsdp N`): each large base weight is cut along one dimension over the N devices of an
  "fsdp" group, so a device stores 1/N of it; XLA's SPMD partitioner all-gathers a weight where a layer uses it.
  N = 1 gives an "fsdp" axis of size 1: every device holds a full copy, as a plain data-parallel mesh does.
- LoRA params and their AdamW state stay replicated: fp32 weights plus two moments are 12 bytes per LoRA param,
  70 MB for SDXL's UNet at rank 4 (5.8 M params; README: Benchmark) against 1.3 GB for a quarter of its bf16 base:
  too little to be worth sharding.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_lora.errors import UserError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# Params with fewer elements stay replicated (biases, norms, small convs): they add up to little memory, and each
# sharded param costs one all-gather per use.
MIN_SHARDED_SIZE = 2**14


def make_mesh(devices: list | None = None, fsdp: int = 1) -> Mesh:
    """A ("data", "fsdp") mesh over all devices of all processes (or the given ones), `fsdp` devices per group."""
    devices = jax.devices() if devices is None else list(devices)
    if fsdp < 1 or len(devices) % fsdp:
        divisors = [n for n in range(1, len(devices) + 1) if len(devices) % n == 0]
        raise UserError(
            f"--fsdp {fsdp} must divide the number of devices ({len(devices)}) so that every group has as many; "
            f"use one of {divisors}"
        )
    # Consecutive devices form a group: when N divides the devices per process, the gathers stay within a host.
    return Mesh(np.asarray(devices).reshape(-1, fsdp), (DATA_AXIS, FSDP_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of training batches shaped (accum, global_batch, ...): rows split over every device of the mesh."""
    return NamedSharding(mesh, P(None, mesh.axis_names))


def param_sharding(mesh: Mesh, shape: tuple[int, ...], min_size: int = MIN_SHARDED_SIZE) -> NamedSharding:
    """FSDP placement of one frozen param: its largest dimension that the "fsdp" axis divides is split over it;
    replicated when no dimension divides, for params under `min_size` elements, and on a mesh without FSDP."""
    n = dict(mesh.shape).get(FSDP_AXIS, 1)
    spec: list[str | None] = [None] * len(shape)
    divisible = [d for d, size in enumerate(shape) if size % n == 0]
    if n > 1 and divisible and math.prod(shape) >= min_size:
        spec[max(divisible, key=lambda d: shape[d])] = FSDP_AXIS
    return NamedSharding(mesh, P(*spec))


def param_shardings(mesh: Mesh, params: Any, min_size: int = MIN_SHARDED_SIZE) -> Any:
    """`param_sharding` of every leaf of a param tree (arrays or jax.ShapeDtypeStruct)."""
    return jax.tree.map(lambda x: param_sharding(mesh, tuple(x.shape), min_size), params)


def place(tree: Any, shardings: Any, dtype: Any = None) -> Any:
    """Put every leaf on its sharding, floating ones cast to `dtype` when given. jax.ShapeDtypeStruct leaves stay
    abstract, with the sharding attached, so a step can be compiled from shapes alone (bench_train.py --compile_only)."""

    def put(x, sharding):
        cast = dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype if cast else x.dtype, sharding=sharding)
        x = jax.device_put(x, sharding)  # cast after: each device converts only its shard
        return x.astype(dtype) if cast else x

    return jax.tree.map(put, tree, shardings)


def remat_compiler_options(mesh: Mesh) -> dict[str, str] | None:
    """XLA options a step with jax.checkpoint (remat) needs on this mesh's platform to save memory, or None.

    XLA:CPU removes remat's optimization barriers before its CSE passes, which then merge the recomputation back into
    the forward pass: no memory is saved. Keeping the barriers gives CPU what GPU and TPU do by default (they remove
    them only after CSE), so the CPU runs and the compile-only memory benchmark see the savings a GPU sees.
    """
    if mesh.devices.flat[0].platform != "cpu":
        return None
    return {"xla_disable_hlo_passes": "cse_barrier_expander"}
