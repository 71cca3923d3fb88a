"""DreamBooth (diffusers' train_dreambooth_lora.py flags): instance folders, class images sampled by our pipeline and
resumed, prior-preservation batches over several devices and processes, the loss arithmetic, and an end-to-end run
whose adapter lowers the instance images' loss in PyTorch diffusers."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from flax_lora import dreambooth as D
from flax_lora import train as T
from flax_lora.config import TrainConfig
from flax_lora.data import BatchLoader, build_tiny_dataset, load_prompt_folder, preprocess_image
from flax_lora.errors import MissingFileError, UserError
from flax_lora.tiny import TOKENIZER_MAX_LENGTH

torch = pytest.importorskip("torch")

INSTANCE_PROMPT = "a photo of sks shape"
CLASS_PROMPT = "a photo of a shape"


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    """Two shapes images; the folder's metadata.jsonl is not an image and is ignored."""
    return build_tiny_dataset(tmp_path_factory.mktemp("data") / "instance", num_images=2, resolution=64)


def _config(model, out, **kw) -> TrainConfig:
    base = dict(
        pretrained_model_name_or_path=model, output_dir=str(out), resolution=64, center_crop=True,
        train_batch_size=1, learning_rate=3e-3, lr_warmup_steps=0, rank=4, report_to="none", seed=0,
        cache_latents=True, cache_text_embeddings=True,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------- user errors


def test_bad_dreambooth_inputs_are_one_line_errors_before_any_model_loads(tmp_path, instance_dir):
    no_model = str(tmp_path / "no-model")  # never reached: each error comes first
    db = dict(instance_prompt=INSTANCE_PROMPT)
    with pytest.raises(MissingFileError, match=r"^--instance_data_dir .*missing does not exist$"):
        T.main(_config(no_model, tmp_path / "o", instance_data_dir=str(tmp_path / "missing"), **db))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"^--instance_data_dir .*empty holds no images; expected files ending in "):
        T.main(_config(no_model, tmp_path / "o", instance_data_dir=str(tmp_path / "empty"), **db))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match=r"^--class_data_dir .*a-file: .* is a file, not a folder$"):
        T.main(_config(no_model, tmp_path / "o", instance_data_dir=instance_dir, with_prior_preservation=True,
                       class_data_dir=str(tmp_path / "a-file"), class_prompt=CLASS_PROMPT, **db))  # fmt: skip
    assert not (tmp_path / "o").exists()
    flag_errors = {
        "--with_prior_preservation needs --class_prompt": dict(
            instance_data_dir=instance_dir, with_prior_preservation=True, class_data_dir="c", **db
        ),
        "--with_prior_preservation needs --class_data_dir": dict(
            instance_data_dir=instance_dir, with_prior_preservation=True, class_prompt=CLASS_PROMPT, **db
        ),
        "--instance_data_dir needs --instance_prompt": dict(instance_data_dir=instance_dir),
        "--instance_data_dir and --train_data_dir are two training sets": dict(
            instance_data_dir=instance_dir, train_data_dir=instance_dir, **db
        ),
        "--instance_prompt captions the --instance_data_dir images": dict(train_data_dir=instance_dir, **db),
        "--lora_dropout is not supported": dict(instance_data_dir=instance_dir, lora_dropout=0.1, **db),
        "--validation_images is not supported": dict(instance_data_dir=instance_dir, validation_images=["x.png"], **db),
        "--num_class_images and --sample_batch_size must be >= 1": dict(
            instance_data_dir=instance_dir, with_prior_preservation=True, class_data_dir="c", class_prompt="c",
            num_class_images=0, **db,
        ),
    }  # fmt: skip
    for message, kw in flag_errors.items():
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            _config("m", tmp_path / "o", **kw)
        assert "\n" not in str(e.value)
    notes = _config("m", tmp_path / "o", instance_data_dir=instance_dir, class_prompt="c", **db).ignored_flag_notes()
    assert notes == ["--class_prompt: used only with --with_prior_preservation; ignored"]  # diffusers warns too


# ----------------------------------------------------------------------------------------------- the loss


def test_prior_loss_weight_enters_the_loss_as_diffusers_dreambooth():
    rng = np.random.default_rng(0)
    pred, target = (jnp.asarray(rng.normal(size=(6, 4, 2, 2)), jnp.float32) for _ in range(2))
    t = jnp.array([10, 200, 900, 10, 500, 999])
    prior = jnp.array([0, 0, 0, 1, 1, 1], jnp.float32)
    schedule = T.NoiseSchedule(np.linspace(0.999, 0.01, 1000).astype(np.float32))
    mse = np.mean((np.asarray(pred) - np.asarray(target)) ** 2, axis=(1, 2, 3))
    for w in (0.0, 1.0, 2.5):
        got = T.diffusion_loss(pred, target, t, schedule, prior=prior, prior_loss_weight=w)
        np.testing.assert_allclose(got, mse[:3].mean() + w * mse[3:].mean(), rtol=1e-6)
        # min-SNR weights the instance half only (diffusers' SDXL DreamBooth script); the class half stays plain MSE
        s = np.asarray(schedule.alphas_cumprod)[np.asarray(t)]
        s = s / (1 - s)
        snr_w = np.minimum(s, 5.0) / s
        got = T.diffusion_loss(pred, target, t, schedule, 5.0, prior, w)
        np.testing.assert_allclose(got, (mse * snr_w)[:3].mean() + w * mse[3:].mean(), rtol=1e-6)
    # Without `prior` nothing changes: the same numbers as before DreamBooth
    before = ((pred - target) ** 2).mean((1, 2, 3)).mean()
    np.testing.assert_array_equal(T.diffusion_loss(pred, target, t, schedule), before)


def test_train_step_weighs_the_class_half_by_the_prior_loss_weight(tiny_sd1_path):
    from jax.sharding import Mesh

    from flax_lora.loading import load_pipeline
    from flax_lora.lora import UNET_TARGETS, LoraConfig, new_adapter

    pipe = load_pipeline(tiny_sd1_path)
    mesh = Mesh(np.asarray(jax.devices()).reshape(-1, 1), ("data", "fsdp"))
    configs = {"unet": LoraConfig(4, None, UNET_TARGETS)}
    lora = dict(new_adapter(jax.random.PRNGKey(0), pipe.params, configs["unet"]).params)
    rng = np.random.default_rng(0)
    text = T.encode_captions(pipe, [INSTANCE_PROMPT] * 8 + [CLASS_PROMPT] * 8, 16)["text_embeddings"]
    batch = {
        "latent_mean": rng.normal(size=(1, 16, 4, 8, 8)).astype(np.float32),
        "latent_std": np.full((1, 16, 4, 8, 8), 0.01, np.float32),
        "text_embeddings": text[None],
        "prior": np.tile(np.repeat(np.float32([0, 1]), 1), 8)[None],  # rows alternate instance / class
    }
    schedule = T.noise_schedule(pipe.scheduler_config)
    losses = {}
    for w in (0.0, 2.0):
        step = T.make_train_step(pipe, configs, optax.sgd(1e-3), schedule, mesh, prior_loss_weight=w)
        put = T.put_batch(batch, mesh, 16, list(range(16)))
        losses[w] = float(step.loss(lora, put, jax.random.PRNGKey(1)))
    plain = {k: v for k, v in batch.items() if k != "prior"}
    step = T.make_train_step(pipe, configs, optax.sgd(1e-3), schedule, mesh)
    mean = float(step.loss(lora, T.put_batch(plain, mesh, 16, list(range(16))), jax.random.PRNGKey(1)))
    # Same noise and timesteps in all three: instance mean + w x class mean, and the plain mean is half their sum.
    instance, prior = losses[0.0], (losses[2.0] - losses[0.0]) / 2
    assert prior > 0.1 * instance
    np.testing.assert_allclose(mean, (instance + prior) / 2, rtol=1e-5)


# -------------------------------------------------------------------------------------------- the batches


class _Tokenizer:
    def __call__(self, texts):
        return np.array([[len(t), hash(t) % 97] for t in texts], np.int32)


def _images(folder, n, color):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 32), (color, 10 * i, 0)).save(os.path.join(folder, f"{i:02d}.png"))
    return str(folder)


def test_prior_preservation_batches_split_evenly_over_devices_and_processes(tmp_path):
    instance = load_prompt_folder(_images(tmp_path / "i", 3, 200), INSTANCE_PROMPT, "--instance_data_dir")
    classes = load_prompt_folder(_images(tmp_path / "c", 5, 50), CLASS_PROMPT, "--class_data_dir")
    devices, per_device = 4, 2  # 4 devices, 2 instance + 2 class rows each: a batch of 16 rows

    def loader(rows, accum=2):
        base = BatchLoader(instance, _Tokenizer(), 32, devices * per_device, [0], accum=accum, seed=3)
        return D.add_class_examples(base, None, classes, rows, {})[0]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(jax, "device_count", lambda: devices)
        whole = loader(list(range(16)))
        halves = [loader(list(range(8))), loader(list(range(8, 16)))]  # two processes of two devices each
        batch = whole.batch(5)
        assert batch["pixel_values"].shape == (2, 16, 3, 32, 32)
        np.testing.assert_array_equal(batch["prior"][0], np.tile([0, 0, 1, 1], 4))  # each device: 2 + 2
        # A class row holds a class image (red 50) and its prompt; an instance row the instance ones (red 200)
        red = batch["pixel_values"][:, :, 0].mean(axis=(2, 3))
        assert np.all((red > 0) == (batch["prior"] == 0)), red
        prompt_length = np.where(batch["prior"], len(CLASS_PROMPT), len(INSTANCE_PROMPT))
        np.testing.assert_array_equal(batch["input_ids"][..., 0], prompt_length)
        for key in batch:  # the processes' rows put together are the single-process batch
            np.testing.assert_array_equal(np.concatenate([h.batch(5)[key] for h in halves], axis=1), batch[key])
        np.testing.assert_array_equal(loader(list(range(16))).batch(5)["pixel_values"], batch["pixel_values"])  # resume
    assert whole.steps_per_epoch == 1 and whole.num_examples == 8  # the larger set once: 5 class images, 8 per step
    with pytest.raises(ValueError, match="does not split evenly"):
        D.split_rows([0, 1], 6, 4)


# ------------------------------------------------------------------------------------------ end to end


def _instance_loss_torch(sd, folder, ids):
    """The denoising MSE of the instance images with fixed noise and timesteps, computed in PyTorch."""
    from tests.test_train import _torch_eval_loss

    data = load_prompt_folder(folder, INSTANCE_PROMPT, "--instance_data_dir")
    pixels = np.stack([preprocess_image(data.load_image(i), 64, True, False, None) for i in range(len(data))])
    t = np.array([50, 200, 400, 600, 800], np.int32)
    pixels, t = np.repeat(pixels, len(t), 0), np.tile(t, len(data))
    noise = torch.Generator().manual_seed(0)
    noise = torch.randn((len(t), 4, 8, 8), generator=noise).numpy()
    return _torch_eval_loss(sd, pixels, {"input_ids": np.repeat(ids, len(t), 0)}, t, noise)


def test_dreambooth_samples_class_images_trains_and_the_adapter_lowers_the_loss_in_pytorch(
    tiny_sd1_path, instance_dir, tmp_path, caplog, monkeypatch
):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    monkeypatch.setattr(D, "CLASS_SAMPLING_STEPS", 10)  # diffusers' 50 take 5x as long and test nothing more

    class_dir = tmp_path / "class"
    config = _config(
        tiny_sd1_path, tmp_path / "run", instance_data_dir=instance_dir, instance_prompt=INSTANCE_PROMPT,
        with_prior_preservation=True, class_data_dir=str(class_dir), class_prompt=CLASS_PROMPT, num_class_images=3,
        sample_batch_size=1, max_train_steps=40, checkpointing_steps=1000, prior_loss_weight=0.5,
    )  # fmt: skip
    with caplog.at_level("INFO"):
        result = T.main(config)
    assert any(r.getMessage().startswith("sampling 3 class images of 'a photo of a shape'") and "10 steps, guidance 7.5"
               in r.getMessage() for r in caplog.records)  # fmt: skip
    names = sorted(os.listdir(class_dir))
    assert names == ["class-00000.png", "class-00001.png", "class-00002.png"]  # no temporary files left
    first = [np.asarray(Image.open(class_dir / n)) for n in names]
    assert first[0].shape == (64, 64, 3) and first[0].std() > 1  # the model's size, a real sample
    assert result["step"] == 40

    card = (tmp_path / "run" / "README.md").read_text()
    assert f"instance_prompt: {INSTANCE_PROMPT}" in card and "# LoRA DreamBooth: run" in card
    assert f"captioned `{INSTANCE_PROMPT}` with [DreamBooth]" in card and f"`{CLASS_PROMPT}`" in card

    sd = StableDiffusionPipeline.from_pretrained(tiny_sd1_path, safety_checker=None)
    sd.scheduler = DDPMScheduler.from_config(sd.scheduler.config)
    ids = sd.tokenizer([INSTANCE_PROMPT], padding="max_length", truncation=True, max_length=TOKENIZER_MAX_LENGTH)
    ids = ids.input_ids
    base = _instance_loss_torch(sd, instance_dir, np.asarray(ids))
    sd.load_lora_weights(str(tmp_path / "run"), weight_name="pytorch_lora_weights.safetensors")
    tuned = _instance_loss_torch(sd, instance_dir, np.asarray(ids))
    assert tuned < 0.95 * base, (base, tuned)
    print(f"instance images' denoising loss in PyTorch: base {base:.4f}, DreamBooth LoRA {tuned:.4f}")

    # A run killed while sampling keeps the images it finished; the rerun samples only the missing ones, the same
    # images again (each from (seed, its number) alone), and leaves the others untouched.
    from flax_lora.loading import load_pipeline
    from flax_lora.sharding import make_mesh

    untouched = os.stat(class_dir / names[1]).st_mtime_ns
    os.remove(class_dir / names[0])
    os.remove(class_dir / names[2])
    pipe, write = load_pipeline(tiny_sd1_path), D._write_image

    def killed_at_the_second_image(path, image):
        if os.path.basename(path) == names[2]:
            (class_dir / f".{names[2]}.tmp").write_bytes(b"half a png")
            raise KeyboardInterrupt
        write(path, image)

    with pytest.MonkeyPatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(D, "_write_image", killed_at_the_second_image)
        D.prepare_class_images(config, pipe, make_mesh())
    assert sorted(os.listdir(class_dir)) == [f".{names[2]}.tmp", names[0], names[1]]
    with caplog.at_level("INFO"):
        caplog.clear()
        data = D.prepare_class_images(config, pipe, make_mesh())
    assert any(r.getMessage().startswith("sampling 1 class images") for r in caplog.records)
    assert sorted(os.listdir(class_dir)) == names  # the unfinished file is gone
    assert os.stat(class_dir / names[1]).st_mtime_ns == untouched
    for name, image in zip(names, first):
        diff = np.abs(np.asarray(Image.open(class_dir / name)).astype(int) - image).max()
        assert diff <= 2, (name, diff)  # identical here; a last-bit difference of another platform is allowed
    assert len(data) == 3 and data.captions(0) == [CLASS_PROMPT]


def test_missing_class_images_count_the_users_own_images(tmp_path):
    _images(tmp_path, 2, 0)  # 00.png, 01.png
    Image.new("RGB", (8, 8)).save(tmp_path / D.class_image_name(1))
    (tmp_path / ".class-00000.png.tmp").write_bytes(b"")  # neither counts nor blocks its number
    (tmp_path / "notes.txt").write_text("")
    assert D.missing_class_images(str(tmp_path), 6) == [0, 2, 3]
    assert D.missing_class_images(str(tmp_path), 3) == []
    assert D.missing_class_images(str(tmp_path / "new"), 2) == [0, 1]
