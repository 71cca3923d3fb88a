"""Tiny Stable Diffusion pipelines built locally with PyTorch diffusers, for tests and the built-in default.

No model hub is needed: every component is randomly initialised from a small config and saved with
`save_pretrained` (safetensors), so the loading code under test is the same one that reads real checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TINY_KINDS = ("sd1", "sd2")
_TOKENIZER_MAX_LENGTH = 16
# The noise schedule every Stable Diffusion 1.x/2.x scheduler config shares.
SD_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    steps_offset=1,
)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, done_file: str) -> Iterator[Path]:
    """A fresh folder beside `target` that replaces it only when the block succeeds; a crash leaves nothing.

    `done_file` names a file of a finished folder, so a concurrent builder that published first is not an error.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        yield tmp
        if target.is_dir():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / done_file).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_tokenizer(out_dir: Path) -> None:
    """Write a byte-level CLIP tokenizer with no merges (one token per character)."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=_TOKENIZER_MAX_LENGTH,
    )
    tokenizer.save_pretrained(str(out_dir))


def tiny_unet_config(kind: str) -> dict:
    """UNet2DConditionModel kwargs of a tiny SD1-style or SD2-style UNet."""
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    if kind == "sd2":
        # SD 2.x: Linear proj_in/proj_out and a head dim per block.
        config.update(use_linear_projection=True, attention_head_dim=(4, 8))
    return config


def build_tiny_pipeline(out_dir: str | os.PathLike, kind: str = "sd1", seed: int = 0) -> str:
    """Build and save a tiny PyTorch diffusers pipeline (64 px images, 8x8 latents); return its folder."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {TINY_KINDS}")
    out = Path(out_dir)
    if (out / "model_index.json").exists():
        return str(out)
    try:
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError as e:  # torch is a test/dev extra
        raise ImportError(f"building a tiny pipeline needs PyTorch: pip install torch==2.13.0 ({e})") from e

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(kind))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_TOKENIZER_MAX_LENGTH,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    text_encoder = CLIPTextModel(text_config)
    # The schedulers the real checkpoints ship: SD 1.5 PNDM (epsilon), SD 2.x DDIM (v_prediction).
    if kind == "sd2":
        scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, prediction_type="v_prediction")
    else:
        scheduler = PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True)
    with atomic_directory(out, "model_index.json") as tmp:
        _save_pipeline(tmp, unet, vae, text_encoder, scheduler)
    return str(out)


def _save_pipeline(folder: Path, unet, vae, text_encoder, scheduler) -> None:
    """Assemble a StableDiffusionPipeline with the local tokenizer and save it as safetensors."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    _write_tokenizer(folder / "tokenizer")
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
