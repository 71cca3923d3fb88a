"""The device mesh every part of the project shares: one "data" axis over all devices of all processes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D data-parallel mesh over all devices of all processes (or the given ones)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of training batches shaped (accum, global_batch, ...): rows split over the data axis."""
    return NamedSharding(mesh, P(None, DATA_AXIS))
