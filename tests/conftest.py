"""Shared test set-up: 8 fake CPU devices and tiny pipelines built once per session."""

import os

# Must be set before jax is imported anywhere: the tests shard over 8 host devices.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from flax_lora.tiny import build_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd1_path(tmp_path_factory) -> str:
    """A tiny SD1-style pipeline (conv proj_in/out, epsilon) saved by PyTorch diffusers."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd1", kind="sd1")


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory) -> str:
    """A tiny SD2-style pipeline (linear projections, per-block head dims, v_prediction)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd2", kind="sd2")
