"""The persistent compilation cache: on by default in the given folder, off by name, JAX's own setting first."""

import jax

from flax_lora.compile_cache import enable_compilation_cache
from flax_lora.config import DEFAULT_COMPILATION_CACHE, InferConfig, TrainConfig


def test_cache_folder_is_set_created_or_turned_off(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    before = jax.config.jax_compilation_cache_dir
    try:
        folder = tmp_path / "cache" / "jax"
        assert enable_compilation_cache(str(folder)) == str(folder) and folder.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(folder)
        for off in ("none", "off", "", None):
            assert enable_compilation_cache(off) is None
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/else")  # the user's JAX setting wins
        assert enable_compilation_cache(str(tmp_path / "other")) == "/somewhere/else"
        assert not (tmp_path / "other").exists()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert TrainConfig().compilation_cache_dir == InferConfig(prompt="x", pretrained_model_name_or_path="m").compilation_cache_dir == DEFAULT_COMPILATION_CACHE
