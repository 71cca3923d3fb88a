"""--gradient_checkpointing: the remat UNet trains to the same numbers with less memory in XLA's own accounting."""

import dataclasses

import jax
import numpy as np
import optax

from flax_lora import train as T
from flax_lora.config import TrainConfig, parse_args
from flax_lora.loading import SDPipeline
from flax_lora.lora import LoraConfig, init_lora
from flax_lora.models.unet import UNet2DConditionModel, UNetConfig, init_shapes
from flax_lora.models.vae import AutoencoderKL, VAEConfig
from flax_lora.sharding import make_mesh

# Small but not tiny: two levels, two-layer transformers, 16x16 latents: activations (not weights) dominate the
# step's temporary memory, as they do at real sizes. About 25 s to compile each way on one CPU core.
SMALL_UNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    transformer_layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=4,
)


def _random_params(shapes, rng: np.random.Generator) -> dict:
    """Random weights for param shapes, scaled so activations stay O(1); faster than compiling the model's init."""

    def leaf(path, x):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(np.float32)
        return np.full(x.shape, 1.0 if name == "scale" else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _step_and_inputs(remat: bool):
    """The project's train step on a random small UNet (one device), a fresh state and a cached-latents batch."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(SMALL_UNET), remat=remat)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 2, 4, 16, 16)).astype(np.float32)
    batch = {"latent_mean": latents, "latent_std": np.full_like(latents, 0.1),
             "text_embeddings": rng.standard_normal((1, 2, 16, 32)).astype(np.float32)}  # fmt: skip
    base = _random_params(init_shapes(unet.config), rng)
    lora = init_lora(jax.random.key(1), base, LoraConfig(4))
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # non-zero `up`: gradients reach every `down` too
    vae = AutoencoderKL(VAEConfig.from_dict({"scaling_factor": 0.18215}, "test"))
    pipe = SDPipeline(unet=unet, text_encoder=None, vae=vae, tokenizer=None, scheduler_config={}, params={},
                      path="", name="small")  # fmt: skip
    mesh = make_mesh(jax.devices()[:1])
    schedule = T.noise_schedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    optimizer = optax.sgd(1.0)  # the update is minus the gradient, so comparing updates compares gradients
    step = T.make_train_step(pipe, {"unet": LoraConfig(4)}, optimizer, schedule, mesh, base_params={"unet": base})
    state = T.create_train_state({"unet": lora}, optimizer, 0, mesh)
    return step, state, jax.device_put(batch, T.batch_sharding(mesh))


def test_gradient_checkpointing_gives_the_same_step_with_less_temporary_memory():
    results = {}
    for remat in (False, True):
        step, state, batch = _step_and_inputs(remat)
        before = jax.tree.map(np.asarray, state.params)
        compiled = step.jitted.lower(state, step.base_params, batch).compile()
        state, metrics = compiled(state, step.base_params, batch)
        grads = jax.tree.map(lambda b, a: b - np.asarray(a), before, state.params)
        results[remat] = (float(metrics["loss"]), grads, compiled.memory_analysis().temp_size_in_bytes)
    (loss, grads, temp), (remat_loss, remat_grads, remat_temp) = results[False], results[True]
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    assert scale > 0
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(r, g, rtol=1e-4, atol=1e-4 * scale)  # float32 rounding of a changed op order
    # Activations of every resnet and transformer layer are recomputed, not stored.
    assert remat_temp < 0.5 * temp, (temp, remat_temp)
    print(f"temp memory per step: {temp / 2**20:.1f} MiB, with remat {remat_temp / 2**20:.1f} MiB")


def test_gradient_checkpointing_flag():
    assert parse_args(["--gradient_checkpointing"]).gradient_checkpointing
    assert not TrainConfig().gradient_checkpointing
    unet = UNet2DConditionModel(UNetConfig.from_dict(SMALL_UNET))
    assert dataclasses.replace(SDPipeline(unet, None, None, None, {}, {}, "", ""), unet=unet.clone(remat=True)).unet.remat
