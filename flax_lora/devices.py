"""Where a training run's devices come from: the automatic CPU split, jax.distributed, and glibc's huge pages.

On a CPU host a fresh single-process run splits the CPU into XLA devices, up to one per core (XLA:CPU runs a
device's step mostly on one thread); --train_batch_size is then the whole batch, so it trains what one device
would. An explicit count (--num_cpu_devices, JAX_NUM_CPU_DEVICES, XLA_FLAGS), a multi-process run or a process
where JAX has already started keeps the devices as they are, and --train_batch_size per device.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

from flax_lora.cli import HUGE_PAGES_TUNABLE
from flax_lora.config import TrainConfig

logger = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask (a container's or taskset's share), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def auto_cpu_devices(cores: int, batch: int, fsdp: int = 1) -> int:
    """Devices of the automatic CPU split: the most, at most one per core, that divide the batch into equal shares
    and form whole --fsdp groups; 1 when no count does."""
    return max((n for n in range(1, min(cores, batch) + 1) if batch % n == 0 and n % fsdp == 0), default=1)


MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def local_model_bytes(path: str | None, mixed_precision: str) -> int | None:
    """About how much host memory one copy of a local pipeline's weights takes (None: not a local folder).

    The largest weight file of each component, doubled in fp32 (a file may hold fp16 weights): an upper bound, so
    that the automatic split never plans more model copies than fit.
    """
    folder = os.path.expanduser(path or "")
    if not path or not os.path.isdir(folder):
        return None
    total = 0
    for component in MODEL_COMPONENTS:
        weights = Path(folder, component)
        sizes = [f.stat().st_size for f in weights.glob("*") if f.suffix in (".safetensors", ".bin")]
        total += max(sizes, default=0)
    return total * (2 if mixed_precision == "no" else 1)


def devices_that_fit(model_bytes: int | None, fsdp: int, ram_bytes: int) -> int | None:
    """The most CPU devices whose model copies (each holding 1/fsdp of it) plus the host's fit in 60% of RAM."""
    if not model_bytes:
        return None
    return max(1, int((0.6 * ram_bytes / model_bytes - 1) * fsdp))


def ram_bytes() -> int:
    """Physical memory of this host."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def global_batch_size(train_batch_size: int, device_count: int, cpu_split: int) -> int:
    """Rows of one micro-batch over all devices: --train_batch_size per device, or all of it when the CPU was split
    automatically (so the split trains what one device would)."""
    return train_batch_size if cpu_split else train_batch_size * device_count


def cpu_device_count_is_set() -> bool:
    """Whether JAX_NUM_CPU_DEVICES, jax.config or XLA_FLAGS already chose the CPU device count (the user's, kept)."""
    return jax.config.values["jax_num_cpu_devices"] >= 0 or (
        "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    )


def cpu_split_message(batch: int, devices: int, cores: int) -> str:
    """The log line that says how the automatic CPU split shares the batch."""
    if devices == 1:
        why = f" (no device count up to the {cores} cores divides it; a batch the core count divides trains faster)"
        return f"CPU: batch {batch} on 1 XLA device" + (why if cores > 1 else "")
    how = "one per core" if devices == cores else f"the most of the {cores} cores that divide the batch"
    return f"CPU: batch {batch} split over {devices} XLA devices ({how}; --num_cpu_devices 1 turns this off)"


def huge_pages_enabled() -> bool:
    """Whether GLIBC_TUNABLES asks glibc for huge pages (train_flax.py restarts itself with them; flax_lora.cli)."""
    tunables = dict(t.split("=", 1) for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if "=" in t)
    return tunables.get(HUGE_PAGES_TUNABLE, "0") not in ("", "0")


def log_cpu_split(batch: int, devices: int, fsdp: int, model_bytes: int) -> None:
    """Say how the automatic CPU split shares the batch, and warn when the model's copies may not fit in RAM."""
    logger.info("%s; glibc huge pages %s", cpu_split_message(batch, devices, usable_cores()),
                "on" if huge_pages_enabled() else "off (train_flax.py turns them on)")  # fmt: skip
    # Every CPU device holds its own copy of the frozen model in host memory (FSDP splits the large weights).
    need, ram = model_bytes * (devices / fsdp + 1), ram_bytes()
    if devices > 1 and need > 0.8 * ram:
        logger.warning(
            "the %d CPU devices each hold a copy of the frozen model: about %.1f of %.1f GiB of RAM; if the run runs "
            "out of memory, pass --num_cpu_devices 1 or --fsdp %d", devices, need / 2**30, ram / 2**30, devices,
        )


def init_devices(config: TrainConfig) -> int:
    """Set the CPU device count and start jax.distributed when several processes are configured.

    Returns the CPU devices split automatically (--num_cpu_devices 0), or 0. No automatic split when the count is
    explicit (the flag, JAX_NUM_CPU_DEVICES, XLA_FLAGS), in multi-process runs, and when JAX has already started in
    this process (library use, the test suite's 8 fake devices): their --train_batch_size stays per device.
    """
    multi_process = config.coordinator_address is not None or config.multihost
    split = 0
    if not config.num_cpu_devices and not multi_process and not cpu_device_count_is_set():
        cores = usable_cores()
        # Each CPU device holds its own copy of the frozen model: no more devices than copies fit in memory.
        fit = devices_that_fit(local_model_bytes(config.pretrained_model_name_or_path, config.mixed_precision),
                               config.fsdp, ram_bytes())  # fmt: skip
        n = auto_cpu_devices(min(cores, fit or cores), config.train_batch_size, config.fsdp)
        try:  # shapes the CPU backend only: on a GPU/TPU host it changes nothing the run uses
            jax.config.update("jax_num_cpu_devices", n)
            split = n
        except RuntimeError:  # JAX has started: its devices stay as they are
            pass
    if config.num_cpu_devices:
        try:
            jax.config.update("jax_num_cpu_devices", config.num_cpu_devices)
        except RuntimeError as e:  # JAX reads it once, when its backends start
            raise RuntimeError(
                f"--num_cpu_devices {config.num_cpu_devices} cannot take effect: this process has already started "
                "JAX. Train in a fresh process, or set JAX_NUM_CPU_DEVICES before JAX starts."
            ) from e
    if multi_process:
        # CPU-only processes need an explicit collectives backend; GPU/TPU ignore this option.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if config.coordinator_address is not None:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    elif config.multihost:
        jax.distributed.initialize()
    return split
