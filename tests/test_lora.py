"""LoRA in our models: targets, zero start, the LoRA collection under jit, merge/unmerge, several adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_lora.loading import load_pipeline
from flax_lora.lora import (
    TEXT_ENCODER_TARGETS,
    LoraConfig,
    init_lora,
    lora_modules,
    merge_lora,
    new_adapter,
    pt_module_path,
    weighted_layers,
)


@pytest.fixture(scope="module")
def pipe(tiny_sd1_path):
    return load_pipeline(tiny_sd1_path)


def _randomize_up(tree, seed):
    """Give `up` non-zero values so the adapter changes outputs."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _unet(pipe, params, *lora):
    """A jitted UNet forward on fixed inputs, with the given (tree, scale) LoRA layers."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    text = rng.standard_normal((2, 16, 32)).astype(np.float32)
    return jax.jit(lambda p, lora: pipe.predict_noise({"unet": p}, latents, jnp.array([5, 600]), text, lora))(params, lora)


def test_pt_module_path_keeps_non_list_underscores():
    assert pt_module_path(("down_blocks_0", "attentions_1", "to_out_0")) == "down_blocks.0.attentions.1.to_out.0"
    assert pt_module_path(("time_embedding", "linear_1")) == "time_embedding.linear_1"
    assert pt_module_path(("text_model", "encoder", "layers_3", "mlp", "fc1")) == "text_model.encoder.layers.3.mlp.fc1"


def test_default_targets_and_patterns(pipe):
    default = init_lora(jax.random.key(0), pipe.params["unet"], LoraConfig(rank=2))
    names = {pt_module_path(p) for p in lora_modules(default)}
    assert names and all(n.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for n in names)
    assert sum(n.endswith("to_out.0") for n in names) == len(names) // 4
    for down, up in lora_modules(default).values():
        assert down.shape[-1] == 2 and up.shape[-2] == 2 and not up.any()

    wider = init_lora(jax.random.key(0), pipe.params["unet"], LoraConfig(target_modules=("proj_in", "ff.net.2")))
    conv_down, conv_up = lora_modules(wider)[("down_blocks_0", "attentions_0", "proj_in")]
    assert conv_down.shape == (1, 1, 32, 4) and conv_up.shape == (1, 1, 4, 32)  # SD1 proj_in is a 1x1 conv
    assert ("down_blocks_0", "attentions_0", "transformer_blocks_0", "ff", "net_2") in lora_modules(wider)

    regex = init_lora(jax.random.key(0), pipe.params["unet"], LoraConfig(target_modules=(r"re:mid_block\..*attn1\.to_q",)))
    assert [pt_module_path(p) for p in lora_modules(regex)] == ["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]

    text = init_lora(jax.random.key(0), pipe.params["text_encoder"], LoraConfig(target_modules=TEXT_ENCODER_TARGETS))
    assert len(lora_modules(text)) == 2 * 4  # two layers, four projections

    with pytest.raises(ValueError, match="match no Dense/Conv module; module paths look like"):
        init_lora(jax.random.key(0), pipe.params["unet"], LoraConfig(target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="1x1 Conv"):
        init_lora(jax.random.key(0), pipe.params["unet"], LoraConfig(target_modules=("conv_in",)))


def test_fresh_adapter_is_bit_identical_and_scale_is_alpha_over_rank(pipe):
    config = LoraConfig(rank=4, alpha=2.0)
    assert config.scale == 0.5 and LoraConfig(rank=8).scale == 1.0
    adapter = new_adapter(jax.random.key(1), pipe.params, config)
    base = _unet(pipe, pipe.params["unet"])
    fresh = _unet(pipe, pipe.params["unet"], adapter.scope_layers("unet"))
    np.testing.assert_array_equal(np.asarray(base), np.asarray(fresh))


def test_merged_equals_unmerged_and_unmerge_restores(pipe):
    adapter = new_adapter(jax.random.key(2), pipe.params, LoraConfig(rank=4, alpha=8, target_modules=("to_q", "to_v", "proj_in")))
    adapter.params["unet"] = _randomize_up(adapter.params["unet"], 3)
    tree, scale = adapter.scope_layers("unet", multiplier=0.7)
    assert scale == pytest.approx(2.0 * 0.7)
    base = _unet(pipe, pipe.params["unet"])
    unmerged = _unet(pipe, pipe.params["unet"], (tree, scale))
    merged_params = merge_lora(pipe.params["unet"], tree, scale)
    merged = _unet(pipe, merged_params)
    assert float(jnp.abs(unmerged - base).max()) > 1e-2  # the adapter does something
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5)
    restored = merge_lora(merged_params, tree, -scale)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(pipe.params["unet"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_several_adapters_add_up_with_their_own_weights(pipe):
    first = new_adapter(jax.random.key(4), pipe.params, LoraConfig(rank=2, target_modules=("to_k",)))
    second = new_adapter(jax.random.key(5), pipe.params, LoraConfig(rank=4, alpha=1, target_modules=("to_k", "to_out.0")))
    first.params["unet"] = _randomize_up(first.params["unet"], 6)
    second.params["unet"] = _randomize_up(second.params["unet"], 7)
    layers = weighted_layers([(first, 0.5), (second, 1.5)], "unet")
    both = _unet(pipe, pipe.params["unet"], *layers)
    fused = pipe.params["unet"]
    for tree, scale in layers:
        fused = merge_lora(fused, tree, scale)
    np.testing.assert_allclose(np.asarray(both), np.asarray(_unet(pipe, fused)), atol=1e-5)
    only_first = _unet(pipe, pipe.params["unet"], layers[0])
    assert float(jnp.abs(both - only_first).max()) > 1e-3


def test_gradients_reach_only_the_lora_tree(pipe):
    adapter = new_adapter(jax.random.key(8), pipe.params, LoraConfig(rank=2))
    latents = jnp.ones((1, 4, 8, 8))
    text = jnp.ones((1, 16, 32))

    def loss(lora_tree, base):
        return jnp.mean(pipe.predict_noise({"unet": base}, latents, jnp.array([3]), text, ((lora_tree, 1.0),)) ** 2)

    grads = jax.jit(jax.grad(loss))(adapter.params["unet"], pipe.params["unet"])
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapter.params["unet"])
    # With up = 0 only `up` gets a gradient at step 0, as in PEFT.
    up_norm = sum(float(jnp.abs(up).sum()) for _, up in lora_modules(grads).values())
    down_norm = sum(float(jnp.abs(down).sum()) for down, _ in lora_modules(grads).values())
    assert up_norm > 0 and down_norm == 0


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="unknown LoRA init"):
        LoraConfig(init="zeros")
