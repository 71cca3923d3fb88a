"""Shared test set-up: 8 fake CPU devices and tiny pipelines, saved by PyTorch diffusers, built once per session."""

import os
import tempfile

# Must be set before jax is imported anywhere: the tests shard over 8 host devices.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Many tests compile the same steps at the same shapes: JAX's persistent cache compiles each once per machine.
# Keep it one folder for the whole session: a module pointing JAX elsewhere recompiles what other modules compiled.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"flax-lora-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

from tests.pipelines import build_torch_pipeline  # noqa: E402


# The slowest modules, slowest first (durations of a cold run on 2 cores): pytest-xdist (`-n auto --dist loadfile`,
# pyproject.toml) hands whole modules to its workers in collection order, so these start first and the two workers
# end about together, rather than one starting test_demo's 4-minute first run when the other is nearly done.
SLOWEST_MODULES = ("test_demo", "test_inference", "test_train", "test_sdxl", "test_dora", "test_loading", "test_locon",
                   "test_sharding", "test_train_options", "test_buckets", "test_dreambooth", "test_cpu_devices",
                   "test_multiprocess", "test_bench", "test_remat")  # fmt: skip


def pytest_collection_modifyitems(items: list) -> None:
    """Run the slowest modules first (see SLOWEST_MODULES); the order within a module is kept."""
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


@pytest.fixture(scope="session")
def tiny_sd1_path(tmp_path_factory) -> str:
    """A tiny SD1-style pipeline (conv proj_in/out, epsilon, quick-GELU CLIP) saved by diffusers + transformers 5."""
    return build_torch_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd1", kind="sd1")


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory) -> str:
    """A tiny SD2-style pipeline (linear projections, per-block heads, v_prediction, GELU CLIP)."""
    return build_torch_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd2", kind="sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> str:
    """A tiny SDXL-style pipeline (text_time conditioning, two text encoders, blocks without attention)."""
    return build_torch_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sdxl", kind="sdxl")


@pytest.fixture(scope="session")
def tiny_sd1_old_layout_path(tmp_path_factory) -> str:
    """The SD1 pipeline with its text encoder saved the transformers 4.x way (`text_model.` keys)."""
    return build_torch_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd1-old", kind="sd1", old_layout=True)
