"""Training: schedules match diffusers, the sharded step, loss goes down (in JAX and PyTorch), exact resume."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_lora import train as T
from flax_lora.config import TrainConfig
from flax_lora.data import BatchLoader, build_tiny_dataset, load_image_folder, preprocess_image

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def pipe(tiny_sd1_path):
    from flax_lora.loading import load_pipeline

    return load_pipeline(tiny_sd1_path)


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("data") / "two", num_images=2, resolution=64)


# ------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noising_matches_diffusers_ddpm(beta_schedule, prediction_type):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    sched = T.noise_schedule(dict(ref.config))
    np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-4)
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(2, 4, 3, 3)).astype(np.float32), rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
    t = np.array([10, 900])
    x_t, target = T.add_noise(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    tx0, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    np.testing.assert_allclose(x_t, ref.add_noise(tx0, tn, tt).numpy(), atol=1e-5)
    expected = tn if prediction_type == "epsilon" else ref.get_velocity(tx0, tn, tt)
    np.testing.assert_allclose(target, expected.numpy(), atol=1e-5)


def test_unknown_beta_schedule_is_a_user_error():
    from flax_lora.errors import UserError

    with pytest.raises(UserError, match="beta_schedule='laplace'"):
        T.noise_schedule({"beta_schedule": "laplace"})


def test_min_snr_weighting():
    sched = T.noise_schedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    t = jnp.array([5, 500])
    pred, target = jnp.ones((2, 4)), jnp.zeros((2, 4))
    snr = np.asarray(T.snr(sched, t))
    assert snr[0] > 5 > snr[1]  # low noise: weight gamma/snr; high noise: weight 1
    expected = np.mean([5.0 / snr[0], 1.0])
    np.testing.assert_allclose(T.diffusion_loss(pred, target, t, sched, snr_gamma=5.0), expected, rtol=1e-5)
    assert float(T.diffusion_loss(pred, target, t, sched)) == 1.0


@pytest.mark.parametrize(
    "name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
)
def test_lr_schedules_match_diffusers(name):
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=30, num_cycles=2, power=2.0)
    fn = T.lr_schedule(name, 1e-3, 5, 30, num_cycles=2, power=2.0)
    for step in range(32):
        np.testing.assert_allclose(float(fn(step)), opt.param_groups[0]["lr"], rtol=1e-4, atol=1e-10, err_msg=f"step {step}")
        opt.step()
        ref.step()


# ------------------------------------------------------------------------------------- the step


def test_sharded_step_trains_lora_only_and_compiles_once(pipe, two_images):
    from flax_lora.lora import LoraConfig, new_adapter

    assert jax.device_count() == 8
    mesh = T.make_mesh()
    config = TrainConfig(resolution=64, learning_rate=1e-2, lr_warmup_steps=0)
    configs = {"unet": LoraConfig(4)}
    adapter = new_adapter(jax.random.PRNGKey(1), pipe.params, configs["unet"])
    optimizer, lr_fn = T.make_optimizer(config, 10, config.learning_rate)
    base_before = jax.tree.map(np.array, pipe.params)
    state = T.create_train_state(adapter.params, optimizer, 0, mesh)
    lora_before = jax.tree.map(np.array, state.params)
    step = T.make_train_step(
        pipe, configs, optimizer, T.noise_schedule(pipe.scheduler_config), mesh, snr_gamma=5.0, lr_fn=lr_fn
    )
    data = load_image_folder(two_images)
    rows = T.process_rows(mesh, 8)
    loader = BatchLoader(data, pipe.tokenizer, 64, global_batch=8, rows=rows, accum=2, random_flip=True)
    for i in range(2):
        state, metrics = step(state, T.put_batch(loader.batch(i), mesh, 8, rows))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert step.compiled_count() == 1  # the second call reused the first compile
    assert int(state.step) == 2
    assert state.params["unet"] is not None
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), lora_before, state.params)
    assert all(jax.tree.leaves(changed["unet"]))  # every LoRA leaf moved (up starts at 0, down gets grads after)
    same = jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), base_before, pipe.params)
    assert all(jax.tree.leaves(same))
    # The batch is split over all 8 devices; params are replicated.
    batch = T.put_batch(loader.batch(2), mesh, 8, rows)
    assert len(batch["pixel_values"].sharding.device_set) == 8
    assert batch["pixel_values"].addressable_shards[0].data.shape[1] == 1
    assert jax.tree.leaves(state.params)[0].sharding.is_fully_replicated


# ------------------------------------------------------------------------------- end-to-end runs


def assert_same_adapter(folder_a, folder_b) -> None:
    """The diffusers adapter files of two runs hold the same keys and bit-identical weights."""
    from safetensors.numpy import load_file

    a = load_file(str(Path(folder_a) / "pytorch_lora_weights.safetensors"))
    b = load_file(str(Path(folder_b) / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _config(tiny_path, data_dir, out_dir, **kw) -> TrainConfig:
    base = dict(
        pretrained_model_name_or_path=tiny_path,
        train_data_dir=data_dir,
        output_dir=str(out_dir),
        resolution=64,
        center_crop=True,
        train_batch_size=1,
        learning_rate=3e-3,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        rank=4,
        cache_latents=True,
        cache_text_embeddings=True,
        report_to="none",
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _eval_batch(pipe, data_dir):
    """Fixed latents, noise, timesteps and token ids (a dict: both tokenizers for SDXL) for a deterministic loss."""
    data = load_image_folder(data_dir)
    pixels = np.stack(
        [preprocess_image(data.load_image(i), 64, True, False, np.random.default_rng(0)) for i in range(len(data))]
    )
    ids = pipe.tokenize([data.captions(i)[0] for i in range(len(data))])
    t = np.array([50, 200, 400, 600, 800], np.int32)
    pixels, ids = np.repeat(pixels, len(t), 0), {k: np.repeat(v, len(t), 0) for k, v in ids.items()}
    t = np.tile(t, len(data))
    noise = np.random.default_rng(1).normal(size=(len(t), 4, 8, 8)).astype(np.float32)
    return pixels, ids, t, noise


# SDXL's size conditioning of a 64 px centre crop of a 64 px image: original size, crop top-left, target size.
EVAL_TIME_IDS = (64, 64, 0, 0, 64, 64)


def _jax_eval_loss(pipe, adapter, pixels, ids, t, noise) -> float:
    """Denoising MSE of the pipeline, with every component of `adapter` (or none) applied."""
    layers = {} if adapter is None else {c: (adapter.scope_layers(c),) for c in adapter.params}
    return float(jax.jit(lambda layers: _eval_loss_fn(pipe, layers, pixels, ids, t, noise))(layers))


def _eval_loss_fn(pipe, layers, pixels, ids, t, noise):
    latents = pipe.vae.scale_latents(pipe.encode_images(pipe.params, pixels).mean)
    sched = T.noise_schedule(pipe.scheduler_config)
    noisy, target = T.add_noise(sched, latents, jnp.asarray(noise), jnp.asarray(t))
    context, pooled = pipe.encode_prompt(pipe.params, ids, layers)
    added = None
    if pooled is not None:
        added = {"text_embeds": pooled, "time_ids": jnp.tile(jnp.array(EVAL_TIME_IDS, jnp.float32), (len(t), 1))}
    pred = pipe.predict_noise(pipe.params, noisy, jnp.asarray(t), context, layers.get("unet", ()), added)
    return jnp.mean((pred - target) ** 2)


def _torch_eval_loss(sd, pixels, ids, t, noise) -> float:
    """The same loss in a PyTorch StableDiffusionPipeline or StableDiffusionXLPipeline."""
    with torch.no_grad():
        latents = sd.vae.encode(torch.from_numpy(pixels)).latent_dist.mean * sd.vae.config.scaling_factor
        tt = torch.from_numpy(t).long()
        tn = torch.from_numpy(noise)
        noisy = sd.scheduler.add_noise(latents, tn, tt)
        kwargs = {}
        if getattr(sd, "text_encoder_2", None) is None:
            emb = sd.text_encoder(torch.from_numpy(ids["input_ids"]).long())[0]
        else:  # diffusers' SDXL encode_prompt: penultimate states of both encoders, pooled projection of the second
            out_1 = sd.text_encoder(torch.from_numpy(ids["input_ids"]).long(), output_hidden_states=True)
            out_2 = sd.text_encoder_2(torch.from_numpy(ids["input_ids_2"]).long(), output_hidden_states=True)
            emb = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
            time_ids = torch.tensor([EVAL_TIME_IDS] * len(t), dtype=torch.float32)
            kwargs["added_cond_kwargs"] = {"text_embeds": out_2.text_embeds, "time_ids": time_ids}
        pred = sd.unet(noisy, tt, emb, **kwargs).sample
        return float(torch.mean((pred - tn) ** 2))


def test_training_lowers_loss_and_the_adapter_works_in_pytorch(tiny_sd1_path, two_images, pipe, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from flax_lora.formats import load_adapter
    from tests.test_formats import _flax_deltas

    config = _config(
        tiny_sd1_path, two_images, tmp_path / "run", max_train_steps=40, checkpointing_steps=1000,
        validation_prompt="a red circle", validation_epochs=20, num_validation_images=2, num_inference_steps=4,
        export_formats="diffusers,kohya",
    )
    result = T.main(config)
    out = tmp_path / "run"
    adapter_file = out / "pytorch_lora_weights.safetensors"
    assert result["step"] == 40 and adapter_file.is_file() and (out / "loss.png").is_file()
    assert result["adapters"] == [str(adapter_file), str(out / "lora_kohya.safetensors")]
    # Validation ran mid-run and at the end, through the inference pipeline, and drew real images.
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert {"final_0.png", "final_1.png", "step000020_0.png"} <= set(samples), samples
    from PIL import Image

    final = np.asarray(Image.open(out / "samples" / "final_0.png"))
    assert final.shape == (64, 64, 3) and final.std() > 1

    batch = _eval_batch(pipe, two_images)
    adapter = load_adapter(str(adapter_file), pipe.params)
    kohya = _flax_deltas(load_adapter(str(out / "lora_kohya.safetensors"), pipe.params))
    for name, delta in _flax_deltas(adapter).items():  # both files carry the same trained weights
        np.testing.assert_allclose(kohya[name], delta, rtol=1e-5, atol=1e-8, err_msg=name)
    base_loss = _jax_eval_loss(pipe, None, *batch)
    lora_loss = _jax_eval_loss(pipe, adapter, *batch)
    assert lora_loss < 0.95 * base_loss, (base_loss, lora_loss)

    sd = StableDiffusionPipeline.from_pretrained(tiny_sd1_path, safety_checker=None)
    sd.scheduler = DDPMScheduler.from_config(sd.scheduler.config)
    torch_base = _torch_eval_loss(sd, *batch)
    sd.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    torch_lora = _torch_eval_loss(sd, *batch)
    np.testing.assert_allclose(torch_base, base_loss, rtol=2e-3)
    np.testing.assert_allclose(torch_lora, lora_loss, rtol=2e-3)
    assert torch_lora < 0.95 * torch_base, (torch_base, torch_lora)
    print(f"denoising loss base/LoRA: JAX {base_loss:.4f}/{lora_loss:.4f}, PyTorch {torch_base:.4f}/{torch_lora:.4f}")


def test_preempt_and_resume_equals_straight_run(tiny_sd1_path, two_images, tmp_path, monkeypatch):
    kw = dict(max_train_steps=6, checkpointing_steps=100, snr_gamma=5.0, noise_offset=0.05, random_flip=True,
              gradient_accumulation_steps=2)
    straight = T.main(_config(tiny_sd1_path, two_images, tmp_path / "straight", **kw))
    assert straight["step"] == 6

    # SIGTERM arrives while step 3 is loaded: the run saves step 3 and returns without an adapter.
    original = BatchLoader.batch

    def batch_then_sigterm(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step)

    monkeypatch.setattr(BatchLoader, "batch", batch_then_sigterm)
    first = T.main(_config(tiny_sd1_path, two_images, tmp_path / "resumed", **kw))
    monkeypatch.setattr(BatchLoader, "batch", original)
    assert first["preempted"] and first["step"] == 3
    assert not (tmp_path / "resumed" / "pytorch_lora_weights.safetensors").exists()
    meta = json.loads((tmp_path / "resumed" / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert meta["step"] == 3 and meta["data_position"] == 3 * 16

    second = T.main(_config(tiny_sd1_path, two_images, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    assert second["step"] == 6
    assert_same_adapter(tmp_path / "straight", tmp_path / "resumed")
    np.testing.assert_array_equal([l for _, l in straight["loss_history"]], [l for _, l in second["loss_history"]])


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_sd1_path, two_images, tmp_path):
    cfg = _config(tiny_sd1_path, two_images, tmp_path / "nan", max_train_steps=4, checkpointing_steps=2)
    T.main(cfg)
    good = sorted(os.listdir(tmp_path / "nan" / "checkpoints"))
    assert good == ["2", "4"]
    with pytest.raises(FloatingPointError, match="loss is nan at step 5.*last good checkpoint"):
        T.main(_config(tiny_sd1_path, two_images, tmp_path / "nan", max_train_steps=8, checkpointing_steps=2,
                       noise_offset=float("nan"), resume_from_checkpoint="latest"))
    assert sorted(os.listdir(tmp_path / "nan" / "checkpoints")) == good


def test_cli_splits_the_cpu_into_devices_with_memory_efficient_attention(tiny_sd1_path, two_images, tmp_path):
    out = tmp_path / "cpu2"
    cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "train_flax.py"),
           "--pretrained_model_name_or_path", tiny_sd1_path, "--train_data_dir", two_images, "--output_dir", str(out),
           "--resolution", "64", "--center_crop", "--train_batch_size", "1", "--max_train_steps", "2",
           "--report_to", "none", "--num_cpu_devices", "2", "--enable_xformers_memory_efficient_attention"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The conftest's 8 fake devices (XLA_FLAGS, inherited) give way to the flag: 2 devices, one row each.
    assert "2 devices (1 processes), global batch 2 x 1 accumulation, 2 steps" in proc.stderr
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_num_cpu_devices_after_jax_started_says_so():
    jax.devices()  # JAX has started in this process
    with pytest.raises(RuntimeError, match="--num_cpu_devices 3 cannot take effect.*JAX_NUM_CPU_DEVICES"):
        T.init_devices(TrainConfig(num_cpu_devices=3))
