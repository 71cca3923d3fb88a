"""SDXL on a tiny PyTorch-saved pipeline: size ids of each crop, generation and training against PyTorch diffusers."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from flax_lora import train as T
from flax_lora.data import build_tiny_dataset, crop_image, load_image_folder, mirrored_size_ids, resized_size
from flax_lora.formats import load_adapter, save_adapter
from flax_lora.inference import FlaxLoraPipeline
from flax_lora.loading import load_pipeline
from tests.test_inference import ONE_LEVEL, _random_adapter
from tests.test_train import _config, _eval_batch, _jax_eval_loss, _torch_eval_loss

torch = pytest.importorskip("torch")
PROMPTS = ["a red square", "a blue circle on green"]


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path):
    return FlaxLoraPipeline.from_pretrained(tiny_sdxl_path)


def _torch_sdxl(path: str):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_size_ids_name_the_crop_of_the_resized_flipped_image():
    """original size, crop top-left in the resized (and flipped) image, target size: diffusers' SDXL script's ids."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (48, 80, 3), np.uint8))  # 80 wide, 48 high
    new_w, new_h = resized_size(80, 48, 32)
    assert (new_w, new_h) == (53, 32)  # the long side truncated, as torchvision's Resize
    resized = np.asarray(img.resize((new_w, new_h), Image.BILINEAR), np.float32) / 127.5 - 1
    seen_flip = seen_plain = False
    for seed in range(12):
        pixels, ids = crop_image(img, 32, center_crop=False, random_flip=True, rng=np.random.default_rng(seed))
        h, w, top, left, target_h, target_w = ids.astype(int)
        assert (h, w, target_h, target_w) == (48, 80, 32, 32) and top == 0 and 0 <= left <= new_w - 32
        plain = resized[top : top + 32, left : left + 32].transpose(2, 0, 1)
        flipped = resized[:, ::-1][top : top + 32, left : left + 32].transpose(2, 0, 1)
        if np.allclose(pixels, flipped):
            seen_flip = True
            # The cached-latent path flips a crop: its ids name the same region measured in the flipped image.
            mirror = mirrored_size_ids(ids)
            np.testing.assert_array_equal(mirror[[0, 1, 2, 4, 5]], ids[[0, 1, 2, 4, 5]])
            m = int(mirror[3])
            np.testing.assert_allclose(resized[:, ::-1][:, m : m + 32], resized[:, new_w - m - 32 : new_w - m][:, ::-1])
            np.testing.assert_allclose(resized[:, left : left + 32][:, ::-1], resized[:, ::-1][:, new_w - left - 32 : new_w - left])
        else:
            np.testing.assert_allclose(pixels, plain)
            seen_plain = True
    assert seen_flip and seen_plain
    _, centre = crop_image(img, 32, center_crop=True, random_flip=False, rng=np.random.default_rng(0))
    assert tuple(centre) == (48, 80, 0, round((53 - 32) / 2), 32, 32)  # torchvision's CenterCrop rounds


@pytest.mark.parametrize(
    # The diffusers file's outputs per component are compared in test_formats_sdxl.py; here a whole generation.
    "adapter_format,negative", [(None, None), ("kohya", "blurry")]
)
def test_sdxl_images_match_pytorch(sdxl, tiny_sdxl_path, adapter_format, negative, tmp_path):
    """Same init latents, Euler, guidance 5: both encoders, pooled embeds, size ids and LoRAs as PyTorch applies them."""
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    reference = _torch_sdxl(tiny_sdxl_path)
    sdxl.unload_loras()
    if adapter_format is not None:
        adapter = _random_adapter(sdxl, base_model=tiny_sdxl_path, std=0.2)
        assert set(adapter.params) == {"unet", "text_encoder", "text_encoder_2"}
        path = save_adapter(adapter, tmp_path, format=adapter_format, base_params=sdxl.pipe.params)
        sdxl.load_lora(path)
        reference.load_lora_weights(str(tmp_path), weight_name=path.rsplit("/", 1)[-1])
    kwargs = dict(negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0)
    ours = sdxl(PROMPTS, latents=latents, **kwargs)
    with torch.no_grad():
        theirs = reference(PROMPTS, latents=torch.from_numpy(latents), height=64, width=64, output_type="np", **kwargs).images
    diff = np.abs(ours - theirs)
    print(adapter_format, negative, f"mean {diff.mean():.1e} max {diff.max():.1e}")
    assert diff.mean() < ONE_LEVEL and diff.max() < 4 * ONE_LEVEL
    if adapter_format is not None:  # the LoRA changed the image, so the comparison saw it
        sdxl.unload_loras()
        assert np.abs(sdxl(PROMPTS, latents=latents, **kwargs) - ours).mean() > 5 * ONE_LEVEL


def test_cached_text_is_the_prompt_encoding(sdxl, tmp_path):
    """--cache_text_embeddings stores what the step would compute: both encoders' states and the pooled embeds."""
    data = load_image_folder(build_tiny_dataset(tmp_path / "data", num_images=3, resolution=64))
    cache = T.cache_text(sdxl.pipe, data, batch=2)
    context, pooled = sdxl.pipe.encode_prompt(sdxl.pipe.params, sdxl.pipe.tokenize([data.captions(i)[0] for i in range(3)]))
    np.testing.assert_allclose(cache["text_embeddings"], context, atol=1e-6)
    np.testing.assert_allclose(cache["pooled_text_embeddings"], pooled, atol=1e-6)
    length = sdxl.pipe.tokenizer.model_max_length
    assert cache["text_embeddings"].shape == (3, length, 32 + 48) and cache["pooled_text_embeddings"].shape == (3, 48)


def test_sdxl_training_lowers_loss_and_pytorch_agrees(tiny_sdxl_path, tmp_path):
    """Both text encoders and the UNet trained; diffusers and kohya files lower PyTorch's loss exactly as ours."""
    from diffusers import DDPMScheduler

    data = build_tiny_dataset(tmp_path / "data", num_images=2, resolution=64)
    config = _config(
        tiny_sdxl_path, data, tmp_path / "run", max_train_steps=20, learning_rate=1e-2, checkpointing_steps=1000,
        train_text_encoder=True, cache_text_embeddings=False, random_flip=True, export_formats="diffusers,kohya",
    )
    result = T.main(config)
    out = tmp_path / "run"
    assert result["step"] == 20
    pipe = load_pipeline(tiny_sdxl_path)
    adapter = load_adapter(result["adapters"][0], pipe.params)
    assert set(adapter.params) == {"unet", "text_encoder", "text_encoder_2"}
    batch = _eval_batch(pipe, data)
    base_loss, lora_loss = _jax_eval_loss(pipe, None, *batch), _jax_eval_loss(pipe, adapter, *batch)
    assert lora_loss < 0.95 * base_loss, (base_loss, lora_loss)
    for path in result["adapters"]:
        reference = _torch_sdxl(tiny_sdxl_path)
        reference.scheduler = DDPMScheduler.from_config(reference.scheduler.config)
        torch_base = _torch_eval_loss(reference, *batch)
        reference.load_lora_weights(str(out), weight_name=path.rsplit("/", 1)[-1])
        torch_lora = _torch_eval_loss(reference, *batch)
        np.testing.assert_allclose([torch_base, torch_lora], [base_loss, lora_loss], rtol=2e-3, err_msg=path)
    print(f"SDXL denoising loss base/LoRA: JAX {base_loss:.4f}/{lora_loss:.4f}, PyTorch {torch_base:.4f}/{torch_lora:.4f}")


def test_another_vae_replaces_the_pipelines(tiny_sdxl_path, tiny_sd1_path, tmp_path):
    """--pretrained_vae_model_name_or_path: an AutoencoderKL folder or a pipeline folder's vae; a missing one is named."""
    from flax_lora.errors import MissingFileError

    other = load_pipeline(tiny_sd1_path).params["vae"]
    standalone = tmp_path / "vae"
    shutil.copytree(Path(tiny_sd1_path) / "vae", standalone)
    for source in (str(standalone), tiny_sd1_path):
        swapped = load_pipeline(tiny_sdxl_path, vae=source).params["vae"]
        for a, b in zip(jax.tree.leaves(swapped), jax.tree.leaves(other)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(MissingFileError, match="VAE folder .*nowhere does not exist"):
        load_pipeline(tiny_sdxl_path, vae=str(tmp_path / "nowhere"))
