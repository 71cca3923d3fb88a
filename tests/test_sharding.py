"""--fsdp: the frozen base sharded over "fsdp" groups trains to the same numbers as the replicated one, and resumes."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flax_lora import train as T
from flax_lora.config import TrainConfig
from flax_lora.data import BatchLoader, load_image_folder
from flax_lora.errors import UserError
from flax_lora.sharding import FSDP_AXIS, MIN_SHARDED_SIZE, batch_sharding, make_mesh, param_sharding, param_shardings


from tests.test_train import pipe, two_images  # noqa: E402,F401  (the same module fixtures)


def test_mesh_axes_and_param_placement():
    mesh = make_mesh(fsdp=4)
    assert dict(mesh.shape) == {"data": 2, FSDP_AXIS: 4}
    # Every device still gets its own batch rows.
    assert len(batch_sharding(mesh).addressable_devices_indices_map((1, 8))) == 8
    spec = lambda shape: param_sharding(mesh, shape).spec  # noqa: E731
    assert spec((320, 1280)) == P(None, FSDP_AXIS)  # the largest dimension
    assert spec((3, 3, 640, 320)) == P(None, None, FSDP_AXIS, None)
    assert spec((1002, 1280)) == P(None, FSDP_AXIS)
    assert spec((1280, 1002)) == P(FSDP_AXIS, None)  # the largest one that 4 divides
    assert spec((1001, 999)) == P(None, None)  # none divides
    assert spec((1280,)) == P(None)  # small params (biases, norms) stay replicated
    assert make_mesh().shape[FSDP_AXIS] == 1
    assert param_sharding(make_mesh(), (320, 1280)).is_fully_replicated


@pytest.mark.parametrize("fsdp", [0, 3, 16])
def test_fsdp_that_does_not_divide_the_devices_is_a_user_error(fsdp):
    with pytest.raises(UserError, match=rf"--fsdp {fsdp} must divide the number of devices \(8\).*1, 2, 4, 8"):
        make_mesh(fsdp=fsdp)
    with pytest.raises(ValueError, match="--fsdp must be >= 1"):
        TrainConfig(fsdp=0)


def test_trainer_refuses_a_bad_fsdp_before_loading_anything(tmp_path):
    config = _config(str(tmp_path / "no-model"), str(tmp_path / "no-data"), tmp_path / "out", fsdp=3)
    with pytest.raises(UserError, match="--fsdp 3 must divide"):  # not the missing data or model
        T.main(config)
    assert not (tmp_path / "out").exists()


def _one_step(pipe, mesh, batch_np, rows):
    """Loss and LoRA gradients of one step (SGD with lr 1: the update is minus the gradient)."""
    import optax

    from flax_lora.lora import LoraConfig, new_adapter

    configs = {"unet": LoraConfig(4)}
    adapter = new_adapter(jax.random.PRNGKey(1), pipe.params, configs["unet"])
    adapter.params["unet"] = jax.tree.map(lambda x: x + 0.01, adapter.params["unet"])  # gradients reach every `down`
    optimizer = optax.sgd(1.0)
    state = T.create_train_state(adapter.params, optimizer, 0, mesh)
    before = T.to_host(state.params)
    step = T.make_train_step(pipe, configs, optimizer, T.noise_schedule(pipe.scheduler_config), mesh)
    state, metrics = step(state, T.put_batch(batch_np, mesh, 8, rows))
    grads = jax.tree.map(lambda b, a: b - a, before, T.to_host(state.params))
    step(state, T.put_batch(batch_np, mesh, 8, rows))
    assert step.compiled_count() == 1
    return step, float(metrics["loss"]), grads


def test_fsdp_step_equals_replicated_step(pipe, two_images):
    data = load_image_folder(two_images)
    replicated_mesh, fsdp_mesh = make_mesh(), make_mesh(fsdp=4)
    rows = T.process_rows(fsdp_mesh, 8)
    assert rows == T.process_rows(replicated_mesh, 8) == list(range(8))
    # Pixels and token ids: the step runs the VAE and the text encoder too, on their sharded weights.
    batch = BatchLoader(data, pipe.tokenizer, 64, global_batch=8, rows=rows, accum=1, random_flip=True).batch(0)
    _, loss, grads = _one_step(pipe, replicated_mesh, batch, rows)
    step, fsdp_loss, fsdp_grads = _one_step(pipe, fsdp_mesh, batch, rows)
    np.testing.assert_allclose(fsdp_loss, loss, rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(fsdp_grads)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * scale)

    # Each device stores a quarter of every large base weight and all of the small ones.
    leaves = jax.tree.leaves(step.base_params)
    sharded = [x for x in leaves if not x.sharding.is_fully_replicated]
    assert {m for x in sharded for m in x.sharding.spec if m} == {FSDP_AXIS}
    assert all(x.size < MIN_SHARDED_SIZE for x in leaves if x.sharding.is_fully_replicated)
    on_device0 = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == jax.devices()[0])
    replicated_bytes = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
    assert on_device0 == replicated_bytes + sum(x.nbytes for x in sharded) // 4
    assert sum(x.nbytes for x in sharded) > 0.4 * sum(x.nbytes for x in leaves)  # even in this tiny pipeline
    assert jax.tree.map(lambda s: s.spec, param_shardings(fsdp_mesh, pipe.params)) == jax.tree.map(
        lambda x: x.sharding.spec, step.base_params
    )


def _config(tiny_path, data_dir, out_dir, **kw) -> TrainConfig:
    base = dict(
        pretrained_model_name_or_path=tiny_path, train_data_dir=data_dir, output_dir=str(out_dir), resolution=64,
        center_crop=True, train_batch_size=1, learning_rate=3e-3, lr_warmup_steps=0, rank=4, cache_latents=True,
        cache_text_embeddings=True, report_to="none", seed=0, max_train_steps=4, checkpointing_steps=2,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_fsdp_run_validates_and_resumes_like_a_replicated_run(tiny_sd1_path, two_images, tmp_path):
    from safetensors.numpy import load_file

    straight = T.main(_config(tiny_sd1_path, two_images, tmp_path / "straight"))
    # The first half with --fsdp 4 draws validation images (the sampler gathers the sharded base) ...
    first = T.main(_config(tiny_sd1_path, two_images, tmp_path / "fsdp", fsdp=4, max_train_steps=2,
                           validation_prompt="a red circle", num_validation_images=2, num_inference_steps=2))  # fmt: skip
    assert first["step"] == 2 and len(first["samples"]) == 2
    # ... and the second resumes its checkpoint, also with --fsdp 4.
    second = T.main(_config(tiny_sd1_path, two_images, tmp_path / "fsdp", fsdp=4, resume_from_checkpoint="latest"))
    assert second["step"] == 4
    np.testing.assert_allclose([l for _, l in second["loss_history"]], [l for _, l in straight["loss_history"]], rtol=1e-4)
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-6, err_msg=k)
