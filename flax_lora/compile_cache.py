"""JAX's persistent compilation cache in the user cache folder, so a second run of the same config starts fast.

The first step of a run is mostly XLA compiling the train step (seconds on CPU, minutes for SDXL on a TPU);
JAX can keep the compiled executables on disk, keyed by the computation, its shapes, the devices and the
compiler version, so a rerun with the same settings loads them instead. A cache folder the user configured
for JAX itself (JAX_COMPILATION_CACHE_DIR) wins over ours.
"""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)

DISABLED = ("", "none", "off")


def enable_compilation_cache(folder: str | None) -> str | None:
    """Cache compiled steps in `folder` (None, '', 'none' or 'off': no cache); returns the folder in use."""
    configured = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if configured:
        return configured
    if folder is None or folder.lower() in DISABLED:
        return None
    folder = os.path.abspath(os.path.expanduser(folder))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a read-only home must not stop training: it only costs the compile
        logger.warning("compilation cache disabled: cannot create %s (%s)", folder, e)
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    # Only compiles worth the disk: the steps and samplers, not the many tiny helper computations.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder
